"""`raylm prepare`: tokenise and pack a corpus once into Parquet shards plus a manifest.

Many runs and Tune trials then read the same sequences (`data.prepared_path`) and seek to
any position instantly. The directory is written under a temporary name and renamed into
place when complete, so it is either whole or absent; an existing directory is never
overwritten (unless it was made by an identical config, in which case there is nothing to do).

Layout:  manifest.json, tokenizer.model, train/part-00000.parquet ..., validation/part-...
Each shard has columns "index" (int64, the global sequence index) and "tokens"
(fixed_size_list<int32>[seq_len + 1]); rows are in index order, 0, 1, 2, ...
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import sys
import time
import uuid
from pathlib import Path

import numpy as np

import raylm
from raylm.config import Config
from raylm.errors import DataError
from raylm.ray_env import configure_local_cluster

SHARD_ROWS = 16384


def prepared_dir(cfg: Config) -> Path:
    return Path(cfg.data.prepared_path or Path("prepared") / cfg.config_name)


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


def _write_split(cfg: Config, ds, out: Path, split: str, log) -> dict:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from raylm.data.pipeline import bad_input_report, iter_rows

    (out / split).mkdir(parents=True)
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
        pq.write_table(table, out / name, compression="zstd")
        shards.append(name)

    for batch in iter_rows(ds):
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
            report = bad_input_report(ds)
            tokens = sequences * cfg.data.seq_len
            log(f"prepare {split}: {report['documents']:,} documents, {tokens:,} tokens, "
                f"{tokens / (now - start):,.0f} tokens/s")
            last_log = now
    if held:
        flush(pending, np.arange(sequences - held, sequences, dtype=np.int64))
    report = bad_input_report(ds)
    elapsed = time.perf_counter() - start
    return {
        "sequences": sequences,
        "tokens": sequences * cfg.data.seq_len,
        "documents": report["documents"],
        "shards": shards,
        "bad_input_skipped": report["skipped"],
        "bad_input_examples": report["examples"],
        "seconds": round(elapsed, 3),
    }


def prepare(cfg: Config, log=print) -> Path:
    """Write the prepared directory for `cfg` (ray must be initialised); return its path."""
    from raylm.data.pipeline import check_cluster_fits, get_tokenizer, packed_dataset

    out = prepared_dir(cfg)
    fingerprint = config_fingerprint(cfg)
    if out.exists():
        manifest_path = out / "manifest.json"
        if manifest_path.is_file() and json.loads(manifest_path.read_text()).get("config_sha256") == fingerprint:
            log(f"{out}: already prepared by an identical config; nothing to do")
            return out
        raise DataError(f"{out}: already exists and was not prepared by this config; "
                        "choose another data.prepared_path or remove it")
    streaming = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, prepared_path=None))
    check_cluster_fits(dataclasses.replace(streaming, scaling=dataclasses.replace(cfg.scaling, num_workers=0)))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        tokenizer = get_tokenizer(streaming, tmp)
        log(f"tokenizer: {tokenizer.vocab_size} pieces, sha256 {tokenizer.sha256[:12]}")
        splits = {}
        for split in ("train", "validation"):
            if split == "validation" and cfg.data.val_fraction <= 0:
                continue
            try:
                ds = packed_dataset(cfg, tokenizer, split)
            except DataError as e:
                if split == "validation" and "holds no files" in str(e):
                    continue
                raise
            splits[split] = _write_split(cfg, ds, tmp, split, log)
        if splits["train"]["sequences"] == 0:
            raise DataError(f"data.sources: the training split holds less than one sequence of {cfg.data.seq_len} tokens")
        manifest = {
            "raylm_version": raylm.__version__,
            "config_sha256": fingerprint,
            "sources": [dataclasses.asdict(s) for s in cfg.data.sources],
            "weights": [s.weight for s in cfg.data.sources],
            "tokenizer_sha256": tokenizer.sha256,
            "tokenizer_path": "tokenizer.model",
            "tokenizer_source": cfg.tokenizer.path,
            "vocab_size": tokenizer.vocab_size,
            "seq_len": cfg.data.seq_len,
            "add_bos": cfg.data.add_bos,
            "val_fraction": cfg.data.val_fraction,
            "on_error": cfg.data.on_error,
            "splits": splits,
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        os.rename(tmp, out)  # atomic: the directory appears complete or not at all
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def summary_lines(out: Path) -> list[str]:
    manifest = json.loads((out / "manifest.json").read_text())
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


def prepare_main(cfg: Config) -> int:
    """CLI entry: start (or join) Ray, prepare, print the summary; DataErrors reach the CLI edge."""
    import ray

    started = False
    if not ray.is_initialized():
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        if not os.environ.get("RAY_ADDRESS"):
            configure_local_cluster()
        ray.init(address=os.environ.get("RAY_ADDRESS"), include_dashboard=False, log_to_driver=False)
        started = True
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = sys.stderr.isatty()
    try:
        out = prepare(cfg)
        for line in summary_lines(out):
            print(line)
    finally:
        if started:
            ray.shutdown()
    return 0
