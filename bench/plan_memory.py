"""The planner's memory estimate (raylm.plan.estimate_memory) against the measured peak of real steps.

Builds the model as training does (raylm.train.parallel: meta device, activation checkpointing,
FSDP2 when sharded), steps it with raylm.train.step.train_step and raylm.optim on random tokens,
and prints one JSON line per case: the measured peak, the estimate and their ratio.

GPU (torch.cuda.max_memory_allocated, reset per case; eager, no compile):
    python bench/plan_memory.py --suite gpu
    python bench/plan_memory.py --preset 1b --seq-len 2048 --micro-batch 4 --ac full --accum 2 [--fsdp]
CPU (peak RSS of this process above its RSS before the model is built, after one step of a
tiny model has loaded the kernels and thread pools; one case per process, run with
MALLOC_MMAP_THRESHOLD_=65536 so freed tensors go back to the OS at once):
    MALLOC_MMAP_THRESHOLD_=65536 python bench/plan_memory.py --preset tiny --seq-len 256 --micro-batch 8
    MALLOC_MMAP_THRESHOLD_=65536 torchrun --nproc-per-node 2 bench/plan_memory.py --preset tiny ...
    python bench/plan_memory.py --suite cpu    # every CPU_SUITE case, each in its own process
                                               # (torchrun for world 2), then a markdown table

--fsdp shards over a one-rank group (FSDP2's all-gather buffers, root kept unsharded, fp32
accumulation of unsharded gradients), which raylm itself only does at world size > 1: it checks
the FSDP2 terms of the model on a machine with one GPU. Under torchrun, every world size > 1 is
FSDP2 as in training.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

GPU_SUITE = [  # (preset, seq_len, micro_batch, accum, ac, fsdp): one H200 runs them all in a few minutes
    ("1b", 2048, 4, 1, "none", False),
    ("1b", 2048, 4, 2, "full", False),
    ("1b", 2048, 8, 1, "selective:2", False),
    ("1b", 4096, 2, 2, "none", True),
    ("1b", 4096, 4, 2, "full", True),
    ("125m", 2048, 8, 2, "none", False),
]

CPU_SUITE = [  # (preset, seq_len, micro_batch, accum, ac, world, precision): ~18 min on 2 busy cores
    # (bf16 on CPU only for tiny: CPU bf16 matmuls are slow, a 125m bf16 case takes over 8 minutes)
    ("debug", 128, 8, 1, "none", 1, "auto"),
    ("debug", 128, 8, 1, "full", 1, "auto"),
    ("debug", 128, 8, 1, "selective:2", 1, "auto"),
    ("tiny", 256, 8, 1, "none", 1, "auto"),
    ("tiny", 256, 8, 1, "full", 1, "auto"),
    ("tiny", 256, 8, 1, "selective:2", 1, "auto"),
    ("tiny", 256, 4, 2, "none", 1, "auto"),
    ("tiny", 256, 8, 2, "full", 1, "auto"),
    ("tiny", 256, 8, 1, "none", 1, "bf16"),
    ("tiny", 256, 8, 1, "full", 1, "bf16"),
    ("125m", 128, 2, 2, "none", 1, "auto"),
    ("125m", 256, 4, 1, "none", 1, "auto"),
    ("debug", 128, 8, 1, "none", 2, "auto"),
    ("tiny", 256, 8, 1, "none", 2, "auto"),
    ("tiny", 256, 8, 1, "full", 2, "auto"),
    ("tiny", 256, 4, 2, "selective:2", 2, "auto"),
    ("tiny", 256, 8, 1, "none", 2, "bf16"),
    ("125m", 128, 2, 2, "full", 2, "auto"),
    ("125m", 256, 4, 1, "none", 2, "auto"),
]


def run_cpu_suite(steps: int) -> list[dict]:
    """Each CPU_SUITE case in a fresh process (peak RSS is per process), then a markdown table."""
    import subprocess

    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    script = str(Path(__file__).resolve())
    results = []
    for preset, seq_len, micro_batch, accum, ac, world, precision in CPU_SUITE:
        case = ["--preset", preset, "--seq-len", str(seq_len), "--micro-batch", str(micro_batch),
                "--accum", str(accum), "--ac", ac, "--precision", precision, "--steps", str(steps)]
        launcher = [sys.executable] if world == 1 else [
            sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}"]
        done = subprocess.run([*launcher, script, *case], capture_output=True, text=True, env=env, check=False)
        ranks = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
        if done.returncode != 0 or len(ranks) != world:
            raise SystemExit(f"{' '.join(case)} (world {world}) failed:\n{done.stderr[-3000:]}")
        worst = max(ranks, key=lambda r: abs(r["ratio"] - 1))
        results.append(worst)
        print(json.dumps(worst), file=sys.stderr, flush=True)
    print("| preset | seq_len | micro-batch | accum | checkpointing | world | precision "
          "| measured MiB | estimate MiB | estimate / measured |")
    print("|---|---:|---:|---:|---|---:|---|---:|---:|---:|")
    for r in results:
        print(f"| {r['preset']} | {r['seq_len']} | {r['micro_batch']} | {r['accum']} | {r['ac']} | {r['world_size']} "
              f"| {r['precision']} | {r['measured_bytes'] / 2**20:,.1f} | {r['estimate_bytes'] / 2**20:,.1f} "
              f"| {r['ratio']:.3f} |")
    return results


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def reset_peak_rss() -> None:
    """Start the kernel's high-water mark (VmHWM) again at the current RSS: a peak from before
    the baseline (imports, first-use compilation of modules) must not count as the step's."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak_rss_bytes() -> int:
    """VmHWM since the last `reset_peak_rss` (ru_maxrss would be the whole process lifetime's)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(preset: str, seq_len: int, micro_batch: int, accum: int, ac: str, fsdp: bool, steps: int,
            precision: str = "auto") -> dict:
    import torch

    from raylm.config import load_config
    from raylm.optim import build_optimizer
    from raylm.plan import estimate_memory
    from raylm.train import parallel
    from raylm.train.step import train_step

    cuda = torch.cuda.is_available()
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    rank, world = parallel.distributed_world()
    cfg = load_config(None, [
        f"model.preset={preset}", f"model.max_seq_len={max(seq_len, 64)}", f"data.seq_len={seq_len}",
        f"train.micro_batch_size={micro_batch}", f"train.global_batch_tokens={micro_batch * accum * world * seq_len}",
        f"train.activation_checkpointing={ac}", "train.compile=false", f"train.precision={precision}",
    ])
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    else:  # load the kernels, libraries and thread pools a step needs before taking the baseline
        warm = load_config(None, ["model.preset=debug", "data.seq_len=16", "train.micro_batch_size=1",
                                  "train.global_batch_tokens=16", f"train.activation_checkpointing={ac}",
                                  f"train.precision={precision}"])
        warm_model = parallel.build_model(warm, device)
        warm_optimizer = build_optimizer(warm_model, warm.optimizer, device.type)
        warm_tokens = [{"tokens": torch.randint(0, warm.model.vocab_size, (1, 17))}]
        train_step(warm_model, warm_optimizer, warm_tokens, device, warm.train.precision, 1.0, 1)
        del warm_model, warm_optimizer
    base = rss_bytes()
    if not cuda:
        reset_peak_rss()
    if fsdp and world == 1:
        from torch.distributed.device_mesh import init_device_mesh

        with torch.device("meta"):
            model = parallel.Transformer(cfg.model)
        parallel.apply_activation_checkpointing(model, ac)
        mesh = init_device_mesh(device.type, (1,), mesh_dim_names=("dp",))
        parallel.apply_fsdp(model, mesh, parallel.mixed_precision_policy(cfg.train.precision, device))
        model.to_empty(device=device)
        torch.manual_seed(0)
        model.init_weights(buffer_device=device)
    else:
        model = parallel.build_model(cfg, device)
    optimizer = build_optimizer(model, cfg.optimizer, device.type)
    generator = torch.Generator().manual_seed(rank)
    micro = [{"tokens": torch.randint(0, cfg.model.vocab_size, (micro_batch, seq_len + 1), generator=generator)}
             for _ in range(accum)]
    for _ in range(steps):
        train_step(model, optimizer, micro, device, cfg.train.precision, cfg.train.grad_clip, world)
    if cuda:
        torch.cuda.synchronize(device)
        measured = torch.cuda.max_memory_allocated(device)
        reserved = torch.cuda.max_memory_reserved(device)
        free, total = torch.cuda.mem_get_info(device)
        extra = {"max_reserved_bytes": reserved, "device_total_bytes": total,
                 "device_used_bytes": total - free, "device": torch.cuda.get_device_name(device)}
    else:
        measured = peak_rss_bytes() - base
        extra = {"device": "cpu", "rss_base_bytes": base}
    estimate = estimate_memory(cfg, world, device.type, fsdp=(world > 1 or fsdp))
    result = {"preset": preset, "seq_len": seq_len, "micro_batch": micro_batch, "accum": accum, "ac": ac,
              "fsdp": world > 1 or fsdp, "world_size": world, "rank": rank, "precision": precision,
              "measured_bytes": measured, "estimate_bytes": estimate.total_bytes,
              "ratio": estimate.total_bytes / measured, **extra,
              "estimate": {k: getattr(estimate, k) for k in ("params_bytes", "optimizer_bytes", "working_bytes",
                                                            "carried_grad_bytes", "activation_bytes", "grad_bytes",
                                                            "step_temp_bytes")}}
    del model, optimizer
    return result


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--suite", choices=["gpu", "cpu"],
                   help="gpu: the GPU cases in this one process; cpu: the CPU cases, one process each")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--accum", type=int, default=1)
    p.add_argument("--ac", default="none")
    p.add_argument("--fsdp", action="store_true")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--precision", default="auto")
    args = p.parse_args(argv)
    if args.suite == "cpu":
        return run_cpu_suite(args.steps)

    import torch

    from raylm.train.parallel import torchrun_group

    cuda = torch.cuda.is_available()
    made_group = (args.fsdp or args.suite == "gpu") and "WORLD_SIZE" not in os.environ
    if made_group:  # a one-rank group for --fsdp outside torchrun
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), RANK="0", LOCAL_RANK="0",
                          WORLD_SIZE="1")
        torch.distributed.init_process_group("nccl" if cuda else "gloo")
    cases = GPU_SUITE if args.suite == "gpu" else [
        (args.preset, args.seq_len, args.micro_batch, args.accum, args.ac, args.fsdp)]
    results = []
    with torchrun_group("cuda" if cuda else "cpu") as (rank, world):
        for case in cases:
            result = measure(*case, steps=args.steps, precision=args.precision)
            results.append(result)
            sys.stdout.write(json.dumps(result) + "\n")  # one write: torchrun's ranks share the pipe
            sys.stdout.flush()
    if made_group:
        torch.distributed.destroy_process_group()
    return results


if __name__ == "__main__":
    main()
