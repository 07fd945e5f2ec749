"""Overhead of the Ray layer: tokens/s of `raylm train` with one worker vs the plain torch loop.

Same config (model, batch, steps), same machine, same number of torch threads (the
worker reserves threads - 0.25 CPUs, leaving room for Ray's own actors, and runs
ceil(cpus_per_worker) = threads torch threads). The plain
loop is `raylm train --local` (raylm.train.single: in-memory data, no Ray); the Ray run is
`train_on_ray` with one worker (TorchTrainer, worker start, data shards read in the worker,
metrics reports) on data prepared beforehand (`raylm prepare`), so that neither side spends
CPU on tokenising while it trains: on a 2-core machine the streaming pipeline's tokenizer
actors would otherwise take CPU from the worker, which measures the data pipeline
(bench/data_throughput.py), not the trainer. Throughput is the median of the per-step `tokens_per_second` after warm-up steps,
so start-up (cluster, tokenizer, pipeline) is excluded: it is a fixed cost, reported
separately as wall time.

    python bench/trainer_overhead.py [--config configs/demo.yaml] [--steps 60] [override ...]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def step_rates(run_dir: Path, warmup: int) -> list[float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["tokens_per_second"] for r in records if "loss" in r and r["step"] > warmup]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "configs/demo.yaml"))
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")

    import torch

    from raylm.config import load_config
    from raylm.train.local import train_local

    out = Path(tempfile.mkdtemp(prefix="raylm-bench-"))
    common = [f"train.max_steps={args.steps}", "train.eval_every=0", "train.checkpoint_every=0",
              "run.sample_tokens=0", f"run.output_dir={out}", "scaling.num_workers=1",
              f"scaling.cpus_per_worker={args.threads - 0.25}", "data.tokenize_cpus=0.1", "data.read_cpus=0.1",
              "data.tokenize_actors=1", *args.overrides]
    quiet = lambda line: None  # noqa: E731

    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    plain_dir = Path(train_local(load_config(args.config, common + ["run.name=plain"]), log=quiet).run_dir)
    plain_wall = time.perf_counter() - start

    import ray

    from raylm.ray.connect import configure_local_cluster
    from raylm.ray.prepare import prepare
    from raylm.ray.train import fit
    from raylm.train.runs import resolve_run

    configure_local_cluster()
    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    prepared = f"data.prepared_path={out / 'prepared'}"
    prepare(load_config(args.config, common + [prepared]), log=quiet)
    start = time.perf_counter()
    ray_dir = Path(fit(resolve_run(load_config(args.config, common + [prepared, "run.name=ray"])), log=quiet).run_dir)
    ray_wall = time.perf_counter() - start
    ray.shutdown()

    plain = statistics.median(step_rates(plain_dir, args.warmup))
    on_ray = statistics.median(step_rates(ray_dir, args.warmup))
    cfg = load_config(args.config, common)
    print(f"config {Path(args.config).name}: {cfg.model.num_params():,} parameters, "
          f"{cfg.train.global_batch_tokens} tokens/step, {args.steps} steps, {args.threads} torch threads")
    print(f"plain torch loop : {plain:10,.0f} tokens/s (median after step {args.warmup}), wall {plain_wall:.0f} s")
    print(f"raylm train, 1 worker: {on_ray:6,.0f} tokens/s (median after step {args.warmup}), wall {ray_wall:.0f} s")
    print(f"ratio ray / plain: {on_ray / plain:.3f} (goal >= 0.95)")


if __name__ == "__main__":
    main()
