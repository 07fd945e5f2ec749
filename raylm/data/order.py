"""The deterministic order of packed sequences and its split over workers.

Every training sequence has a global index 0, 1, 2, ... Optimizer step s consumes exactly
the indices [s*G, (s+1)*G) for G = global batch in sequences, whatever the world size, so
the count consumed (s*G) is the whole data position a checkpoint needs. Within a step,
rank r's k-th micro-batch of B sequences is the slice starting at `start + k*W*B + r*B`;
this depends on neither the gradient accumulation nor the step, so a run resumed on a
different number of workers continues with the next unseen sequence.

Index i maps to a packed row through a seeded permutation per epoch (epoch = i // N).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np


def micro_batch_indices(start: int, k: int, rank: int, world_size: int, micro_batch_size: int) -> np.ndarray:
    """Global indices of rank's k-th micro-batch of a stream that begins at `start`."""
    first = start + k * world_size * micro_batch_size + rank * micro_batch_size
    return np.arange(first, first + micro_batch_size, dtype=np.int64)


class SequenceOrder:
    """Global index -> row of an N-row packed dataset: a fresh seeded permutation each epoch."""

    def __init__(self, n_rows: int, seed: int, shuffle: bool = True):
        if n_rows <= 0:
            raise ValueError("SequenceOrder needs at least one row")
        self.n_rows, self.seed, self.shuffle = n_rows, seed, shuffle
        self._perms: dict[int, np.ndarray] = {}

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            if len(self._perms) > 4:
                self._perms.clear()
            rng = np.random.default_rng([self.seed, epoch])
            self._perms[epoch] = rng.permutation(self.n_rows)
        return self._perms[epoch]

    def rows(self, indices: np.ndarray) -> np.ndarray:
        indices = np.asarray(indices, dtype=np.int64)
        if not self.shuffle:
            return indices % self.n_rows
        epochs, positions = np.divmod(indices, self.n_rows)
        out = np.empty_like(indices)
        for epoch in np.unique(epochs):
            mask = epochs == epoch
            out[mask] = self._perm(int(epoch))[positions[mask]]
        return out


class PackedDataset:
    """Packed rows held in memory, read in the global order (the single-process path)."""

    def __init__(self, rows: np.ndarray, seed: int = 0, shuffle: bool = True):
        self.rows = rows  # (N, seq_len + 1)
        self.order = SequenceOrder(len(rows), seed, shuffle)

    def __len__(self) -> int:
        return len(self.rows)

    def take(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        return {"tokens": self.rows[self.order.rows(indices)], "index": np.asarray(indices, dtype=np.int64)}

    def micro_batches(self, start: int, rank: int, world_size: int, micro_batch_size: int) -> Iterator[dict]:
        """This rank's micro-batches from global index `start` on, without end (epochs repeat)."""
        k = 0
        while True:
            yield self.take(micro_batch_indices(start, k, rank, world_size, micro_batch_size))
            k += 1
