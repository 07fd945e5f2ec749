"""MFU and tokens/s of the torch core alone: FSDP2 + bf16 + torch.compile, no Ray.

One GPU:        python bench/gpu_mfu.py --preset 1b --seq-len 2048 --micro-batch 4
Several GPUs:   torchrun --nproc_per_node 8 bench/gpu_mfu.py --preset 1b --seq-len 4096
Tiny, on CPU:   python bench/gpu_mfu.py --tiny          (what the test runs; no compile)

The model is built exactly as training builds it (raylm.train.parallel.build_model: meta
device, fully_shard per block + root when world > 1, bf16 mixed precision, activation
checkpointing, compile) and stepped by the training step (raylm.train.step.train_step) on
random tokens, so the number is the model + sharding + optimizer cost without data loading.
MFU = tokens/s per device x ModelConfig.flops_per_token / peak bf16 FLOP/s of the device
(raylm.train.metrics table, or --peak-flops).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="1b")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--accum", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--activation-checkpointing", default="none", help="none, full or selective:N")
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--peak-flops", type=float, default=None)
    p.add_argument("--tiny", action="store_true", help="debug model, seq 64, 4 steps, CPU-friendly")
    args = p.parse_args(argv)

    import torch

    from raylm.config import load_config
    from raylm.optim import build_optimizer
    from raylm.train.metrics import device_peak_flops, peak_memory_bytes
    from raylm.train.parallel import build_model, init_from_env
    from raylm.train.step import train_step

    if args.tiny:
        args.preset, args.seq_len, args.micro_batch, args.steps, args.warmup = "debug", 64, 2, 4, 1
    cuda = torch.cuda.is_available()
    rank, world = init_from_env("cuda" if cuda else "cpu")
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    compile_blocks = cuda and not args.no_compile  # inductor on CPU compiles C++ for minutes
    cfg = load_config(None, [
        f"model.preset={args.preset}", f"model.max_seq_len={max(args.seq_len, 64)}", f"data.seq_len={args.seq_len}",
        f"train.micro_batch_size={args.micro_batch}",
        f"train.global_batch_tokens={args.micro_batch * args.accum * world * args.seq_len}",
        f"train.activation_checkpointing={args.activation_checkpointing}", f"train.compile={str(compile_blocks).lower()}",
        f"train.precision={'bf16' if cuda else 'fp32'}",
    ])
    model = build_model(cfg, device)
    optimizer = build_optimizer(model, cfg.optimizer, device.type)
    generator = torch.Generator().manual_seed(rank)
    micro = [{"tokens": torch.randint(0, cfg.model.vocab_size, (args.micro_batch, args.seq_len + 1), generator=generator)}
             for _ in range(args.accum)]

    times = []
    for step in range(args.steps):
        start = time.perf_counter()
        train_step(model, optimizer, micro, device, cfg.train.precision, cfg.train.grad_clip, world)
        if cuda:
            torch.cuda.synchronize()
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
    step_s = statistics.median(times)
    tokens_per_device = args.micro_batch * args.accum * args.seq_len / step_s
    peak = device_peak_flops(device, args.peak_flops)
    flops = cfg.model.flops_per_token(args.seq_len)
    result = {
        "preset": args.preset, "params": cfg.model.num_params(), "seq_len": args.seq_len, "world_size": world,
        "micro_batch": args.micro_batch, "accum": args.accum, "compile": compile_blocks,
        "activation_checkpointing": args.activation_checkpointing,
        "device": torch.cuda.get_device_name(device) if cuda else "cpu",
        "tokens_per_second": tokens_per_device * world, "tokens_per_second_per_device": tokens_per_device,
        "step_time_s": step_s, "mfu": tokens_per_device * flops / peak if peak else None,
        "peak_memory_gib": peak_memory_bytes(device) / 2**30,
    }
    if rank == 0:
        mfu = f"{100 * result['mfu']:.1f}%" if result["mfu"] is not None else "n/a (no peak FLOP/s for this device)"
        print(f"{result['preset']} ({result['params'] / 1e9:.2f}B) seq {args.seq_len} x micro-batch {args.micro_batch} "
              f"x accum {args.accum} on {world} x {result['device']} (compile={compile_blocks}, "
              f"ac={args.activation_checkpointing}): {result['tokens_per_second']:,.0f} tokens/s, "
              f"{tokens_per_device:,.0f} per device, MFU {mfu}, step {step_s * 1e3:.0f} ms, "
              f"peak memory {result['peak_memory_gib']:.1f} GiB")
    if world > 1:
        torch.distributed.destroy_process_group()
    return result


if __name__ == "__main__":
    main()
