#!/usr/bin/env bash
# A Ray cluster on this machine with token authentication on: one head and, with --workers N,
# N more nodes (each its own raylet). The dashboard and job API listen on 127.0.0.1 only; Ray's
# other ports (GCS, raylets, agents) listen on every interface, as Ray's always do, and refuse
# clients without the token. Used by docs/cluster.md and tests/test_cluster_files.py.
#
#   cluster/local.sh start [--workers N] [--port P] [--dashboard-port D] [--num-cpus C] [-- RAY_START_ARGS...]
#   cluster/local.sh status [--port P]
#   cluster/local.sh stop [--port P]
#   cluster/local.sh token
#
# The token: $RAY_AUTH_TOKEN_PATH, else ~/.ray/auth_token (where Ray looks by default); made
# (64 hex characters, as `ray get-auth-token --generate` makes) if missing, and chmod 600
# either way (Ray itself writes it with the default umask). `token` does only that, and prints
# the file's path: the cloud clusters in cluster/ copy that file to their nodes. Every process
# of the cluster runs with RAY_AUTH_MODE=token and that file; a client (`ray job submit`, `ray
# status`) needs both too, or its requests are refused.
#
# `stop` stops this cluster only: SIGTERM to each `ray start --block` it launched (which stops
# that node's processes), then SIGKILL whatever is left in those processes' sessions. It never
# runs `ray stop`, which would stop every Ray process on the machine.
#
# State (pids, logs, each node's Ray temp dir) lives in $RAYLM_LOCAL_DIR, default /tmp/raylm-local-<port>
# (short: Ray's socket paths have a length limit). `ray` is $RAY, else the one on PATH; the
# nodes run with this environment, so activate the virtualenv that has raylm first.
set -euo pipefail

RAY="${RAY:-ray}"
HOST=127.0.0.1
START_TIMEOUT_S="${RAYLM_LOCAL_START_TIMEOUT_S:-180}"

die() { echo "cluster/local.sh: error: $*" >&2; exit 2; }

usage() {
    sed -n '7,10p' "$0" | sed 's/^# *//' >&2
    exit 2
}

ray_python() {
    local ray_path
    ray_path="$(command -v "$RAY")" || die "no '$RAY' on PATH (activate the virtualenv, or set RAY=/path/to/ray)"
    local beside
    beside="$(dirname "$ray_path")/python"
    if [[ -x "$beside" ]]; then echo "$beside"; else echo python3; fi
}

free_port() {
    "$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# http_status URL [TOKEN_FILE]: the HTTP status of a GET (with the token of TOKEN_FILE), or 000
# if nothing answers. The token is read from the file, never put on a command line (ps shows those).
http_status() {
    "$PY" - "$@" <<'EOF'
import sys, urllib.error, urllib.request
req = urllib.request.Request(sys.argv[1])
if len(sys.argv) > 2:
    req.add_header("Authorization", "Bearer " + open(sys.argv[2]).read().strip())
try:
    with urllib.request.urlopen(req, timeout=5) as r:
        print(r.status)
except urllib.error.HTTPError as e:
    print(e.code)
except Exception:
    print("000")
EOF
}

alive() { [[ -n "${1:-}" ]] && kill -0 "$1" 2>/dev/null; }

session_pids() {  # live processes of session $1
    ps -e -o pid=,sid=,stat= | awk -v sid="$1" '$2 == sid && $3 !~ /^Z/ { print $1 }'
}

ensure_token() {
    local file="$1"
    if [[ ! -s "$file" ]]; then
        # A directory made here is private; an existing one (~/.ray, /tmp) keeps its mode.
        [[ -d "$(dirname "$file")" ]] || (umask 077 && mkdir -p "$(dirname "$file")")
        (umask 077 && "$PY" -c 'import secrets, sys; sys.stdout.write(secrets.token_hex(32))' > "$file")
        echo "wrote a new token to $file"
    fi
    chmod 600 "$file"
}

# launch NAME LOG ARGS...: `ray start --block ARGS` in a session of its own, in the background.
launch() {
    local name="$1" log="$2"
    shift 2
    setsid "$RAY" start --block "$@" > "$log" 2>&1 < /dev/null &
    local pid=$!
    echo "$pid" > "$STATE/$name.pid"
    # setsid runs the command in this same process (it is no group leader), so pid == session id.
}

wait_started() {  # NAME LOG
    local name="$1" log="$2" pid deadline=$((SECONDS + START_TIMEOUT_S))
    pid="$(cat "$STATE/$name.pid")"
    until grep -q "Ray runtime started" "$log" 2>/dev/null; do
        alive "$pid" || { tail -n 40 "$log" >&2; die "$name: ray start exited (log: $log)"; }
        (( SECONDS < deadline )) || { tail -n 40 "$log" >&2; die "$name: not started in ${START_TIMEOUT_S} s (log: $log)"; }
        sleep 0.5
    done
}

wait_http() {  # WHAT URL WANT [TOKEN_FILE]
    local what="$1" url="$2" want="$3" token_file="${4:-}" code deadline=$((SECONDS + START_TIMEOUT_S))
    while :; do
        code="$(http_status "$url" ${token_file:+"$token_file"})"
        [[ "$code" == "$want" ]] && return 0
        (( SECONDS < deadline )) || die "$what did not answer $want at $url in ${START_TIMEOUT_S} s (last: $code)"
        sleep 1
    done
}

parse_common() {
    PORT=6379; DASHBOARD_PORT=8265; WORKERS=0; NUM_CPUS=""; EXTRA=()
    while (( $# )); do
        case "$1" in
            --port) PORT="${2:?--port needs a value}"; shift 2 ;;
            --dashboard-port) DASHBOARD_PORT="${2:?--dashboard-port needs a value}"; shift 2 ;;
            --workers) WORKERS="${2:?--workers needs a value}"; shift 2 ;;
            --num-cpus) NUM_CPUS="${2:?--num-cpus needs a value}"; shift 2 ;;
            --) shift; EXTRA=("$@"); break ;;
            *) usage ;;
        esac
    done
    [[ "$PORT" =~ ^[0-9]+$ ]] || die "--port must be a number, got '$PORT'"
    [[ "$DASHBOARD_PORT" =~ ^[0-9]+$ ]] || die "--dashboard-port must be a number, got '$DASHBOARD_PORT'"
    [[ "$WORKERS" =~ ^[0-9]+$ ]] || die "--workers must be a whole number, got '$WORKERS'"
    STATE="${RAYLM_LOCAL_DIR:-/tmp/raylm-local-$PORT}"
}

start_failed() {
    local f
    echo "cluster/local.sh: start failed; stopping the nodes it started (logs: $STATE)" >&2
    for f in "$STATE"/*.pid; do [[ -e "$f" ]] && stop_node "$(basename "$f" .pid)"; done
}

cmd_start() {
    parse_common "$@"
    PY="$(ray_python)"
    TOKEN_FILE="${RAY_AUTH_TOKEN_PATH:-$HOME/.ray/auth_token}"
    if [[ -f "$STATE/head.pid" ]] && alive "$(cat "$STATE/head.pid")"; then
        die "a cluster from this script already runs on port $PORT ($STATE); stop it first: $0 stop --port $PORT"
    fi
    rm -rf "$STATE"
    mkdir -p "$STATE"
    trap start_failed EXIT  # a start that fails stops what it started (the logs stay in $STATE)
    ensure_token "$TOKEN_FILE"

    export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH="$TOKEN_FILE"
    unset RAY_AUTH_TOKEN RAY_ADDRESS  # the file is the one source; never join another cluster
    export RAY_USAGE_STATS_ENABLED=0
    # Small machines: keep more idle workers alive than CPUs (docs/cluster.md, "Sizing").
    export RAY_num_workers_soft_limit="${RAY_num_workers_soft_limit:-16}"
    local cpus=() node=(--node-ip-address="$HOST" --disable-usage-stats)
    [[ -n "$NUM_CPUS" ]] && cpus=(--num-cpus="$NUM_CPUS")

    # Every port of its own (another Ray instance on this machine may hold the defaults).
    local agent_port
    agent_port="$(free_port)"
    echo "$agent_port" > "$STATE/head.agent_port"
    launch head "$STATE/head.log" --head --port="$PORT" \
        --dashboard-host="$HOST" --dashboard-port="$DASHBOARD_PORT" --include-dashboard=true \
        --ray-client-server-port="$(free_port)" --dashboard-agent-listen-port="$agent_port" \
        --dashboard-agent-grpc-port="$(free_port)" --metrics-export-port="$(free_port)" \
        --runtime-env-agent-port="$(free_port)" --temp-dir="$STATE/head" "${node[@]}" "${cpus[@]}" "${EXTRA[@]}"
    echo "$PORT $DASHBOARD_PORT $WORKERS" > "$STATE/ports"
    echo "$TOKEN_FILE" > "$STATE/token_path"
    wait_started head "$STATE/head.log"

    # Each node has a temp dir of its own, as on separate machines: a shared one would make the
    # nodes share the unpacked working_dir of a job, and a worker node that drops its copy when
    # its tasks end would delete the directory the job's driver on the head runs in.
    # One node at a time: a raylet has 30 s to register with the GCS (Ray's node.py), which a
    # small, busy machine can miss when several start at once; a worker that misses it gets one
    # more try.
    local i try
    for (( i = 1; i <= WORKERS; i++ )); do
        for try in 1 2; do
            agent_port="$(free_port)"
            echo "$agent_port" > "$STATE/worker-$i.agent_port"
            launch "worker-$i" "$STATE/worker-$i.log" --address="$HOST:$PORT" \
                --dashboard-agent-listen-port="$agent_port" --dashboard-agent-grpc-port="$(free_port)" \
                --metrics-export-port="$(free_port)" --runtime-env-agent-port="$(free_port)" \
                --temp-dir="$STATE/w$i" "${node[@]}" "${cpus[@]}" "${EXTRA[@]}"
            if (( try == 2 )); then wait_started "worker-$i" "$STATE/worker-$i.log"; break; fi
            (wait_started "worker-$i" "$STATE/worker-$i.log") 2>/dev/null && break
            stop_node "worker-$i"
            mv "$STATE/worker-$i.log" "$STATE/worker-$i.log.1"
            echo "worker-$i did not start (log: $STATE/worker-$i.log.1); trying once more" >&2
        done
    done

    # Ready for jobs: the job API answers with the token, and every node's agent is up.
    local dashboard="http://$HOST:$DASHBOARD_PORT"
    wait_http "the job API" "$dashboard/api/jobs/" 200 "$TOKEN_FILE"
    for f in "$STATE"/*.agent_port; do
        wait_http "the agent of $(basename "$f" .agent_port)" "http://$HOST:$(cat "$f")/api/local_raylet_healthz" 200
    done
    [[ "$(http_status "$dashboard/api/jobs/")" == 401 ]] || die "the job API answered a request without the token"

    trap - EXIT
    local client_env="export RAY_AUTH_MODE=token"
    [[ "$TOKEN_FILE" != "$HOME/.ray/auth_token" ]] && client_env+=" RAY_AUTH_TOKEN_PATH=$TOKEN_FILE"
    cat <<EOF
Ray cluster up: 1 head + $WORKERS worker node(s) on this machine, token authentication on.
  GCS                      $HOST:$PORT
  dashboard and job API    $dashboard (this machine only)
  token                    $TOKEN_FILE (mode 600)
Submit from the repository root (clients need the token: without it they are refused):
  $client_env
  RAY_ADDRESS=$dashboard ray job submit --working-dir . -- raylm train configs/debug.yaml
Stop it: $0 stop --port $PORT
EOF
}

cmd_status() {
    parse_common "$@"
    PY="$(ray_python)"
    [[ -f "$STATE/ports" ]] || die "no cluster from this script on port $PORT ($STATE)"
    read -r PORT DASHBOARD_PORT WORKERS < "$STATE/ports"
    local f name pid
    for f in "$STATE"/*.pid; do
        name="$(basename "$f" .pid)"; pid="$(cat "$f")"
        if alive "$pid"; then echo "$name: running (pid $pid)"; else echo "$name: not running"; fi
    done
    echo "job API http://$HOST:$DASHBOARD_PORT, auth mode: $("$PY" - "http://$HOST:$DASHBOARD_PORT/api/authentication_mode" <<'EOF'
import json, sys, urllib.request
try:
    print(json.load(urllib.request.urlopen(sys.argv[1], timeout=5)).get("authentication_mode"))
except Exception as e:
    print(f"unreachable ({e})")
EOF
)"
    RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH="$(cat "$STATE/token_path")" "$RAY" status --address="$HOST:$PORT"
}

stop_node() {  # NAME
    local f="$STATE/$1.pid" pid deadline
    [[ -f "$f" ]] || return 0
    pid="$(cat "$f")"
    if alive "$pid"; then
        kill -TERM "$pid" 2>/dev/null || true
        deadline=$((SECONDS + 30))
        while alive "$pid" && (( SECONDS < deadline )); do sleep 0.5; done
    fi
    deadline=$((SECONDS + 30))
    local left
    while left="$(session_pids "$pid")" && [[ -n "$left" ]]; do
        (( SECONDS < deadline )) || die "$1: processes of session $pid left: $left"
        # shellcheck disable=SC2086
        kill -KILL $left 2>/dev/null || true
        sleep 0.5
    done
    rm -f "$f"
}

cmd_stop() {
    parse_common "$@"
    if [[ ! -d "$STATE" ]]; then echo "no cluster from this script on port $PORT"; return 0; fi
    local f
    for f in "$STATE"/worker-*.pid; do [[ -e "$f" ]] && stop_node "$(basename "$f" .pid)"; done
    stop_node head
    rm -rf "$STATE"
    echo "stopped the cluster on port $PORT"
}

cmd_token() {
    (( $# == 0 )) || usage
    PY="$(ray_python)"
    local file="${RAY_AUTH_TOKEN_PATH:-$HOME/.ray/auth_token}"
    ensure_token "$file" >&2
    echo "$file"
}

case "${1:-}" in
    start) shift; cmd_start "$@" ;;
    token) shift; cmd_token "$@" ;;
    status) shift; cmd_status "$@" ;;
    stop) shift; cmd_stop "$@" ;;
    *) usage ;;
esac
