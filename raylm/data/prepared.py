"""The prepared-shard format: writer, reader and manifest of tokenised, packed sequences (no Ray).

`raylm prepare` tokenises and packs a corpus once; many runs and Tune trials then read the same
sequences (`data.prepared_path`) and seek to any position instantly. The directory is written
under a temporary name and renamed into place when complete, so it is either whole or absent;
an existing directory is never overwritten (unless an identical config made it: nothing to do).

On object storage (`data.prepared_path=s3://...`), which cannot rename a prefix, the shards
are written in place and manifest.json last: a prefix without a manifest is no prepared data
(the reader says so), a failed prepare removes exactly the files it wrote (never the prefix,
never a concurrent writer's objects), and a prefix that already holds a file is never written
into.

Layout (format 2):  manifest.json, tokenizer.model, train/part-00000.bin ..., validation/part-...
A shard is raw fixed-width rows, no header: row r of the split is bytes
[(r % shard_rows) * row_bytes, +row_bytes) of shard r // shard_rows, each row seq_len + 1
little-endian tokens of the manifest's `token_dtype` (uint16 when the vocabulary fits, else
int32); rows are in global index order 0, 1, 2, ... Fixed width is what lets a rank read only
the rows it trains on: a row is one ranged read (a pread locally, a ranged GET on a bucket),
with no row group or page to decompress for the rows of other ranks. (There is no cache of
whole row groups: the shuffled order spreads a rank's rows over the split, and a group's other
rows belong to other ranks, so reading groups would read the data about W times over.) Shards are about
`SHARD_BYTES` each (whole rows), so a split of any size is a modest number of objects.
Format 1 (whole zstd Parquet shards, read whole by every worker) is refused in one line.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import numpy as np

import raylm
from raylm import storage
from raylm.config import Config
from raylm.data.order import DataPosition, IndexPermutation, unseen_micro_batches
from raylm.data.transforms import TOKEN_DTYPE
from raylm.errors import DataError, EmptySplit

MANIFEST = "manifest.json"
TOKENIZER = "tokenizer.model"
FORMAT = 2
SHARD_BYTES = 256 * 2**20  # per shard (whole rows): 7B at seq 4096 in uint16 is ~3,100 shards for 840 GB
SPLITS = ("train", "validation")
READ_AHEAD = 4  # micro-batches a reader fetches ahead of the one being trained on
READ_THREADS = 16  # ranged reads in flight at once (a bucket's latency, not its bandwidth, bounds one)


def prepared_dir(cfg: Config) -> str | Path:
    """data.prepared_path (a local Path or a URI), or prepared/<config name>."""
    return storage.location(cfg.data.prepared_path or Path("prepared") / cfg.config_name)


def config_fingerprint(cfg: Config) -> str:
    """What determines the prepared sequences: sources, packing, split, bad-input policy, tokenizer."""
    d = cfg.data
    relevant = {
        "sources": [dataclasses.asdict(s) for s in d.sources],
        "seq_len": d.seq_len, "add_bos": d.add_bos, "val_fraction": d.val_fraction,
        "on_error": d.on_error, "max_document_bytes": d.max_document_bytes,
        "tokenizer": dataclasses.asdict(cfg.tokenizer), "vocab_size": cfg.model.vocab_size,
    }
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()


# ---------------------------------------------------------------------------------------
# Manifest


def read_manifest(path: str | Path) -> dict:
    path = storage.location(path)
    try:
        with storage.errors(path, "data.prepared_path", DataError):
            return json.loads(storage.read_bytes(storage.child(path, MANIFEST)))
    except (FileNotFoundError, NotADirectoryError):
        raise DataError(f"data.prepared_path={str(path)!r}: no {MANIFEST} (not a directory written by raylm prepare)") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{storage.child(path, MANIFEST)}: not valid JSON ({e.msg} at line {e.lineno})") from None


def check_format(manifest: dict, path: str | Path) -> dict:
    """The manifest, if this raylm reads its format; else one line saying what to do."""
    found = manifest.get("format", 1)
    if found != FORMAT:
        raise DataError(f"data.prepared_path={str(path)!r} is prepared format {found} (raylm "
                        f"{manifest.get('raylm_version', '?')}), this raylm reads format {FORMAT} "
                        "(rows read by range); run raylm prepare again into a new data.prepared_path")
    return manifest


def token_dtype(vocab_size: int) -> np.dtype:
    """The narrowest little-endian dtype that holds every token id of the vocabulary."""
    return np.dtype("<u2") if vocab_size <= 2**16 else np.dtype("<i4")


def check_prepared(cfg: Config, tokenizer_sha256: str) -> dict:
    """The manifest, if it was made with this run's tokenizer, seq_len and add_bos; else DataError."""
    path = cfg.data.prepared_path
    manifest = check_format(read_manifest(path), path)
    if manifest["tokenizer_sha256"] != tokenizer_sha256:
        raise DataError(f"data.prepared_path={path!r} was tokenised with tokenizer sha256 "
                        f"{manifest['tokenizer_sha256'][:12]}, this run uses {tokenizer_sha256[:12]}; "
                        "run raylm prepare again or drop tokenizer.path")
    for key in ("seq_len", "add_bos"):
        if manifest[key] != getattr(cfg.data, key):
            raise DataError(f"data.prepared_path={path!r} was packed with data.{key}={manifest[key]!r}, "
                            f"this run has data.{key}={getattr(cfg.data, key)!r}; run raylm prepare again")
    return manifest


def has_split(path: str | Path, split: str) -> bool:
    return bool(read_manifest(path)["splits"].get(split, {}).get("sequences"))


def prepared_fingerprint(manifest: dict, cfg: Config) -> str:
    """What decides a prepared run's sequence order: the shards (by their config and counts) and data.seed."""
    counts = {s: info["sequences"] for s, info in manifest["splits"].items()}
    text = json.dumps({"prepared": manifest["config_sha256"], "sequences": counts, "seed": cfg.data.seed,
                       "format": manifest.get("format", 1)}, sort_keys=True)  # the order differs by format
    return hashlib.sha256(text.encode()).hexdigest()


def summary_lines(out: str | Path) -> list[str]:
    manifest = read_manifest(out)
    lines = [f"prepared {out}: tokenizer sha256 {manifest['tokenizer_sha256'][:12]}, seq_len {manifest['seq_len']}"]
    for split, info in manifest["splits"].items():
        line = (f"  {split}: {info['documents']:,} documents -> {info['sequences']:,} sequences, "
                f"{info['tokens']:,} tokens in {len(info['shards'])} shard(s)")
        if info["seconds"]:
            line += f", {info['tokens'] / info['seconds']:,.0f} tokens/s"
        lines.append(line)
        for kind, n in info["bad_input_skipped"].items():
            lines.append(f"  skipped {n} {kind}: e.g. {info['bad_input_examples'][kind]}")
    return lines


# ---------------------------------------------------------------------------------------
# Writer


@contextmanager
def writing(cfg: Config):
    """Yield a `storage.WriteLog` to write the prepared files with; they become `prepared_dir(cfg)`
    only if the block completes. Yields None when an identical config prepared it already;
    DataError if another one did, or when the place holds anything else.

    Locally the files go to a new hidden directory beside it, unique to this process (a
    neighbour's is never touched), renamed into place at the end. On object storage they go to
    the prefix itself, manifest.json last, and a failure removes exactly the files this command
    wrote: never the prefix, never another writer's objects (`storage.WriteLog`)."""
    out = prepared_dir(cfg)
    storage.check_writable_dir(out, "data.prepared_path", DataError)
    remote = storage.is_uri(out)
    with storage.errors(out, "data.prepared_path", DataError):
        found = storage.holds_files(out) if remote else storage.exists(out)
        manifest_path = storage.child(out, MANIFEST)
        existing = json.loads(storage.read_bytes(manifest_path)) if found and storage.is_file(manifest_path) else {}
    if existing and existing.get("format", 1) != FORMAT:  # the same config in an old format: not "nothing to do"
        check_format(existing, out)
    same = existing.get("config_sha256") == config_fingerprint(cfg)
    if same:
        yield None
        return
    if found:
        raise DataError(f"{out}: already exists and was not prepared by this config; "
                        "choose another data.prepared_path or remove it")
    if remote:
        target = storage.WriteLog(out, "data.prepared_path", DataError)
        try:
            yield target
        except BaseException:
            with contextlib.suppress(OSError):
                target.remove()
            raise
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield storage.WriteLog(tmp, "data.prepared_path", DataError)
        try:
            os.rename(tmp, out)  # atomic: the directory appears complete or not at all
        except OSError:  # a non-empty directory took the name meanwhile
            raise DataError(f"{out}: appeared while this prepare ran (another prepare?); it was left alone") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_split(cfg: Config, batches: Iterable[dict], target: storage.WriteLog, split: str,
                bad_input: Callable[[], dict], log: Callable[[str], None]) -> dict:
    """Write packed row batches {"tokens", "index"} (in index order) as fixed-width shards through
    `target` (from `writing`), streamed (memory: one batch); return the split's manifest entry."""
    storage.make_dirs(storage.child(target.root, split))
    dtype = token_dtype(cfg.model.vocab_size)
    width = cfg.data.seq_len + 1
    shard_rows = max(1, SHARD_BYTES // (width * dtype.itemsize))
    shards: list[str] = []
    sequences, in_shard = 0, 0
    start = last_log = time.perf_counter()
    with contextlib.ExitStack() as open_shard:
        out = None
        for batch in batches:
            rows, index = np.asarray(batch["tokens"]), batch["index"]
            if len(index) and index[0] != sequences:  # the pipeline's contract; a violation is a bug
                raise AssertionError(f"{split}: expected index {sequences}, got {index[0]}")
            if rows.size and (rows.min() < 0 or rows.max() >= cfg.model.vocab_size):
                raise AssertionError(f"{split}: a token id outside [0, {cfg.model.vocab_size})")
            rows = rows.astype(dtype, copy=False)
            while len(rows):
                if out is None:
                    shards.append(f"{split}/part-{len(shards):05d}.bin")
                    out = open_shard.enter_context(target.output(storage.child(target.root, shards[-1])))
                take = min(len(rows), shard_rows - in_shard)
                out.write(np.ascontiguousarray(rows[:take]).tobytes())
                rows, in_shard, sequences = rows[take:], in_shard + take, sequences + take
                if in_shard == shard_rows:
                    open_shard.close()  # the shard is complete (and recorded) when its stream closes
                    out, in_shard = None, 0
            now = time.perf_counter()
            if now - last_log >= 2.0:
                tokens = sequences * cfg.data.seq_len
                log(f"prepare {split}: {bad_input()['documents']:,} documents, {tokens:,} tokens, "
                    f"{tokens / (now - start):,.0f} tokens/s")
                last_log = now
    report = bad_input()
    return {
        "sequences": sequences,
        "tokens": sequences * cfg.data.seq_len,
        "documents": report["documents"],
        "shards": shards,
        "bad_input_skipped": report["skipped"],
        "bad_input_examples": report["examples"],
        "seconds": round(time.perf_counter() - start, 3),
    }


def write_manifest(cfg: Config, target: storage.WriteLog, tokenizer_sha256: str, vocab_size: int,
                   splits: dict) -> None:
    """manifest.json, the last file: refused when another writer put files beside this command's."""
    if splits["train"]["sequences"] == 0:
        raise EmptySplit(f"data.sources: the training split holds less than one sequence of {cfg.data.seq_len} tokens")
    width = cfg.data.seq_len + 1
    dtype = token_dtype(vocab_size)
    manifest = {
        "format": FORMAT,
        "layout": "fixed-width rows: row r is shard r // shard_rows, bytes (r % shard_rows) * row_bytes",
        "token_dtype": dtype.str,
        "row_tokens": width,
        "row_bytes": width * dtype.itemsize,
        "shard_rows": max(1, SHARD_BYTES // (width * dtype.itemsize)),
        "raylm_version": raylm.__version__,
        "config_sha256": config_fingerprint(cfg),
        "sources": [dataclasses.asdict(s) for s in cfg.data.sources],
        "weights": [s.weight for s in cfg.data.sources],
        "tokenizer_sha256": tokenizer_sha256,
        "tokenizer_path": TOKENIZER,
        "tokenizer_source": cfg.tokenizer.path,
        "vocab_size": vocab_size,
        "seq_len": cfg.data.seq_len,
        "add_bos": cfg.data.add_bos,
        "val_fraction": cfg.data.val_fraction,
        "on_error": cfg.data.on_error,
        "splits": splits,
    }
    target.check_alone()
    target.write_bytes(storage.child(target.root, MANIFEST), (json.dumps(manifest, indent=2) + "\n").encode())


# ---------------------------------------------------------------------------------------
# Reader


class PreparedSplit:
    """A prepared split served by global index, reading only the rows asked for.

    Index i maps to a row through a seeded per-epoch bijection (`IndexPermutation`, no
    permutation held in memory); the rows of a micro-batch are read by range, adjacent rows
    in one read, on a pool of threads, and `micro_batches` keeps at most `read_ahead`
    micro-batches in flight ahead of the one being trained on. Memory is O(read_ahead x
    micro-batch) and bytes read are the rows trained on, whatever the split's size.
    """

    def __init__(self, path: str | Path, split: str = "train", seed: int = 0, shuffle: bool = True,
                 read_ahead: int = READ_AHEAD, filesystem=None):
        self.path = storage.location(path)
        manifest = check_format(read_manifest(self.path), self.path)
        info = manifest["splits"].get(split)
        if not info or info["sequences"] == 0:
            raise EmptySplit(f"data.prepared_path={str(self.path)!r}: no {split} sequences")
        self.n_rows, self.shards = info["sequences"], info["shards"]
        self.width, self.row_bytes = manifest["row_tokens"], manifest["row_bytes"]
        self.shard_rows, self.dtype = manifest["shard_rows"], np.dtype(manifest["token_dtype"])
        self.order = IndexPermutation(self.n_rows, seed, shuffle)
        self.read_ahead = max(0, read_ahead)
        fs, self._root = storage.resolve(self.path)
        self._fs = filesystem or fs  # anything with open_input_file(path) -> read_at(nbytes, offset)
        self._files: dict[int, object] = {}
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None

    def __len__(self) -> int:
        return self.n_rows

    def _file(self, shard: int):
        with self._lock:
            f = self._files.get(shard)
        if f is None:
            f = self._fs.open_input_file(f"{self._root}/{self.shards[shard]}")  # a HEAD on a bucket, once
            with self._lock:
                self._files[shard] = f
        return f

    def _read(self, first_row: int, count: int) -> np.ndarray:
        """Rows [first_row, first_row + count) of one shard, as (count, width) tokens."""
        shard, offset = divmod(first_row, self.shard_rows)
        nbytes = count * self.row_bytes
        with storage.errors(storage.child(self.path, self.shards[shard]), "data.prepared_path", DataError):
            data = self._file(shard).read_at(nbytes, offset * self.row_bytes)
        if len(data) != nbytes:
            raise DataError(f"{storage.child(self.path, self.shards[shard])}: {len(data)} bytes at row {offset}, "
                            f"expected {nbytes} (a truncated shard); run raylm prepare again")
        return np.frombuffer(data, dtype=self.dtype).reshape(count, self.width)

    def _submit(self, indices: np.ndarray):
        """Start reading the rows of `indices`: (indices, [(positions, future of rows)])."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(READ_THREADS, thread_name_prefix="prepared-read")
        rows = self.order.rows(indices)
        by_row = np.argsort(rows, kind="stable")
        sorted_rows = rows[by_row]
        # a run: consecutive rows in one shard, one ranged read
        cut = np.flatnonzero((np.diff(sorted_rows) != 1) | (np.diff(sorted_rows // self.shard_rows) != 0)) + 1
        reads = []
        for run in np.split(np.arange(len(rows)), cut) if len(rows) else []:
            first, count = int(sorted_rows[run[0]]), len(run)
            reads.append((by_row[run], self._pool.submit(self._read, first, count)))
        return np.asarray(indices, dtype=np.int64), reads

    def _collect(self, pending) -> dict[str, np.ndarray]:
        indices, reads = pending
        tokens = np.empty((len(indices), self.width), dtype=TOKEN_DTYPE)  # (B, seq_len + 1)
        for positions, future in reads:
            tokens[positions] = future.result()
        return {"tokens": tokens, "index": indices}

    def take(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        return self._collect(self._submit(np.asarray(indices, dtype=np.int64)))

    def micro_batches(self, position: DataPosition, rank: int, world_size: int, micro_batch_size: int,
                      step_sequences: int | None = None) -> Iterator[dict]:
        """This rank's micro-batches after `position`, without end, `read_ahead` of them in flight."""
        ahead: collections.deque = collections.deque()
        wanted = unseen_micro_batches(position, rank, world_size, micro_batch_size, step_sequences)
        while True:
            while len(ahead) <= self.read_ahead:
                ahead.append(self._submit(next(wanted)))
            yield self._collect(ahead.popleft())


    def close(self) -> None:
        """Wait for the reads in flight, then drop the open files (a later read opens them again)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        with self._lock:
            self._files.clear()


def read_split(path: str | Path, split: str = "train", seed: int = 0, shuffle: bool = True) -> PreparedSplit:
    """A split of prepared data, read by global index (only the rows asked for)."""
    return PreparedSplit(path, split, seed=seed, shuffle=shuffle)


def prepared_sources(cfg: Config) -> tuple[PreparedSplit, PreparedSplit | None]:
    """(train, validation or None) of data.prepared_path."""
    path = cfg.data.prepared_path
    train = read_split(path, "train", seed=cfg.data.seed, shuffle=True)
    val = read_split(path, "validation", shuffle=False) if has_split(path, "validation") else None
    return train, val
