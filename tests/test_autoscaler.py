"""An elastic run on Ray's fake multi-node autoscaler (`cluster/local-autoscaler.yaml`).

The head (`ray start --head --autoscaling-config`, RAY_FAKE_CLUSTER=1) holds no `trainer`
resource; each `gpu` node holds one. The module's cluster keeps one gpu node up (min_workers 1).
`raylm train` with scaling.num_workers=[1, 3] asks for 3 workers (Ray Train's elastic request,
through `request_resources`), starts on the one node, the autoscaler launches two more, and the
run grows to 3 workers. The test reads the run's metrics.jsonl (world_size per step), `ray
status` and the autoscaler's own log. Teardown stops this cluster's processes only (by session).

`autoscaler_fit` is the pure check of the elastic design: an elastic config's max workers
must fit the autoscaler's node groups.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from raylm.config import Config, load_config
from raylm.train import checkpoint as ckpt
from support import frozen, wait_for

pytestmark = pytest.mark.ray

ROOT = Path(__file__).resolve().parents[1]
AUTOSCALER_YAML = ROOT / "cluster" / "local-autoscaler.yaml"
RAY = str(Path(sys.executable).with_name("ray"))

MAX_STEPS = 40
DATA = ["data.sources.0.max_bytes=100000", "tokenizer.sample_bytes=100000", "data.val_fraction=0"]
ELASTIC = ["scaling.num_workers=[1, 3]", "scaling.resources_per_worker={trainer: 1}", "scaling.cpus_per_worker=0",
           "scaling.use_gpu=false", "scaling.resize_check_s=10"]
RUN = [f"train.max_steps={MAX_STEPS}", f"train.global_batch_tokens={64 * 24}", "train.micro_batch_size=8",
       "train.checkpoint_every=2", "train.eval_every=0", "train.log_every=10", "run.sample_tokens=0"]


# ---------------------------------------------------------------------------------------
# The autoscaler fit of an elastic config (pure).


def worker_bundle(cfg: Config) -> dict[str, float]:
    """One Ray Train worker's resources, as `raylm.ray.train.scaling_config` asks for them."""
    s = cfg.scaling
    bundle = {"CPU": s.cpus_per_worker, **s.resources_per_worker}
    if s.use_gpu:
        bundle["GPU"] = 1.0
    return {k: float(v) for k, v in bundle.items() if v > 0}


def autoscaler_capacity(cluster: dict, bundle: dict[str, float]) -> int:
    """How many workers of `bundle` the cluster's node groups hold at their max_workers (the head's
    own node type included, with its one node), capped by the cluster-wide max_workers."""
    head = cluster.get("head_node_type")
    total_nodes_left = cluster.get("max_workers", float("inf"))
    per_group = []
    for name, group in cluster["available_node_types"].items():
        resources = group.get("resources", {})
        per_node = min(int(resources.get(k, 0) // v) for k, v in bundle.items()) if bundle else 0
        if name == head:
            per_group.append((per_node, 1, True))
        per_group.append((per_node, group.get("max_workers", 0), False))
    capacity = 0
    for per_node, nodes, is_head in sorted(per_group, reverse=True):  # the fullest nodes first
        if not is_head:
            nodes = min(nodes, total_nodes_left)
            total_nodes_left -= nodes
        capacity += per_node * nodes
    return capacity


def autoscaler_fit(cluster: dict, cfg: Config) -> str | None:
    """None if an elastic run can grow to its max on the cluster's node groups; else why not.

    max <= sum over groups of max_workers x workers per node (per node: the node's `trainer`,
    GPU and CPU divided by one worker's), and so min too: the run cannot even start below it.
    """
    s = cfg.scaling
    if not s.elastic:
        return None
    bundle = worker_bundle(cfg)
    capacity = autoscaler_capacity(cluster, bundle)
    if s.max_workers > capacity:
        return (f"scaling.num_workers={s.num_workers}: max {s.max_workers} workers of {bundle} but the node groups "
                f"hold at most {capacity} at their max_workers")
    return None


def test_elastic_configs_fit_the_local_autoscaler_node_groups():
    cluster = yaml.safe_load(AUTOSCALER_YAML.read_text())
    gpu = cluster["available_node_types"]["gpu"]
    assert (gpu["min_workers"], gpu["max_workers"]) == (0, 3)
    assert gpu["resources"]["GPU"] == gpu["resources"]["trainer"] == 1 and gpu["resources"]["CPU"] == 0
    assert cluster["available_node_types"][cluster["head_node_type"]]["resources"].get("trainer", 0) == 0
    assert cluster["provider"]["type"] == "fake_multinode"

    problems = []
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        cfg = load_config(path)
        # GPU configs are sized for the cloud GPU groups: tests/test_cluster_files.py checks them there.
        if cfg.scaling.elastic and not cfg.scaling.use_gpu and (why := autoscaler_fit(cluster, cfg)):
            problems.append(f"{path.name}: {why}")
    assert not problems, problems

    # The check itself: the elastic run of the test below fits, one more worker or GPU workers do not.
    debug = ROOT / "configs/debug.yaml"
    assert autoscaler_fit(cluster, load_config(debug, ELASTIC)) is None
    assert autoscaler_fit(cluster, load_config(debug, ["scaling.num_workers=[1,3]", "scaling.use_gpu=true",
                                                       "scaling.cpus_per_worker=0"])) is None
    assert "hold at most 3" in autoscaler_fit(cluster, load_config(debug, [*ELASTIC, "scaling.num_workers=[1,4]"]))
    assert "hold at most 0" in autoscaler_fit(cluster, load_config(debug, [*ELASTIC, "scaling.cpus_per_worker=0.25"]))
    assert "hold at most 0" in autoscaler_fit(
        cluster, load_config(debug, [*ELASTIC, "scaling.resources_per_worker={trainer: 2}"]))


# ---------------------------------------------------------------------------------------
# A real elastic run on the fake autoscaler.


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _session_pids(sid: int) -> list[int]:
    """Live (not zombie) processes of session `sid`: the head's `ray start` and all it started,
    the autoscaler's fake nodes and their workers included."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        try:
            if os.getsid(pid) != sid:
                continue
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if state != "Z":
            pids.append(pid)
    return pids


def _stop_head(head: subprocess.Popen, temp_dir: Path) -> None:
    """Stop the cluster this module started, and only it (not `ray stop`, which stops every Ray
    process on the machine): SIGTERM to `ray start --block`, which stops its own processes; then
    SIGKILL what is left of its session (the fake nodes belong to the autoscaler, not to it)."""
    if head.poll() is None:
        head.send_signal(signal.SIGTERM)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pass
    deadline = time.monotonic() + 60
    while (left := _session_pids(head.pid)) and time.monotonic() < deadline:
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.5)
    if head.poll() is None:
        head.wait(timeout=10)
    shutil.rmtree(temp_dir, ignore_errors=True)
    assert not _session_pids(head.pid), f"processes of the fake cluster left: {_session_pids(head.pid)}"


class FakeCluster:
    def __init__(self, address: str, head: subprocess.Popen, temp_dir: Path, log: Path, env: dict):
        self.address, self.head, self.temp_dir, self.log, self.env = address, head, temp_dir, log, env

    def wait_started(self, timeout_s: float = 300) -> None:
        deadline = time.monotonic() + timeout_s
        while "Ray runtime started" not in self.log.read_text():
            assert self.head.poll() is None, \
                f"ray start exited with {self.head.returncode}:\n{self.log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, \
                f"the head did not start in {timeout_s:g} s:\n{self.log.read_text()[-3000:]}"
            time.sleep(0.5)

    def status(self) -> str:
        done = subprocess.run([RAY, "status", f"--address={self.address}"], env=self.env, capture_output=True,
                              text=True, timeout=120)
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout

    def wait_for_nodes(self, nodes: dict[str, int], timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while (got := active_nodes(status := self.status())) != nodes:
            assert time.monotonic() < deadline, f"waited {timeout_s:g} s for {nodes}, got {got}:\n{status}"
            time.sleep(2)

    def monitor_log(self) -> str:
        return (self.temp_dir / "session_latest" / "logs" / "monitor.log").read_text()


def active_nodes(status: str) -> dict[str, int]:
    """Node type -> count from the `Active:` section of `ray status`."""
    section = status.split("Active:", 1)[1].split("Pending:", 1)[0]
    return {m.group(2): int(m.group(1)) for m in re.finditer(r"^\s+(\d+)\s+(\S+)\s*$", section, re.M)}


@pytest.fixture(scope="module")
def fake_cluster(tmp_path_factory):
    """A head started with cluster/local-autoscaler.yaml: its own temp dir, ports and session.
    Yields as soon as `ray start` runs (`wait_started` waits for it), so other setup overlaps."""
    from ray.util import get_node_ip_address

    work = tmp_path_factory.mktemp("fake_cluster")
    port = _free_port()
    address = f"{get_node_ip_address()}:{port}"
    config = yaml.safe_load(AUTOSCALER_YAML.read_text())
    config["provider"]["gcs_address"] = address  # fake nodes join this head, not <ip>:6379
    # One gpu node kept up (min_workers 1 here, 0 in the file): the run starts on it at 1 worker
    # (the test holds the autoscaler back until then). From 0 nodes it would start at 1, 2 or 3
    # workers: the fake provider launches the 3 nodes within seconds of the run's request.
    config["available_node_types"]["gpu"]["min_workers"] = 1
    (work / "autoscaler.yaml").write_text(yaml.safe_dump(config))
    temp_dir = Path("/tmp") / f"raylm-fake-{os.getpid()}"  # short: Ray's socket paths have a length limit
    env = {**os.environ, "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1", "RAY_AUTH_MODE": "disabled",
           "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0", "RAY_USAGE_STATS_ENABLED": "0",
           # Processes of this cluster that look a cluster up by "auto" (Ray Train's placement group
           # cleaner does) find this one, not the newest other Ray instance on the machine.
           "RAY_ADDRESS": address}
    # Every port of its own: the session's in-process cluster (or another on this machine) may hold the defaults.
    ports = [f"--{flag}={_free_port()}" for flag in (
        "dashboard-port", "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "metrics-export-port",
        "runtime-env-agent-port", "ray-client-server-port")]
    # SIGTERM to `ray start --block` if the test process dies (a killed CI job), so it still stops
    # its cluster; the fake nodes' raylets then exit for want of a GCS.
    die_with_parent = [setpriv, "--pdeathsig", "TERM", "--"] if (setpriv := shutil.which("setpriv")) else []
    log = work / "head.log"
    with log.open("w") as out:
        head = subprocess.Popen(
            [*die_with_parent, RAY, "start", "--head", "--block", f"--port={port}", "--num-cpus=2", "--num-gpus=0",
             f"--object-store-memory={300 * 2**20}", f"--temp-dir={temp_dir}", "--disable-usage-stats",
             "--include-dashboard=false", f"--autoscaling-config={work / 'autoscaler.yaml'}", *ports],
            env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )
    try:
        yield FakeCluster(address, head, temp_dir, log, env)
    finally:
        _stop_head(head, temp_dir)


@pytest.fixture(scope="module")
def prepared_data(ray_cluster, tmp_path_factory) -> str:
    """`data.prepared_path=...` of the debug corpus slice, prepared on the session's in-process
    cluster, not the fake one: there Ray Data would start Ray's AutoscalingCoordinator (a detached
    actor) before the run, at a random phase of its 20 s look at the cluster (see the test)."""
    from raylm.ray.prepare import prepare

    override = f"data.prepared_path={tmp_path_factory.mktemp('prepared') / 'debug'}"
    prepare(load_config(ROOT / "configs/debug.yaml", [*DATA, override]), log=lambda line: None)
    return override


def session_processes(sid: int, match) -> list[int]:
    """Live processes of session `sid` whose command line satisfies `match` (Ray's workers
    set theirs to `ray::ClassName...`)."""
    found = []
    for pid in _session_pids(sid):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if match(cmdline):
            found.append(pid)
    return found


def step_rows(runs: Path) -> list[dict]:
    """The step records so far of the one run under `runs`."""
    rows = []
    for path in runs.glob("*/metrics.jsonl"):
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line being written
            if "loss" in record:
                rows.append(record)
    return rows


def checkpointed(runs: Path) -> bool:
    return any(ckpt.latest_checkpoint(run) is not None for run in runs.glob("*"))


@pytest.mark.slow
def test_elastic_run_makes_the_autoscaler_launch_gpu_nodes_and_grows_to_its_max(fake_cluster, prepared_data,
                                                                                  tmp_path):
    """The run starts on the one gpu node at 1 worker; its request for 3 makes the autoscaler
    launch two more nodes; it grows to 3 and stays there. Every step is recorded once: at 1
    worker up to the checkpoint it restored at the resize, at 3 after.

    The test makes that order, not timing: the autoscaler is stopped (`frozen`) until the run
    has trained at 1 worker past a checkpoint, so the run cannot start at 3 (wherever Ray's
    AutoscalingCoordinator, which looks at the cluster every 20 s, is in its period); then the
    one training worker is stopped until the run has grown, so it cannot finish at 1 worker
    (however long the launch and the coordinator's next look take). Prepared shards: a resize
    restarts without a data pipeline."""
    fake_cluster.wait_started()
    fake_cluster.wait_for_nodes({"ray.head.default": 1, "gpu": 1}, 300)  # the group's floor, nothing more
    (monitor,) = session_processes(fake_cluster.head.pid, lambda c: "/autoscaler/" in c and "monitor.py" in c)

    runs = tmp_path / "runs"
    train = [sys.executable, "-m", "raylm", "train", "configs/debug.yaml", *DATA, prepared_data, *ELASTIC, *RUN,
             f"run.output_dir={runs}"]
    log = tmp_path / "train.log"
    with log.open("w") as out:
        run = subprocess.Popen(train, cwd=ROOT, env=fake_cluster.env, stdout=out, stderr=subprocess.STDOUT)
    try:
        with frozen([monitor]):  # no node is launched for the run's request yet
            wait_for(lambda: checkpointed(runs), 600, "a checkpoint at 1 worker", ended=lambda: run.poll() is not None)
            (worker,) = wait_for(lambda: session_processes(fake_cluster.head.pid,
                                                           lambda c: c.startswith("ray::RayTrainWorker")),
                                 120, "the training worker's process")
            os.kill(worker, signal.SIGSTOP)
        try:  # the autoscaler runs, the run waits at 1 worker
            rows = step_rows(runs)
            assert {r["world_size"] for r in rows} == {1} and max(r["step"] for r in rows) < MAX_STEPS
            wait_for(lambda: any(r["world_size"] == 3 for r in step_rows(runs)), 600, "the run to grow to 3",
                     ended=lambda: run.poll() is not None)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(worker, signal.SIGCONT)  # killed already at the resize, as a rule
        run.wait(timeout=900)
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
    output = log.read_text()
    assert run.returncode == 0, output[-8000:]
    (run_dir,) = runs.iterdir()
    assert f"final checkpoint: {run_dir / ckpt.checkpoint_dir_name(MAX_STEPS)}" in output

    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, MAX_STEPS + 1))  # steps after the restored one: trained again
    sizes = [r["world_size"] for r in steps]
    assert sizes[0] == 1, sizes
    grown = sizes.index(3)
    assert sizes[grown:] == [3] * (MAX_STEPS - grown), sizes  # at its max, it stays there
    assert grown in [r["step"] for r in records if r.get("event") == "restored"]  # restored at the resize
    assert ckpt.read_marker(run_dir / ckpt.checkpoint_dir_name(MAX_STEPS))["world_size"] == 3

    # The autoscaler launched the other two nodes, for Ray Train's request of 3 `trainer` bundles.
    assert active_nodes(fake_cluster.status()) == {"ray.head.default": 1, "gpu": 3}
    monitor_log = fake_cluster.monitor_log()
    assert "{'trainer': 1.0}: 3 from request_resources()" in monitor_log
    launches = [int(n) for n in re.findall(r":event_summary:Adding (\d+) node\(s\) of type gpu", monitor_log)]
    assert launches[0] == 1 and sum(launches[1:]) >= 2, launches  # the floor, then the run's 2 more
