"""Prepared data at scale: a worker's peak RSS, bytes read and time to first batch against dataset size.

Prepared datasets of about 0.1, 1 and 4 GB are written with raylm's own writer
(`raylm.data.prepared.writing` + `write_split` + `write_manifest`) from synthetic token rows
(seq_len 2048, vocab 32000: uint16 rows of 4,098 bytes), on local disk and on s3:// through a
`moto_server` this script starts on 127.0.0.1. For each, a fresh subprocess plays one worker
of the 7B config's shape (rank 3 of 8, micro-batches of 2, 1024 sequences per step) and trains
on `--batches` micro-batches: it prints its time to first batch (from opening the split), its
peak RSS (`ru_maxrss`) and the bytes it read, counted at the storage boundary (a wrapper
around the pyarrow filesystem counting what its files' `read_at` returned; the manifest,
read once through `raylm.storage`, is added). The goal: RSS and time to first batch flat
within +10% from 0.1 to 4 GB, bytes read <= 1.2x the rows trained on (plus the read-ahead).

Shards are `--shard-mb` (32) each for every size, so that the sizes differ only in how many
shards there are: moto reads a whole object from its spool for every ranged GET, a cost of
moto's that grows with the object's size (S3 serves a range at the same cost whatever the
object's size). The data is deleted afterwards.

    python bench/scale_data.py [--sizes-gb 0.1 1 4] [--where local s3] [--root /tmp/data/scale]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SEQ_LEN, VOCAB = 2048, 32000
BUCKET = "raylm-bench-scale"
AWS_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
WORKER = {"rank": 3, "world": 8, "micro": 2, "step": 1024}  # llama2-7b.yaml's shape at 8 GPUs


class CountingFS:
    """A pyarrow filesystem, counting the bytes (and reads) its files' read_at return."""

    def __init__(self, fs):
        self.fs, self.bytes_read, self.reads, self.opens = fs, 0, 0, 0

    def open_input_file(self, path):
        f, outer = self.fs.open_input_file(path), self
        outer.opens += 1

        class Counted:
            def read_at(self, nbytes, offset):
                data = f.read_at(nbytes, offset)
                outer.bytes_read += len(data)
                outer.reads += 1
                return data
        return Counted()


def worker(path: str, batches: int) -> None:
    """One worker: open the split, train on `batches` micro-batches; print a JSON line."""
    from raylm import storage
    from raylm.data import prepared
    from raylm.data.order import DataPosition

    rss_imports_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start, start_cpu = time.perf_counter(), time.process_time()
    counted = CountingFS(storage.resolve(path)[0])
    manifest_bytes = len(storage.read_bytes(storage.child(storage.location(path), prepared.MANIFEST)))
    data = prepared.PreparedSplit(path, seed=0, filesystem=counted)
    it = data.micro_batches(DataPosition(), WORKER["rank"], WORKER["world"], WORKER["micro"], WORKER["step"])
    rows = len(next(it)["index"])
    first_s, first_cpu_s = time.perf_counter() - start, time.process_time() - start_cpu
    for _ in range(batches - 1):
        rows += len(next(it)["index"])
    data.close()  # the read-ahead in flight is counted too
    print(json.dumps({
        "first_batch_s": first_s, "first_batch_cpu_s": first_cpu_s, "all_s": time.perf_counter() - start,
        "rss_peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "rss_imports_mib": rss_imports_kib / 1024,
        "bytes_read": counted.bytes_read + manifest_bytes * 2,  # read_manifest: once here, once in the reader
        "reads": counted.reads, "opens": counted.opens,
        "trained_bytes": rows * data.row_bytes, "rows": rows,
    }))


def write_dataset(out: str, gigabytes: float, shard_mb: int) -> dict:
    """A prepared train split of about `gigabytes` of synthetic rows; its manifest entry."""
    import numpy as np

    from raylm.config import load_config
    from raylm.data import prepared

    prepared.SHARD_BYTES = shard_mb * 2**20
    cfg = load_config(None, ["model.preset=debug", f"model.vocab_size={VOCAB}", f"model.max_seq_len={SEQ_LEN}",
                             f"data.seq_len={SEQ_LEN}",
                             f"train.global_batch_tokens={SEQ_LEN * 1024}", f"data.prepared_path={out}"])
    row_bytes = (SEQ_LEN + 1) * 2
    n_rows = int(gigabytes * 1e9) // row_bytes
    rng = np.random.default_rng(0)

    def batches():
        for first in range(0, n_rows, 2048):
            n = min(2048, n_rows - first)
            yield {"tokens": rng.integers(0, VOCAB, (n, SEQ_LEN + 1), dtype=np.uint16),
                   "index": np.arange(first, first + n)}

    report = lambda: {"documents": n_rows, "skipped": {}, "examples": {}}  # noqa: E731
    with prepared.writing(cfg) as target:
        split = prepared.write_split(cfg, batches(), target, "train", report, lambda line: None)
        prepared.write_manifest(cfg, target, "0" * 64, VOCAB, {"train": split})
    return split


def start_moto(tmp: Path) -> tuple[str, subprocess.Popen]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    tmp.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen([str(Path(sys.executable).with_name("moto_server")), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "TMPDIR": str(tmp)})
    url = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            urllib.request.urlopen(url, timeout=1).close()
            break
        except urllib.error.HTTPError:
            break
        except OSError:
            time.sleep(0.2)
    return url, proc


def run_point(path: str, batches: int, env: dict) -> dict:
    out = subprocess.run([sys.executable, __file__, "--worker", path, "--batches", str(batches)], env=env,
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes-gb", type=float, nargs="+", default=[0.1, 1.0, 4.0])
    parser.add_argument("--where", nargs="+", default=["local", "s3"], choices=["local", "s3"])
    parser.add_argument("--root", default="/tmp/data/scale")
    parser.add_argument("--shard-mb", type=int, default=32)
    parser.add_argument("--batches", type=int, default=64, help="micro-batches the worker trains on")
    parser.add_argument("--repeats", type=int, default=2, help="fresh workers per point (the median is shown)")
    parser.add_argument("--worker")
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker, args.batches)

    root = Path(args.root)
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    moto = None
    if "s3" in args.where:
        import pyarrow.fs as pafs

        url, moto = start_moto(root / "moto-spool")
        env.update(AWS_ENV, AWS_ENDPOINT_URL=url)
        env.pop("AWS_ENDPOINT_URL_S3", None)
        os.environ.update(AWS_ENV, AWS_ENDPOINT_URL=url)
        pafs.S3FileSystem(endpoint_override=url.removeprefix("http://"), scheme="http",
                          allow_bucket_creation=True).create_dir(BUCKET)
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    if subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                      text=True).stdout.strip():
        commit += " + uncommitted changes"
    print(f"# bench/scale_data.py: {platform.machine()}, {os.cpu_count()} cores, "
          f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, commit {commit}")
    print(f"# worker: rank {WORKER['rank']} of {WORKER['world']}, micro-batch {WORKER['micro']}, "
          f"{WORKER['step']} sequences/step, {args.batches} micro-batches; seq_len {SEQ_LEN}, uint16 rows; "
          f"shards of {args.shard_mb} MiB; median of {args.repeats} fresh workers, "
          "run round-robin over the sizes")
    print("| where | dataset | shards | peak RSS MiB (after imports) | first batch s (CPU s) | read / trained | "
          "bytes read | trained bytes | reads |")
    print("|---|---|---|---|---|---|---|---|---|")
    try:
        for where in args.where:
            paths, splits = {}, {}
            for gb in args.sizes_gb:
                paths[gb] = f"s3://{BUCKET}/{gb}gb" if where == "s3" else str(root / f"{gb}gb")
                t = time.perf_counter()
                splits[gb] = write_dataset(paths[gb], gb, args.shard_mb)
                print(f"#   {where} {gb} GB written in {time.perf_counter() - t:.0f} s", flush=True)
            points = {gb: [] for gb in args.sizes_gb}
            for _ in range(args.repeats):  # round-robin over the sizes: load drifts alike for each
                for gb in args.sizes_gb:
                    points[gb].append(run_point(paths[gb], args.batches, env))
            for gb in args.sizes_gb:
                runs = sorted(points[gb], key=lambda q: q["first_batch_s"])
                p = runs[len(runs) // 2]
                size = splits[gb]["sequences"] * (SEQ_LEN + 1) * 2
                print(f"| {where} | {size / 1e9:.2f} GB | {len(splits[gb]['shards'])} | "
                      f"{max(q['rss_peak_mib'] for q in runs):.0f} ({p['rss_imports_mib']:.0f}) | "
                      f"{p['first_batch_s']:.3f} ({statistics.median(q['first_batch_cpu_s'] for q in runs):.3f}) | "
                      f"{p['bytes_read'] / p['trained_bytes']:.3f} | "
                      f"{p['bytes_read']:,} | {p['trained_bytes']:,} | {p['reads']} |", flush=True)
                print(f"#   first batch of each worker: {', '.join('%.3f' % q['first_batch_s'] for q in runs)} s; "
                      f"CPU: {', '.join('%.3f' % q['first_batch_cpu_s'] for q in runs)} s; "
                      f"peak RSS: {', '.join('%.0f' % q['rss_peak_mib'] for q in runs)} MiB", flush=True)
            for gb in args.sizes_gb:
                if where == "s3":
                    from raylm import storage

                    storage.resolve(paths[gb])[0].delete_dir(f"{BUCKET}/{gb}gb")
                else:
                    shutil.rmtree(paths[gb], ignore_errors=True)
    finally:
        if moto is not None:
            moto.terminate()
            moto.wait(timeout=60)
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
