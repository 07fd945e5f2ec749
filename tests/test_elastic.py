"""Elastic training and fault tolerance on a multi-node Ray cluster (`ray.cluster_utils.Cluster`).

Virtual nodes on this machine, CPU workers holding a `trainer` resource each, the debug model.
`fit` runs in a task pinned to the head node while the test adds, removes, drains nodes and
kills workers, and reads the run's real outputs: metrics.jsonl (one record per step with its
world size, `restored` events) and the checkpoints' data positions.

The session's 2-CPU cluster is shut down for this module and started again after it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from raylm.config import load_config
from raylm.train import checkpoint as ckpt
from support import frozen, wait_for

pytestmark = [pytest.mark.ray, pytest.mark.slow]  # every test here runs on a Ray cluster

ROOT = Path(__file__).resolve().parents[1]
G = 8  # sequences per step: 2 workers x 2 x 2, and uneven (4/2/2) on 3 workers of micro-batch 2


def elastic_config(out: Path, *overrides: str):
    return load_config(ROOT / "configs/debug.yaml", [
        f"run.output_dir={out}", "data.sources.0.max_bytes=400000", "data.seq_len=64",
        f"train.global_batch_tokens={64 * G}", "train.micro_batch_size=2", "train.eval_every=0",
        "train.log_every=1", "run.sample_tokens=0", "run.keep_checkpoints=50", "data.tokenize_actors=1",
        "scaling.cpus_per_worker=0", "scaling.resources_per_worker={trainer: 1}", "scaling.resize_check_s=1",
        "train.preemption_check_every=1", *overrides,
    ])


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> str:
    """`tokenizer.path=...` of the tokenizer these runs would train, trained once here in this
    process: each streaming run (and `raylm prepare`) would otherwise sample the corpus through
    Ray Data and train the same one again before its first step."""
    from support import train_tokenizer_local

    path = tmp_path_factory.mktemp("tokenizer") / "tokenizer.model"
    train_tokenizer_local(elastic_config(path.parent)).save(path)
    return f"tokenizer.path={path}"


@pytest.fixture(scope="module")
def cluster():
    """A head node (2 CPUs, 2 trainer slots); tests add and remove worker nodes of 1 slot."""
    import ray
    from ray.cluster_utils import Cluster

    from conftest import quiet_ray_data, start_local_ray

    ray.shutdown()
    # Ray Train's preemption watcher looks for drained nodes every 1 s, not 5 (its node processes
    # inherit it): the just-in-time checkpoint follows the drain sooner; nothing else changes.
    poll = os.environ.get("RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S")
    os.environ["RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S"] = "1"
    c = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 2, "resources": {"trainer": 2}, "object_store_memory": 300 * 2**20,
        "include_dashboard": False})
    ray.init(address=c.address, log_to_driver=False, configure_logging=False)
    quiet_ray_data()
    yield c
    ray.shutdown()
    c.shutdown()
    if poll is None:
        del os.environ["RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S"]
    else:
        os.environ["RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S"] = poll
    start_local_ray()


RUNNING: list = []


@pytest.fixture(autouse=True)
def no_run_outlives_its_test():
    """A failed test's run is cancelled (its driver task and, fate-shared, the Train controller)."""
    yield
    import ray

    while RUNNING:
        ray.cancel(RUNNING.pop(), force=True)


def fit_in_background(cfg):
    """(run dir, ObjectRef of (metrics, final checkpoint)) of `fit` running in a head-node task."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from raylm.train.runs import resolve_run

    spec = resolve_run(cfg)
    head = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    ref = ray.remote(num_cpus=0, max_retries=0)(_fit).options(scheduling_strategy=head).remote(spec)
    RUNNING.append(ref)
    return Path(spec.run_dir), ref


def ray_cli(*args: str, address: str) -> None:
    """The `ray` command of this interpreter's environment (the venv need not be on PATH)."""
    command = [str(Path(sys.executable).with_name("ray")), *args, "--address", address]
    subprocess.run(command, check=True, capture_output=True, timeout=300,
                   env={**os.environ, "RAY_AUTH_MODE": "disabled"})


def _fit(spec):
    from raylm.ray.train import fit

    result = fit(spec, log=lambda line: None)
    return result.metrics, result.checkpoint


def records(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            pass  # a line being written
    return out


def step_records(run_dir: Path) -> list[dict]:
    return [r for r in records(run_dir) if "loss" in r]


def ended(ref):
    """`wait_for`'s `ended` for the run `ref`: True once it has finished (raising its error if it failed)."""
    import ray

    def check() -> bool:
        done, _ = ray.wait([ref], timeout=0)
        if done:
            ray.get(ref)
        return bool(done)

    return check


def last_step(run_dir: Path) -> int:
    return max((r["step"] for r in step_records(run_dir)), default=0)


def final_position(run_dir: Path) -> dict:
    newest = ckpt.list_checkpoints(run_dir)[-1]
    return ckpt.read_marker(newest)["train_state"]


def assert_each_sequence_trained_once(state: dict, steps: int) -> None:
    """The final data position holds steps x G distinct indices, the number the steps trained:
    so none was trained twice (a streaming split may leave a few unconsumed rows below the
    newest ones, in a worker's buffer at the end: `data_extra`)."""
    extra = state["data_extra"]
    assert len(set(extra)) == len(extra) and all(i > state["data_watermark"] for i in extra)
    assert state["data_watermark"] + len(extra) == steps * G
    assert state["tokens_consumed"] == steps * G * 64


def prepare_data(cluster, out: Path, tokenizer: str) -> str:
    from raylm.ray.prepare import prepare

    data = f"data.prepared_path={out / 'prepared'}"
    prepare(elastic_config(out, data, tokenizer), log=lambda line: None)
    return data


def training_worker_pids(node_id: str | None = None) -> list[int]:
    """Process ids of the live Ray Train workers (on node `node_id` only, if given)."""
    import ray

    alive = ray._private.state.actors(actor_state_name="ALIVE").values()
    return [a["Pid"] for a in alive if a["ActorClassName"] == "RayTrainWorker" and a["Pid"]
            and node_id in (None, a["Address"]["NodeID"])]


def head_node_id() -> str:
    import ray

    return ray.get_runtime_context().get_node_id()


def test_shrink_and_grow_keep_the_global_batch_and_the_loss_curve(cluster, tokenizer, tmp_path):
    """[2, 3] workers on prepared data: a node joins (2 -> 3, an uneven 4/2/2 split), then leaves
    (3 -> 2). Every step is trained once in the final metrics and its loss matches an
    uninterrupted run's: the same trainer in one process, without Ray (the global batch is exact
    at every world size, so 1, 2 and 3 workers compute the same steps up to summation order).

    The node joins and leaves while the workers are stopped (`frozen`) at a step the test has
    read, so the run cannot reach its end before either, however fast or slow the machine."""
    import ray

    from raylm.train.local import train_local

    data = prepare_data(cluster, tmp_path, tokenizer)
    steps = 24
    fixed = elastic_config(tmp_path / "fixed", data, f"train.max_steps={steps}", "scaling.num_workers=2")
    reference_dir = Path(train_local(fixed, log=lambda line: None).run_dir)
    reference = {r["step"]: r["loss"] for r in step_records(reference_dir)}

    cfg = elastic_config(tmp_path / "elastic", data, f"train.max_steps={steps}", "scaling.num_workers=[2, 3]",
                         "train.checkpoint_every=2")
    run_dir, ref = fit_in_background(cfg)
    wait_for(lambda: last_step(run_dir) >= 3, 300, "step 3", ended=ended(ref))
    with frozen(training_worker_pids()):
        assert last_step(run_dir) < steps - 2, "the run got to its end before the node joined"
        node = cluster.add_node(num_cpus=0, resources={"trainer": 1})  # returns once the node is up
    wait_for(lambda: any(r["world_size"] == 3 for r in step_records(run_dir)), 300, "the run to grow to 3",
             ended=ended(ref))
    grown_at = min(r["step"] for r in step_records(run_dir) if r["world_size"] == 3)
    wait_for(lambda: last_step(run_dir) >= grown_at + 2, 300, "steps on 3 workers", ended=ended(ref))
    # The head's workers stopped: the one on the leaving node waits for them in a collective.
    with frozen(training_worker_pids(head_node_id())):
        assert last_step(run_dir) < steps, "the run got to its end before the node left"
        cluster.remove_node(node)
    metrics, final = ray.get(ref, timeout=600)

    got = step_records(run_dir)
    assert [r["step"] for r in got] == list(range(1, steps + 1))  # redone steps replaced the lost ones
    sizes = [r["world_size"] for r in got]
    assert sizes[0] == 2 and 3 in sizes and sizes[-1] == 2 and sizes.index(3) < len(sizes) - sizes[::-1].index(3)
    assert all(r["tokens_consumed"] == r["step"] * G * 64 for r in got)
    for r in got:
        assert r["loss"] == pytest.approx(reference[r["step"]], rel=2e-4), (r["step"], r["world_size"])
    assert sum(1 for r in records(run_dir) if r.get("event") == "restored") >= 2
    state = final_position(run_dir)
    assert state["step"] == steps and state["data_watermark"] == steps * G and state["data_extra"] == []


def test_a_preemption_checkpoints_at_once_and_a_killed_worker_restarts_the_run_each_sequence_trained_once(
        cluster, tokenizer, tmp_path):
    """Streaming data, default failure settings, [1, 3] workers.

    1. Preemption: a drain with a deadline (a spot reclaim) on a worker's node. The workers see
       it at their next preemption check and checkpoint at once, at a step at or after the one
       they had reached at the drain; after the node is gone the run restarts from that
       checkpoint, so no step trained before the drain is trained again (none lost).
    2. Kill: once the restarted run has trained a few steps, a training worker is SIGKILLed. The
       run restarts from its latest checkpoint (its stream from the checkpoint's anchor, not
       from the start of the corpus) and the steps trained since are trained again and replace
       the lost ones.

    The run finishes every step once in metrics.jsonl, and its final data position is exactly
    the first steps x G sequences: none trained twice, none skipped. The drain and the kill are
    made while the workers are stopped (`frozen`) at a step the test has read, so neither can
    come after the run's end, however fast or slow the machine."""
    import ray

    steps = 60
    cfg = elastic_config(tmp_path, tokenizer, f"train.max_steps={steps}", "scaling.num_workers=[1, 3]",
                         "train.checkpoint_every=1000")  # so the only checkpoint before the end is the preemption's
    assert cfg.run.max_failures > 0 and cfg.run.max_preemptions != 0  # the defaults
    node = cluster.add_node(num_cpus=0, resources={"trainer": 1})
    run_dir, ref = fit_in_background(cfg)
    wait_for(lambda: any(r["world_size"] == 3 for r in step_records(run_dir)), 300, "3 workers", ended=ended(ref))
    wait_for(lambda: last_step(run_dir) >= 4, 300, "step 4", ended=ended(ref))
    with frozen(training_worker_pids()):
        drained_at = last_step(run_dir)  # the workers are at this step or past it (a row may be on its way)
        assert drained_at < steps - 1, "the run got to its end before the drain"
        ray_cli("drain-node", "--node-id", node.node_id, "--reason", "DRAIN_NODE_REASON_PREEMPTION",
                "--reason-message", "spot", "--deadline-remaining-seconds", "120", address=cluster.address)
    # complete: its directory appears before rank 0 writes the marker last
    wait_for(lambda: (found := ckpt.list_checkpoints(run_dir)) and ckpt.read_marker(found[0]), 300,
             "a just-in-time checkpoint", ended=ended(ref))
    (jit,) = ckpt.list_checkpoints(run_dir)
    saved = ckpt.read_marker(jit)["train_state"]["step"]
    assert drained_at <= saved < steps  # at a preemption check after the drain, not a periodic save
    cluster.remove_node(node)  # the deadline: the instance is reclaimed

    wait_for(lambda: any(r.get("event") == "restored" for r in records(run_dir)), 300, "the restart",
             ended=ended(ref))
    wait_for(lambda: sum(1 for r in step_records(run_dir) if r["step"] > saved) >= 2, 300,
             "steps after the restart", ended=ended(ref))
    # The restarted group's workers: as many live as the world size its rows report (an old
    # group's actors may still be listed alive for a moment after the restart).
    size = step_records(run_dir)[-1]["world_size"]
    pids = wait_for(lambda: p if len(p := training_worker_pids()) == size else None, 300,
                    f"{size} live training workers", ended=ended(ref))
    with frozen(pids):
        trained = [r["step"] for r in step_records(run_dir) if r["step"] > saved]
        assert len(trained) >= 2 and max(trained) < steps, "the run got to its end before the kill"
        restores_before_kill = sum(1 for r in records(run_dir) if r.get("event") == "restored")
        os.kill(pids[-1], signal.SIGKILL)
    ray.get(ref, timeout=600)

    got = step_records(run_dir)
    assert [r["step"] for r in got] == list(range(1, steps + 1))  # redone steps replaced the lost ones
    assert {r["world_size"] for r in got if r["step"] > saved} <= {1, 2}
    # Every restart restores the preemption's checkpoint: after the drain and after the kill
    # (and after any restart Ray makes for its own reasons: seen under a load average of 40, its
    # PlacementGroupCleaner took the live controller for dead and removed the workers' group).
    restored = [r for r in records(run_dir) if r.get("event") == "restored"]
    assert len(restored) >= 2 and {r["step"] for r in restored} == {saved}, restored
    assert restored[0]["step"] >= drained_at  # no step trained before the drain was lost
    # The kill's restart drops the steps trained between the restart and the kill.
    assert restored[restores_before_kill]["dropped_records"] >= len(trained)
    state = final_position(run_dir)
    assert state["step"] == steps
    assert_each_sequence_trained_once(state, steps)
    assert state["data_anchor"][0] < state["data_watermark"]
