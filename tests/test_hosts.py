"""raylm on real hosts: `cluster/hosts.sh` makes a head (Ray head + moto_server), a worker host and a
client host out of Linux namespaces, each with its own address in 198.18.0.0/24, its own disk and
processes, and a hostname that resolves to 127.0.0.1 (as many cloud images map their own name). Jobs
are submitted from the client with `ray job submit`; corpus and runs travel through s3:// on the
head's moto_server, since the hosts share no writable directory. One cluster for the module; its
finaliser removes every namespace it made, even after a failure.

Needs root, `ip`, `unshare` and `nsenter` (Linux): elsewhere the module is skipped with the reason in
pytest's summary."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.hosts, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
HOSTS = ROOT / "cluster" / "hosts.sh"
CORPUS = "s3://corpus/stdlib/"
CORPUS_DIRS = ("json", "email", "asyncio")  # ~0.9 MB of the standard library's sources


def why_not() -> str | None:
    if not sys.platform.startswith("linux"):
        return "host tests need Linux namespaces"
    if os.geteuid() != 0:
        return "host tests need root (network, mount and PID namespaces): run as root, as CI does"
    for tool in ("ip", "unshare", "nsenter"):
        if shutil.which(tool) is None:
            return f"host tests need '{tool}' on PATH"
    return None


class Hosts:
    """`cluster/hosts.sh` with this module's prefix (namespaces PREFIX-*, state under DIR/PREFIX)."""

    def __init__(self, prefix: str, base: Path):
        self.prefix = prefix
        self.env = {**os.environ, "RAYLM_HOSTS_PREFIX": prefix, "RAYLM_HOSTS_DIR": str(base),
                    "RAYLM_HOSTS_PYTHON": sys.executable}

    def sh(self, *args: str, timeout: float = 900, check: bool = True) -> subprocess.CompletedProcess:
        proc = subprocess.run(["bash", str(HOSTS), *args], env=self.env, capture_output=True, text=True,
                              timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"hosts.sh {' '.join(args[:3])} exited {proc.returncode}:\n"
                                 f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
        return proc

    def run(self, host: str, command: str, timeout: float = 900, check: bool = True) -> subprocess.CompletedProcess:
        return self.sh("exec", host, "bash", "-c", command, timeout=timeout, check=check)

    def python(self, host: str, code: str, timeout: float = 900) -> str:
        return self.sh("exec", host, "python", "-c", code, timeout=timeout).stdout

    def namespaces(self) -> list[str]:
        out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        return [line.split()[0] for line in out.splitlines() if line.split()[0].startswith(self.prefix + "-")]


def upload_script(dirs: tuple[str, ...]) -> str:
    """Python for the client host: the buckets `corpus` and `runs` on the head's moto_server, and
    the standard library's `dirs` (their .py files) under s3://corpus/stdlib/."""
    return f"""
import boto3, glob, os, sysconfig
s3 = boto3.client("s3")
for bucket in ("corpus", "runs"):
    s3.create_bucket(Bucket=bucket)
lib = sysconfig.get_paths()["stdlib"]
for d in {dirs!r}:
    for f in sorted(glob.glob(os.path.join(lib, d, "*.py"))):
        s3.upload_file(f, "corpus", "stdlib/" + os.path.relpath(f, lib))
"""


UPLOAD = upload_script(CORPUS_DIRS)


@pytest.fixture(scope="module")
def hosts():
    reason = why_not()
    if reason:
        pytest.skip(reason)
    prefix = f"rlt{os.getpid() % 100000}"
    h = Hosts(prefix, Path("/var/lib/raylm-hosts"))
    h.env["RAYLM_HOSTS_ENV"] = DETECT_FAST  # a lost host is declared dead in seconds, not a minute
    # The hosts' start is a wait for an event (the head lists the nodes); a loaded machine (the
    # suite runs two pytest workers, and another host module may start at the same time) is slower.
    h.env["RAYLM_HOSTS_START_TIMEOUT_S"] = "600"
    try:
        h.sh("up", "2", "--cpus", "2", timeout=900)
        h.python("client", UPLOAD)
        yield h
    finally:
        h.sh("down", check=False, timeout=300)
        left = h.namespaces()
        assert not left, f"namespaces left behind: {left}"


def train_args(name: str, *overrides: str) -> str:
    """A `raylm train` command line (for the hosts' shell) on the debug preset over the s3 corpus."""
    args = [f"{ROOT}/configs/debug.yaml", "run.output_dir=s3://runs/", f"run.name={name}",
            f"data.sources=[{{path: '{CORPUS}', format: text}}]", "data.val_fraction=0",
            "train.eval_every=0", "train.log_every=1", "run.sample_tokens=0", *overrides]
    return "python -m raylm train " + " ".join(f"'{a}'" for a in args)


def records(h: Hosts, run: str) -> list[dict]:
    out = h.python("client", f"from raylm import storage; print(storage.read_bytes('{run}/metrics.jsonl').decode())")
    return [json.loads(line) for line in out.splitlines() if line.strip()]


# ---------------------------------------------------------------------------------------------
# Faults that cross a network: a partition, a host crash, a spot preemption. Each runs [1, 2]
# workers (one per host) and makes its fault while the head's training workers are stopped at a
# step the test has read (`frozen`), so no fault can come after the run's end however slow the
# machine; the head's workers are found in the head's own PID namespace, never by name alone.

G = 8  # debug preset: sequences per step
# Ray's health checks as docs/elastic.md recommends for spot clusters (bench/hosts_faults.py --detect)
DETECT_FAST = "RAY_health_check_period_ms=2000 RAY_health_check_timeout_ms=2000 RAY_health_check_failure_threshold=5"
# A fault run has no end of its own: the test (or the bench) stops it once it has seen what it
# waits for, so no fault can come after the run's end however fast the machine. A constant
# learning rate after warmup makes step k's loss independent of max_steps, so a short reference
# run is the same curve.
OPEN_ENDED = ("train.max_steps=100000", "optimizer.schedule=constant", "optimizer.warmup_steps=4")


def host_processes(h: Hosts, host: str, marker: bytes = b"RayTrainWorker") -> list[int]:
    """This machine's pids of `host`'s processes whose command line holds `marker`."""
    init = int((Path(h.env["RAYLM_HOSTS_DIR"]) / h.prefix / host / "pid").read_text())
    ns = os.readlink(f"/proc/{init}/ns/pid")
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.readlink(f"/proc/{entry}/ns/pid") == ns and marker in Path(f"/proc/{entry}/cmdline").read_bytes():
                    pids.append(int(entry))
            except OSError:
                continue
    return pids


def step_rows(h: Hosts, run: str) -> list[dict]:
    try:
        return [r for r in records(h, run) if "loss" in r]
    except AssertionError:  # no metrics.jsonl yet
        return []


def last_json(out: str):
    """The last line of `out` that is JSON (Ray may print a warning line after it)."""
    for line in reversed(out.splitlines()):
        try:
            return json.loads(line)
        except ValueError:
            continue
    raise AssertionError(f"no JSON line in:\n{out[-3000:]}")


def alive_nodes(h: Hosts) -> dict[str, str]:
    """Node id -> IP of the cluster's alive nodes (asked on the head: a driver needs a Ray node)."""
    return last_json(h.python("h0", """
import json, ray
ray.init(address="auto", logging_level="ERROR")
print(json.dumps({n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"]}))
"""))


def node_id_of(h: Hosts, ip: str) -> str:
    return next(node for node, addr in alive_nodes(h).items() if addr == ip)


class Job:
    """A `raylm train` submitted from the client host with `ray job submit`, running in the
    background; its output is collected line by line (`output`)."""

    def __init__(self, h: Hosts, name: str, *overrides: str, workers: str = "[1,2]",
                 resources: str = "{host: 1}"):
        import threading

        self.h, self.run, self.id = h, f"s3://runs/{name}", f"raylm-{name}-{os.getpid()}"
        command = train_args(name, f"scaling.num_workers={workers}", f"scaling.resources_per_worker={resources}",
                             "scaling.resize_check_s=5", *overrides)
        self.proc = subprocess.Popen(["bash", str(HOSTS), "exec", "client", "bash", "-c",
                                      f"ray job submit --address $RAYLM_DASHBOARD --submission-id {self.id} "
                                      f"-- {command} 2>&1"],
                                     env=h.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        self.reader = threading.Thread(target=lambda: self.lines.extend(self.proc.stdout), daemon=True)
        self.reader.start()

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def ended(self) -> bool:
        return self.proc.poll() is not None

    def gone(self) -> bool:
        """False while the job runs; once it has ended, an AssertionError with its output's tail
        (for waits on events that only a running job can make)."""
        if self.proc.poll() is None:
            return False
        self.reader.join(timeout=60)
        raise AssertionError(f"the job ended (exit {self.proc.returncode}):\n{self.output[-8000:]}")

    def rows(self) -> list[dict]:
        return step_rows(self.h, self.run)

    def last_step(self) -> int:
        return max((r["step"] for r in self.rows()), default=0)

    def finish(self, timeout: float = 1800) -> str:
        self.proc.wait(timeout=timeout)
        self.reader.join(timeout=60)
        assert self.proc.returncode == 0 and "succeeded" in self.output, self.output[-6000:]
        return self.output

    def stop(self, timeout: float = 900) -> None:
        """`ray job stop` (SIGTERM to the driver: raylm stops as on Ctrl-C, keeping its checkpoints)."""
        self.h.run("client", f"ray job stop --address $RAYLM_DASHBOARD {self.id}", timeout=timeout)
        self.proc.wait(timeout=timeout)
        self.reader.join(timeout=60)

    def kill(self) -> None:
        if not self.ended():
            self.h.run("client", f"ray job stop --address $RAYLM_DASHBOARD {self.id}", timeout=300, check=False)
            self.proc.kill()


def newest_checkpoint(h: Hosts, run: str) -> dict:
    """The train state in the marker of `run`'s newest checkpoint ({} if none)."""
    return last_json(h.python("client", f"""
import json
from raylm.train import checkpoint as ckpt
found = ckpt.latest_checkpoint({run!r})
print(json.dumps(ckpt.read_marker(found)["train_state"] if found else {{}}))
"""))


def check_every_step_once(job: Job) -> list[dict]:
    """Every step once in the metrics, none lost, none repeated; the newest checkpoint says each
    sequence up to it was trained once. Returns the rows."""
    rows = job.rows()
    last = rows[-1]["step"]
    assert [r["step"] for r in rows] == list(range(1, last + 1))  # none lost, none repeated
    assert all(r["tokens_consumed"] == r["step"] * G * 64 for r in rows)
    state = newest_checkpoint(job.h, job.run)
    assert state["step"] >= last - 4 and state["data_watermark"] == state["step"] * G
    assert state["data_extra"] == []  # each sequence trained once
    return rows


def training_worker_ips(h: Hosts) -> list[str]:
    """The node IPs of every training worker the cluster has run so far."""
    return last_json(h.python("h0", """
import json, ray
from ray.util.state import list_actors
ray.init(address="auto", logging_level="ERROR")
nodes = {n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes()}
print(json.dumps(sorted({nodes[a.node_id] for a in list_actors(filters=[("class_name", "=", "RayTrainWorker")],
                                                                 detail=True, limit=10000)})))
"""))


T0 = [0.0]


def phase(what: str) -> None:
    """A timestamped line for `pytest -s` (where the host test's time goes)."""
    import time
    now = time.monotonic()
    T0[0] = T0[0] or now
    print(f"[hosts +{now - T0[0]:6.1f}s] {what}", file=sys.stderr, flush=True)


PREEMPTED = re.compile(r"step (\d+): a node of this run is being preempted; checkpointing now")


class Faults:
    """The three faults that cross a network, made on worker host h1 of a [1, 2] run, each while
    the head's training workers are stopped at a step the caller has read (`frozen`)."""

    def __init__(self, h: Hosts, job: Job):
        self.h, self.job = h, job

    def rows_after(self, step: int, size: int) -> bool:
        return any(r["world_size"] == size and r["step"] > step for r in self.job.rows())

    def hit(self, fault: str) -> dict:
        """Make `fault` on h1, wait for the run to step on 1 worker, bring h1 back and wait for the
        run to grow back to 2 workers. Returns what happened, with times (time.time())."""
        import time
        from support import frozen, wait_for

        h, job, out = self.h, self.job, {"fault": fault}
        notices_before = len(PREEMPTED.findall(job.output))
        with frozen(host_processes(h, "h0")):
            out["at"] = job.last_step()
            out["t"] = time.time()
            out["restores_before"] = len(restores(h, job.run))
            if fault == "partition":
                h.sh("cut", "h1")
            elif fault == "crash":
                h.sh("crash", "h1")
            else:  # a spot reclaim notice: drain h1 with a deadline
                h.run("h0", f"ray drain-node --node-id {node_id_of(h, '198.18.0.2')} --reason "
                            "DRAIN_NODE_REASON_PREEMPTION --reason-message spot --deadline-remaining-seconds 120")
        phase(f"{fault} at step {out['at']}")
        if fault == "preemption":  # the reclaim comes once the run has checkpointed at the notice
            def notice():
                steps = [int(m) for m in PREEMPTED.findall(job.output)][notices_before:]
                return steps or None

            seen = wait_for(notice, 900, "the checkpoint at the preemption notice", ended=job.gone, poll_s=1)
            out["notice_step"] = seen[0]
            wait_for(lambda: newest_checkpoint(h, job.run).get("step", 0) >= seen[0], 900,
                     "the notice's checkpoint to be complete", ended=job.gone, poll_s=1)
            with frozen(host_processes(h, "h0")):
                out["at"] = job.last_step()
                out["t"] = time.time()
                out["restores_before"] = len(restores(h, job.run))
                h.sh("crash", "h1")
            phase(f"reclaimed (crash) at step {out['at']} after the notice at step {seen[0]}")
        # the first new step, on the 1 worker left (rows of steps after the restored checkpoint
        # were dropped and are trained again first)
        new = wait_for(lambda: next((r for r in job.rows() if r["step"] > out["at"] and r["world_size"] == 1), None),
                       1800, f"a new step on 1 worker after the {fault}", ended=job.gone, poll_s=1)
        out["next_new_step_s"] = new["time"] - out["t"]
        with frozen(host_processes(h, "h0")):
            shrunk_at = job.last_step()
            phase(f"1 worker at step {shrunk_at}")
            h.sh("heal" if fault == "partition" else "revive", "h1")
            wait_for(lambda: "198.18.0.2" in alive_nodes(h).values(), 900, f"h1 to rejoin after the {fault}",
                     poll_s=1)
        wait_for(lambda: self.rows_after(shrunk_at, 2), 1800, f"the run to grow back to 2 workers after the {fault}",
                 ended=job.gone, poll_s=1)
        phase(f"2 workers again at step {job.last_step()}")
        return out


def restores(h: Hosts, run: str) -> list[dict]:
    return [r for r in records(h, run) if r.get("event") == "restored"]


def test_a_two_host_run_survives_a_partition_a_crash_and_a_preemption_growing_back_each_time(hosts):
    """`raylm train` with scaling.num_workers=[1,2] and one `host` resource per worker, submitted
    with `ray job submit` from the client host, its corpus streamed from s3:// and its run on
    s3:// (the head's moto_server): one training worker on each host, connected by gloo although
    every hostname resolves to 127.0.0.1 (raylm pins gloo to the interface of the node's Ray IP).

    1. Partition: the worker host's link goes down (no process dies). The run goes on with the
       head's worker; when the link returns, the host's Ray node (marked dead meanwhile) exits,
       its supervisor restarts it, and the run grows back to 2 workers.
    2. Crash: every process of the worker host is SIGKILLed at once. The run goes on with the
       head's worker; the host boots again, rejoins, and the run grows back to 2 workers.
    3. Spot preemption: `ray drain-node` with a deadline on the worker host. The run checkpoints
       at the notice; the host is then reclaimed (crashed), and the run restores from exactly that
       checkpoint (a checkpoint just in time: no step between the notice and it is lost), goes on
       with one worker and grows back when the host returns.

    Each fault is made, and each host brought back, while the head's training workers are
    stopped at a step the test has read. The run is then stopped (`ray job stop`). At the end:
    every step once (none lost, none repeated), each sequence trained once, and every loss, on 2
    workers or 1, equal (rel 1e-4) to the same run on one host, uninterrupted."""
    from support import wait_for

    phase("submit")
    job = Job(hosts, "faults", *OPEN_ENDED, "train.checkpoint_every=4", "train.preemption_check_every=1",
              "run.max_failures=10")
    try:
        wait_for(lambda: (r := job.rows()) and r[-1]["world_size"] == 2 and r[-1]["step"] >= 6, 1800,
                 "steps on 2 workers", ended=job.gone, poll_s=1)
        phase(f"2 workers at step {job.last_step()}")
        assert training_worker_ips(hosts) == ["198.18.0.1", "198.18.0.2"]  # one worker per host
        faults = Faults(hosts, job)
        seen = [faults.hit(fault) for fault in ("partition", "crash", "preemption")]
        job.stop()
        phase("stopped")
    finally:
        job.kill()

    rows = check_every_step_once(job)
    sizes = [r["world_size"] for r in rows]
    assert sizes[0] == 2 and sizes[-1] == 2
    # Each fault shrank the run: `Faults.hit` waited for a new step on 1 worker after each. The
    # final curve need not show it: a growth restores the newest checkpoint, and the 1-worker
    # steps after it are trained again on 2.
    # The reclaim restored the checkpoint made at the notice: nothing trained before the notice was lost.
    preemption = seen[2]
    after_reclaim = restores(hosts, job.run)[preemption["restores_before"]]
    assert after_reclaim["step"] >= preemption["notice_step"], (after_reclaim, preemption)
    # The same run on one host (both workers on the head: half its `host_h0` unit each), uninterrupted,
    # to the same step: a streaming step trains the same rows at any world size, so every loss of
    # the faulted run, through its shrinks and growths, is the uninterrupted run's.
    one_host = Job(hosts, "one-host", *OPEN_ENDED[1:], f"train.max_steps={rows[-1]['step']}",
                   "train.checkpoint_every=1000", workers="2", resources="{host_h0: 0.5}")
    one_host.finish()
    phase("reference finished")
    reference = {r["step"]: r for r in one_host.rows()}
    assert {r["world_size"] for r in reference.values()} == {2}
    for r in rows:
        assert r["loss"] == pytest.approx(reference[r["step"]]["loss"], rel=1e-4), (r["step"], r["world_size"])


# ---------------------------------------------------------------------------------------------
# A Tune sweep over both hosts, one host lost mid-sweep (issue 21, item 5)

# A wide window (first checkpoint to end) for the crash: the two trials' steps can be far apart
# (16 steps seen on a quiet machine), and steps of the debug model are cheap beside a trial's start.
SWEEP_STEPS = 64
SWEEP_CHECKPOINT_EVERY = 16
# Placement by count, on hosts of 2 CPUs: a trial's own process (the Tune trainable that fits its
# TorchTrainer, with the trainer's controller) takes 1.5 CPUs, so each host runs one; a training
# worker takes 0.5 CPU and the host's one `host` unit, so each host runs one. Lost with h1 are
# then always one trial's process and one training worker (of the same trial or of the other).
LOST_HOST_SWEEP = f"""\
base: {ROOT}/configs/debug.yaml
set:
  train.max_steps: {SWEEP_STEPS}
  train.eval_every: 32
  train.checkpoint_every: {SWEEP_CHECKPOINT_EVERY}
  run.sample_tokens: 0
  data.sources: [{{path: '{CORPUS}', format: text, max_bytes: 300000}}]
resources:
  num_workers: 1
  cpus_per_worker: 0.5
  resources_per_worker: {{host: 1}}
trial_cpus: 1.5
space:
  optimizer.lr: {{grid: [3.0e-3, 1.0e-3]}}
scheduler: none                 # every trial to its end: none is stopped before the host is lost
metric: val_loss
max_concurrent: 2
max_trial_failures: 2           # a trial whose own process was on the lost host is retried by Tune
output_dir: s3://runs/sweeps
"""


class SweepJob(Job):
    """`raylm tune` submitted from the client host with `ray job submit`, the sweep file uploaded
    as the job's working directory (as a user on another machine submits one)."""

    def __init__(self, h: Hosts, name: str, sweep_yaml: str):
        import threading

        self.h, self.run, self.id = h, f"s3://runs/sweeps/{name}", f"raylm-{name}"
        local = Path(h.env["RAYLM_HOSTS_DIR"]) / h.prefix / "client" / "disk" / "tmp" / name  # the client's /tmp
        local.mkdir(parents=True)
        (local / "sweep.yaml").write_text(sweep_yaml + f"name: {name}\n")
        # the hosts run the checkout under test (ROOT), not whatever the virtualenv installed; Ray
        # Train keeps its runs' state (their workers' nodes) for `train_runs`
        runtime_env = json.dumps({"working_dir": f"/tmp/{name}", "env_vars": {
            "PYTHONPATH": str(ROOT), "RAY_TRAIN_ENABLE_STATE_TRACKING": "1"}})
        self.proc = subprocess.Popen(["bash", str(HOSTS), "exec", "client", "bash", "-c",
                                      f"ray job submit --address $RAYLM_DASHBOARD --submission-id {self.id} "
                                      f"--runtime-env-json '{runtime_env}' -- python -m raylm tune sweep.yaml 2>&1"],
                                     env=h.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        self.reader = threading.Thread(target=lambda: self.lines.extend(self.proc.stdout), daemon=True)
        self.reader.start()


def train_runs(h: Hosts) -> dict[str, list[dict]]:
    """Ray Train's own record of its runs (what the dashboard's Train page shows; kept when the
    job sets RAY_TRAIN_ENABLE_STATE_TRACKING=1), by run name (a trial's id): each TorchTrainer fit
    of the trial (two when Tune retried it), with its attempts' worker IPs (two attempts when Ray
    Train restarted its workers). The state actor's handle is Ray's internal API."""
    return last_json(h.python("h0", """
import json, ray
from ray.train.v2._internal.state.state_actor import get_state_actor
ray.init(address="auto", logging_level="ERROR")
actor = get_state_actor()
runs = ray.get(actor.get_train_runs.remote()) if actor else {}
attempts = ray.get(actor.get_train_run_attempts.remote()) if actor else {}
out = {}
for run_id, run in sorted(runs.items(), key=lambda item: item[1].start_time_ns):
    out.setdefault(run.name, []).append({"run_id": run_id, "attempts": [
        sorted(w.node_ip for w in a.workers) for a in sorted(attempts.get(run_id, {}).values(),
                                                             key=lambda a: a.start_time_ns)]})
print(json.dumps(out))
"""))


def trial_checkpoints(h: Hosts, sweep_dir: str) -> dict[str, int]:
    """Trial id -> the step of its run's newest checkpoint (0: none yet)."""
    return last_json(h.python("client", f"""
import json
from raylm import storage
from raylm.train import checkpoint as ckpt
runs = storage.child({sweep_dir!r}, "runs")
out = {{}}
for trial in [i.base_name for i in storage.list_dir(runs) if ".failed-" not in i.base_name]:
    found = ckpt.latest_checkpoint(storage.child(runs, trial))
    out[trial] = ckpt.read_marker(found)["train_state"]["step"] if found else 0
print(json.dumps(out))
"""))


def test_a_sweep_over_both_hosts_finishes_by_itself_when_a_host_is_lost_and_its_trials_continue_from_checkpoints(
        hosts):
    """`raylm tune` submitted with `ray job submit` from the client host, its sweep directory, the
    trials' run directories and Tune's state on s3:// (the head's moto_server): 2 trials of the
    debug model at once, placed by count (LOST_HOST_SWEEP) so that each host runs one trial's
    process and one training worker. Once both trials have a checkpoint and neither has
    finished, h1 crashes (every process SIGKILLed, while every training worker is stopped at a
    step the test has read) and is not brought back: the sweep goes on with the head alone.

    Lost with h1: a trial's process, which Tune retries (`max_trial_failures`; the retry waits for
    the lost host's lease on the run directory to go stale and continues the run from its newest
    checkpoint), and a training worker (Ray Train's record of its workers' nodes says whose),
    whose trial Ray Train restarts from its newest checkpoint when that trial's process lives,
    or Tune when it was the same trial. Checked: the job succeeds by itself (no --resume), both
    trials complete every step, each step once in its metrics, and every trial that lost
    something restored a checkpoint at or after the one it had at the crash, not step 0."""
    from support import frozen, wait_for

    h = hosts
    name = f"lost-host-{os.getpid()}"
    phase("sweep: submit")
    job = SweepJob(h, name, LOST_HOST_SWEEP)
    try:
        def crash_once_both_trials_have_checkpointed():
            # every training worker stopped while the test reads and crashes: the trials move on
            # only between two looks, however slow a look is on a loaded machine
            with frozen(host_processes(h, "h0") + host_processes(h, "h1")):
                steps = trial_checkpoints(h, job.run)
                if len(steps) < 2 or not all(SWEEP_CHECKPOINT_EVERY <= s < SWEEP_STEPS for s in steps.values()):
                    return None
                workers_on_h1 = [trial for trial, runs in train_runs(h).items()
                                 if "198.18.0.2" in ([[]] + runs[-1]["attempts"])[-1]]
                h.sh("crash", "h1")
                return steps, workers_on_h1

        at_crash, workers_on_h1 = wait_for(crash_once_both_trials_have_checkpointed, 1800,
                                           "a checkpoint of both trials before either ends", ended=job.gone, poll_s=1)
        phase(f"sweep: h1 crashed; newest checkpoints {at_crash}, training on h1: {workers_on_h1}")
        assert len(workers_on_h1) == 1, workers_on_h1
        worker_on_h1 = workers_on_h1[0]
        output = job.finish()
        phase("sweep: finished")
    finally:
        job.kill()
    assert "best trial" in output and "--resume" not in output, output[-6000:]

    results = json.loads(h.python("client", f"from raylm import storage; "
                                            f"print(storage.read_bytes('{job.run}/results.json').decode())"))
    assert sorted((t["trial_id"], t["state"], t["steps"]) for t in results["trials"]) == [
        (trial, "completed", SWEEP_STEPS) for trial in sorted(at_crash)]
    fits = train_runs(h)
    retried_by_tune = {trial for trial, runs in fits.items() if len(runs) > 1}
    restarted_by_train = {trial for trial, runs in fits.items() if any(len(r["attempts"]) > 1 for r in runs)}
    phase(f"sweep: retried by Tune {sorted(retried_by_tune)}, restarted by Ray Train {sorted(restarted_by_train)}; "
          f"{fits}")
    assert len(retried_by_tune) == 1  # the trial whose process was on h1
    assert worker_on_h1 in retried_by_tune | restarted_by_train
    for trial in retried_by_tune | restarted_by_train:
        lost = records(h, f"{job.run}/runs/{trial}")
        assert [r["step"] for r in lost if "loss" in r] == list(range(1, SWEEP_STEPS + 1)), trial  # each once
        restored = [r["step"] for r in lost if r.get("event") == "restored"]
        assert restored and restored[0] >= at_crash[trial], (trial, restored, at_crash)  # not from step 0
