"""Pure tokenise and pack functions: numpy in, numpy out, no Ray and no torch.

Ray Data's `map_batches` and the single-process path both call these, so a packed row is
the same whichever way it was made.

Packing layout: documents become `[BOS] tokens [EOS]` and are concatenated into one stream;
row i is `stream[i*L : i*L + L + 1]` for L = seq_len. Consecutive rows overlap by one token,
so every token of the stream is a training target exactly once, no padding is ever needed,
and a long document simply continues into the next row.

Loss masks travel inside the token ids: a token that is not a training target (a pair's
prompt, a chat's template text and user turns) is stored as ``-1 - id``, negative, so every
path that moves rows (in memory, the Ray Data stream, its restarts and anchors) carries the
mask without a second array, and plain text rows (never negative) are unchanged.
`raylm.train.step` decodes them (`docs/data.md`, "Supervised formats").
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import chain

import numpy as np

from raylm.data.parse import document_segments

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


def masked_ids(ids: Sequence[int]) -> list[int]:
    """Token ids marked as no-loss (`-1 - id`); `unmask` undoes it."""
    return [-1 - i for i in ids]


def unmask(tokens: np.ndarray) -> np.ndarray:
    """(ids, trained) of stored tokens: ids >= 0, trained False where the token was masked."""
    trained = tokens >= 0
    return np.where(trained, tokens, -1 - tokens), trained


def encode_documents(texts: Sequence[str], encode) -> list[list[int]]:
    """Token ids of each document, `encode(list[str]) -> list[list[int]]`; a supervised document
    (`raylm.data.parse.supervised_document`) is encoded segment by segment, its no-loss
    segments marked (`masked_ids`). Plain text goes to `encode` as it always has."""
    segmented = [document_segments(t) for t in texts]
    if not any(s is not None for s in segmented):
        return encode(list(texts))
    pieces = [seg for s in segmented if s is not None for seg in s]
    encoded = iter(encode(pieces)) if pieces else iter(())
    plain = iter(encode([t for t, s in zip(texts, segmented) if s is None]) if any(s is None for s in segmented)
                 else ())
    out = []
    for s in segmented:
        if s is None:
            out.append(list(next(plain)))
            continue
        ids: list[int] = []
        for k in range(len(s)):
            part = next(encoded)
            ids += part if k % 2 else masked_ids(part)
        out.append(ids)
    return out


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
    stream = frame_documents(encode_documents(texts, encode), bos_id, eos_id, add_bos)
    rows, carry = pack(stream, seq_len, carry)
    return rows, carry, int(stream.size)
