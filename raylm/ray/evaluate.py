"""`raylm eval` on a large corpus: the packed rows from the Ray Data pipeline training uses (same rows)."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from raylm.config import Config
from raylm.data.plan import plan_files
from raylm.ray.connect import ray_session
from raylm.ray.data import _ordered, iter_rows, packed_dataset
from raylm.tokenizer import Tokenizer


def ray_rows(cfg: Config, tokenizer: Tokenizer, split: str, max_rows: int | None) -> Iterator[np.ndarray]:
    """Rows (n, seq_len + 1) of `split` in global index order, tokenised on the CPU actor pool
    while the caller evaluates; joins RAY_ADDRESS or starts a local cluster for the duration."""
    with ray_session():
        pipeline = packed_dataset(cfg, tokenizer, plan_files(cfg, split, mixture=False), split)
        ds = pipeline.dataset if max_rows is None else _ordered(pipeline.dataset.limit(max_rows))
        # Iterated to the end (the limit ends it): an abandoned iterator could leave the
        # tokenizer actors holding CPUs (see raylm.ray.data.validation_dataset).
        for batch in iter_rows(ds):
            yield batch["tokens"]
