#!/usr/bin/env bash
# Several Ray hosts on one Linux machine, each with its own address, disk, processes and hostname,
# made of namespaces: a way to try (and test) a multi-node raylm cluster on one box. Needs root.
#
#   cluster/hosts.sh up N [--cpus C]     N hosts: h0 (Ray head + moto_server, the cluster's S3) and
#                                        h1..h(N-1) (Ray workers), plus `client` (no Ray; submits jobs)
#   cluster/hosts.sh down                remove every host, link and process this script made
#   cluster/hosts.sh exec HOST CMD...    run CMD on HOST (with the cluster's env: RAY_ADDRESS, token, S3)
#   cluster/hosts.sh list                the hosts, their addresses and whether their Ray is up
#   cluster/hosts.sh cut HOST | heal HOST      take HOST's network link down / up (no process dies)
#   cluster/hosts.sh crash HOST                SIGKILL every process of HOST at once
#   cluster/hosts.sh revive HOST               boot a crashed HOST again (its Ray rejoins)
#   cluster/hosts.sh add HOST [--cpus C] [--gpus G] [--resources JSON]   one more worker host (hK, K < 100)
#   cluster/hosts.sh remove HOST               remove one worker host: its processes, namespaces, link, disk
#   cluster/hosts.sh up 1 --autoscale YAML     the head with Ray's autoscaler on YAML (provider:
#                                        cluster/hosts_provider.py), no worker hosts: it adds and removes them
#
# Each host is a network namespace on a bridge (in a hub namespace of its own) with an address in
# 198.18.0.0/24 (RFC 2544's range for network tests), no default route and no NAT: no packet can
# leave the machine, and the machine's own namespace cannot reach the hosts either. Each host also
# has its own PID, mount and UTS namespace: PID 1 is a reaper; /tmp, /var/tmp, /dev/shm and HOME are
# the host's own disk ($STATE/HOST/disk, private tmpfs for /dev/shm); the checkout and its
# virtualenv are visible read-only; every host has the same hostname (`raylm-host`) and maps it to
# 127.0.0.1, as many cloud images do, so nothing may rely on the hostname's address.
#
# Ray: token authentication on (the token is copied to each host's disk, as a cloud would install a
# secret); the head's dashboard and job API listen on the head's own address only; every host has a
# custom resource `host_<name>` (1 unit), so a run can pin one worker per host. A supervisor on each
# host restarts its Ray node when it exits (a node the GCS marked dead after a partition rejoins as
# a new node, as a cloud's node supervisor would restart it). `ray stop` is never run: a host's
# processes stop when its PID namespace's init dies.
#
# The autoscaler on these hosts (`up --autoscale`, cluster/hosts-autoscaler.yaml): the head's Ray
# starts with --autoscaling-config, and its autoscaler (on h0, inside h0's namespaces) uses
# cluster/hosts_provider.py, a NodeProvider whose nodes are hosts of this set. A host cannot make its
# siblings (its mount and PID namespaces are its own), so creating and removing hosts is this
# machine's job, as it is a cloud's: `up --autoscale` also starts, on the machine, the set's host API
# (`python cluster/hosts_provider.py serve`), which listens on a Unix socket that h0 sees as
# /tmp/hosts-api.sock and runs `add`/`remove` for the provider. `down` stops it first.
#
# Env: RAYLM_HOSTS_PREFIX (default rl; namespaces are PREFIX-hub, PREFIX-h0, ..., so several sets of
# hosts can be up at once), RAYLM_HOSTS_DIR (state and the hosts' disks: DIR/PREFIX/HOST/disk; default
# /var/lib/raylm-hosts; not under /tmp, and hidden from the hosts), RAYLM_HOSTS_SUBNET (default
# 198.18.0), RAYLM_HOSTS_PYTHON (the interpreter with raylm and Ray; default the checkout's .venv),
# RAYLM_HOSTS_ENV (extra VAR=value words for every process on the hosts, e.g. Ray's health-check
# settings "RAY_health_check_period_ms=1000 RAY_health_check_failure_threshold=5": docs/elastic.md).
set -euo pipefail

PREFIX="${RAYLM_HOSTS_PREFIX:-rl}"
BASE="${RAYLM_HOSTS_DIR:-/var/lib/raylm-hosts}"
STATE="$BASE/$PREFIX"
SUBNET="${RAYLM_HOSTS_SUBNET:-198.18.0}"
REPO="$(cd "$(dirname "$0")/.." && pwd)"
SELF="$REPO/cluster/hosts.sh"
RAY_PORT=6379
DASH_PORT=8265
S3_PORT=5000
START_TIMEOUT_S="${RAYLM_HOSTS_START_TIMEOUT_S:-240}"

die() { echo "cluster/hosts.sh: error: $*" >&2; exit 2; }

python_bin() {
    local py="${RAYLM_HOSTS_PYTHON:-}"
    if [[ -z "$py" ]]; then
        if [[ -x "$REPO/.venv/bin/python" ]]; then py="$REPO/.venv/bin/python"; else py="$(command -v python3)"; fi
    fi
    echo "$py"
}

host_index() {  # h0 -> 0, h3 -> 3, client -> 100
    case "$1" in
        client) echo 100 ;;
        h[0-9]*) echo "${1#h}" ;;
        *) die "unknown host '$1' (hosts are h0..hN and client)" ;;
    esac
}
host_addr() { echo "$SUBNET.$(( $(host_index "$1") + 1 ))"; }
netns() { echo "$PREFIX-$1"; }
init_pid() { cat "$STATE/$1/pid" 2>/dev/null || true; }
alive() { local p; p="$(init_pid "$1")"; [[ -n "$p" ]] && kill -0 "$p" 2>/dev/null; }

need_root() {
    [[ "$(id -u)" == 0 ]] || die "needs root (network, mount and PID namespaces)"
    command -v ip >/dev/null || die "needs 'ip' (iproute2)"
    command -v unshare >/dev/null && command -v nsenter >/dev/null || die "needs 'unshare' and 'nsenter' (util-linux)"
}

# --- inside a host: PID 1 ------------------------------------------------------------------
host_init() {  # runs as PID 1 of the host's PID namespace, in its own mount and UTS namespaces
    local host="$1" venv="$2"
    local disk="$STATE/$host/disk"
    hostname raylm-host
    mkdir -p "$disk/tmp" "$disk/var-tmp" "$disk/home" /run/raylm-hosts-keep
    # Keep the checkout and the virtualenv reachable before /tmp is covered (either may live in /tmp).
    local keep=() p
    for p in "$REPO" "$venv"; do
        local k="/run/raylm-hosts-keep/$(echo "$p" | tr / _)"
        mkdir -p "$k"; mount --bind "$p" "$k"; keep+=("$p=$k")
    done
    mount --bind "$disk/tmp" /tmp
    mount --bind "$disk/var-tmp" /var/tmp
    mount -t tmpfs -o size=4g tmpfs /dev/shm
    local kv
    for kv in "${keep[@]}"; do
        p="${kv%%=*}"; local k="${kv#*=}"
        mkdir -p "$p" 2>/dev/null || true
        mount --bind "$k" "$p"; mount -o remount,bind,ro "$p"
    done
    printf '127.0.0.1 localhost raylm-host\n::1 localhost\n' > "$disk/hosts"
    mount --bind "$disk/hosts" /etc/hosts
    # Hide every host's state (other hosts' disks included); this host's disk stays at /tmp etc.
    mount -t tmpfs -o size=1m tmpfs "$BASE"
    touch /tmp/.raylm-host-ready
    exec "$(python_bin)" -c '
import os, time
while True:  # PID 1: reap whatever is orphaned in this host
    try:
        os.wait()
    except ChildProcessError:
        time.sleep(0.5)
'
}

# --- outside ---------------------------------------------------------------------------------
make_net() {
    local hub; hub="$(netns hub)"
    ip netns list | grep -qw "^$hub" && return 0
    ip netns add "$hub"
    ip -n "$hub" link add br0 type bridge
    ip -n "$hub" link set br0 up
    ip -n "$hub" link set lo up
}

find_init() {  # HOST: this machine's pid of the host's PID 1 (in its network namespace, pid 1 inside)
    local netino p status
    netino="$(stat -L -c %i "/run/netns/$(netns "$1")" 2>/dev/null)" || return 0
    for p in /proc/[0-9]*; do
        [[ "$(stat -L -c %i "$p/ns/net" 2>/dev/null)" == "$netino" ]] || continue
        status="$(grep '^NSpid:' "$p/status" 2>/dev/null)" || continue
        if [[ "$(echo "$status" | awk '{print NF, $NF}')" == "3 1" ]]; then echo "${p#/proc/}"; return 0; fi
    done
}

boot_host() {  # HOST: start its init (network already made)
    local host="$1" venv
    venv="$("$(python_bin)" -c 'import sys; print(sys.prefix)')"
    mkdir -p "$STATE/$host/disk/tmp"
    rm -f "$STATE/$host/disk/tmp/.raylm-host-ready"
    cp "$STATE/token" "$STATE/$host/disk/tmp/auth_token" 2>/dev/null || true
    chmod 600 "$STATE/$host/disk/tmp/auth_token" 2>/dev/null || true
    setsid ip netns exec "$(netns "$host")" unshare --mount --pid --uts --fork --mount-proc --propagation private \
        bash "$SELF" _init "$host" "$venv" </dev/null >"$STATE/$host/init.log" 2>&1 &
    local child="" i
    for i in $(seq 1 100); do
        child="$(find_init "$host")"
        [[ -n "$child" ]] && break
        sleep 0.1
    done
    [[ -n "$child" ]] || die "host $host did not start (see $STATE/$host/init.log)"
    echo "$child" > "$STATE/$host/pid"
    for i in $(seq 1 200); do  # the init has made its mounts
        [[ -e "$STATE/$host/disk/tmp/.raylm-host-ready" ]] && return 0
        sleep 0.1
    done
    die "host $host did not finish its set-up (see $STATE/$host/init.log)"
}

make_host() {  # HOST: namespace, veth on the bridge, address, init
    local host="$1" ns hub i
    ns="$(netns "$host")"; hub="$(netns hub)"; i="$(host_index "$host")"
    ip netns add "$ns"
    ip -n "$hub" link add "v$i" type veth peer name eth0 netns "$ns"
    ip -n "$hub" link set "v$i" master br0 up
    ip -n "$ns" addr add "$(host_addr "$host")/24" dev eth0
    ip -n "$ns" link set eth0 up
    ip -n "$ns" link set lo up
    boot_host "$host"
}

# The environment every command on a host gets.
host_env() {
    local head; head="$(host_addr h0)"
    echo "HOME=/tmp/home PATH=$(dirname "$(python_bin)"):/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin" \
         "RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=/tmp/auth_token RAY_ADDRESS=$head:$RAY_PORT" \
         "RAYLM_HEAD=$head RAYLM_DASHBOARD=http://$head:$DASH_PORT" \
         "AWS_ENDPOINT_URL=http://$head:$S3_PORT AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing" \
         "AWS_DEFAULT_REGION=us-east-1 AWS_EC2_METADATA_DISABLED=true" \
         "${RAYLM_HOSTS_ENV:-}"
}

host_exec() {  # HOST CMD...
    local host="$1"; shift
    alive "$host" || die "host $host is not running"
    # shellcheck disable=SC2046
    nsenter --target "$(init_pid "$host")" --mount --pid --uts --net --wd=/tmp -- \
        env -i $(host_env) "$@"
}

start_services() {  # HOST [CPUS GPUS EXTRA]: its supervised Ray node (and on h0 moto_server); EXTRA:
    # more `, "name": units` entries for its --resources (the hosts `add` makes)
    local host="$1" cpus="${2:-}" gpus="${3:-0}" extra="${4:-}"
    [[ -n "$cpus" ]] || cpus="$(cat "$STATE/cpus")"
    local addr; addr="$(host_addr "$host")"
    local ray_args env_line=""
    if [[ "$host" == h0 ]]; then
        host_exec h0 bash -c "setsid moto_server -H $addr -p $S3_PORT >/tmp/moto.log 2>&1 &"
        ray_args="--head --port=$RAY_PORT --dashboard-host=$addr --dashboard-port=$DASH_PORT"
        if [[ -e "$STATE/h0/disk/tmp/autoscaler.yaml" ]]; then  # `up --autoscale`: the provider's module too
            ray_args+=" --autoscaling-config=/tmp/autoscaler.yaml"
            env_line="export PYTHONPATH=$REPO/cluster"
        fi
    else
        ray_args="--address=$(host_addr h0):$RAY_PORT"
    fi
    [[ "$gpus" == 0 ]] || ray_args+=" --num-gpus=$gpus"
    # The supervisor: restart the node whenever it exits (after a back-off), until
    # /tmp/ray-supervisor.stop exists on the host.
    cat > "$STATE/$host/disk/tmp/ray-node.sh" <<EOF
$env_line
n=0
while [ ! -e /tmp/ray-supervisor.stop ]; do
    n=\$((n+1)); echo "start \$n \$(date -u +%FT%TZ)" >> /tmp/ray-supervisor.log
    ray start $ray_args --node-ip-address=$addr --num-cpus=$cpus --resources='{"host": 1, "host_$host": 1$extra}' \\
        --temp-dir=/tmp/ray --block --disable-usage-stats >> /tmp/ray-node.log 2>&1
    sleep 5
done
EOF
    host_exec "$host" bash -c "setsid bash /tmp/ray-node.sh </dev/null >/dev/null 2>&1 &"
}

wait_nodes() {  # N: until the head sees N alive nodes (or more)
    local n="$1" deadline=$((SECONDS + START_TIMEOUT_S))
    while (( SECONDS < deadline )); do
        local got
        got="$(host_exec h0 timeout 30 python -c "
import ray
ray.init(address='auto', logging_level='ERROR')
print(sum(1 for n in ray.nodes() if n['Alive']))" 2>/dev/null | tail -1 || true)"
        [[ "$got" =~ ^[0-9]+$ ]] && (( got >= n )) && return 0  # more: the autoscaler's hosts
        sleep 2
    done
    die "the head did not see $n nodes within ${START_TIMEOUT_S}s (logs: cluster/hosts.sh exec h0 cat /tmp/ray-node.log)"
}

start_api() {  # the set's host API for the autoscaler's provider (outside the hosts: it makes them)
    local sock="$STATE/h0/disk/tmp/hosts-api.sock" i
    rm -f "$sock"
    RAYLM_HOSTS_PREFIX="$PREFIX" RAYLM_HOSTS_DIR="$BASE" setsid "$(python_bin)" "$REPO/cluster/hosts_provider.py" \
        serve "$sock" </dev/null >>"$STATE/api.log" 2>&1 &
    echo $! > "$STATE/api.pid"
    for i in $(seq 1 300); do
        [[ -S "$sock" ]] && return 0
        kill -0 "$(cat "$STATE/api.pid")" 2>/dev/null || break
        sleep 0.1
    done
    die "the host API did not start (see $STATE/api.log)"
}

stop_api() {  # the API and any `add`/`remove` it runs (its process group)
    local p; p="$(cat "$STATE/api.pid" 2>/dev/null || true)"
    [[ -n "$p" ]] && kill -9 -- "-$p" 2>/dev/null || true
    rm -f "$STATE/api.pid"
}

with_lock() {  # CMD...: with the set's host list locked (the API may add and remove at once)
    ( flock 9; "$@" ) 9>"$STATE/lock"
}
list_add() { grep -qx "$1" "$STATE/hosts" && return 1; echo "$1" >> "$STATE/hosts"; }
list_remove() { grep -vx "$1" "$STATE/hosts" > "$STATE/hosts.new" || true; mv "$STATE/hosts.new" "$STATE/hosts"; }

cmd_add() {  # HOST [--cpus C] [--gpus G] [--resources JSON]: one more worker host, its Ray joining the head
    need_root
    local host="${1:-}"; shift || true
    [[ "$host" =~ ^h[1-9][0-9]?$ ]] || die "add needs a worker host name h1..h99, got '$host'"
    [[ -e "$STATE/hosts" ]] || die "no hosts with prefix '$PREFIX' are up (cluster/hosts.sh up first)"
    local cpus gpus=0 resources='{}'
    cpus="$(cat "$STATE/cpus")"
    while [[ $# -gt 0 ]]; do
        case "$1" in
            --cpus) cpus="$2"; shift 2 ;;
            --gpus) gpus="$2"; shift 2 ;;
            --resources) resources="$2"; shift 2 ;;
            *) die "unknown option '$1'" ;;
        esac
    done
    [[ "$cpus" =~ ^[0-9]+$ ]] || die "--cpus needs a whole number, got '$cpus'"
    [[ "$gpus" =~ ^[0-9]+$ ]] || die "--gpus needs a whole number, got '$gpus'"
    local extra
    extra="$("$(python_bin)" -c '
import json, re, sys
try:
    d = json.loads(sys.argv[1])
    assert isinstance(d, dict) and all(re.fullmatch(r"[A-Za-z_][\w.-]*", k) and float(v) >= 0 for k, v in d.items())
except Exception:
    sys.exit(1)
print("".join(f", \"{k}\": {float(v):g}" for k, v in d.items()))' "$resources")" \
        || die "--resources needs a JSON object of name: units, got '$resources'"
    with_lock list_add "$host" || die "host $host exists in set '$PREFIX'"
    make_host "$host"
    start_services "$host" "$cpus" "$gpus" "$extra"
    wait_joined "$host"  # an autoscaler expects the node's heartbeat soon after it is made
}

cmd_remove() {  # HOST: a worker host and all it had: processes, namespaces, link, disk
    need_root
    local host="${1:-}"
    [[ "$host" =~ ^h[1-9][0-9]?$ ]] || die "remove needs a worker host name h1..h99 (not the head or client), got '$host'"
    grep -qx "$host" "$STATE/hosts" 2>/dev/null || die "no host $host in set '$PREFIX'"
    local p i; p="$(init_pid "$host")"; [[ -n "$p" ]] || p="$(find_init "$host")"
    if [[ -n "$p" ]]; then
        kill -9 "$p" 2>/dev/null || true  # PID 1 gone: the kernel kills the whole host
        for i in $(seq 1 300); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
    fi
    ip -n "$(netns hub)" link del "v$(host_index "$host")" 2>/dev/null || true
    ip netns del "$(netns "$host")" 2>/dev/null || true
    rm -rf "${STATE:?}/$host"
    with_lock list_remove "$host"
}

wait_joined() {  # HOST: until its Ray node has joined the head (`ray start` says so in its log)
    local log="$STATE/$1/disk/tmp/ray-node.log" deadline=$((SECONDS + START_TIMEOUT_S))
    while (( SECONDS < deadline )); do
        grep -q "Ray runtime started" "$log" 2>/dev/null && return 0
        sleep 1
    done
    die "host $1 did not join the head within ${START_TIMEOUT_S}s (logs: cluster/hosts.sh exec $1 cat /tmp/ray-node.log)"
}

cmd_up() {
    need_root
    local n="${1:-}"; shift || true
    [[ "$n" =~ ^[0-9]+$ && "$n" -ge 1 ]] || die "up needs a host count N >= 1"
    local cpus=2 autoscale=""
    while [[ $# -gt 0 ]]; do
        case "$1" in
            --cpus) cpus="$2"; shift 2 ;;
            --autoscale) autoscale="$2"; shift 2
                [[ -f "$autoscale" ]] || die "--autoscale: no cluster YAML at '$autoscale'" ;;
            *) die "unknown option '$1'" ;;
        esac
    done
    [[ -e "$STATE/hosts" ]] && die "hosts with prefix '$PREFIX' are up already (cluster/hosts.sh down first)"
    mkdir -p "$STATE"; chmod 700 "$STATE"
    echo "$cpus" > "$STATE/cpus"
    "$(python_bin)" -c 'import secrets; print(secrets.token_hex(32))' > "$STATE/token"
    chmod 600 "$STATE/token"
    make_net
    local hosts=() i
    for ((i = 0; i < n; i++)); do hosts+=("h$i"); done
    hosts+=(client)
    printf '%s\n' "${hosts[@]}" > "$STATE/hosts"
    for h in "${hosts[@]}"; do make_host "$h"; done
    if [[ -n "$autoscale" ]]; then  # before the head starts: its autoscaler reads both at once
        cp "$autoscale" "$STATE/h0/disk/tmp/autoscaler.yaml"
        start_api
    fi
    for ((i = 0; i < n; i++)); do start_services "h$i"; [[ $i == 0 ]] && wait_nodes 1; done
    wait_nodes "$n"
    cmd_list
}

cmd_down() {
    need_root
    stop_api  # first: no host is made while the others go
    local h
    for h in $(cat "$STATE/hosts" 2>/dev/null); do
        local p; p="$(init_pid "$h")"; [[ -n "$p" ]] || p="$(find_init "$h")"
        [[ -n "$p" ]] && kill -9 "$p" 2>/dev/null || true  # PID 1 gone: the kernel kills the whole host
    done
    local ns
    for ns in $(ip netns list 2>/dev/null | awk '{print $1}' | grep -E "^$PREFIX-(hub|h[0-9]+|client)$" || true); do
        ip netns del "$ns" 2>/dev/null || true
    done
    rm -rf "$STATE"
}

cmd_list() {
    local h
    for h in $(cat "$STATE/hosts" 2>/dev/null); do
        local state=down
        alive "$h" && state=up
        local link; link="$(ip -n "$(netns "$h")" -br link show eth0 2>/dev/null | awk '{print $2}')"
        echo "$h $(host_addr "$h") host:$state link:${link:-none}"
    done
}

main() {
    local cmd="${1:-}"; shift || true
    case "$cmd" in
        up) cmd_up "$@" ;;
        down) cmd_down ;;
        list) cmd_list ;;
        exec) [[ $# -ge 2 ]] || die "exec needs HOST CMD..."; host_exec "$@" ;;
        cut) need_root; ip -n "$(netns "$1")" link set eth0 down ;;
        heal) need_root; ip -n "$(netns "$1")" link set eth0 up ;;
        crash) need_root; kill -9 "$(init_pid "$1")" ;;
        revive) need_root; alive "$1" && die "host $1 is running"; boot_host "$1"
                [[ "$1" == client ]] || start_services "$1" ;;
        add) cmd_add "$@" ;;
        remove) cmd_remove "$@" ;;
        _init) host_init "$@" ;;
        *) sed -n '5,17p' "$0" | sed 's/^# *//' >&2; exit 2 ;;
    esac
}

main "$@"
