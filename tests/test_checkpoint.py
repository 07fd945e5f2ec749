"""Checkpoint integrity: checksums in the marker, one save per marker, no non-finite weights.

Real debug models, real DCP files on disk. The two-rank cases run once, as a real 2-process
gloo group (torch.multiprocessing spawn) with FSDP2, in a module fixture; each rank writes its
results to a JSON file that the tests read.
"""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch.distributed.checkpoint import CheckpointException
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from raylm.config import load_config
from raylm.errors import CheckpointError
from raylm.optim import build_optimizer
from raylm.train import checkpoint as ckpt
from raylm.train.parallel import build_model
from support import RunsCode, run_ranks

# One process loading or saving a checkpoint without a process group is intended here.
pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


def config():
    return load_config(None, ["model.preset=debug", "model.vocab_size=512", "model.max_seq_len=64",
                              "data.seq_len=32"])


def fresh() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    cfg = config()
    model = build_model(cfg, torch.device("cpu"))
    return model, build_optimizer(model, cfg.optimizer, "cpu")


def perturb(model: torch.nn.Module, amount: float = 0.01) -> None:
    """Change every weight (each rank its shards), as a training step would."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(amount)


def full_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Unsharded weights (a collective under FSDP2)."""
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    return {k: v.detach().clone() for k, v in state.items()}


def zero_fill(file: Path) -> None:
    file.write_bytes(bytes(file.stat().st_size))


# ---------------------------------------------------------------------------------------
# Two ranks


def _two_rank_work(rank: int, out: Path) -> dict:
    model, optimizer = fresh()
    result: dict = {}
    # As under Ray Train: each rank saves into its own local directory.
    own = out / "separate" / f"rank{rank}"
    ckpt.save_checkpoint(own, model, optimizer, {"step": 1})
    shutil.copytree(own, out / "first" / f"rank{rank}")
    ckpt.save_checkpoint(out / "older", model, optimizer, {"step": 1})
    perturb(model)
    ckpt.save_checkpoint(own, model, optimizer, {"step": 2})  # the same directories, reused
    weights = full_weights(model)
    if rank == 0:
        torch.save(weights, out / "saved_weights.pt")

    # A shared directory, verified by both ranks together.
    newer = ckpt.save_checkpoint(out / "newer", model, optimizer, {"step": 2})
    result["verify_clean"] = ckpt.verify_checkpoint(newer)
    if rank == 0:
        zero_fill(newer / "__1_0.distcp")
    dist.barrier()
    result["verify_damaged"] = ckpt.verify_checkpoint(newer)
    logged: list[str] = []
    good = ckpt.newest_good([newer, out / "older"], log=logged.append)
    result["newest_good"] = (good[0].name, good[1]["train_state"]["step"]) if good else None
    result["logged"] = logged

    # Only rank 1's shard is non-finite: both ranks must refuse, naming the same parameter.
    if rank == 1:
        with torch.no_grad():
            model.tok_embeddings.weight.to_local()[0, 0] = float("nan")
    try:
        ckpt.save_checkpoint(out / "nan" / f"rank{rank}", model, optimizer, {"step": 3})
        result["nan_save"] = "saved"
    except CheckpointError as e:
        result["nan_save"] = str(e)
    return result


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> tuple[Path, list[dict]]:
    out = tmp_path_factory.mktemp("two_ranks")
    return out, run_ranks(_two_rank_work, out)


def merge(dirs: list[Path], into: Path) -> Path:
    """What Ray Train does with the ranks' local directories on upload."""
    for d in dirs:
        shutil.copytree(d, into, dirs_exist_ok=True)
    return into


@pytest.mark.slow  # a spawned two-rank gloo group
def test_two_ranks_saving_into_separate_directories_merge_into_one_checkpoint_that_verifies_and_loads(
        two_ranks, tmp_path):
    """Each rank hashes only its own files; rank 0's marker lists both ranks' shards, and the
    merged directory passes the full check and loads in one process with the saved weights."""
    out, _ = two_ranks
    assert sorted(p.name for p in (out / "separate" / "rank1").iterdir()) == ["__1_0.distcp"]
    merged = merge([out / "separate" / "rank0", out / "separate" / "rank1"], tmp_path / "merged")
    marker = ckpt.read_marker(merged)
    assert marker["world_size"] == 2 and marker["train_state"] == {"step": 2}
    assert sorted(marker["files"]) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    assert ckpt.verify_checkpoint(merged) is None
    model, optimizer = fresh()
    assert ckpt.load_checkpoint(merged, model, optimizer) == {"step": 2}
    saved = torch.load(out / "saved_weights.pt", weights_only=True)
    loaded = full_weights(model)
    assert saved.keys() == loaded.keys()
    for name in saved:
        torch.testing.assert_close(loaded[name], saved[name], rtol=0, atol=0)


@pytest.mark.slow  # a spawned two-rank gloo group
def test_reused_directory_with_a_shard_left_from_the_earlier_save_fails_verification(two_ranks, tmp_path):
    """A shard of the first save in the second save's directory has the right name and size, so
    only its checksum tells it apart; the full check names it."""
    out, _ = two_ranks
    mixed = merge([out / "separate" / "rank0", out / "separate" / "rank1"], tmp_path / "mixed")
    old_shard = out / "first" / "rank1" / "__1_0.distcp"
    assert old_shard.stat().st_size == (mixed / "__1_0.distcp").stat().st_size
    shutil.copy(old_shard, mixed / "__1_0.distcp")
    assert ckpt.read_marker(mixed) is not None  # the cheap check cannot see it
    assert ckpt.verify_checkpoint(mixed) == f"{mixed}/__1_0.distcp: checksum mismatch (damaged or from another save)"
    with pytest.raises(CheckpointError, match="__1_0.distcp: checksum mismatch"):
        ckpt.load_checkpoint(mixed, *fresh())


@pytest.mark.slow  # a spawned two-rank gloo group
def test_each_save_has_its_own_save_id_and_dcp_metadata_records_it(two_ranks):
    out, _ = two_ranks
    first = json.loads((out / "first" / "rank0" / ckpt.MARKER).read_text())["save_id"]
    second = json.loads((out / "separate" / "rank0" / ckpt.MARKER).read_text())["save_id"]
    assert len(first) == len(second) == 32 and first != second
    assert ckpt.read_dcp_metadata(out / "separate" / "rank0").storage_meta.save_id == second


@pytest.mark.slow  # a spawned two-rank gloo group
def test_ranks_share_verification_and_agree_on_the_damaged_file_and_the_fallback(two_ranks):
    out, results = two_ranks
    reason = f"{out / 'newer'}/__1_0.distcp: checksum mismatch (damaged or from another save)"
    for result in results:
        assert result["verify_clean"] is None
        assert result["verify_damaged"] == reason
        assert result["newest_good"] == ["older", 1]
        assert result["logged"] == [f"warning: checkpoint {out / 'newer'} is not usable ({reason}); "
                                    "trying an older one"]


@pytest.mark.slow  # a spawned two-rank gloo group
def test_a_non_finite_weight_on_one_rank_makes_every_rank_refuse_before_writing(two_ranks):
    out, results = two_ranks
    expected = "the model holds non-finite weights (parameter tok_embeddings.weight)"
    for rank, result in enumerate(results):
        assert result["nan_save"] == f"refusing to save {out / 'nan' / f'rank{rank}'}: {expected}"
    assert not (out / "nan").exists()


# ---------------------------------------------------------------------------------------
# One process


def test_zero_filled_shard_of_the_right_size_is_named_refused_and_skipped_for_an_older_checkpoint(tmp_path):
    model, optimizer = fresh()
    older = ckpt.save_checkpoint(tmp_path / ckpt.checkpoint_dir_name(1), model, optimizer, {"step": 1})
    perturb(model)
    newest = ckpt.save_checkpoint(tmp_path / ckpt.checkpoint_dir_name(2), model, optimizer, {"step": 2})
    zero_fill(newest / "__0_0.distcp")
    assert ckpt.read_marker(newest) is not None  # sizes match: only checksums catch it
    reason = f"{newest}/__0_0.distcp: checksum mismatch (damaged or from another save)"
    assert ckpt.verify_checkpoint(newest) == reason
    with pytest.raises(CheckpointError) as refused:
        ckpt.load_checkpoint(newest, *fresh())
    assert str(refused.value) == reason

    (tmp_path / "checkpoint_00000009").mkdir()  # no marker: not a candidate, no warning
    logged: list[str] = []
    candidates = [older, tmp_path / "checkpoint_00000009", newest, tmp_path / "missing", newest / ".." / newest.name]
    path, marker = ckpt.newest_good(candidates, log=logged.append)
    assert path == older and marker["train_state"] == {"step": 1}
    assert logged == [f"warning: checkpoint {newest} is not usable ({reason}); trying an older one"]
    zero_fill(older / ".metadata")
    assert ckpt.newest_good(candidates, log=logged.append) is None


def test_a_save_that_fails_part_way_into_a_reused_directory_leaves_no_marker(tmp_path):
    """The earlier save's marker is removed before any shard is rewritten, so a save that dies
    mid-write (here DCP cannot serialise an optimizer entry, as on a full disk) never leaves a
    directory that an old marker still calls complete."""
    model, optimizer = fresh()
    path = ckpt.save_checkpoint(tmp_path / "reused", model, optimizer, {"step": 1})
    assert ckpt.is_complete(path)
    optimizer.param_groups[0]["lr_fn"] = lambda step: 1.0  # not picklable
    with pytest.raises(CheckpointException):
        ckpt.save_checkpoint(path, model, optimizer, {"step": 2})
    assert not (path / ckpt.MARKER).exists()
    assert ckpt.latest_checkpoint(tmp_path) is None and ckpt.newest_good([path]) is None


def test_non_finite_weights_are_refused_and_nothing_is_written(tmp_path):
    model, optimizer = fresh()
    kept = ckpt.save_checkpoint(tmp_path / "kept", model, optimizer, {"step": 1})
    with torch.no_grad():
        model.layers[0].attention.wq.weight[3, 5] = float("inf")
    for path in (tmp_path / "new", kept):
        with pytest.raises(CheckpointError, match=r"refusing to save .*: the model holds non-finite weights "
                                                  r"\(parameter layers\.0\.attention\.wq\.weight\)"):
            ckpt.save_checkpoint(path, model, optimizer, {"step": 2})
    assert not (tmp_path / "new").exists()
    # refused before the stale-marker removal: the earlier checkpoint is untouched and still good
    assert ckpt.verify_checkpoint(kept) is None and ckpt.read_marker(kept)["train_state"] == {"step": 1}


def test_facts_and_extra_files_round_trip_and_extra_files_are_checksummed(tmp_path):
    model, optimizer = fresh()
    facts = {"tokenizer_blake2b": "ab12", "seq_len": 32, "data": {"fingerprint": "f00d", "files": 3}}
    extra = {"tokenizer.model": b"\x00sentencepiece model bytes", "config.yaml": b"model:\n  preset: debug\n"}
    path = ckpt.save_checkpoint(tmp_path / "c", model, optimizer, {"step": 5}, facts=facts, extra_files=extra)
    marker = ckpt.read_marker(path)
    assert marker["facts"] == facts and marker["format"] == "raylm-dcp-2"
    for name, data in extra.items():
        assert (path / name).read_bytes() == data and marker["files"][name]["bytes"] == len(data)
    assert not list(path.glob("*.tmp"))
    assert ckpt.verify_checkpoint(path) is None
    assert ckpt.load_checkpoint(path, *fresh()) == {"step": 5}

    tokenizer = path / "tokenizer.model"
    tokenizer.write_bytes(tokenizer.read_bytes().replace(b"model", b"MODEL"))  # same size
    assert ckpt.verify_checkpoint(path) == f"{tokenizer}: checksum mismatch (damaged or from another save)"
    with pytest.raises(ValueError, match="not allowed"):
        ckpt.save_checkpoint(tmp_path / "d", model, optimizer, {"step": 5}, extra_files={ckpt.MARKER: b"{}"})


def test_marker_of_another_format_is_refused_with_its_format_named(tmp_path):
    path = ckpt.save_checkpoint(tmp_path / "c", *fresh(), {"step": 1})
    marker = json.loads((path / ckpt.MARKER).read_text())
    marker["format"] = "raylm-dcp-1"
    marker["files"] = {name: entry["bytes"] for name, entry in marker["files"].items()}
    (path / ckpt.MARKER).write_text(json.dumps(marker))
    assert ckpt.read_marker(path) is None
    with pytest.raises(CheckpointError, match=f"format 'raylm-dcp-1', expected '{ckpt.FORMAT}'"):
        ckpt.load_checkpoint(path, *fresh())


def test_matching_checksums_do_not_make_loading_unpickle_code(tmp_path):
    """An attacker can rewrite the marker too: a crafted `.metadata` listed with its true checksum
    still passes only through the allow-listed unpickler, which refuses it."""
    flag = tmp_path / "pwned"
    path = ckpt.save_checkpoint(tmp_path / "evil", *fresh(), {"step": 1})
    crafted = pickle.dumps(RunsCode(flag))
    (path / ".metadata").write_bytes(crafted)
    marker = json.loads((path / ckpt.MARKER).read_text())
    marker["files"][".metadata"] = ckpt._write_atomic(path / ".metadata", crafted)
    (path / ckpt.MARKER).write_text(json.dumps(marker))
    assert ckpt.verify_checkpoint(path) is None
    with pytest.raises(CheckpointError, match="not allowed"):
        ckpt.load_checkpoint(path, *fresh())
    assert not flag.exists()
