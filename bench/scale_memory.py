"""Per-rank peak memory of gradient accumulation under `train.grad_sync` every and last (issue 20, item 2).

Two ranks over gloo (a torch.multiprocessing spawned process group, no Ray) train the `125m`
preset with FSDP2 as raylm does (`raylm.train.parallel.build_model`, `raylm.optim`,
`raylm.train.step.train_step`), for each case: grad_sync every / last x accumulation 1 / 8
micro-batches per rank per step. Goal: with every, accumulation 8 peaks at <= 1.1x accumulation
1; the planner (`raylm.plan.estimate_memory`) within 15% of each measured peak.

    python bench/scale_memory.py                         # the table below, ~10-20 min on 2 busy cores
    python bench/scale_memory.py --seq-len 128 --micro-batch 2 --accums 1,2   # a quick look

How the peak is measured (the same method as bench/plan_memory.py, whose CPU suite puts the
planner at 0.95-1.05 of it): each case runs in fresh processes started with
MALLOC_MMAP_THRESHOLD_=65536, so every tensor above 64 KiB is its own mmap and goes back to the
OS when freed: resident memory then follows the bytes of live tensors, which is what the planner
counts (glibc would otherwise keep freed blocks in its heap and the high-water mark would
include them). Each rank first runs one step of a tiny model (kernels, thread pools, gloo
buffers are loaded), takes its RSS as the baseline, builds the model and the optimizer, and runs
one step of one micro-batch so that AdamW's state exists, as it does in every step after the
first. Then, before each measured step, it restarts the kernel's high-water mark
(/proc/self/clear_refs, VmHWM): a step's peak = VmHWM - baseline. This is the steady-state step
the planner models (resident parameters and optimizer state + the larger of the forward/backward
and the optimizer step). Each case measures the same number of micro-batches (8: one step of 8,
or 8 steps of 1), since the peak of a small micro-batch is an instant that recurs in each one
(the root's reduce-scatter at the end of backward) and varies by a few percent from one to the
next (which allocations land in the mmap'd tensors and which in glibc's heap arenas): comparing
8 samples of it with 1 would favour accumulation 1. The table shows the largest step peak over
the steps and the two ranks, with the smallest step's beside it.
The step's loss is printed too: the same in both modes (one reduction per micro-batch or one per
step sums the same gradients).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from plan_memory import _free_port, peak_rss_bytes, reset_peak_rss, rss_bytes  # noqa: E402

WORLD = 2


def case_config(preset: str, seq_len: int, micro_batch: int, accum: int, grad_sync: str):
    from raylm.config import load_config

    return load_config(None, [
        f"model.preset={preset}", f"model.max_seq_len={max(seq_len, 64)}", f"data.seq_len={seq_len}",
        f"train.micro_batch_size={micro_batch}", f"train.global_batch_tokens={micro_batch * accum * WORLD * seq_len}",
        "train.activation_checkpointing=none", "train.compile=false", "train.precision=fp32",
        f"train.grad_sync={grad_sync}",
    ])


def warm_up(device) -> None:
    """One step of the debug model: loads the kernels, thread pools and gloo buffers a step
    needs, so the baseline taken after it holds them and the measured peak does not."""
    import torch

    from raylm.config import load_config
    from raylm.optim import build_optimizer
    from raylm.train import parallel
    from raylm.train.step import train_step

    warm = load_config(None, ["model.preset=debug", "data.seq_len=16", "train.micro_batch_size=1",
                              f"train.global_batch_tokens={16 * WORLD}", "train.precision=fp32"])
    model = parallel.build_model(warm, device)
    optimizer = build_optimizer(model, warm.optimizer, device.type)
    tokens = [{"tokens": torch.randint(0, warm.model.vocab_size, (1, 17))}] * 2
    train_step(model, optimizer, tokens, device, "fp32", 1.0, WORLD, global_tokens=2 * 16 * WORLD)
    del model, optimizer
    gc.collect()


def measure(rank: int, preset: str, seq_len: int, micro_batch: int, accum: int, grad_sync: str,
            steps: int) -> dict:
    import torch

    from raylm.optim import build_optimizer
    from raylm.plan import estimate_memory
    from raylm.train import parallel
    from raylm.train.step import train_step

    device = torch.device("cpu")
    cfg = case_config(preset, seq_len, micro_batch, accum, grad_sync)
    warm_up(device)
    base = rss_bytes()
    model = parallel.build_model(cfg, device)
    optimizer = build_optimizer(model, cfg.optimizer, device.type)
    generator = torch.Generator().manual_seed(rank)
    micro = [{"tokens": torch.randint(0, cfg.model.vocab_size, (micro_batch, seq_len + 1), generator=generator)}
             for _ in range(accum)]
    tokens_per_micro_batch = micro_batch * seq_len * WORLD
    train_step(model, optimizer, micro[:1], device, "fp32", cfg.train.grad_clip, WORLD,
               global_tokens=tokens_per_micro_batch, grad_sync=grad_sync)  # AdamW's state now exists
    peaks, times, losses = [], [], []
    for _ in range(steps):
        gc.collect()
        reset_peak_rss()
        start = time.perf_counter()
        stats = train_step(model, optimizer, micro, device, "fp32", cfg.train.grad_clip, WORLD,
                           global_tokens=tokens_per_micro_batch * accum, grad_sync=grad_sync)
        times.append(time.perf_counter() - start)
        peaks.append(peak_rss_bytes() - base)
        losses.append(stats.loss)
    estimate = estimate_memory(cfg, WORLD, "cpu", grad_sync=grad_sync)
    return {"rank": rank, "grad_sync": grad_sync, "accum": accum, "steps": steps, "measured_bytes": max(peaks),
            "min_step_peak_bytes": min(peaks), "estimate_bytes": estimate.total_bytes,
            "carried_grad_bytes": estimate.carried_grad_bytes, "step_s": sum(times) / steps, "loss": losses[0],
            "rss_base_bytes": base}


def _rank_main(rank: int, port: int, case: dict, out: str) -> None:
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)  # two ranks on two cores
    result = measure(rank, **case)
    Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    dist.barrier()
    sys.stdout.flush()
    os._exit(0)  # gloo's teardown can abort a process after the work is done (tests/support.py)


def run_case(case: dict) -> list[dict]:
    """One case in two fresh processes (a peak RSS is per process)."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory(prefix="scale-memory-") as out:
        mp.spawn(_rank_main, args=(_free_port(), case, out), nprocs=WORLD, join=True)
        return [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(WORLD)]


def git_commit() -> str:
    done = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return done.stdout.strip() or "unknown"


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="125m")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--micro-batch", type=int, default=1)
    p.add_argument("--accums", default="1,8", help="micro-batches per rank per step, comma-separated")
    p.add_argument("--modes", default="every,last")
    p.add_argument("--micro-batches", type=int, default=None,
                   help="micro-batches measured per case (default: the largest accumulation): "
                        "accumulation a is measured over micro-batches / a steps")
    args = p.parse_args(argv)
    # Read by glibc when a process starts: the spawned ranks inherit it (see the docstring).
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"
    accums = [int(a) for a in args.accums.split(",")]
    sampled = args.micro_batches or max(accums)
    rows = []
    for mode in args.modes.split(","):
        for accum in accums:
            ranks = run_case({"preset": args.preset, "seq_len": args.seq_len, "micro_batch": args.micro_batch,
                              "accum": accum, "grad_sync": mode, "steps": max(1, sampled // accum)})
            row = max(ranks, key=lambda r: r["measured_bytes"])
            row["min_step_peak_bytes"] = max(r["min_step_peak_bytes"] for r in ranks)
            row["step_s"] = max(r["step_s"] for r in ranks)
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)

    mib = 2**20
    first = {r["grad_sync"]: r for r in rows if r["accum"] == accums[0]}
    print(f"bench/scale_memory.py: {args.preset}, FSDP2 over {WORLD} gloo ranks (spawned, no Ray), fp32, "
          f"micro-batch {args.micro_batch} x seq_len {args.seq_len}, no activation checkpointing")
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores; "
          f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; commit {git_commit()}")
    print(f"peak: VmHWM - baseline RSS, the largest over the measured steps (after one that makes AdamW's state) "
          f"and the two ranks; {sampled} micro-batches measured per case; MALLOC_MMAP_THRESHOLD_=65536")
    print()
    print(f"| grad_sync | accumulation | steps measured | measured peak MiB (smallest step's) | planner MiB "
          f"| planner / measured | peak / accumulation {accums[0]} | carried gradients (planner) MiB "
          f"| s per step | first step's loss |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        base = first.get(r["grad_sync"])
        growth = f"{r['measured_bytes'] / base['measured_bytes']:.3f}" if base else "-"
        print(f"| {r['grad_sync']} | {r['accum']} | {r['steps']} "
              f"| {r['measured_bytes'] / mib:,.0f} ({r['min_step_peak_bytes'] / mib:,.0f}) "
              f"| {r['estimate_bytes'] / mib:,.0f} "
              f"| {r['estimate_bytes'] / r['measured_bytes']:.3f} | {growth} | {r['carried_grad_bytes'] / mib:,.0f} "
              f"| {r['step_s']:.1f} | {r['loss']:.6f} |")
    print()
    for mode in first:
        last = max((r for r in rows if r["grad_sync"] == mode), key=lambda r: r["accum"])
        growth = last["measured_bytes"] / first[mode]["measured_bytes"]
        goal = f" (goal <= 1.1: {'met' if growth <= 1.1 else 'missed'})" if mode == "every" else ""
        print(f"{mode}: accumulation {last['accum']} peaks at {growth:.3f}x accumulation {accums[0]}{goal}")
    ratios = [r["estimate_bytes"] / r["measured_bytes"] for r in rows]
    print(f"planner / measured: {min(ratios):.3f} - {max(ratios):.3f} "
          f"(goal within 15%: {'met' if all(0.85 <= x <= 1.15 for x in ratios) else 'missed'})")
    return rows


if __name__ == "__main__":
    main()
