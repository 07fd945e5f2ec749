"""Ray's autoscaler adds and removes real hosts: `cluster/hosts.sh up 1 --autoscale` starts a head
whose autoscaler runs `cluster/hosts_provider.py`, a NodeProvider whose nodes are namespace hosts of
the set (each its own address, disk and processes). An elastic run asks for workers, the autoscaler
makes hosts for them; when the hosts are idle it removes them, and nothing of them is left.

The module's set: h0 (head, moto_server, no `trainer` slot), client (submits jobs) and the `worker`
hosts the autoscaler makes (one `trainer` slot each), at least one (min_workers 1 here). One set for
the module; its finaliser runs `down` and checks that no namespace of the set is left. Needs root,
`ip`, `unshare` and `nsenter`: elsewhere the module is skipped with the reason in pytest's summary."""
from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import yaml

from support import frozen, wait_for
from test_hosts import upload_script, why_not

pytestmark = [pytest.mark.hosts, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
HOSTS = ROOT / "cluster" / "hosts.sh"
BASE = Path("/var/lib/raylm-hosts")
CORPUS = "s3://corpus/stdlib/"
CORPUS_DIRS = ("json", "email")
MAX_STEPS = 40
SEQUENCES = 24  # per step, at any world size (global_batch_tokens / seq_len)
SEQ_LEN = 64  # debug preset


class Hosts:
    """`cluster/hosts.sh` with this module's prefix; the set's state is read from STATE directly."""

    def __init__(self, prefix: str):
        self.prefix, self.state = prefix, BASE / prefix
        self.env = {**os.environ, "RAYLM_HOSTS_PREFIX": prefix, "RAYLM_HOSTS_DIR": str(BASE),
                    "RAYLM_HOSTS_PYTHON": sys.executable,
                    "RAYLM_HOSTS_ENV": "AUTOSCALER_UPDATE_INTERVAL_S=1",  # the autoscaler looks every second
                    # a host's Ray start is retried by its supervisor; on a loaded machine it took 3 tries
                    "RAYLM_HOSTS_START_TIMEOUT_S": "600"}

    def sh(self, *args: str, timeout: float = 900, check: bool = True) -> subprocess.CompletedProcess:
        proc = subprocess.run(["bash", str(HOSTS), *args], env=self.env, capture_output=True, text=True,
                              timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"hosts.sh {' '.join(args[:3])} exited {proc.returncode}:\n"
                                 f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
        return proc

    def python(self, host: str, code: str) -> str:
        return self.sh("exec", host, "python", "-c", code).stdout

    def hosts(self) -> list[str]:
        return (self.state / "hosts").read_text().split()

    def namespaces(self) -> list[str]:
        out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        return [line.split()[0] for line in out.splitlines() if line.split()[0].startswith(self.prefix + "-")]

    def processes(self, host: str, marker: bytes) -> list[int]:
        """This machine's pids of `host`'s processes whose command line holds `marker`."""
        init = int((self.state / host / "pid").read_text())
        ns = os.readlink(f"/proc/{init}/ns/pid")
        pids = []
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                with contextlib.suppress(OSError):
                    if (os.readlink(f"/proc/{entry}/ns/pid") == ns
                            and marker in Path(f"/proc/{entry}/cmdline").read_bytes()):
                        pids.append(int(entry))
        return pids

    def alive_ips(self) -> set[str]:
        """The IPs of the cluster's alive Ray nodes (asked on the head)."""
        out = self.python("h0", "import json, ray\nray.init(address='auto', logging_level='ERROR')\n"
                                "print(json.dumps([n['NodeManagerAddress'] for n in ray.nodes() if n['Alive']]))")
        return set(json.loads(out.strip().splitlines()[-1]))

    def provider_nodes(self) -> list[str]:
        """The provider's nodes (h0 and the hosts it made and saw join), from its state on h0's disk."""
        try:
            return sorted(json.loads((self.state / "h0" / "disk" / "tmp" / "hosts-provider.json").read_text()))
        except (FileNotFoundError, ValueError):
            return []

    def monitor_log(self) -> str:
        ray_dir = self.state / "h0" / "disk" / "tmp" / "ray"  # the head's newest session (a slow start is retried)
        session = os.path.basename(os.readlink(ray_dir / "session_latest"))
        return (ray_dir / session / "logs" / "monitor.log").read_text()


UPLOAD = upload_script(CORPUS_DIRS)


@pytest.fixture(scope="module")
def autoscaled(tmp_path_factory):
    """A set started with cluster/hosts-autoscaler.yaml, its worker group kept at 1 host or more
    and an idle host removed after 12 s; the corpus uploaded to the head's S3."""
    reason = why_not()
    if reason:
        pytest.skip(reason)
    config = yaml.safe_load((ROOT / "cluster" / "hosts-autoscaler.yaml").read_text())
    config["available_node_types"]["worker"]["min_workers"] = 1  # the run starts on one host
    config["idle_timeout_minutes"] = 0.2
    path = tmp_path_factory.mktemp("autoscaler") / "hosts-autoscaler.yaml"
    path.write_text(yaml.safe_dump(config))
    h = Hosts(f"pv{os.getpid() % 100000}")
    try:
        h.sh("up", "1", "--cpus", "2", "--autoscale", str(path))
        h.python("client", UPLOAD)
        yield h
    finally:
        h.sh("down", check=False, timeout=300)
        left = h.namespaces()
        assert not left, f"namespaces left behind: {left}"
        assert not h.state.exists(), f"state left behind: {h.state}"


class Job:
    """`raylm train` submitted from the client host with `ray job submit`, in the background."""

    def __init__(self, h: Hosts, name: str, *overrides: str):
        self.h, self.run, self.id = h, f"s3://runs/{name}", f"raylm-{name}-{os.getpid()}"
        args = [f"{ROOT}/configs/debug.yaml", "run.output_dir=s3://runs/", f"run.name={name}",
                f"data.sources=[{{path: '{CORPUS}', format: text}}]", "data.val_fraction=0",
                "train.eval_every=0", "train.log_every=1", "run.sample_tokens=0", *overrides]
        command = "python -m raylm train " + " ".join(f"'{a}'" for a in args)
        self.proc = subprocess.Popen(["bash", str(HOSTS), "exec", "client", "bash", "-c",
                                      f"ray job submit --address $RAYLM_DASHBOARD --submission-id {self.id} "
                                      f"-- {command} 2>&1"],
                                     env=h.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        self.reader = threading.Thread(target=lambda: self.lines.extend(self.proc.stdout), daemon=True)
        self.reader.start()

    def gone(self) -> bool:
        if self.proc.poll() is None:
            return False
        self.reader.join(timeout=60)
        raise AssertionError(f"the job ended (exit {self.proc.returncode}):\n{''.join(self.lines)[-8000:]}")

    def records(self) -> list[dict]:
        out = self.h.python("client", f"""
from raylm import storage
try:
    print(storage.read_bytes('{self.run}/metrics.jsonl').decode())
except Exception:
    pass""")
        return [json.loads(line) for line in out.splitlines() if line.startswith("{")]

    def rows(self) -> list[dict]:
        return [r for r in self.records() if "loss" in r]

    def checkpointed_at_one_worker(self) -> bool:
        return self.h.python("client", f"""
from raylm.train import checkpoint as ckpt
found = ckpt.latest_checkpoint({self.run!r})
print(bool(found) and ckpt.read_marker(found)["world_size"] == 1)""").strip().endswith("True")

    def finish(self, timeout: float = 1800) -> str:
        self.proc.wait(timeout=timeout)
        self.reader.join(timeout=60)
        output = "".join(self.lines)
        assert self.proc.returncode == 0 and "succeeded" in output, output[-6000:]
        return output

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.h.sh("exec", "client", "bash", "-c", f"ray job stop --address $RAYLM_DASHBOARD {self.id}",
                      timeout=300, check=False)
            self.proc.kill()


def training_worker_ips(h: Hosts) -> list[str]:
    """The node IPs of every training worker the cluster has run so far."""
    out = h.python("h0", """
import json, ray
from ray.util.state import list_actors
ray.init(address="auto", logging_level="ERROR")
nodes = {n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes()}
print(json.dumps(sorted({nodes[a.node_id] for a in list_actors(filters=[("class_name", "=", "RayTrainWorker")],
                                                                 detail=True, limit=10000)})))
""")
    return json.loads(out.strip().splitlines()[-1])


def test_an_elastic_run_makes_the_autoscaler_add_two_hosts_and_grow_to_three_workers_then_idle_hosts_go(
        autoscaled):
    """`raylm train` with scaling.num_workers=[1,3] and one `trainer` slot per worker, submitted from
    the client host, starts on the one worker host the autoscaler keeps (h1), asks for 3 workers,
    and the autoscaler makes two more hosts (h2, h3: new namespaces, addresses, disks, Ray nodes);
    the run grows to 3 workers, one per host, with the same global batch (24 sequences a step at
    any size), every step recorded once. After the run, the autoscaler removes the idle hosts down
    to its floor of one, and nothing of a removed host is left: no namespace, no veth on the
    bridge, no process, no disk.

    The test makes that order, not timing: the autoscaler is stopped until the run has a checkpoint
    at 1 worker (so the run cannot start at 3); then the run's one worker is stopped until the run
    has grown (so it cannot finish at 1 worker however long a host takes to make). The two hosts
    are made side by side, but may join a few seconds apart: the run may pass through 2 workers."""
    h = autoscaled
    wait_for(lambda: h.provider_nodes() == ["h0", "h1"], 600, "the autoscaler's first worker host (h1)", poll_s=1)
    assert h.hosts() == ["h0", "client", "h1"]
    (monitor,) = [p for p in h.processes("h0", b"monitor.py") if b"autoscaler" in Path(f"/proc/{p}/cmdline").read_bytes()]

    job = None
    worker_paused = contextlib.ExitStack()
    try:
        with frozen([monitor]):  # no host is made for the run's request yet
            job = Job(h, "grow", "scaling.num_workers=[1,3]", "scaling.resources_per_worker={trainer: 1}",
                      "scaling.cpus_per_worker=0", "scaling.resize_check_s=5", f"train.max_steps={MAX_STEPS}",
                      f"train.global_batch_tokens={SEQUENCES * SEQ_LEN}", "train.micro_batch_size=8",
                      "train.checkpoint_every=2")
            wait_for(job.checkpointed_at_one_worker, 900, "a checkpoint at 1 worker", ended=job.gone, poll_s=5)
            worker_paused.enter_context(frozen(h.processes("h1", b"RayTrainWorker")))
        # The autoscaler runs: it makes h2 and h3 for the run's request of 3 `trainer` slots.
        wait_for(lambda: h.provider_nodes() == ["h0", "h1", "h2", "h3"], 900, "hosts h2 and h3", poll_s=1)
        assert sorted(h.hosts()) == ["client", "h0", "h1", "h2", "h3"]  # (h2 and h3 in either order)
        wait_for(lambda: any(r["world_size"] == 3 for r in job.rows()), 900, "the run to grow to 3 workers",
                 ended=job.gone, poll_s=5)
        worker_paused.close()  # killed at the resize already, as a rule
        # 3 workers, 1 `trainer` slot per host: one worker on each of the 3 hosts
        assert training_worker_ips(h) == ["198.18.0.2", "198.18.0.3", "198.18.0.4"]
        # Each host's PID 1, read while the run keeps all three busy: once it ends, the
        # autoscaler may remove any idle one (h1 too) before the test looks.
        made = {x: int((h.state / x / "pid").read_text()) for x in ("h1", "h2", "h3")}
        job.finish()
    finally:
        worker_paused.close()
        if job is not None:
            job.kill()

    records = job.records()
    rows = [r for r in records if "loss" in r]
    assert [r["step"] for r in rows] == list(range(1, MAX_STEPS + 1))  # each step once
    sizes = [r["world_size"] for r in rows]
    assert sizes[0] == 1 and sizes[-1] == 3 and sizes == sorted(sizes), sizes  # grown, never shrunk
    assert sizes.index(3) in [r["step"] for r in records if r.get("event") == "restored"]  # grown at a restore
    # The same global batch at every size: every step trains 24 sequences of 64 tokens.
    assert all(r["tokens_consumed"] == r["step"] * SEQUENCES * SEQ_LEN for r in rows)
    log = h.monitor_log()
    assert "{'trainer': 1.0}: 3 from request_resources()" in log
    launches = [int(n) for n in re.findall(r"Adding (\d+) node\(s\) of type worker", log)]
    assert launches[0] == 1 and sum(launches[1:]) == 2, launches  # the floor, then the run's 2 more

    # After the run: the idle hosts go, down to the group's floor of one.
    wait_for(lambda: len(h.provider_nodes()) == 2, 600, "the autoscaler to remove two idle hosts", poll_s=1)
    (kept,) = [x for x in h.provider_nodes() if x != "h0"]
    assert h.hosts() == ["h0", "client", kept]
    assert h.alive_ips() == {"198.18.0.1", f"198.18.0.{int(kept[1:]) + 1}"}
    bridge = subprocess.run(["ip", "-n", f"{h.prefix}-hub", "-br", "link"], capture_output=True, text=True).stdout
    log = h.monitor_log()
    for host in set(made) - {kept}:
        assert f"{h.prefix}-{host}" not in h.namespaces()  # its network namespace
        assert not Path(f"/proc/{made[host]}").exists()  # its PID 1, so every process of it
        assert not (h.state / host).exists()  # its disk
        assert f"v{int(host[1:])}@" not in bridge  # its veth on the bridge
        # and it was the autoscaler that removed it, as idle
        assert re.search(rf"Terminating the node with id {host} and ip [\d.]+\. \(idle\)", log), log[-3000:]
