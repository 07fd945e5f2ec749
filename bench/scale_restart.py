"""What a restart reads: bytes from storage per checkpoint byte, and restart-to-first-step time
against checkpoint size (issue 20, item 3).

For each model preset a checkpoint is written by 2 ranks (a torch gloo process group without
Ray, FSDP2 as in training) and then restored by them, side by side in one run:

- bytes: counted at the storage boundary, a pyarrow filesystem that wraps the local one and
  counts every byte it hands out (the checkpoint is named by its `file://` URI, so every read
  raylm makes, marker, listing, `.metadata`, shards by byte range, goes through it). Today's
  restart: the Ray Train controller picks its stream's start with `newest_good` in one process
  (every file hashed), the ranks verify again (sharing the files) and then load with
  `verify=False`. This branch: the controller reads markers only (`newest_complete`), the
  ranks `restore_newest` (each verifies the items it reads, as it reads them). The
  ratio is bytes read / checkpoint bytes; goal <= 1.2.
- time: from building the model to the end of the first training step after the restore,
  the slower of the 2 ranks. The old column adds the controller's single-process hashing
  (timed in this process) to the ranks' verify + load; the new column is `Trainer.restore`.

    python bench/scale_restart.py [--presets debug tiny 125m] [--out /tmp/restart-bench]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


# ---------------------------------------------------------------------------------------
# Counting filesystem


class CountingHandler(pafs.FileSystemHandler):
    """A pyarrow filesystem handler around `base` that counts the bytes every read returns, per
    file (`bytes_by_file`) and as (file, offset, length) ranges (`reads`)."""

    def __init__(self, base: pafs.FileSystem):
        self.base = base
        self.lock = threading.Lock()
        self.bytes_by_file: dict[str, int] = {}
        self.reads: list[tuple[str, int, int]] = []

    def reset(self) -> None:
        with self.lock:
            self.bytes_by_file, self.reads = {}, []

    def total(self) -> int:
        return sum(self.bytes_by_file.values())

    def count(self, path: str, offset: int, n: int) -> None:
        with self.lock:
            self.bytes_by_file[path] = self.bytes_by_file.get(path, 0) + n
            self.reads.append((path, offset, n))

    # the FileSystemHandler interface, delegated
    def get_type_name(self):
        return "counting"

    def normalize_path(self, path):
        return self.base.normalize_path(path)

    def get_file_info(self, paths):
        return self.base.get_file_info(paths)

    def get_file_info_selector(self, selector):
        return self.base.get_file_info(selector)

    def create_dir(self, path, recursive):
        self.base.create_dir(path, recursive=recursive)

    def delete_dir(self, path):
        self.base.delete_dir(path)

    def delete_dir_contents(self, path, missing_dir_ok=False):
        self.base.delete_dir_contents(path, missing_dir_ok=missing_dir_ok)

    def delete_root_dir_contents(self):
        raise OSError("not supported")

    def delete_file(self, path):
        self.base.delete_file(path)

    def move(self, src, dest):
        self.base.move(src, dest)

    def copy_file(self, src, dest):
        self.base.copy_file(src, dest)

    def open_input_stream(self, path):
        return pa.PythonFile(_CountingFile(self, path, self.base.open_input_file(path)), mode="r")

    def open_input_file(self, path):
        return pa.PythonFile(_CountingFile(self, path, self.base.open_input_file(path)), mode="r")

    def open_output_stream(self, path, metadata):
        return self.base.open_output_stream(path, metadata=metadata)

    def open_append_stream(self, path, metadata):
        return self.base.open_append_stream(path, metadata=metadata)


class _CountingFile:
    def __init__(self, handler: CountingHandler, path: str, raw):
        self.handler, self.path, self.raw = handler, path, raw
        self.closed = False

    def read(self, n=-1):
        offset = self.raw.tell()
        data = self.raw.read() if n is None or n < 0 else self.raw.read(n)
        self.handler.count(self.path, offset, len(data))
        return data

    def seek(self, pos, whence=0):
        return self.raw.seek(pos, whence)

    def tell(self):
        return self.raw.tell()

    def size(self):
        return self.raw.size()

    def readable(self):
        return True

    def seekable(self):
        return True

    def writable(self):
        return False

    def close(self):
        self.closed = True
        self.raw.close()


def count_file_uris() -> CountingHandler:
    """Route every `file://` URI raylm resolves in this process through one counting handler."""
    from raylm import storage

    handler = CountingHandler(pafs.LocalFileSystem())
    counting = pafs.PyFileSystem(handler)
    resolve = storage.resolve

    def counted(path):
        if storage.scheme_of(path) == "file":
            return counting, str(path)[len("file://"):].rstrip("/")
        return resolve(path)

    storage.resolve = counted
    return handler


def uri(path: Path) -> str:
    return f"file://{Path(path).resolve()}"


def checkpoint_bytes(path: Path) -> int:
    from raylm.train import checkpoint as ckpt

    marker = json.loads((Path(path) / ckpt.MARKER).read_text())
    return sum(e["bytes"] for e in marker["files"].values()) + (Path(path) / ckpt.MARKER).stat().st_size


# ---------------------------------------------------------------------------------------
# The measurement


def bench_config(preset: str):
    from raylm.config import load_config

    return load_config(None, [f"model.preset={preset}", "data.seq_len=128", "model.max_seq_len=128",
                              "train.global_batch_tokens=256", "train.micro_batch_size=1",
                              "train.eval_every=0", "train.checkpoint_every=0", "train.log_every=1000",
                              "train.max_steps=1000"])


class _FirstStep(Exception):
    pass


class _TimingSink:
    """Stops the trainer when the first step after the restore is written."""

    def __init__(self, root: Path):
        from raylm.train import checkpoint as ckpt

        self.root, self.ckpt = root, ckpt

    def write(self, record):
        raise _FirstStep()

    def checkpoint_dir(self, step):
        return self.root / self.ckpt.checkpoint_dir_name(step)

    def report(self, record, checkpoint):
        pass

    def restore_candidates(self):
        return [uri(p) for p in self.ckpt.list_checkpoints(self.root)]

    def rewind(self, step):
        pass

    def preempted(self):
        return False

    def close(self):
        pass

    def set_aside_after(self, step, log):
        pass


def _rows(cfg, n: int = 64):
    import numpy as np

    return np.random.default_rng(0).integers(4, cfg.model.vocab_size, size=(n, cfg.data.seq_len + 1)).astype(np.int32)


def rank_work(rank: int, out: Path, preset: str, repeats: int = 2) -> dict:
    import torch

    from raylm.data.order import PackedDataset
    from raylm.optim import build_optimizer
    from raylm.train import checkpoint as ckpt
    from raylm.train.parallel import build_model
    from raylm.train.trainer import RankEnv, Trainer

    cfg = bench_config(preset)
    run = out / preset
    model = build_model(cfg, torch.device("cpu"))
    optimizer = build_optimizer(model, cfg.optimizer, "cpu")
    # One real step, so that the optimizer state (2/3 of the checkpoint) is there.
    trainer = Trainer(cfg, RankEnv(rank, 2), _TimingSink(run), PackedDataset(_rows(cfg)), model=model,
                      optimizer=optimizer, log=lambda line: None)
    try:
        trainer.fit()
    except _FirstStep:
        pass
    path = ckpt.save_checkpoint(run / ckpt.checkpoint_dir_name(1), model, optimizer,
                                {"step": 1, "tokens_consumed": 256, "data_watermark": 2, "data_extra": []})
    del trainer, model, optimizer
    counter = count_file_uris()
    result: dict = {}

    # Side by side, alternating (today, now, now, today) so that neither gains from going first.
    for k, design in enumerate(("old", "new", "new", "old")[:2 * repeats]):
        torch.distributed.barrier()
        counter.reset()
        timed = (_restart_today if design == "old" else _restart_now)(cfg, rank, out, run, path)
        result[f"{design}_bytes"] = counter.total()
        for key, value in timed.items():
            result[f"{design}_{key}"] = min(value, result.get(f"{design}_{key}", float("inf")))
    return result


def _restart_today(cfg, rank: int, out: Path, run: Path, path: Path) -> dict:
    """The workers' part of a restart before issue 20: shared verification (`newest_good`), then
    a load without checks."""
    import torch

    from raylm.data.order import PackedDataset
    from raylm.optim import build_optimizer
    from raylm.train import checkpoint as ckpt
    from raylm.train.parallel import build_model
    from raylm.train.trainer import RankEnv, Trainer

    start = time.perf_counter()
    model = build_model(cfg, torch.device("cpu"))
    optimizer = build_optimizer(model, cfg.optimizer, "cpu")
    built = time.perf_counter()
    found = ckpt.newest_good([uri(path)], log=lambda line: None)
    ckpt.load_checkpoint(found[0], model, optimizer, verify=False)
    restore_s = time.perf_counter() - built
    trainer = Trainer(cfg, RankEnv(rank, 2), _TimingSink(out / "none"), PackedDataset(_rows(cfg)), model=model,
                      optimizer=optimizer, log=lambda line: None)
    trainer.state.step = 1
    _first_step(trainer, trainer.state)
    return {"restore_s": restore_s, "s": time.perf_counter() - start}


def _restart_now(cfg, rank: int, out: Path, run: Path, path: Path) -> dict:
    """This branch: `Trainer.restore`, each rank verifying what it reads as it loads it."""
    from raylm.data.order import PackedDataset
    from raylm.train.trainer import RankEnv, Trainer

    start = time.perf_counter()
    trainer = Trainer(cfg, RankEnv(rank, 2), _TimingSink(run), PackedDataset(_rows(cfg)), log=lambda line: None)
    built = time.perf_counter()
    state = trainer.restore()
    restore_s = time.perf_counter() - built
    assert trainer.restored_from == uri(path), trainer.restored_from
    _first_step(trainer, state)
    return {"restore_s": restore_s, "s": time.perf_counter() - start}


def _first_step(trainer, state) -> None:
    """Run `trainer` from `state` (already restored) to the end of its first step."""
    trainer.restore = lambda: state
    try:
        trainer.fit()
    except _FirstStep:
        pass


def controller(run: Path) -> dict:
    """The Ray Train controller's part, in this process (world 1): today's and this branch's."""
    from raylm.train import checkpoint as ckpt

    counter = count_file_uris()
    candidates = [uri(p) for p in ckpt.list_checkpoints(run)]
    start = time.perf_counter()
    ckpt.newest_good(candidates, log=lambda line: None)
    old = {"bytes": counter.total(), "s": time.perf_counter() - start}
    counter.reset()
    start = time.perf_counter()
    ckpt.newest_complete(candidates)
    new = {"bytes": counter.total(), "s": time.perf_counter() - start}
    return {"old": old, "new": new}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["debug", "tiny", "125m"])
    parser.add_argument("--out", default="/tmp/restart-bench")
    parser.add_argument("--repeats", type=int, default=2, choices=(1, 2), help="restarts of each design (best kept)")
    args = parser.parse_args()
    import functools

    sys.path.insert(0, str(ROOT / "tests"))
    from support import run_ranks

    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    rows = []
    for preset in args.presets:
        results = run_ranks(functools.partial(rank_work, preset=preset, repeats=args.repeats), out, tag=preset)
        path = out / preset / "checkpoint_00000001"
        size = checkpoint_bytes(path)
        ctl = controller(out / preset)
        params = bench_config(preset).model.num_params()
        old_bytes = ctl["old"]["bytes"] + sum(r["old_bytes"] for r in results)
        new_bytes = ctl["new"]["bytes"] + sum(r["new_bytes"] for r in results)
        rows.append((preset, params, size, old_bytes / size, new_bytes / size, ctl["new"]["bytes"],
                     ctl["old"]["s"], ctl["old"]["s"] + max(r["old_restore_s"] for r in results),
                     max(r["new_restore_s"] for r in results),
                     ctl["old"]["s"] + max(r["old_s"] for r in results), max(r["new_s"] for r in results)))
        shutil.rmtree(out / preset, ignore_errors=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    print(f"bench/scale_restart.py: {platform.machine()}, {os.cpu_count()} cores, "
          f"{dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC, commit {commit} (+ working tree); "
          f"2 ranks, torch gloo process group without Ray, checkpoint on local disk read through file:// URIs")
    print()
    print("| preset | parameters | checkpoint MB | bytes read / checkpoint bytes, today | now "
          "| controller reads, now (bytes) | controller hashing, today (s) | checkpoint reading, today (s) | now (s) "
          "| restart to first step, today (s) | now (s) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for preset, params, size, old, new, ctl_bytes, ctl_s, old_read_s, new_read_s, old_s, new_s in rows:
        print(f"| {preset} | {params / 1e6:.1f}M | {size / 1e6:.1f} | {old:.2f} | {new:.2f} | {ctl_bytes:,} "
              f"| {ctl_s:.1f} | {old_read_s:.1f} | {new_read_s:.1f} | {old_s:.1f} | {new_s:.1f} |")
    print()
    print("checkpoint reading: today = the controller's single-process newest_good + the slower rank's "
          "newest_good and load; now = the slower rank's Trainer.restore; best of --repeats, alternating. restart to first step: from "
          "building the model to the end of the first step after the restore (today: plus the controller's part).")


if __name__ == "__main__":
    main()
