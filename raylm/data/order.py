"""The deterministic order of packed sequences, the data position, and the split over workers.

Every training sequence has a global index 0, 1, 2, ... Optimizer step s consumes exactly
the indices [s*G, (s+1)*G) for G = global batch in sequences, whatever the world size, so
the count consumed (s*G) is the whole data position a checkpoint needs.

The split of a step over W workers with micro-batches of B sequences (`step_slots`): the
step has ceil(G / (W*B)) rounds of W*B slots; slot j of round q belongs to rank
(j // B) % W, and holds sequence s*G + q*W*B + j when that is below (s+1)*G. When W*B
divides G every micro-batch is full and rank r's k-th micro-batch starts at
`s*G + k*W*B + r*B`. When it does not (an elastic run at a world size that does not divide
the batch), the last round is partly empty: ranks take uneven shares, and a rank whose
micro-batch is empty runs a zero-weight one so the collectives stay in step. The loss is
normalised by the global token count, so the optimisation is the same at every world size.

Index i maps to a packed row through a seeded permutation per epoch (epoch = i // N).

The data position of a run is a `DataPosition`: every index below `watermark` is consumed,
plus a few consumed indices above it (`extra`; empty with the formula above, which the
streaming path also follows since it trades rows between workers; non-empty in checkpoints
of older streaming runs, whose steps took whatever rows each worker had been handed). It is rank-agnostic, so a run
resumed on any number of workers trains every unseen sequence once and no seen one again.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from raylm.config import rounds_per_step


@dataclass
class DataPosition:
    watermark: int = 0
    """Every global index below this has been trained on."""
    extra: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    """Sorted consumed indices >= watermark."""

    def consumed(self) -> int:
        return self.watermark + int(self.extra.size)

    def advance(self, indices) -> DataPosition:
        """The position after also consuming `indices` (any order, from any ranks)."""
        new = np.unique(np.concatenate([self.extra, np.asarray(indices, dtype=np.int64).ravel()]))
        new = new[new >= self.watermark]
        watermark = self.watermark
        # the longest run of consecutive indices starting at the watermark moves it forward
        run = np.flatnonzero(new != watermark + np.arange(new.size))
        n_prefix = int(run[0]) if run.size else int(new.size)
        return DataPosition(watermark + n_prefix, new[n_prefix:])

    def is_consumed(self, indices: np.ndarray) -> np.ndarray:
        indices = np.asarray(indices, dtype=np.int64)
        return (indices < self.watermark) | np.isin(indices, self.extra)

    def state_dict(self) -> dict:
        return {"watermark": self.watermark, "extra": self.extra.tolist()}

    @classmethod
    def from_state_dict(cls, state: dict) -> DataPosition:
        return cls(int(state["watermark"]), np.asarray(state.get("extra", []), dtype=np.int64))


def step_slots(step_sequences: int, rank: int, world_size: int, micro_batch_size: int) -> list[np.ndarray]:
    """Offsets within a step of rank's sequences, one array per micro-batch (some may be short or empty)."""
    G, W, B = step_sequences, world_size, micro_batch_size
    out = []
    for q in range(rounds_per_step(G, W, B)):
        first = q * W * B + rank * B
        out.append(np.arange(first, min(first + B, G) if first < G else first, dtype=np.int64))
    return out


def step_shares(step_sequences: int, world_size: int, micro_batch_size: int) -> list[int]:
    """Sequences each rank trains on per step."""
    return [sum(len(s) for s in step_slots(step_sequences, r, world_size, micro_batch_size))
            for r in range(world_size)]


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

    def micro_batches(self, position: DataPosition, rank: int, world_size: int, micro_batch_size: int,
                      step_sequences: int | None = None) -> Iterator[dict]:
        """This rank's micro-batches after `position`, without end (epochs repeat)."""
        yield from (self.take(ix) for ix in unseen_micro_batches(position, rank, world_size, micro_batch_size,
                                                                  step_sequences))


def unseen_micro_batches(position: DataPosition, rank: int, world_size: int, micro_batch_size: int,
                         step_sequences: int | None = None) -> Iterator[np.ndarray]:
    """Global indices of rank's micro-batches over the indices `position` has not consumed.

    Index j of the unseen sequence (watermark, watermark+1, ... minus `extra`) is laid out by
    `step_slots` with G = `step_sequences` (None: W*B, one full round per step), so with an
    empty `extra` step s covers [s*G, (s+1)*G) exactly. Micro-batches may be short or empty.
    """
    W, B = world_size, micro_batch_size
    G = step_sequences if step_sequences is not None else W * B
    slots = step_slots(G, rank, W, B)
    extra = position.extra
    k = 0
    while True:
        step, q = divmod(k, len(slots))
        virtual = step * G + slots[q]
        if extra.size == 0:
            yield virtual + position.watermark
        else:
            # j-th unseen index = watermark + j + (number of extras at or below it)
            real = virtual + position.watermark
            for _ in range(extra.size + 1):
                shifted = virtual + position.watermark + np.searchsorted(extra, real, side="right")
                if np.array_equal(shifted, real):
                    break
                real = shifted
            yield real
        k += 1


class IndexPermutation:
    """Global index -> row of an N-row dataset without holding a permutation: a fresh seeded
    bijection of [0, N) each epoch, computed per index (prepared data, any N).

    A balanced Feistel network over the smallest 2**(2h) >= N, with cycle-walking: an index
    whose image falls outside [0, N) is mapped again until it lands inside, which keeps the
    map a bijection of [0, N) (fewer than 4 walks on average, since 2**(2h) < 4N). Memory is
    O(batch), whatever N; the order depends only on (seed, epoch, N), so a run resumed at any
    world size maps every global index to the same row.
    """

    ROUNDS = 6

    def __init__(self, n_rows: int, seed: int, shuffle: bool = True):
        if n_rows <= 0:
            raise ValueError("IndexPermutation needs at least one row")
        self.n_rows, self.seed, self.shuffle = n_rows, seed, shuffle
        self.half_bits = max(1, (int(n_rows - 1).bit_length() + 1) // 2)
        self._keys: dict[int, np.ndarray] = {}

    def _round_keys(self, epoch: int) -> np.ndarray:
        if epoch not in self._keys:
            if len(self._keys) > 4:
                self._keys.clear()
            rng = np.random.default_rng([self.seed, epoch, 0xFE1])
            self._keys[epoch] = rng.integers(0, 2**63, self.ROUNDS, dtype=np.uint64)
        return self._keys[epoch]

    @staticmethod
    def _mix(x: np.ndarray, key: np.uint64) -> np.ndarray:
        """splitmix64's finaliser of x + key: every output bit depends on every input bit."""
        with np.errstate(over="ignore"):
            z = (x + key) * np.uint64(0x9E3779B97F4A7C15)
            z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
            z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
            return z ^ (z >> np.uint64(31))

    def _feistel(self, x: np.ndarray, keys: np.ndarray) -> np.ndarray:
        h = np.uint64(self.half_bits)
        mask = np.uint64((1 << self.half_bits) - 1)
        left, right = x >> h, x & mask
        for key in keys:
            left, right = right, left ^ (self._mix(right, key) & mask)
        return (left << h) | right

    def rows(self, indices: np.ndarray) -> np.ndarray:
        indices = np.asarray(indices, dtype=np.int64)
        epochs, positions = np.divmod(indices, self.n_rows)
        if not self.shuffle:
            return positions
        out = np.empty_like(indices)
        for epoch in np.unique(epochs):
            mask = epochs == epoch
            keys = self._round_keys(int(epoch))
            x = positions[mask].astype(np.uint64)
            outside = np.ones(x.shape, dtype=bool)
            while outside.any():  # cycle-walking: bounded, each walk is a step along x's cycle
                x[outside] = self._feistel(x[outside], keys)
                outside = x >= np.uint64(self.n_rows)
            out[mask] = x.astype(np.int64)
        return out
