"""Single-process data path: the default corpus tokenised and packed in memory, no Ray.

Used by `raylm train --local`, the torch-core tests and GPU benchmarks under torchrun. The
Ray Data pipeline (`raylm.data.pipeline`) produces the same rows for the same config.
"""

from __future__ import annotations

import numpy as np

from raylm.config import STDLIB_CORPUS, Config
from raylm.data.corpus import Document, stdlib_documents
from raylm.data.order import PackedDataset
from raylm.data.transforms import TOKEN_DTYPE, tokenize_and_pack
from raylm.errors import DataError
from raylm.tokenizer import Tokenizer


def local_documents(cfg: Config, split: str) -> list[Document]:
    docs: list[Document] = []
    for i, src in enumerate(cfg.data.sources):
        if src.path != STDLIB_CORPUS:
            raise DataError(
                f"data.sources.{i}.path={src.path!r}: the single-process path reads only {STDLIB_CORPUS!r}; "
                "other corpora stream through Ray Data (run without --local)"
            )
        docs.extend(stdlib_documents(split, cfg.data.val_fraction, src.max_bytes))
    return docs


def pack_documents(docs: list[Document], tokenizer: Tokenizer, seq_len: int, add_bos: bool,
                   batch_docs: int = 256) -> np.ndarray:
    """All rows (N, seq_len + 1) of `docs` in document order; the last partial row is dropped."""
    parts, carry = [], None
    for start in range(0, len(docs), batch_docs):
        texts = [d.text for d in docs[start : start + batch_docs]]
        rows, carry, _ = tokenize_and_pack(
            texts, tokenizer.encode, seq_len, tokenizer.bos_id, tokenizer.eos_id, add_bos, carry
        )
        parts.append(rows)
    if not parts:
        return np.zeros((0, seq_len + 1), dtype=TOKEN_DTYPE)
    return np.concatenate(parts)


def train_tokenizer_local(cfg: Config) -> Tokenizer:
    docs = local_documents(cfg, "train")
    rng = np.random.default_rng(cfg.tokenizer.seed)
    if len(docs) > cfg.tokenizer.sample_docs:
        picked = np.sort(rng.choice(len(docs), cfg.tokenizer.sample_docs, replace=False))
        docs = [docs[i] for i in picked]
    else:
        docs = [docs[i] for i in rng.permutation(len(docs))]
    t = cfg.tokenizer
    return Tokenizer.train(
        (d.text for d in docs),
        cfg.model.vocab_size,
        model_type=t.model_type,
        byte_fallback=t.byte_fallback,
        character_coverage=t.character_coverage,
        max_piece_length=t.max_piece_length,
        max_bytes=t.sample_bytes,
    )


def local_datasets(cfg: Config, tokenizer: Tokenizer) -> tuple[PackedDataset, PackedDataset | None]:
    """(train, validation) packed in memory; validation is None when val_fraction is 0."""
    d = cfg.data
    train_rows = pack_documents(local_documents(cfg, "train"), tokenizer, d.seq_len, d.add_bos)
    if len(train_rows) == 0:
        raise DataError(f"data.sources: the training split holds less than one sequence of {d.seq_len} tokens")
    train = PackedDataset(train_rows, seed=d.seed, shuffle=True)
    val = None
    if d.val_fraction > 0:
        val_rows = pack_documents(local_documents(cfg, "validation"), tokenizer, d.seq_len, d.add_bos)
        val = PackedDataset(val_rows, seed=d.seed, shuffle=False) if len(val_rows) else None
    return train, val
