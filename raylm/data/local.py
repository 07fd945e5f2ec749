"""Single-process data path: the corpus tokenised and packed in memory, no Ray.

Used by `raylm train --local`, the torch-core tests and GPU benchmarks under torchrun. It
walks the same file plan (`raylm.data.sources.plan_files`) with the same parser, samples the
tokenizer the same way and packs with the same functions, so its rows equal the Ray Data
pipeline's (`raylm.data.pipeline`) row for row. Local paths only (no URIs) in practice.
"""

from __future__ import annotations

import numpy as np

from collections import Counter

from raylm.config import Config
from raylm.data.corpus import Document, is_validation
from raylm.data.order import PackedDataset
from raylm.data.parse import parse_file, sample_priority
from raylm.data.sources import plan_files
from raylm.data.transforms import TOKEN_DTYPE, tokenize_and_pack
from raylm.errors import DataError
from raylm.tokenizer import Tokenizer


def local_documents(cfg: Config, split: str, *, mixture: bool = True) -> list[Document]:
    """The documents of `split` in the order the Ray Data pipeline reads them (same file plan, same parser)."""
    plan = plan_files(cfg, split, mixture=mixture)
    problems = list(plan.problems)
    docs: list[Document] = []
    for f in plan.files:
        with plan.filesystem.open_input_stream(f.path) as stream:
            parsed, bad = parse_file(stream.read(), f.spec)
        if bad and cfg.data.on_error == "raise":
            raise DataError(bad[0][1])
        problems.extend(bad)
        docs.extend(Document(doc_id, text) for doc_id, text in parsed
                    if is_validation(doc_id, cfg.data.val_fraction) == (split == "validation"))
    if problems:
        kinds = Counter(kind for kind, _ in dict.fromkeys(problems))
        print(f"raylm: skipped bad input: {', '.join(f'{n} {k}' for k, n in kinds.items())} ({problems[0][1]})")
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
    """The tokenizer `raylm.data.pipeline.get_tokenizer` trains, without Ray (same seeded sample)."""
    docs = local_documents(cfg, "train", mixture=False)
    seed = cfg.tokenizer.seed
    docs = sorted(docs, key=lambda d: (sample_priority(seed, d.doc_id), d.doc_id))[: cfg.tokenizer.sample_docs]
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
