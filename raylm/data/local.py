"""Single-process data path: the corpus tokenised and packed in memory, or prepared shards, no Ray.

Used by `raylm train --local`, torchrun, the torch-core tests and GPU benchmarks. It walks the
same file plan (`raylm.data.plan`) with the same parser, samples the tokenizer the same way
and packs with the same functions, so its rows equal the Ray Data pipeline's
(`raylm.ray.data`) row for row. Local paths only (no URIs) in practice.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np

from raylm.config import Config
from raylm.data.corpus import Document
from raylm.data.order import DataPosition, PackedDataset
from raylm.data.parse import BadInputTally, read_documents, sample_priority
from raylm.data.plan import CorpusListing, plan_files
from raylm.data.transforms import TOKEN_DTYPE, tokenize_and_pack
from raylm.errors import EmptySplit
from raylm.tokenizer import Tokenizer


BATCH_DOCS = 256
"""Documents tokenised and packed per call: memory is one file plus one batch's tokens."""


def _file_documents(cfg: Config, split: str, *, mixture: bool = True, listing: CorpusListing | None = None,
                    tally: BadInputTally | None = None) -> Iterator[list[tuple[str, str]]]:
    """Each file's (doc_id, text) documents of `split`, file by file in the Ray Data pipeline's
    plan order (same file plan, same reader), read only as far as the caller iterates."""
    plan = plan_files(cfg, split, mixture=mixture, listing=listing)
    d = cfg.data
    yield from read_documents(((f.path, f.spec) for f in plan.files), plan.filesystem, split, d.val_fraction,
                              d.on_error, tally)


def local_documents(cfg: Config, split: str, *, mixture: bool = True, listing: CorpusListing | None = None,
                    tally: BadInputTally | None = None) -> list[Document]:
    """The documents of `split` in the order the Ray Data pipeline reads them (same file plan, same parser).

    Bad input raises (data.on_error=raise) or is counted in `tally` and skipped."""
    return [Document(doc_id, text) for docs in _file_documents(cfg, split, mixture=mixture, listing=listing,
                                                               tally=tally)
            for doc_id, text in docs]


def pack_batches(text_batches: Iterable[list[str]], tokenizer: Tokenizer, seq_len: int, add_bos: bool
                 ) -> Iterator[np.ndarray]:
    """Rows (n, seq_len + 1) of each batch of document texts in turn, the packing carried across
    batches: together, one sequential pack of all the documents (the last partial row is dropped)."""
    carry = None
    for texts in text_batches:
        rows, carry, _ = tokenize_and_pack(
            texts, tokenizer.encode, seq_len, tokenizer.bos_id, tokenizer.eos_id, add_bos, carry
        )
        yield rows


def planned_rows(cfg: Config, tokenizer: Tokenizer, split: str, max_rows: int | None = None, *,
                 mixture: bool = True, listing: CorpusListing | None = None, tally: BadInputTally | None = None
                 ) -> Iterator[np.ndarray]:
    """The rows ((n, seq_len + 1) arrays, in order) of `split`'s sequential pack, made in this
    process: files read in plan order, BATCH_DOCS documents tokenised at a time, and nothing
    read past what the caller iterates or `max_rows` (None: all) needs.

    The one "read, split into documents, pack" loop of the single-process path: training's
    in-memory datasets, its evaluation rows and `raylm eval` all take their rows from here.
    Bad input raises (data.on_error=raise) or is counted in `tally` and skipped; EmptySplit
    (at the first row asked for) when `split` holds no file."""
    if max_rows is not None and max_rows <= 0:
        return
    d = cfg.data
    batches = ([text for _, text in docs[start:start + BATCH_DOCS]]
               for docs in _file_documents(cfg, split, mixture=mixture, listing=listing, tally=tally)
               for start in range(0, len(docs), BATCH_DOCS))
    made = 0
    for rows in pack_batches(batches, tokenizer, d.seq_len, d.add_bos):
        if max_rows is not None:
            rows = rows[:max_rows - made]
        if len(rows):
            made += len(rows)
            yield rows
        if max_rows is not None and made >= max_rows:
            return


def _stacked(parts: Iterable[np.ndarray], seq_len: int) -> np.ndarray:
    return np.concatenate([np.zeros((0, seq_len + 1), dtype=TOKEN_DTYPE), *parts])


def first_rows(cfg: Config, tokenizer: Tokenizer, split: str, n: int, listing: CorpusListing | None = None
               ) -> np.ndarray:
    """The first `n` rows (at most; (k, seq_len + 1)) of `split`'s sequential pack, reading files
    in plan order only until they are filled: the held-out rows evaluation reads, in the
    driver's process, at the cost of the files they come from (bad input as data.on_error says,
    not counted: the run's report counts the training stream's)."""
    parts = []
    try:
        parts.extend(planned_rows(cfg, tokenizer, split, n, listing=listing))
    except EmptySplit:
        pass
    return _stacked(parts, cfg.data.seq_len)


def tokenizer_sample(cfg: Config, listing: CorpusListing | None = None) -> list[str]:
    """The tokenizer's training sample without Ray: the same seeded documents the Ray path samples."""
    docs = local_documents(cfg, "train", mixture=False, listing=listing)
    seed = cfg.tokenizer.seed
    docs = sorted(docs, key=lambda d: (sample_priority(seed, d.doc_id), d.doc_id))[: cfg.tokenizer.sample_docs]
    return [d.text for d in docs]


class CountedSource:
    """A batch source with the bad-input counts of the documents it was packed from."""

    def __init__(self, source, tally: BadInputTally):
        self.source, self.tally = source, tally

    def __len__(self) -> int:
        return len(self.source)

    def micro_batches(self, position: DataPosition, rank: int, world_size: int, micro_batch_size: int,
                      step_sequences: int | None = None) -> Iterator[dict]:
        return self.source.micro_batches(position, rank, world_size, micro_batch_size, step_sequences)

    def bad_input(self) -> dict:
        return self.tally.report()


def local_datasets(cfg: Config, tokenizer: Tokenizer, listing: CorpusListing | None = None
                   ) -> tuple[CountedSource, PackedDataset | None]:
    """(train, validation) packed in memory; validation is None when there is no held-out document."""
    d = cfg.data
    tally = BadInputTally()
    train_rows = _stacked(planned_rows(cfg, tokenizer, "train", listing=listing, tally=tally), d.seq_len)
    if len(train_rows) == 0:
        raise EmptySplit(f"data.sources: the training split holds less than one sequence of {d.seq_len} tokens")
    train = CountedSource(PackedDataset(train_rows, seed=d.seed, shuffle=True), tally)
    try:
        val_rows = _stacked(planned_rows(cfg, tokenizer, "validation", listing=listing, tally=tally), d.seq_len)
    except EmptySplit:
        return train, None
    return train, PackedDataset(val_rows, seed=d.seed, shuffle=False) if len(val_rows) else None
