"""Data pipeline benchmark: Ray Data tokenise+pack vs a single-process sentencepiece loop; data wait in training.

    python bench/data_throughput.py [--site-packages-bytes N] [--corpus-bytes N] [--steps N]

1. Corpus: every .py file of the interpreter's standard library (tests included), plus the
   first --site-packages-bytes of the installed packages' .py files (default 45 MB: 24M
   tokens), copied to a temp dir once and read as a `text` source with data.on_error=skip
   (a few stdlib test files are deliberately not UTF-8). The default config otherwise.
2. Single process: the documents already in memory, encoded in batches of 256 with one
   sentencepiece thread, framed and packed by the same functions (the baseline); and the
   same with sentencepiece's own 2-thread batch encode, for reference.
3. Ray Data: the streaming pipeline (read + parse tasks, tokenizer actor pool, packing
   actor) consumed block by block on the driver, end to end from the request to the last
   row, on a fresh cluster and (best of 2) on a warm one; the same on the first half of
   the corpus, so that the difference gives the rate with start-up taken out. CPU-s is the
   CPU time of the whole machine during a run (/proc/stat), which shows where time goes.
4. Data wait: one Ray Train worker trains the debug model with the core `Trainer` on the
   streaming source; the loop's `data_wait_fraction` is averaged over steps after warm-up.
Tokens are counted as packed sequences x seq_len in both paths.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ["RAY_AUTH_MODE"] = "disabled"
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)

import numpy as np  # noqa: E402

from raylm.config import load_config  # noqa: E402
from raylm.data.corpus import stdlib_root  # noqa: E402
from raylm.data.local import local_documents  # noqa: E402
from raylm.data.transforms import frame_documents, pack  # noqa: E402
from raylm.ray.connect import configure_local_cluster  # noqa: E402
from raylm.tokenizer import Tokenizer  # noqa: E402


def stdlib_copy(site_packages_bytes: int) -> Path:
    """Every .py file of the standard library (tests included), plus the first
    `site_packages_bytes` of this environment's installed packages' .py files (sorted), so
    the corpus passes 20M tokens with code present on every machine. Copied once."""
    import sysconfig

    root = stdlib_root()
    out = Path(tempfile.gettempdir()) / f"raylm-bench-code-{platform.python_version()}-{site_packages_bytes}"
    if not (out / ".complete").exists():
        for path in sorted(root.rglob("*.py")):
            rel = path.relative_to(root)
            if {"site-packages", "dist-packages", "__pycache__"} & set(rel.parts):
                continue
            (out / "stdlib" / rel).parent.mkdir(parents=True, exist_ok=True)
            (out / "stdlib" / rel).write_bytes(path.read_bytes())
        site = Path(sysconfig.get_paths()["purelib"])
        total = 0
        for path in sorted(site.rglob("*.py")):
            if total >= site_packages_bytes or "__pycache__" in path.parts:
                continue
            data = path.read_bytes()
            total += len(data)
            (out / "site" / path.relative_to(site)).parent.mkdir(parents=True, exist_ok=True)
            (out / "site" / path.relative_to(site)).write_bytes(data)
        (out / ".complete").write_text("")
    return out


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def cpu_seconds() -> float:
    """CPU time the whole machine has spent busy (all processes, /proc/stat), in seconds."""
    fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    return (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def single_process(docs, tok, seq_len, batch_docs=256, threads=1) -> tuple[int, float]:
    start = time.perf_counter()
    carry, rows = None, 0
    for i in range(0, len(docs), batch_docs):
        ids = tok.sp.encode([d.text for d in docs[i : i + batch_docs]], out_type=int, num_threads=threads)
        r, carry = pack(frame_documents(ids, tok.bos_id, tok.eos_id, True), seq_len, carry)
        rows += len(r)
    return rows * seq_len, time.perf_counter() - start


def ray_pipeline(cfg, tok) -> dict:
    """One execution, consumed block by block on the driver as the blocks arrive."""
    from raylm.data.plan import plan_files
    from raylm.ray.data import iter_rows, packed_dataset

    cpu0 = cpu_seconds()
    start = time.perf_counter()
    ds = packed_dataset(cfg, tok, plan_files(cfg, "train"), "train").dataset
    first_row_s, rows = None, 0
    for batch in iter_rows(ds, batch_rows=None):
        rows += len(batch["index"])
        first_row_s = first_row_s or time.perf_counter() - start
    return {"tokens": rows * cfg.data.seq_len, "seconds": time.perf_counter() - start, "first_row_s": first_row_s,
            "cpu_s": cpu_seconds() - cpu0}


def train_and_wait(config: dict) -> None:
    """Ray Train worker: the real loop on the streaming source; write per-step metrics."""
    import torch

    from raylm.ray.data import StreamingTrainSource
    from raylm.train.trainer import RunDirSink, RankEnv, Trainer

    torch.set_num_threads(1)
    cfg = load_config(None, config["overrides"])
    sink = RunDirSink(Path(config["out"]).parent, keep_checkpoints=1)
    Trainer(cfg, RankEnv(), sink, StreamingTrainSource("train"), log=lambda line: None).fit()
    sink.close()


def data_wait(overrides, tok, steps) -> dict:
    import ray.train
    from ray.train.torch import TorchTrainer

    from raylm.data.plan import list_corpus
    from raylm.ray.data import data_config, trainer_datasets

    cfg = load_config(None, overrides)
    out = Path(tempfile.mkdtemp()) / "metrics.jsonl"
    datasets, _ = trainer_datasets(cfg, tok, list_corpus(cfg), run_dir=str(out.parent))
    TorchTrainer(
        train_and_wait,
        train_loop_config={"overrides": overrides, "out": str(out)},
        scaling_config=ray.train.ScalingConfig(num_workers=1, resources_per_worker={"CPU": cfg.scaling.cpus_per_worker}),
        run_config=ray.train.RunConfig(name=f"bench-data-{int(time.time())}", storage_path=tempfile.mkdtemp()),
        datasets=datasets,
        dataset_config=data_config(cfg),
    ).fit()
    records = [json.loads(line) for line in out.read_text().splitlines()]
    records = [r for r in records if "data_wait_fraction" in r]
    warm = records[len(records) // 5 :]
    waits = np.array([r["data_wait_fraction"] for r in warm])
    return {"steps": len(records), "mean": float(waits.mean()), "median": float(np.median(waits)),
            "max": float(waits.max()), "step_s": float(np.mean([r["step_time_s"] for r in warm])),
            "first_step_wait_fraction": records[0]["data_wait_fraction"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus-bytes", type=int, default=None, help="cap on corpus bytes (default: all)")
    parser.add_argument("--steps", type=int, default=60, help="training steps for the data-wait measurement (0: skip)")
    parser.add_argument("--site-packages-bytes", type=int, default=45_000_000,
                        help="bytes of installed packages' code added to the stdlib (default: enough for 20M+ tokens)")
    args = parser.parse_args()

    import ray

    seq_len = 256
    source = {"path": str(stdlib_copy(args.site_packages_bytes)), "format": "text", "max_bytes": args.corpus_bytes}
    overrides = ["model.preset=debug", "model.vocab_size=4096", f"data.seq_len={seq_len}", "data.val_fraction=0",
                 "data.on_error=skip", "data.sources=" + json.dumps([source])]
    cfg = load_config(None, overrides)
    start = time.perf_counter()
    docs = local_documents(cfg, "train")
    read_s = time.perf_counter() - start
    corpus_bytes = sum(len(d.text.encode()) for d in docs)
    tok = Tokenizer.train((d.text for d in docs[::7]), 4096, max_bytes=4_000_000)

    tokens_sp, seconds_sp = single_process(docs, tok, seq_len)
    tokens_sp2, seconds_sp2 = single_process(docs, tok, seq_len, threads=2)
    assert tokens_sp2 == tokens_sp
    configure_local_cluster()
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=1_000_000_000, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    cold = ray_pipeline(cfg, tok)
    assert cold["tokens"] == tokens_sp, (cold["tokens"], tokens_sp)
    # Further executions on the same cluster (Ray Data's own actors and idle workers exist
    # already; tokenizer actors start afresh), alternating the whole corpus and its first
    # half: the difference is the pipeline's rate with its start-up taken out. Best of 2.
    half_cfg = load_config(None, overrides[:-1] + ["data.sources=" + json.dumps([{**source, "max_bytes": corpus_bytes // 2}])])
    fulls, halves = [], []
    for _ in range(2):
        fulls.append(ray_pipeline(cfg, tok))
        halves.append(ray_pipeline(half_cfg, tok))
    assert all(f["tokens"] == tokens_sp for f in fulls)
    warm = min(fulls, key=lambda r: r["seconds"])
    half = min(halves, key=lambda r: r["seconds"])
    marginal_rate = (warm["tokens"] - half["tokens"]) / (warm["seconds"] - half["seconds"])

    wait = None
    if args.steps:
        wait_overrides = ["model.preset=debug", "model.vocab_size=4096", "data.seq_len=256", "data.on_error=skip",
                          "data.val_fraction=0", f"train.max_steps={args.steps}", "train.global_batch_tokens=2048",
                          "train.micro_batch_size=8", "train.eval_every=0", "scaling.cpus_per_worker=0.5",
                          "data.sources=" + json.dumps([source])]
        wait = data_wait(wait_overrides, tok, args.steps)
    ray.shutdown()

    sp_rate = tokens_sp / seconds_sp
    print(f"machine: {os.cpu_count()} cores, {cpu_model()}; Python {platform.python_version()}, Ray {ray.__version__}")
    print(f"corpus: {len(docs):,} .py files (stdlib with tests, installed packages), {corpus_bytes / 1e6:.1f} MB -> "
          f"{tokens_sp:,} tokens (vocab 4096, seq_len {seq_len}); read + parse in one process: {read_s:.2f} s")
    print(f"{'path':<56}{'seconds':>9}{'tokens/s':>13}{'ratio':>8}{'CPU-s':>8}")

    def row(name, seconds, rate, cpu=None):
        cpu_text = f"{cpu:>8.1f}" if cpu is not None else f"{'':>8}"
        print(f"{name:<56}{seconds:>9.2f}{rate:>13,.0f}{rate / sp_rate:>8.2f}{cpu_text}")

    row("single process, 1 sentencepiece thread (baseline)", seconds_sp, sp_rate, seconds_sp)
    row("single process, sentencepiece's 2-thread encode", seconds_sp2, tokens_sp2 / seconds_sp2)
    row("Ray Data pipeline, end to end, fresh cluster", cold["seconds"], cold["tokens"] / cold["seconds"], cold["cpu_s"])
    row("Ray Data pipeline, end to end, warm cluster (best of 2)", warm["seconds"], warm["tokens"] / warm["seconds"],
        warm["cpu_s"])
    row("Ray Data pipeline, first half of the corpus (best of 2)", half["seconds"], half["tokens"] / half["seconds"], half["cpu_s"])
    row("Ray Data pipeline, marginal (second half - first)", warm["seconds"] - half["seconds"], marginal_rate,
        warm["cpu_s"] - half["cpu_s"])
    print(f"(first packed row after {cold['first_row_s']:.2f} s fresh, {warm['first_row_s']:.2f} s warm;"
          f" CPU-s: CPU time of the whole machine during the run)")
    if wait is not None:
        print(f"data wait (1 Ray Train worker, debug model, {wait['steps']} steps of {wait['step_s'] * 1e3:.0f} ms, "
              f"after 20% warm-up): mean {100 * wait['mean']:.2f}%, median {100 * wait['median']:.2f}%, "
              f"max {100 * wait['max']:.2f}% (first step {100 * wait['first_step_wait_fraction']:.0f}%)")


if __name__ == "__main__":
    main()
