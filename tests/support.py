"""Shared test pieces: an in-memory sink, a real two-rank gloo group, a crafted pickle; reference
data helpers (the default corpus's documents, a whole-list pack, the run's tokenizer); waits for events (`wait_for`) and a pause the test controls (`frozen`), so no test depends on speed."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from raylm.config import Config, load_config
from raylm.data.corpus import Document, stdlib_files, stdlib_root
from raylm.data.local import BATCH_DOCS, pack_batches, tokenizer_sample
from raylm.data.transforms import TOKEN_DTYPE
from raylm.tokenizer import Tokenizer, load_or_train
from raylm.train import checkpoint as ckpt

# The session's shared run (conftest.py's `local_run`): LOCAL_STEPS steps, a checkpoint every
# LOCAL_CHECKPOINT_EVERY steps (2, 4, 6) and an evaluation every LOCAL_EVAL_EVERY (0, 3, 6)
LOCAL_STEPS, LOCAL_CHECKPOINT_EVERY, LOCAL_EVAL_EVERY = 6, 2, 3


def local_config(out: str | Path, *overrides: str) -> Config:
    """The debug model on a 200 kB slice of the default corpus: a `raylm train --local` run of
    seconds, with checkpoints, held-out evaluation (2 micro-batches) and an end-of-run sample."""
    return load_config(None, [
        "model.preset=debug", "model.vocab_size=512", "model.max_seq_len=64", "data.seq_len=32",
        "data.sources.0.max_bytes=200000", "tokenizer.sample_bytes=100000", "data.val_fraction=0.1",
        f"train.max_steps={LOCAL_STEPS}", "train.global_batch_tokens=256", "train.micro_batch_size=4",
        f"train.eval_every={LOCAL_EVAL_EVERY}", "train.eval_batches=2",
        f"train.checkpoint_every={LOCAL_CHECKPOINT_EVERY}", "train.log_every=1", "optimizer.warmup_steps=1",
        "optimizer.lr=3e-3", f"run.output_dir={out}", "run.sample_tokens=4", "run.keep_checkpoints=5", *overrides,
    ])


def stdlib_documents(max_bytes: int | None = None) -> Iterator[Document]:
    """Every document of the default corpus (or of its max_bytes sample), in sorted order, with
    no split (the train/validation split is the file plan's): read here independently of it."""
    root = stdlib_root()
    for path in stdlib_files(max_bytes):
        text = path.read_bytes().decode("utf-8", errors="replace")
        if text.strip():
            yield Document(path.relative_to(root).as_posix(), text)


def pack_documents(docs: list[Document], tokenizer: Tokenizer, seq_len: int, add_bos: bool,
                   batch_docs: int = BATCH_DOCS) -> np.ndarray:
    """All rows (N, seq_len + 1) of `docs` in document order; the last partial row is dropped."""
    batches = ([d.text for d in docs[start : start + batch_docs]] for start in range(0, len(docs), batch_docs))
    parts = list(pack_batches(batches, tokenizer, seq_len, add_bos))
    if not parts:
        return np.zeros((0, seq_len + 1), dtype=TOKEN_DTYPE)
    return np.concatenate(parts)


def train_tokenizer_local(cfg: Config) -> Tokenizer:
    """The tokenizer `raylm train` gets for `cfg`, made in this process."""
    return load_or_train(cfg, lambda: tokenizer_sample(cfg), lambda line: None)


class ListSink:
    """The trainer's Sink protocol with records kept in `records` and reports in `reports`."""

    def __init__(self, checkpoint_root: Path | None = None):
        self.records: list[dict] = []
        self.reports: list[tuple[int, Path | None]] = []
        self.root = checkpoint_root

    def write(self, record: dict) -> None:
        self.records.append(record)

    def checkpoint_dir(self, step: int) -> Path:
        if self.root is None:  # a test that does not look at checkpoints: they go to a temporary directory
            self.root = Path(tempfile.mkdtemp(prefix="raylm-test-"))
        return self.root / ckpt.checkpoint_dir_name(step)

    def report(self, record: dict, checkpoint: Path | None) -> None:
        self.reports.append((record["step"], checkpoint))

    def restore_candidates(self) -> list[Path]:
        return ckpt.list_checkpoints(self.root) if self.root is not None else []

    def rewind(self, step: int) -> None:
        self.records = [r for r in self.records if r["step"] <= step]

    def preempted(self) -> bool:
        return False

    def close(self) -> None:
        pass

    def set_aside_after(self, step: int, log) -> None:
        if self.root is not None:
            ckpt.set_aside_after(self.root, step, log)

    def losses(self) -> dict[int, float]:
        return {r["step"]: r["loss"] for r in self.records if "loss" in r}


class RunsCode:
    """Unpickling this runs a shell command: a stand-in for a crafted checkpoint."""

    def __init__(self, flag: Path):
        self.flag = flag

    def __reduce__(self):
        return os.system, (f"touch {self.flag}",)


def _rank_main(rank: int, world: int, port: int, work: Callable[[int, Path], dict], out: str, tag: str) -> None:
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        result = work(rank, Path(out))
        (Path(out) / f"{tag}_rank{rank}.json").write_text(json.dumps(result))
        dist.barrier()
    except BaseException:
        dist.destroy_process_group()
        raise
    # Done and written: leave without tearing gloo down. Its teardown races between ranks and
    # now and then aborts a process (std::terminate, SIGABRT) after the work has finished, even
    # after a barrier (seen in CI); the test reads each rank's result from its file.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_ranks(work: Callable[[int, Path], dict], out: Path, tag: str = "result", world: int = 2) -> list[dict]:
    """Run `work(rank, out)` (a module-level function or a functools.partial of one) on every rank of
    a real gloo group of `world` processes; return each rank's JSON-able result."""
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_rank_main, args=(world, port, work, str(out), tag), nprocs=world, join=True)
    return [json.loads((out / f"{tag}_rank{r}.json").read_text()) for r in range(world)]


def wait_for(predicate: Callable[[], object], timeout_s: float, what: str, *,
             ended: Callable[[], bool] | None = None, poll_s: float = 0.1):
    """Poll `predicate` until it returns something truthy, and return that.

    `what` names the event in the failure. `ended()` is True once the thing that should make the
    event has stopped (it may raise that thing's own error): the predicate then gets one last
    look, and the failure says the event can no longer come. `timeout_s` only bounds a hang:
    pick it generous; the test never depends on how soon the event comes."""
    import pytest

    deadline = time.monotonic() + timeout_s
    while True:
        if value := predicate():
            return value
        if ended is not None and ended():
            if value := predicate():
                return value
            pytest.fail(f"it ended before {what}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s:g} s waiting for {what}")
        time.sleep(poll_s)


@contextlib.contextmanager
def frozen(pids: list[int]) -> Iterator[list[int]]:
    """Processes `pids` stopped (SIGSTOP) for the block and continued (SIGCONT) after it: a pause
    the test controls, so that what it does in the block (a drain, a kill) lands at a step it
    has read there, however fast or slow the machine. Keep the block short: a stopped Ray
    worker answers no health check (Ray Train gives one 10 minutes)."""
    stopped = []
    try:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGSTOP)
            except ProcessLookupError:
                continue  # gone already (an actor table lags its processes' exits)
            stopped.append(pid)
        yield stopped
    finally:
        for pid in stopped:
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass  # killed in the block
