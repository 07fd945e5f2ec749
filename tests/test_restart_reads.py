"""A restart reads each checkpoint byte once (issue 20, item 3).

Bytes are counted at the storage boundary: checkpoints are named by `file://` URIs and read
through a pyarrow filesystem that wraps the real local one and counts what every read returns
(`bench/scale_restart.py: CountingHandler`). The two-rank cases run once, as a real 2-process
gloo group with FSDP2 and the real `Trainer`, in a module fixture; each rank writes its results
to a JSON file that the tests read.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from raylm import storage
from raylm.config import load_config
from raylm.data.order import PackedDataset
from raylm.errors import CheckpointError
from raylm.optim import build_optimizer
from raylm.train import checkpoint as ckpt
from raylm.train.parallel import build_model
from raylm.train.trainer import RankEnv, Trainer
from support import ListSink, run_ranks

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("scale_restart", ROOT / "bench/scale_restart.py")
scale_restart = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(scale_restart)

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")

ANCHOR = [40, 3, 17]  # [index, file position, token offset] recorded in the newest checkpoint


def config():
    return load_config(None, ["model.preset=debug", "model.vocab_size=512", "model.max_seq_len=64",
                              "data.seq_len=32", "train.global_batch_tokens=256", "train.micro_batch_size=4",
                              "train.eval_every=0", "train.log_every=100"])


def train_state(step: int) -> dict:
    return {"step": step, "tokens_consumed": 256 * step, "skipped_steps": 0, "data_watermark": 8 * step,
            "data_extra": [], "data_anchor": ANCHOR if step == 2 else None}


def full_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Unsharded weights (a collective under FSDP2)."""
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    return {k: v.detach().clone() for k, v in state.items()}


def same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


class UriSink(ListSink):
    """The test sink, offering its checkpoints by their file:// URIs (read through the counter)."""

    def restore_candidates(self) -> list[str]:
        return [scale_restart.uri(p) for p in ckpt.list_checkpoints(self.root)]


def largest_item(checkpoint: Path, name: str) -> tuple[int, int]:
    """(offset, length) of the largest item of file `name`: a tensor shard of the rank that wrote it."""
    items = json.loads((checkpoint / ckpt.MARKER).read_text())["files"][name]["items"]
    offset, length, _digest = max(items, key=lambda item: item[1])
    return offset, length


def restore(cfg, rank: int, run: Path, log: list[str]) -> Trainer:
    trainer = Trainer(cfg, RankEnv(rank, 2), UriSink(run), PackedDataset(np.zeros((64, 33), np.int32)),
                      log=log.append)
    trainer.restore()
    return trainer


def _rank_work(rank: int, out: Path) -> dict:
    cfg = config()
    run = out / "run"
    model = build_model(cfg, torch.device("cpu"))
    optimizer = build_optimizer(model, cfg.optimizer, "cpu")
    saved = {}
    for step in (1, 2):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.01)
        ckpt.save_checkpoint(run / ckpt.checkpoint_dir_name(step), model, optimizer, train_state(step))
        saved[step] = full_weights(model)
    counter = scale_restart.count_file_uris()
    result: dict = {}

    # A restart: the real Trainer's restore, every byte through the counter.
    counter.reset()
    log: list[str] = []
    trainer = restore(cfg, rank, run, log)
    result["bytes_read"] = counter.total()
    result["files_read"] = sorted({Path(p).name for p in counter.bytes_by_file})
    result["restored_step"] = trainer.state.step
    result["weights_are_step_2"] = same_weights(full_weights(trainer.model), saved[2])

    # A shard damaged where only rank 1 reads it: one byte of rank 1's largest tensor item.
    damaged_run = out / "damaged"
    if rank == 0:
        shutil.copytree(run, damaged_run)
        shard = damaged_run / ckpt.checkpoint_dir_name(2) / "__1_0.distcp"
        offset, length = largest_item(shard.parent, shard.name)
        data = bytearray(shard.read_bytes())
        data[offset + length // 2] ^= 0xFF
        shard.write_bytes(bytes(data))
    dist.barrier()
    counter.reset()
    log = []
    trainer = restore(cfg, rank, damaged_run, log)
    result["damaged_reads"] = [[offset, n] for path, offset, n in counter.reads
                               if path.endswith(f"{ckpt.checkpoint_dir_name(2)}/__1_0.distcp")]
    result["fallback_step"] = trainer.state.step
    result["fallback_weights_are_step_1"] = same_weights(full_weights(trainer.model), saved[1])
    result["fallback_log"] = log
    return result


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> tuple[Path, list[dict]]:
    out = tmp_path_factory.mktemp("restart_reads")
    return out, run_ranks(_rank_work, out)


def test_a_two_rank_restart_reads_at_most_1_2_times_the_checkpoint_bytes(two_ranks):
    """Both ranks together read the newest checkpoint (shards, .metadata, marker) about once:
    no rank verifies a file before loading it, and neither re-reads what the other loads."""
    out, results = two_ranks
    newest = out / "run" / ckpt.checkpoint_dir_name(2)
    size = scale_restart.checkpoint_bytes(newest)
    read = sum(r["bytes_read"] for r in results)
    assert read <= 1.2 * size, (read, size)
    assert read >= size * 0.9  # the counter sees the loads: the check above is not vacuous
    for rank, r in enumerate(results):
        assert r["restored_step"] == 2 and r["weights_are_step_2"]
        # its own shards, the replicated entries (wherever DCP put them), .metadata and the marker
        assert {f"__{rank}_0.distcp", ".metadata", ckpt.MARKER} <= set(r["files_read"])
        assert set(r["files_read"]) <= {"__0_0.distcp", "__1_0.distcp", ".metadata", ckpt.MARKER}


def test_a_shard_damaged_where_only_one_rank_reads_it_makes_both_ranks_fall_back_together(two_ranks):
    """Only rank 1 reads the damaged bytes; both ranks skip the checkpoint with the same warning,
    restore the previous one (its weights exactly), and rank 0 sets the damaged one aside."""
    out, results = two_ranks
    damaged = out / "damaged" / ckpt.ABANDONED
    offset, length = largest_item(next(damaged.iterdir()), "__1_0.distcp")
    flipped = offset + length // 2
    touched = [any(o <= flipped < o + n for o, n in r["damaged_reads"]) for r in results]
    assert touched == [False, True]
    reason = (f"{scale_restart.uri(out / 'damaged' / ckpt.checkpoint_dir_name(2))}/__1_0.distcp: "
              "checksum mismatch (damaged or from another save)")
    warning = f"warning: checkpoint {scale_restart.uri(out / 'damaged' / ckpt.checkpoint_dir_name(2))} is not " \
              f"usable ({reason}); trying an older one"
    for r in results:
        assert r["fallback_step"] == 1 and r["fallback_weights_are_step_1"]
    assert results[0]["fallback_log"][0] == warning  # rank 0 logs; rank 1's trainer is quiet
    assert [p.name.split(".")[0] for p in damaged.iterdir()] == [ckpt.checkpoint_dir_name(2)]


def test_the_controller_reads_only_markers_to_start_the_training_stream(two_ranks, monkeypatch):
    """`TrainStream.start`, which runs on the Ray Train controller before any worker, gets the
    position and anchor of the newest checkpoint from the markers alone: no shard, no .metadata."""
    from raylm.ray.data import TrainStream

    out, _ = two_ranks
    monkeypatch.setattr(storage, "resolve", storage.resolve)  # put back after the test
    counter = scale_restart.count_file_uris()
    stream = TrainStream(None, None, None, None, scale_restart.uri(out / "run"), None)
    position, anchor = stream.start()
    assert anchor == ANCHOR and position.watermark == 16
    assert {Path(p).name for p in counter.bytes_by_file} == {ckpt.MARKER}
    markers = sum((p / ckpt.MARKER).stat().st_size for p in ckpt.list_checkpoints(out / "run"))
    assert counter.total() <= 2 * markers


# ---------------------------------------------------------------------------------------
# One process


class _Stream(PackedDataset):
    """A source whose start a controller chose from markers, as `StreamingTrainSource`'s."""

    starts_at_newest_complete = True


def _two_checkpoints(run: Path) -> tuple[Path, Path]:
    cfg = config()
    model = build_model(cfg, torch.device("cpu"))
    optimizer = build_optimizer(model, cfg.optimizer, "cpu")
    first = ckpt.save_checkpoint(run / ckpt.checkpoint_dir_name(1), model, optimizer, train_state(1))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01)
    return first, ckpt.save_checkpoint(run / ckpt.checkpoint_dir_name(2), model, optimizer, train_state(2))


def test_damage_behind_a_stream_built_from_markers_is_noted_so_the_restart_skips_it_unread(tmp_path):
    """The stream was started from the newest complete checkpoint; when loading finds it damaged,
    the trainer notes it and stops for a restart; then the controller's choice and the restore
    skip it by the note (the cheap check), the restore loads the previous one and sets the
    damaged one aside with its files untouched; a fresh start after damage is a fresh model."""
    run = tmp_path / "run"
    first, newest = _two_checkpoints(run)
    shard = newest / "__0_0.distcp"
    shard.write_bytes(bytes(shard.stat().st_size))
    rows = np.zeros((64, 33), np.int32)
    log: list[str] = []
    with pytest.raises(CheckpointError, match="restarting the workers so that the stream starts from"):
        Trainer(config(), RankEnv(), ListSink(run), _Stream(rows), log=log.append).restore()
    assert (newest / ckpt.DAMAGED_NOTE).exists() and ckpt.read_marker(newest) is None
    assert ckpt.newest_complete(ckpt.list_checkpoints(run))[0] == first

    trainer = Trainer(config(), RankEnv(), ListSink(run), _Stream(rows), log=log.append)
    trainer.restore()
    assert trainer.restored_from == first and trainer.state.step == 1
    assert "found damaged by an earlier restore" in log[-2] and "abandoned future" in log[-1]
    assert [p.name.split(".")[0] for p in (run / ckpt.ABANDONED).iterdir()] == [newest.name]

    # Every candidate damaged, with a plain source: the partly loaded weights are not kept.
    only = tmp_path / "only"
    _, newest = _two_checkpoints(only)
    shutil.rmtree(only / ckpt.checkpoint_dir_name(1))
    for name in ("__0_0.distcp",):
        (newest / name).write_bytes((newest / name).read_bytes()[:-64] + bytes(64))  # the last item damaged
    trainer = Trainer(config(), RankEnv(), ListSink(only), PackedDataset(rows), log=log.append)
    trainer.restore()
    fresh = build_model(config(), torch.device("cpu"))
    assert trainer.restored_from is None and trainer.state.step == 0
    assert same_weights(trainer.model.state_dict(), fresh.state_dict())


def test_a_marker_without_item_checksums_still_loads_verified_whole(tmp_path):
    """Checkpoints written before item checksums: their files are verified whole before loading,
    so they load, and damage in them is still found."""
    first, newest = _two_checkpoints(tmp_path / "run")
    for path in (first, newest):
        marker = json.loads((path / ckpt.MARKER).read_text())
        for entry in marker["files"].values():
            entry.pop("items", None)
        (path / ckpt.MARKER).write_text(json.dumps(marker))
    cfg = config()
    model = build_model(cfg, torch.device("cpu"))
    assert ckpt.load_checkpoint(newest, model, build_optimizer(model, cfg.optimizer, "cpu"))["step"] == 2
    shard = newest / "__0_0.distcp"
    shard.write_bytes(bytes(shard.stat().st_size))
    log: list[str] = []
    found, damaged = ckpt.restore_newest([newest, first], model, build_optimizer(model, cfg.optimizer, "cpu"),
                                         log=log.append)
    assert found[0] == first and damaged == [(newest, f"{shard}: checksum mismatch (damaged or from another save)")]
