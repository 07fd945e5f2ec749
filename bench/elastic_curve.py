"""Loss curves of an uninterrupted run and of the same run killed once, preempted once and resized twice.

On a `ray.cluster_utils.Cluster` (a head with 2 training slots, CPU workers, debug model,
prepared data), with `scaling.num_workers=[2, 3]`:

1. an uninterrupted run on 2 workers;
2. the same config, elastic: a node with a third slot joins (resize 2 -> 3, an uneven split
   of the batch), a training worker is SIGKILLed (restart from the latest checkpoint), the
   node gets a preemption notice (`ray drain-node` with a deadline: the run saves at once)
   and is then removed (resize 3 -> 2).

It writes a PNG overlaying both loss curves, marks the events, and prints the largest
per-step difference of the losses.

    python bench/elastic_curve.py [--steps 60] [--out docs/img/elastic_curve.png]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

G, L = 8, 64


def records(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    out = []
    for line in (path.read_text().splitlines() if path.exists() else []):
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return out


def steps(run_dir: Path) -> list[dict]:
    return [r for r in records(run_dir) if "loss" in r]


def last_step(run_dir: Path) -> int:
    s = steps(run_dir)
    return s[-1]["step"] if s else 0


def wait(predicate, what: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--out", default=str(ROOT / "docs/img/elastic_curve.png"))
    args = parser.parse_args()
    os.environ["RAY_AUTH_MODE"] = "disabled"

    import ray
    from ray.cluster_utils import Cluster
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from raylm.config import load_config
    from raylm.ray.prepare import prepare
    from raylm.train.runs import resolve_run

    out = Path(tempfile.mkdtemp(prefix="raylm-elastic-"))
    common = [f"run.output_dir={out}", "data.sources.0.max_bytes=400000", f"data.seq_len={L}",
              f"train.global_batch_tokens={G * L}", "train.micro_batch_size=2", "train.eval_every=0",
              "train.log_every=1", "run.sample_tokens=0", "run.keep_checkpoints=50", "data.tokenize_actors=1",
              "scaling.cpus_per_worker=0", "scaling.resources_per_worker={trainer: 1}", "scaling.resize_check_s=1",
              "train.preemption_check_every=1", "train.checkpoint_every=5", f"train.max_steps={args.steps}",
              f"data.prepared_path={out / 'prepared'}"]
    config = ROOT / "configs/debug.yaml"

    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 2, "resources": {"trainer": 2}, "object_store_memory": 300 * 2**20, "include_dashboard": False})
    ray.init(address=cluster.address, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    head = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)

    def start(cfg):
        spec = resolve_run(cfg)

        def run(spec):
            from raylm.ray.train import fit

            fit(spec, log=lambda line: None)

        return Path(spec.run_dir), ray.remote(num_cpus=0, max_retries=0)(run).options(scheduling_strategy=head).remote(spec)

    prepare(load_config(config, common), log=lambda line: None)
    fixed_dir, ref = start(load_config(config, [*common, "scaling.num_workers=2", "run.name=uninterrupted"]))
    ray.get(ref)

    elastic_dir, ref = start(load_config(config, [*common, "scaling.num_workers=[2, 3]", "run.name=elastic"]))
    events = []
    wait(lambda: last_step(elastic_dir) >= 8, "step 8")
    node = cluster.add_node(num_cpus=0, resources={"trainer": 1})
    events.append((last_step(elastic_dir), "node joins"))
    wait(lambda: any(r["world_size"] == 3 for r in steps(elastic_dir)), "the resize to 3")
    grown_at = min(r["step"] for r in steps(elastic_dir) if r["world_size"] == 3)
    wait(lambda: last_step(elastic_dir) >= grown_at + 6, "steps on 3 workers")
    alive = ray._private.state.actors(actor_state_name="ALIVE").values()
    pid = next(a["Pid"] for a in alive if a["ActorClassName"] == "RayTrainWorker")
    events.append((last_step(elastic_dir), "worker killed"))
    killed_at = time.time()
    os.kill(pid, signal.SIGKILL)
    wait(lambda: any(r["time"] > killed_at for r in steps(elastic_dir)), "the restart after the kill")
    wait(lambda: last_step(elastic_dir) >= events[-1][0] + 6, "steps after the kill")
    events.append((last_step(elastic_dir), "preemption notice"))
    subprocess.run([str(Path(sys.executable).with_name("ray")), "drain-node", "--address", cluster.address, "--node-id", node.node_id,
                    "--reason", "DRAIN_NODE_REASON_PREEMPTION", "--reason-message", "spot",
                    "--deadline-remaining-seconds", "30"], check=True, capture_output=True, timeout=60)
    noticed = time.time()
    wait(lambda: any(r["time"] > noticed for r in steps(elastic_dir)) and last_step(elastic_dir) >= events[-1][0] + 3,
         "steps after the notice")
    cluster.remove_node(node)
    events.append((last_step(elastic_dir), "node reclaimed"))
    ray.get(ref)
    ray.shutdown()
    cluster.shutdown()

    reference = {r["step"]: r["loss"] for r in steps(fixed_dir)}
    elastic = steps(elastic_dir)
    restored = [r for r in records(elastic_dir) if r.get("event") == "restored"]
    diffs = [abs(r["loss"] - reference[r["step"]]) / reference[r["step"]] for r in elastic]
    sizes = [r["world_size"] for r in elastic]

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.plot(sorted(reference), [reference[s] for s in sorted(reference)], lw=3, alpha=0.4,
            label="uninterrupted, 2 workers")
    ax.plot([r["step"] for r in elastic], [r["loss"] for r in elastic], lw=1, color="k",
            label="elastic [2, 3]: resized twice, killed once, preempted once")
    for step, what in events:
        ax.axvline(step, color="gray", ls=":", lw=1)
        ax.text(step, ax.get_ylim()[1], " " + what, rotation=90, va="top", fontsize=8, color="gray")
    for r in restored:
        ax.plot([r["step"]], [reference.get(r["step"], float("nan"))], "rv", ms=6)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title(f"debug model, {G} sequences x {L} tokens per step; red: restored from a checkpoint")
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)

    print(f"steps {args.steps}; world sizes seen in the elastic run: {sorted(set(sizes))}; "
          f"restores at steps {[r['step'] for r in restored]} (records dropped: "
          f"{[r['dropped_records'] for r in restored]})")
    print("events: " + ", ".join(f"{what} after step {step}" for step, what in events))
    print(f"largest relative loss difference per step: {max(diffs):.2e} (mean {sum(diffs) / len(diffs):.2e})")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
