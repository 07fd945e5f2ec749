"""What a checkpoint costs the step that takes it, blocking versus in the background (issue 20, item 4).

Two runs of the `125m` preset (its model shape and vocabulary: 134M parameters, 1.6 GB of
weights and AdamW state per checkpoint) on 2 ranks of a gloo process group, started as torchrun
starts them (`raylm train --local`; Ray is not needed for this: the save path is the torch
core's, the same under Ray Train), writing their run directory and checkpoints to a moto_server
this script starts on 127.0.0.1. One run with `train.checkpoint_async=false`, one with `true`,
side by side in one session, the same steps and data. CPU-sized batch: 1 sequence of 128 tokens
per rank per step, fp32, no compile.

Printed per run (rank 0's figures; the ranks wait for each other in every step):
- median step: the median `step_time_s` of metrics.jsonl (forward, backward, update) of steps 2+;
- checkpoint step / median: (the checkpoint step's `step_time_s` + the time the trainer was
  blocked in `Trainer._checkpoint` at that step, timed by a wrapper this script installs in
  each rank) / median step; the mean over the saves, each save's after it (the last step's
  save, blocking in both modes, is not counted);
- record interval after a save / median interval: the same seen as wall time between
  consecutive step records, so it also holds the next step's compute while a background
  writer thread competes with it for the cores (on CPU) and the step that writes the marker;
- overhead per save: (sum of the record intervals of steps 2+ - their count x their median) /
  saves, in seconds: what the saves cost the run in all.

    python bench/scale_checkpoint.py [--every 3] [--saves 3] [--preset 125m]

bench/RESULTS.md holds `--preset tiny --every 8 --saves 2`: under the load of a shared 2-core
machine moto_server did not complete the 125m preset's 800 MB objects within the S3 client's timeout.
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


def overrides(out: str, steps: int, every: int, background: bool, tokenizer: Path | None, preset: str) -> list[str]:
    return [f"model.preset={preset}", f"run.output_dir={out}", f"train.max_steps={steps}", f"train.checkpoint_every={every}",
            f"train.checkpoint_async={'true' if background else 'false'}",
            "data.seq_len=128", "train.global_batch_tokens=256", "train.micro_batch_size=1",
            "data.sources.0.max_bytes=3000000", "tokenizer.sample_bytes=2000000", "data.val_fraction=0",
            "train.eval_every=0", "train.log_every=1000", "train.precision=fp32", "train.compile=false",
            "train.device=cpu", "scaling.num_workers=2", "scaling.use_gpu=false", "run.keep_checkpoints=1", "run.sample_tokens=0", "optimizer.warmup_steps=2",
            *([f"tokenizer.path={tokenizer}"] if tokenizer else [])]


# `raylm train`, with the time each rank spends blocked in Trainer._checkpoint appended to
# $BENCH_SAVE_TIMES as {"step", "blocked_s"} lines.
DRIVER = """
import json, os, sys, time
from raylm.cli import main
from raylm.train.trainer import Trainer

checkpoint = Trainer._checkpoint

def timed(self, record, background=False):
    start = time.perf_counter()
    checkpoint(self, record, background)
    with open(os.environ["BENCH_SAVE_TIMES"], "a") as f:
        f.write(json.dumps({"step": self.state.step, "blocked_s": time.perf_counter() - start}) + "\\n")

Trainer._checkpoint = timed
sys.exit(main(sys.argv[1:]))
"""


def run_two_ranks(args: list[str], env: dict, log: Path) -> None:
    port = free_port()
    procs = []
    for rank in range(2):
        rank_env = {**env, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
                    "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1",
                    "PYTHONPATH": str(ROOT), "BENCH_SAVE_TIMES": str(log.with_suffix(f".rank{rank}.saves.jsonl"))}
        with open(log.with_suffix(f".rank{rank}.log"), "w") as f:
            procs.append(subprocess.Popen([sys.executable, "-c", DRIVER, "train", str(ROOT / "configs/125m.yaml"),
                                           "--local", *args], env=rank_env, cwd=ROOT, stdout=f,
                                          stderr=subprocess.STDOUT))
    codes = [p.wait() for p in procs]
    if any(codes):
        raise SystemExit(f"a rank failed ({codes}); see {log.with_suffix('.rank0.log')}")


def step_records(run_dir: str) -> dict[int, dict]:
    from raylm import storage

    records = [json.loads(line) for line in storage.read_bytes(storage.child(run_dir, "metrics.jsonl")).decode()
               .splitlines()]
    return {r["step"]: r for r in records if "loss" in r}


def measure(records: dict[int, dict], blocked: dict[int, float], every: int, steps: int) -> dict:
    compute = {k: records[k]["step_time_s"] for k in range(2, steps + 1)}  # step 1: warm-up
    median = statistics.median(compute.values())
    begins = [k for k in range(every, steps, every)]
    # interval k: from step k's record to step k+1's, so it holds step k's save and step k+1's work
    interval = {k: records[k + 1]["time"] - records[k]["time"] for k in range(2, steps)}
    plain = [v for k, v in interval.items() if k % every != 0]
    interval_median = statistics.median(plain)
    ratios = [(compute[k] + blocked[k]) / median for k in begins]
    return {"median_s": median,
            "checkpoint_ratio": statistics.mean(ratios),
            "checkpoint_ratios": ratios,
            "blocked_s": statistics.mean(blocked[k] for k in begins),
            "interval_ratio": statistics.mean(interval[k] for k in begins) / interval_median,
            "overhead_per_save_s": (sum(interval.values()) - len(interval) * interval_median) / len(begins)}


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
    parser.add_argument("--preset", default="125m", help="model.preset (the 125m config's vocabulary stays)")
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
            run_two_ranks(overrides(out, steps, args.every, background, tokenizer, args.preset), env, work / mode)
            wall = time.time() - start
            (run_dir,) = [storage.child(out, Path(e.path).name) for e in storage.list_dir(out)]
            if tokenizer is None:  # trained once, by the first run; the second reads it
                tokenizer = work / "tokenizer.model"
                tokenizer.write_bytes(storage.read_bytes(storage.child(run_dir, "tokenizer.model")))
            records = step_records(run_dir)
            assert sorted(records) == list(range(1, steps + 1)), sorted(records)
            blocked = {r["step"]: r["blocked_s"] for r in map(json.loads, (work / f"{mode}.rank0.saves.jsonl")
                                                                .read_text().splitlines())}
            results[mode] = {**measure(records, blocked, args.every, steps), "wall_s": wall}
            storage.delete_dir(out)  # moto keeps objects in memory
        cfg = load_config(ROOT / "configs/125m.yaml", overrides("runs", steps, args.every, False, None, args.preset))
    finally:
        moto.terminate()
        moto.wait(timeout=30)

    n = cfg.model.num_params()
    print(f"# bench/scale_checkpoint.py, {dt.date.today()}, commit {git_commit()}")
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores; Python {platform.python_version()}; "
          f"moto_server on 127.0.0.1; 2 ranks (gloo, torchrun-style processes, no Ray)")
    print(f"model: {args.preset} preset (the 125m config's vocabulary), {n:,} parameters; checkpoint {12 * n / 1e9:.2f} GB (fp32 weights + AdamW "
          f"moments), {12 * n / 2 / 1e9:.2f} GB per rank; {args.saves} saves every {args.every} steps, "
          f"{steps} steps; 1 x 128 tokens per rank per step")
    print()
    print("| save | median step (s) | checkpoint step / median | each save | blocked in save (s) | "
          "record interval after a save / median interval | overhead per save (s) | run wall (s) |")
    print("|---|---:|---:|---|---:|---:|---:|---:|")
    for mode, r in results.items():
        per = ", ".join(f"{x:.2f}" for x in r["checkpoint_ratios"])
        print(f"| {mode} (checkpoint_async={'true' if mode == 'background' else 'false'}) | {r['median_s']:.2f} | "
              f"**{r['checkpoint_ratio']:.2f}x** | {per} | {r['blocked_s']:.2f} | {r['interval_ratio']:.2f}x | "
              f"{r['overhead_per_save_s']:.1f} | {r['wall_s']:.0f} |")
    goal = results["background"]["checkpoint_ratio"] <= 1.3
    print()
    print(f"goal (background checkpoint step <= 1.3x the median step): {'met' if goal else 'NOT met'}")


if __name__ == "__main__":
    main()
