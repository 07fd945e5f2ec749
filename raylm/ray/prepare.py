"""`raylm prepare` on Ray: tokenise and pack the corpus once through the Ray Data pipeline into prepared shards.

The format (writer, reader, manifest) is `raylm.data.prepared`; this module only feeds it
from the pipeline.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from raylm import storage
from raylm.config import Config
from raylm.data import prepared
from raylm.data.plan import list_corpus, plan_files
from raylm.errors import EmptySplit
from raylm.ray.cluster import check_cluster_fits
from raylm.ray.data import iter_rows, packed_dataset, sample_documents
from raylm.tokenizer import load_or_train
from raylm.train.runs import check_storage


def prepare(cfg: Config, log=print) -> str | Path:
    """Write the prepared directory for `cfg` (Ray must be up); return its path (or URI)."""
    out = prepared.prepared_dir(cfg)
    check_storage(cfg, reads_sources=True)  # an unreachable store or a missing bucket: one line, before any work
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, prepared_path=str(out)))
    with prepared.writing(cfg) as target:
        if target is None:
            log(f"{out}: already prepared by an identical config; nothing to do")
            return out
        check_cluster_fits(cfg, workers=0, streaming=True)
        listing = list_corpus(cfg)
        tokenizer = load_or_train(cfg, lambda: sample_documents(cfg, listing), log)
        target.write_bytes(storage.child(target.root, prepared.TOKENIZER), tokenizer.to_bytes())
        log(f"tokenizer: {tokenizer.vocab_size} pieces, sha256 {tokenizer.sha256[:12]}")
        splits = {}
        for split in prepared.SPLITS:
            try:
                plan = plan_files(cfg, split, listing=listing)
            except EmptySplit:
                if split == "train":
                    raise
                continue
            pipeline = packed_dataset(cfg, tokenizer, plan, split)
            splits[split] = prepared.write_split(cfg, iter_rows(pipeline.dataset), target, split,
                                                 pipeline.bad_input, log)
        prepared.write_manifest(cfg, target, tokenizer.sha256, tokenizer.vocab_size, splits)
    return out
