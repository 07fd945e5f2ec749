"""Prepared data at scale: a rank reads only the rows it trains on (by range, local and s3://),
the per-epoch order needs no permutation in memory, and resume at another world size trains
every row once. No Ray: the shards are written by raylm's own writer from synthetic rows."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.fs as pafs
import pytest

from raylm import storage
from raylm.config import load_config
from raylm.data import prepared
from raylm.data.order import DataPosition, IndexPermutation
from raylm.errors import DataError

SEQ_LEN = 15  # rows of 16 tokens: 32 bytes in uint16
N_ROWS = 300
AWS_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


def synthetic_rows(n: int, width: int = SEQ_LEN + 1) -> np.ndarray:
    """Row r holds r (as two tokens: r // 500, r % 500) then a pattern of r: each row names itself."""
    rows = (np.arange(n)[:, None] * 7 + np.arange(width)[None, :]) % 500
    rows[:, 0], rows[:, 1] = np.arange(n) // 500, np.arange(n) % 500
    return rows.astype(np.int32)


def write_prepared(out, rows: np.ndarray, monkeypatch, shard_rows: int = 64):
    """A prepared directory (or prefix) written by `writing` + `write_split` + `write_manifest`."""
    monkeypatch.setattr(prepared, "SHARD_BYTES", shard_rows * rows.shape[1] * 2)
    cfg = load_config(None, ["model.preset=debug", "model.vocab_size=512", f"data.seq_len={rows.shape[1] - 1}",
                             f"train.global_batch_tokens={(rows.shape[1] - 1) * 16}",
                             f"data.prepared_path={out}"])
    batches = ({"tokens": rows[i:i + 50], "index": np.arange(i, min(i + 50, len(rows)))}
               for i in range(0, len(rows), 50))
    report = lambda: {"documents": len(rows), "skipped": {}, "examples": {}}  # noqa: E731
    with prepared.writing(cfg) as target:
        splits = {"train": prepared.write_split(cfg, batches, target, "train", report, lambda line: None)}
        prepared.write_manifest(cfg, target, "0" * 64, 512, splits)
    return cfg


class CountingFS:
    """The pyarrow filesystem, counting the bytes its files return (the storage boundary)."""

    def __init__(self, fs):
        self.fs, self.bytes_read, self.reads = fs, 0, 0

    def open_input_file(self, path):
        f, outer = self.fs.open_input_file(path), self

        class Counted:
            def read_at(self, nbytes, offset):
                data = f.read_at(nbytes, offset)
                outer.bytes_read += len(data)
                outer.reads += 1
                return data
        return Counted()


def test_index_permutation_is_a_seeded_bijection_each_epoch_whatever_the_batching():
    """Every epoch maps [0, N) onto [0, N) exactly once, differently per epoch and seed, the
    same for one seed, and an index maps to the same row whether asked alone or in a batch."""
    for n in (1, 2, 3, 17, 1000, 4097):
        order = IndexPermutation(n, seed=5)
        rows = order.rows(np.arange(3 * n))
        for epoch in range(3):
            assert np.array_equal(np.sort(rows[epoch * n:(epoch + 1) * n]), np.arange(n))
        if n >= 17:
            assert not np.array_equal(rows[:n], rows[n:2 * n])
            assert not np.array_equal(rows[:n], IndexPermutation(n, seed=6).rows(np.arange(n)))
            assert not np.array_equal(rows[:n], np.arange(n))
        probe = np.array([3 * n - 1, 0, n // 2])
        assert np.array_equal(IndexPermutation(n, seed=5).rows(probe), rows[probe])
    assert np.array_equal(IndexPermutation(10, 5, shuffle=False).rows(np.arange(25)), np.arange(25) % 10)


@pytest.mark.parametrize("world_size, micro_batch", [(3, 2), (2, 5)])
def test_a_rank_reads_only_its_rows_and_they_are_the_rows_its_indices_name(tmp_path, monkeypatch, world_size,
                                                                           micro_batch):
    """Each rank's micro-batches hold the rows its global indices map to, and the bytes it reads
    are its rows plus the bounded read-ahead, nothing of the other ranks' rows or the rest of
    the split (5 shards of 64 rows)."""
    rows = synthetic_rows(N_ROWS)
    write_prepared(tmp_path / "prep", rows, monkeypatch)
    manifest = json.loads((tmp_path / "prep" / "manifest.json").read_text())
    assert manifest["format"] == 2 and manifest["token_dtype"] == "<u2" and len(manifest["splits"]["train"]["shards"]) == 5
    steps, G = 4, world_size * micro_batch * 2
    for rank in range(world_size):
        counted = CountingFS(pafs.LocalFileSystem())
        data = prepared.PreparedSplit(tmp_path / "prep", seed=3, read_ahead=2, filesystem=counted)
        it = data.micro_batches(DataPosition(), rank, world_size, micro_batch, G)
        taken = [next(it) for _ in range(2 * steps)]
        for batch in taken:
            assert batch["tokens"].dtype == np.int32
            assert np.array_equal(batch["tokens"], rows[data.order.rows(batch["index"])])
        trained = sum(len(b["index"]) for b in taken)
        assert trained == 2 * steps * micro_batch
        assert trained * 32 <= counted.bytes_read <= (trained + 2 * micro_batch) * 32


def test_resume_at_another_world_size_trains_every_row_of_the_epoch_once(tmp_path, monkeypatch):
    """3 steps on 2 ranks, then the rest of the epoch on 3 ranks from the position: the rows
    trained are each row of the split exactly once."""
    rows = synthetic_rows(N_ROWS)
    write_prepared(tmp_path / "prep", rows, monkeypatch)
    G, B = 12, 2  # 300 rows = 25 steps of 12

    def train(position, world, steps):
        ids = []
        for rank in range(world):
            data = prepared.read_split(tmp_path / "prep", seed=9)
            it = data.micro_batches(position, rank, world, B, G)
            for _ in range(steps * -(-G // (world * B))):
                batch = next(it)
                ids.extend(batch["tokens"][:, 0] * 500 + batch["tokens"][:, 1])  # the row names itself
        return ids

    first = train(DataPosition(), 2, 3)
    rest = train(DataPosition(watermark=3 * G), 3, 22)
    assert sorted(first + rest) == list(range(N_ROWS))


def test_old_and_damaged_prepared_data_is_one_line(tmp_path, monkeypatch):
    """A format-1 manifest (whole Parquet shards) is refused in one line naming the path and what
    to do; a truncated shard is one line naming the shard, not a short batch."""
    write_prepared(tmp_path / "prep", synthetic_rows(N_ROWS), monkeypatch)
    manifest = json.loads((tmp_path / "prep" / "manifest.json").read_text())
    old = tmp_path / "old"
    old.mkdir()
    (old / "manifest.json").write_text(json.dumps({k: v for k, v in manifest.items() if k != "format"}))
    with pytest.raises(DataError, match=r"^data.prepared_path='.*old' is prepared format 1 .*run raylm prepare "
                                        r"again into a new data.prepared_path$"):
        prepared.read_split(old)
    with pytest.raises(DataError, match="is prepared format 1"):  # prepare into it again: not "nothing to do"
        with prepared.writing(load_config(None, ["model.preset=debug", f"data.prepared_path={old}"])):
            pass
    shard = tmp_path / "prep" / "train" / "part-00004.bin"
    shard.write_bytes(shard.read_bytes()[:100])
    data = prepared.read_split(tmp_path / "prep", shuffle=False)
    with pytest.raises(DataError, match=r"part-00004.bin: 4 bytes at row 3, expected 32 \(a truncated shard\)"):
        data.take(np.array([256 + 3]))
    assert "\n" not in str(pytest.raises(DataError, data.take, np.array([299])).value)


def test_s3_shards_are_read_by_range(s3_server, monkeypatch):
    """On s3:// (moto) a rank reads its rows by ranged GETs: its rows plus the read-ahead, not
    the shards they sit in."""
    for key, value in {**AWS_ENV, "AWS_ENDPOINT_URL": s3_server}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    pafs.S3FileSystem(endpoint_override=s3_server.removeprefix("http://"), scheme="http",
                      allow_bucket_creation=True).create_dir("raylm-prepared-scale")
    rows = synthetic_rows(N_ROWS)
    out = "s3://raylm-prepared-scale/prep"
    write_prepared(out, rows, monkeypatch)
    assert storage.read_bytes(f"{out}/train/part-00000.bin") == rows[:64].astype("<u2").tobytes()
    counted = CountingFS(storage.resolve(out)[0])
    data = prepared.PreparedSplit(out, seed=1, read_ahead=1, filesystem=counted)
    it = data.micro_batches(DataPosition(), 1, 2, 4, 16)
    for _ in range(5):
        batch = next(it)
        assert np.array_equal(batch["tokens"], rows[data.order.rows(batch["index"])])
    assert 5 * 4 * 32 <= counted.bytes_read <= 6 * 4 * 32
