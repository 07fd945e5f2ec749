"""Pure tokenise and pack functions: numpy in, numpy out, no Ray and no torch.

Ray Data's `map_batches` and the single-process path both call these, so a packed row is
the same whichever way it was made.

Packing layout: documents become `[BOS] tokens [EOS]` and are concatenated into one stream;
row i is `stream[i*L : i*L + L + 1]` for L = seq_len. Consecutive rows overlap by one token,
so every token of the stream is a training target exactly once, no padding is ever needed,
and a long document simply continues into the next row.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import chain

import numpy as np

TOKEN_DTYPE = np.int32  # vocabularies up to 2**31; halves memory and Parquet size vs int64


def frame_documents(token_lists: Sequence[Sequence[int]], bos_id: int, eos_id: int, add_bos: bool) -> np.ndarray:
    """Concatenate documents as one stream: [BOS] doc [EOS] for each (BOS optional)."""
    n = len(token_lists)
    if n == 0:
        return np.zeros(0, dtype=TOKEN_DTYPE)
    lengths = np.fromiter((len(t) for t in token_lists), dtype=np.int64, count=n)
    flat = np.fromiter(chain.from_iterable(token_lists), dtype=TOKEN_DTYPE, count=int(lengths.sum()))
    framed = lengths + 1 + int(add_bos)
    ends = np.cumsum(framed)  # exclusive end of each framed document
    out = np.empty(int(ends[-1]), dtype=TOKEN_DTYPE)
    is_token = np.ones(out.size, dtype=bool)
    if add_bos:
        starts = ends - framed
        out[starts] = bos_id
        is_token[starts] = False
    out[ends - 1] = eos_id
    is_token[ends - 1] = False
    out[is_token] = flat
    return out


def pack(stream: np.ndarray, seq_len: int, carry: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Cut `carry + stream` into rows of seq_len + 1 tokens; return (rows, new carry).

    rows: (N, seq_len + 1). The carry holds the tokens not yet a target plus the one token
    that the next row starts with; feed it to the next call to continue the stream.
    """
    if seq_len <= 0:
        raise ValueError(f"seq_len={seq_len}: must be positive")
    flat = stream if carry is None or carry.size == 0 else np.concatenate([carry, stream])
    flat = np.asarray(flat, dtype=TOKEN_DTYPE)
    n_rows = max(0, (flat.size - 1) // seq_len)
    if n_rows == 0:
        return np.zeros((0, seq_len + 1), dtype=TOKEN_DTYPE), flat
    windows = np.lib.stride_tricks.sliding_window_view(flat, seq_len + 1)  # (len - L, L + 1), a view
    rows = np.ascontiguousarray(windows[: n_rows * seq_len : seq_len])  # (N, L + 1)
    return rows, flat[n_rows * seq_len :].copy()


def tokenize_and_pack(
    texts: Sequence[str],
    encode,
    seq_len: int,
    bos_id: int,
    eos_id: int,
    add_bos: bool,
    carry: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, int]:
    """Encode a batch of documents with `encode(list[str]) -> list[list[int]]` and pack them.

    Returns (rows (N, seq_len + 1), carry, tokens in the batch including BOS/EOS).
    """
    stream = frame_documents(encode(list(texts)), bos_id, eos_id, add_bos)
    rows, carry = pack(stream, seq_len, carry)
    return rows, carry, int(stream.size)
