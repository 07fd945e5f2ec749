"""The packing actor's anchors: a stream restarted at a row's anchor rebuilds that row and all after it.

Plain numpy through the Ray Data stage classes (no cluster): files of framed tokens in plan
order, cut into tokenizer batches at arbitrary places, packed; then re-packed from the anchor
of every k-th row, reading only from the anchor's file on, as `TrainStream` does on a restart.
"""

from __future__ import annotations

import numpy as np
import pytest

from raylm.data.order import DataPosition
from raylm.ray.stages import PackIndex

L = 8


def files_of_tokens(seed: int = 0, n_files: int = 30) -> list[np.ndarray]:
    """Each file's framed tokens (several documents each; some files tiny, some empty)."""
    rng = np.random.default_rng(seed)
    sizes = rng.choice([0, 1, 3, 5, 17, 40], size=n_files)
    return [rng.integers(3, 500, size=n).astype(np.int32) for n in sizes]


def batches(files: list[np.ndarray], first_pos: int, rng) -> list[dict]:
    """Tokenizer batches over the files from plan position `first_pos` on, cut at random places."""
    segments = [(pos, tokens) for pos, tokens in enumerate(files) if pos >= first_pos and tokens.size]
    out, i = [], 0
    while i < len(segments):
        n = int(rng.integers(1, 4))
        chunk = segments[i:i + n]
        i += n
        out.append({"stream": [np.concatenate([t for _, t in chunk])],
                    "seg_pos": [np.array([p for p, _ in chunk], dtype=np.int64)],
                    "seg_len": [np.array([t.size for _, t in chunk], dtype=np.int64)],
                    "span": np.array([[chunk[0][0], 0, chunk[-1][0], 0]])})  # one document a file
    return out


def pack_all(files, first_pos=0, **kwargs) -> dict[str, np.ndarray]:
    skip = kwargs.pop("skip", None)
    packer = PackIndex(L, skip, **kwargs)
    parts = [packer(b) for b in batches(files, first_pos, np.random.default_rng(first_pos + 7))]
    return {k: np.concatenate([p[k] for p in parts]) for k in ("tokens", "index", "anchor")}


def test_anchor_names_the_file_and_offset_of_each_rows_first_token():
    files = files_of_tokens()
    full = pack_all(files)
    stream = np.concatenate(files)
    assert np.array_equal(full["index"], np.arange(len(full["index"])))
    for k, (pos, off) in enumerate(full["anchor"]):
        assert files[pos][off] == stream[k * L] == full["tokens"][k][0]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_restart_from_any_rows_anchor_rebuilds_the_rest_of_the_stream_exactly(seed):
    files = files_of_tokens(seed)
    full = pack_all(files)
    for k in range(0, len(full["index"]), 3):
        pos, off = full["anchor"][k]
        again = pack_all(files, first_pos=int(pos), first_index=k, skip_tokens=int(off))
        assert np.array_equal(again["index"], full["index"][k:])
        assert np.array_equal(again["tokens"], full["tokens"][k:])
        assert np.array_equal(again["anchor"], full["anchor"][k:])


def test_restart_drops_what_the_position_consumed():
    files = files_of_tokens()
    full = pack_all(files)
    position = DataPosition(10, np.array([12, 15]))
    pos, off = full["anchor"][9]
    again = pack_all(files, first_pos=int(pos), first_index=9, skip_tokens=int(off), skip=position.state_dict())
    expected = [i for i in range(len(full["index"])) if i >= 10 and i not in (12, 15)]
    assert again["index"].tolist() == expected
    assert np.array_equal(again["tokens"], full["tokens"][expected])


def span_batch(first_pos, first_ord, last_pos, last_ord):
    return {"stream": [np.arange(3, 3 + 2 * L, dtype=np.int32)], "seg_pos": [np.array([first_pos])],
            "seg_len": [np.array([2 * L])], "span": np.array([[first_pos, first_ord, last_pos, last_ord]])}


def test_packing_refuses_batches_out_of_stream_order():
    """Ray Data may run an actor's tasks out of order; the packer must notice, not mis-number rows."""
    files = files_of_tokens()
    parts = batches(files, 0, np.random.default_rng(3))
    packer = PackIndex(L, None)
    packer(parts[1])  # it overtook parts[0]
    with pytest.raises(RuntimeError, match="out of stream order"):
        packer(parts[0])
    packer = PackIndex(L, None)
    packer(span_batch(4, 0, 4, 2))
    packer(span_batch(4, 3, 6, 1))  # the next document of file 4, then on to file 6
    for bad in (span_batch(6, 3, 6, 5), span_batch(5, 0, 5, 1), span_batch(7, 1, 7, 2)):
        with pytest.raises(RuntimeError, match="out of stream order"):
            packer(bad)  # a gap in file 6, a step back, a file's first documents missing
