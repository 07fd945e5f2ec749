"""What a checkpoint costs the step that takes it, blocking versus in the background (issue 20, item 4).

Two runs of the `125m` preset (its model shape and vocabulary: 134M parameters, 1.6 GB of
weights and AdamW state per checkpoint) on 2 ranks of a gloo process group, started as torchrun
starts them (`raylm train --local`; Ray is not needed for this: the save path is the torch
core's, the same under Ray Train), writing their run directory and checkpoints to a moto_server
this script starts on 127.0.0.1. One run with `train.checkpoint_async=false`, one with `true`,
side by side in one session, the same steps and data. CPU-sized batch: 1 sequence of 128 tokens
per rank per step, fp32, no compile.

A step's time here is the interval between consecutive step records (`time` in metrics.jsonl),
so it holds whatever the trainer did after the step's update: the save of a checkpoint step,
the marker of a background save that ended. Printed per run:
- median step: the median interval of steps that neither begin nor finish a save;
- checkpoint step / median: the interval that begins each save (mean over the saves; the
  last step's save, blocking in both modes, is not counted);
- worst other step / median: the slowest interval that does not begin a save (with a
  background save: the steps that train while the writer thread competes for the 2 cores,
  and the step that writes the marker);
- overhead per save: (sum of all intervals - intervals x median) / saves, in seconds.

    python bench/scale_checkpoint.py [--every 3] [--saves 3]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

AWS_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
BUCKET = "raylm-bench"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_moto() -> tuple[str, subprocess.Popen]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([str(Path(sys.executable).with_name("moto_server")), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(url, timeout=1).close()
            return url, proc
        except urllib.error.HTTPError:
            return url, proc
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise SystemExit(f"moto_server did not answer at {url}")
            time.sleep(0.2)


def overrides(out: str, steps: int, every: int, background: bool, tokenizer: Path | None) -> list[str]:
    return [f"run.output_dir={out}", f"train.max_steps={steps}", f"train.checkpoint_every={every}",
            f"train.checkpoint_async={'true' if background else 'false'}",
            "data.seq_len=128", "train.global_batch_tokens=256", "train.micro_batch_size=1",
            "data.sources.0.max_bytes=3000000", "tokenizer.sample_bytes=2000000", "data.val_fraction=0",
            "train.eval_every=0", "train.log_every=1000", "train.precision=fp32", "train.compile=false",
            "train.device=cpu", "scaling.num_workers=2", "scaling.use_gpu=false", "run.keep_checkpoints=1", "run.sample_tokens=0", "optimizer.warmup_steps=2",
            *([f"tokenizer.path={tokenizer}"] if tokenizer else [])]


def run_two_ranks(args: list[str], env: dict, log: Path) -> None:
    port = free_port()
    procs = []
    for rank in range(2):
        rank_env = {**env, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
                    "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1",
                    "PYTHONPATH": str(ROOT)}
        with open(log.with_suffix(f".rank{rank}.log"), "w") as f:
            procs.append(subprocess.Popen([sys.executable, "-m", "raylm", "train", str(ROOT / "configs/125m.yaml"),
                                           "--local", *args], env=rank_env, cwd=ROOT, stdout=f,
                                          stderr=subprocess.STDOUT))
    codes = [p.wait() for p in procs]
    if any(codes):
        raise SystemExit(f"a rank failed ({codes}); see {log.with_suffix('.rank0.log')}")


def step_times(run_dir: str) -> dict[int, float]:
    from raylm import storage

    records = [json.loads(line) for line in storage.read_bytes(storage.child(run_dir, "metrics.jsonl")).decode()
               .splitlines()]
    return {r["step"]: r["time"] for r in records if "loss" in r}


def measure(times: dict[int, float], every: int, steps: int) -> dict:
    # interval k: from step k's record to step k+1's, so it holds step k's save and step k+1's work
    interval = {k: times[k + 1] - times[k] for k in range(2, steps) if k + 1 in times}  # step 1: warm-up
    begins = [k for k in interval if k % every == 0]
    others = [k for k in interval if k not in begins]
    plain = [interval[k] for k in others if (k - 1) % every != 0]  # neither begins nor just after one
    median = statistics.median(plain)
    return {"median_s": median,
            "checkpoint_ratio": statistics.mean(interval[k] for k in begins) / median,
            "checkpoint_ratios": [interval[k] / median for k in begins],
            "worst_other_ratio": max(interval[k] for k in others) / median,
            "overhead_per_save_s": (sum(interval.values()) - len(interval) * median) / len(begins)}


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip() + (" (uncommitted changes)" if subprocess.run(
                                  ["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                                  capture_output=True, text=True).stdout.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--every", type=int, default=3, help="train.checkpoint_every")
    parser.add_argument("--saves", type=int, default=3, help="saves measured per run")
    args = parser.parse_args()
    steps = args.every * args.saves + 2  # the saves, one step after the last, and the final step's save

    import pyarrow.fs as pafs

    from raylm import storage
    from raylm.config import load_config

    url, moto = start_moto()
    env = {**os.environ, **AWS_ENV, "AWS_ENDPOINT_URL": url}
    os.environ.update(AWS_ENV, AWS_ENDPOINT_URL=url)
    os.environ.pop("AWS_ENDPOINT_URL_S3", None)
    env.pop("AWS_ENDPOINT_URL_S3", None)
    s3 = pafs.S3FileSystem(endpoint_override=url.removeprefix("http://"), scheme="http", **{
        "access_key": "testing", "secret_key": "testing", "region": "us-east-1", "allow_bucket_creation": True})
    s3.create_dir(BUCKET)
    work = Path(tempfile.mkdtemp(prefix="raylm-bench-ckpt-"))
    results = {}
    tokenizer = None
    try:
        for background in (False, True):
            mode = "background" if background else "blocking"
            out = f"s3://{BUCKET}/{mode}"
            start = time.time()
            run_two_ranks(overrides(out, steps, args.every, background, tokenizer), env, work / mode)
            wall = time.time() - start
            (run_dir,) = [storage.child(out, Path(e.path).name) for e in storage.list_dir(out)]
            if tokenizer is None:  # trained once, by the first run; the second reads it
                tokenizer = work / "tokenizer.model"
                tokenizer.write_bytes(storage.read_bytes(storage.child(run_dir, "tokenizer.model")))
            times = step_times(run_dir)
            assert sorted(times) == list(range(1, steps + 1)), sorted(times)
            results[mode] = {**measure(times, args.every, steps), "wall_s": wall}
            storage.delete_dir(out)  # moto keeps objects in memory
        cfg = load_config(ROOT / "configs/125m.yaml", overrides("runs", steps, args.every, False, None))
    finally:
        moto.terminate()
        moto.wait(timeout=30)

    n = cfg.model.num_params()
    print(f"# bench/scale_checkpoint.py, {dt.date.today()}, commit {git_commit()}")
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores; Python {platform.python_version()}; "
          f"moto_server on 127.0.0.1; 2 ranks (gloo, torchrun-style processes, no Ray)")
    print(f"model: 125m preset, {n:,} parameters; checkpoint {12 * n / 1e9:.2f} GB (fp32 weights + AdamW "
          f"moments), {12 * n / 2 / 1e9:.2f} GB per rank; {args.saves} saves every {args.every} steps, "
          f"{steps} steps; 1 x 128 tokens per rank per step")
    print()
    print("| save | median step (s) | checkpoint step / median | per save | worst other step / median | "
          "overhead per save (s) | run wall (s) |")
    print("|---|---:|---:|---|---:|---:|---:|")
    for mode, r in results.items():
        per = ", ".join(f"{x:.2f}" for x in r["checkpoint_ratios"])
        print(f"| {mode} (checkpoint_async={'true' if mode == 'background' else 'false'}) | {r['median_s']:.2f} | "
              f"**{r['checkpoint_ratio']:.2f}x** | {per} | {r['worst_other_ratio']:.2f}x | "
              f"{r['overhead_per_save_s']:.1f} | {r['wall_s']:.0f} |")
    goal = results["background"]["checkpoint_ratio"] <= 1.3
    print()
    print(f"goal (background checkpoint step <= 1.3x the median step): {'met' if goal else 'NOT met'}")


if __name__ == "__main__":
    main()
