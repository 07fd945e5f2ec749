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

Layout:  manifest.json, tokenizer.model, train/part-00000.parquet ..., validation/part-...
Each shard has columns "index" (int64, the global sequence index) and "tokens"
(fixed_size_list<int32>[seq_len + 1]); rows are in index order, 0, 1, 2, ...
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from pathlib import Path

import numpy as np

import raylm
from raylm import storage
from raylm.config import Config
from raylm.data.order import PackedDataset
from raylm.errors import DataError, EmptySplit

MANIFEST = "manifest.json"
TOKENIZER = "tokenizer.model"
SHARD_ROWS = 16384
SPLITS = ("train", "validation")


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


def check_prepared(cfg: Config, tokenizer_sha256: str) -> dict:
    """The manifest, if it was made with this run's tokenizer, seq_len and add_bos; else DataError."""
    path = cfg.data.prepared_path
    manifest = read_manifest(path)
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


def data_fingerprint(manifest: dict, cfg: Config) -> str:
    """What decides a prepared run's sequence order: the shards (by their config and counts) and data.seed."""
    counts = {s: info["sequences"] for s, info in manifest["splits"].items()}
    text = json.dumps({"prepared": manifest["config_sha256"], "sequences": counts, "seed": cfg.data.seed},
                      sort_keys=True)
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
        same = found and storage.is_file(manifest_path) and \
            json.loads(storage.read_bytes(manifest_path)).get("config_sha256") == config_fingerprint(cfg)
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
    """Write packed row batches {"tokens", "index"} (in index order) as shards through `target`
    (from `writing`); return the split's manifest entry."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    storage.make_dirs(storage.child(target.root, split))
    width = cfg.data.seq_len + 1
    shards, pending, held, sequences = [], [], 0, 0
    start = last_log = time.perf_counter()

    def flush(rows: list[np.ndarray], index: np.ndarray) -> None:
        tokens = np.concatenate(rows)
        name = f"{split}/part-{len(shards):05d}.parquet"
        table = pa.table({
            "index": pa.array(index, pa.int64()),
            "tokens": pa.FixedSizeListArray.from_arrays(pa.array(tokens.ravel(), pa.int32()), width),
        })
        with target.output(storage.child(target.root, name)) as f:
            pq.write_table(table, f, compression="zstd")
        shards.append(name)

    for batch in batches:
        rows, index = batch["tokens"], batch["index"]
        if len(index) and index[0] != sequences:  # the pipeline's contract; a violation is a bug
            raise AssertionError(f"{split}: expected index {sequences}, got {index[0]}")
        pending.append(rows)
        held += len(rows)
        sequences += len(rows)
        if held >= SHARD_ROWS:
            flush(pending, np.arange(sequences - held, sequences, dtype=np.int64))
            pending, held = [], 0
        now = time.perf_counter()
        if now - last_log >= 2.0:
            tokens = sequences * cfg.data.seq_len
            log(f"prepare {split}: {bad_input()['documents']:,} documents, {tokens:,} tokens, "
                f"{tokens / (now - start):,.0f} tokens/s")
            last_log = now
    if held:
        flush(pending, np.arange(sequences - held, sequences, dtype=np.int64))
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
    manifest = {
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


def read_split(path: str | Path, split: str = "train", seed: int = 0, shuffle: bool = True) -> PackedDataset:
    """A split's shards read whole, served by global index: instant seek, a seeded permutation per epoch."""
    import pyarrow.parquet as pq

    path = storage.location(path)
    manifest = read_manifest(path)
    info = manifest["splits"].get(split)
    if not info or info["sequences"] == 0:
        raise EmptySplit(f"data.prepared_path={str(path)!r}: no {split} sequences")
    width = manifest["seq_len"] + 1
    fs, fs_path = storage.resolve(path)
    shards = []
    for name in info["shards"]:
        with storage.errors(storage.child(path, name), "data.prepared_path", DataError):
            table = pq.read_table(f"{fs_path}/{name}", filesystem=fs, columns=["tokens"])
        shards.append(table.column("tokens").combine_chunks().flatten().to_numpy().reshape(-1, width))
    rows = np.concatenate(shards) if len(shards) > 1 else shards[0]  # (N, L + 1) int32
    return PackedDataset(rows, seed=seed, shuffle=shuffle)


def prepared_sources(cfg: Config) -> tuple[PackedDataset, PackedDataset | None]:
    """(train, validation or None) of data.prepared_path."""
    path = cfg.data.prepared_path
    train = read_split(path, "train", seed=cfg.data.seed, shuffle=True)
    val = read_split(path, "validation", shuffle=False) if has_split(path, "validation") else None
    return train, val
