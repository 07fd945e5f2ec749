"""Torch core of training without Ray: FSDP2 sharding, DCP checkpoints, exact resume.

Two-rank cases run as a real 2-process gloo group (torch.multiprocessing spawn); the data is
the default corpus subset, tokenised once per module, with the debug model.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule

from raylm.config import load_config
from raylm.data.local import local_documents
from raylm.data.order import PackedDataset, step_shares
from raylm.errors import CheckpointError
from raylm.optim import build_optimizer
from raylm.train import checkpoint as ckpt
from raylm.train.parallel import build_model
from raylm.train.trainer import RankEnv, Trainer
from support import ListSink, RunsCode, pack_documents, run_ranks, train_tokenizer_local

STEPS, RESUME_AT = 4, 2


def _local_param_count(model) -> int:
    """Parameter elements held by this rank (its shards under FSDP2)."""
    return sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in model.parameters())


def core_config(tmp: Path | str = "runs", **extra):
    overrides = [
        "model.preset=debug", "model.vocab_size=512", "model.max_seq_len=64",
        "data.seq_len=32", "data.sources.0.max_bytes=300000",
        f"train.max_steps={STEPS}", "train.global_batch_tokens=256", "train.micro_batch_size=2",
        "train.eval_every=0", "train.log_every=1", f"train.checkpoint_every={RESUME_AT}",
        "optimizer.warmup_steps=1", "optimizer.lr=3e-3", f"run.output_dir={tmp}",
    ] + [f"{k}={v}" for k, v in extra.items()]
    return load_config(None, overrides)


@pytest.fixture(scope="module")
def rows_file(tmp_path_factory) -> Path:
    """Packed training rows of the default corpus subset, shared by every process of this module."""
    cfg = core_config()
    tokenizer = train_tokenizer_local(cfg)
    rows = pack_documents(local_documents(cfg, "train"), tokenizer, cfg.data.seq_len, cfg.data.add_bos)
    path = tmp_path_factory.mktemp("core") / "rows.npy"
    np.save(path, rows)
    return path


def train(cfg, rows_path: Path, out: Path, resume: Path | None = None) -> dict:
    """Train to max_steps in this process (any rank of any group); return losses and facts."""
    device = torch.device("cpu")
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    sink = ListSink(out)
    data = PackedDataset(np.load(rows_path), seed=cfg.data.seed)
    trainer = Trainer(cfg, RankEnv(rank, world, device), sink, data, None, initial_checkpoint=resume,
                      log=lambda line: None)
    trainer.fit()
    return {"losses": sink.losses(), "local_params": _local_param_count(trainer.model), "rank": rank}


def full_state(model, optimizer) -> dict[str, torch.Tensor]:
    """The unsharded model (and optimizer moment) tensors, gathered on every rank."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    msd, osd = get_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True))
    out = {f"model.{k}": v.detach().clone() for k, v in msd.items()}
    if osd:
        for name, st in osd["state"].items():
            out[f"exp_avg.{name}"] = st["exp_avg"].detach().clone()
    return out


def _rank_task(task: str, args: dict, rank: int, out: Path) -> dict:
    cfg = core_config(out)
    if task == "train":
        return train(cfg, Path(args["rows"]), out, Path(args["resume"]) if args.get("resume") else None)
    if task == "resumed_then_fresh":  # two runs, one group of processes (one spawn's start-up, not two)
        runs = {}
        for name, resume in (("resumed", Path(args["resume"])), ("three", None)):  # the resume in fresh processes
            (out / name).mkdir(exist_ok=True)
            runs[name] = train(core_config(out / name), Path(args["rows"]), out / name, resume)
        return runs
    model = build_model(cfg, torch.device("cpu"))
    optimizer = build_optimizer(model, cfg.optimizer, "cpu")
    ckpt.load_checkpoint(args["checkpoint"], model, optimizer)
    state = full_state(model, optimizer)
    if rank == 0:
        torch.save(state, out / "loaded_on_2.pt")
    return {"rank": rank}


def spawn(task: str, out: Path, world: int = 2, **args) -> list[dict]:
    """`task` ("train", "resumed_then_fresh" or "load") on a real gloo group of `world` ranks."""
    return run_ranks(functools.partial(_rank_task, task, {k: str(v) for k, v in args.items()}), Path(out), task,
                     world=world)


@pytest.fixture(scope="module")
def two_rank_run(rows_file, tmp_path_factory) -> tuple[Path, list[dict]]:
    """An uninterrupted 2-rank run with checkpoints at RESUME_AT and STEPS."""
    out = tmp_path_factory.mktemp("two_rank")
    return out, spawn("train", out=out, rows=rows_file)


def _losses(result: dict) -> dict[int, float]:
    return {int(k): v for k, v in result["losses"].items()}


@pytest.mark.slow  # a spawned gloo group
def test_fsdp_gives_each_of_two_ranks_about_half_the_parameters(two_rank_run):
    _, results = two_rank_run
    total = core_config().model.num_params()
    local = [r["local_params"] for r in results]
    assert sum(local) == total
    for count in local:
        assert 0.4 * total <= count <= 0.6 * total


@pytest.mark.slow  # a spawned gloo group
def test_init_is_world_size_independent_and_loss_matches_one_process(two_rank_run, rows_file, tmp_path):
    """Same seed, same global batch: one process and two FSDP ranks see the same step-1 loss."""
    _, results = two_rank_run
    one = _losses(train(core_config(tmp_path), rows_file, tmp_path))
    two = _losses(results[0])
    assert one[1] == pytest.approx(two[1], rel=1e-5)
    assert two[STEPS] < two[1]  # it learns


@pytest.mark.slow  # a spawned gloo group
def test_checkpoint_saved_by_two_ranks_loads_in_one_process_with_identical_state(two_rank_run, tmp_path):
    out, _ = two_rank_run
    cfg = core_config(tmp_path)
    model = build_model(cfg, torch.device("cpu"))
    assert not isinstance(model, FSDPModule)
    optimizer = build_optimizer(model, cfg.optimizer, "cpu")
    state = ckpt.load_checkpoint(out / ckpt.checkpoint_dir_name(STEPS), model, optimizer)
    assert state["step"] == STEPS
    # re-save from one process, load on two ranks: the full state must survive both reshardings
    one = full_state(model, optimizer)
    ckpt.save_checkpoint(tmp_path / "resaved", model, optimizer, state)
    spawn("load", out=tmp_path, checkpoint=tmp_path / "resaved")
    two = torch.load(tmp_path / "loaded_on_2.pt", weights_only=True)
    assert one.keys() == two.keys() and any(k.startswith("exp_avg.") for k in one)
    for key in one:
        torch.testing.assert_close(one[key], two[key], rtol=0, atol=0)


@pytest.mark.slow  # a spawned gloo group
def test_resume_at_step_k_matches_uninterrupted_run_on_two_ranks_and_on_one(two_rank_run, rows_file, tmp_path):
    """Stopped after step k and resumed (2 ranks, or 1 process), step k+1 has the uninterrupted loss."""
    out, results = two_rank_run
    uninterrupted = _losses(results[0])
    resume = out / ckpt.checkpoint_dir_name(RESUME_AT)
    on_two = _losses(spawn("train", out=tmp_path, rows=rows_file, resume=resume)[0])
    on_one = _losses(train(core_config(tmp_path), rows_file, tmp_path / "one", resume))
    assert sorted(on_two) == sorted(on_one) == list(range(RESUME_AT + 1, STEPS + 1))
    for step in on_two:
        assert on_two[step] == pytest.approx(uninterrupted[step], rel=1e-6)
        assert on_one[step] == pytest.approx(uninterrupted[step], rel=1e-4)


@pytest.mark.slow  # a spawned gloo group
def test_uneven_split_on_three_ranks_trains_the_same_batch_as_two(two_rank_run, rows_file, tmp_path):
    """8 sequences per step on 3 ranks of micro-batch 2: shares 4/2/2, one rank runs an empty
    (zero-weight) micro-batch. Resumed from the 2-rank checkpoint, the losses match the 2-rank
    run's: the global batch and its normalisation do not depend on the world size."""
    out, results = two_rank_run
    assert step_shares(core_config().sequences_per_step, 3, 2) == [4, 2, 2]
    uninterrupted = _losses(results[0])
    runs = spawn("resumed_then_fresh", out=tmp_path, world=3, rows=rows_file,
                 resume=out / ckpt.checkpoint_dir_name(RESUME_AT))
    three, resumed = [r["three"] for r in runs], [r["resumed"] for r in runs]
    for step, loss in uninterrupted.items():
        assert _losses(three[0])[step] == pytest.approx(loss, rel=1e-5)
    assert sorted(_losses(resumed[0])) == list(range(RESUME_AT + 1, STEPS + 1))
    for step, loss in _losses(resumed[0]).items():
        assert loss == pytest.approx(uninterrupted[step], rel=1e-5)


@pytest.mark.slow  # a spawned gloo group
def test_incomplete_checkpoint_is_never_taken_as_latest(two_rank_run, tmp_path):
    import shutil

    out, _ = two_rank_run
    run = tmp_path / "run"
    for step in (RESUME_AT, STEPS):
        shutil.copytree(out / ckpt.checkpoint_dir_name(step), run / ckpt.checkpoint_dir_name(step))
    newest = run / ckpt.checkpoint_dir_name(STEPS)
    assert ckpt.latest_checkpoint(run) == newest
    shard = newest / "__1_0.distcp"
    shard.write_bytes(shard.read_bytes()[:-10])  # cut short, as by a kill mid-write
    assert ckpt.latest_checkpoint(run) == run / ckpt.checkpoint_dir_name(RESUME_AT)
    with pytest.raises(CheckpointError):
        ckpt.load_checkpoint(newest, *_fresh(core_config(tmp_path)))
    (run / "checkpoint_00000009").mkdir()  # a directory with no marker at all
    assert ckpt.latest_checkpoint(run) == run / ckpt.checkpoint_dir_name(RESUME_AT)
    assert ckpt.resolve_resume(run) == (run.resolve(), (run / ckpt.checkpoint_dir_name(RESUME_AT)).resolve())
    ckpt.prune_checkpoints(run, keep=1)  # keeps the newest complete one and anything newer
    assert [p.name for p in ckpt.list_checkpoints(run)] == [ckpt.checkpoint_dir_name(step)
                                                             for step in (RESUME_AT, STEPS, 9)]
    shutil.rmtree(newest)
    shutil.copytree(out / ckpt.checkpoint_dir_name(STEPS), newest)
    ckpt.prune_checkpoints(run, keep=1)
    assert [p.name for p in ckpt.list_checkpoints(run)] == [ckpt.checkpoint_dir_name(STEPS), "checkpoint_00000009"]


def _fresh(cfg):
    model = build_model(cfg, torch.device("cpu"))
    return model, build_optimizer(model, cfg.optimizer, "cpu")


def test_loading_never_unpickles_code_from_metadata_or_optimizer_entries(tmp_path):
    cfg = core_config(tmp_path)
    model, optimizer = _fresh(cfg)
    flag = tmp_path / "pwned"
    optimizer.param_groups[0]["lr"] = RunsCode(flag)  # stored by DCP as a pickled entry
    ckpt.save_checkpoint(tmp_path / "evil_entry", model, optimizer, {"step": 1})
    assert not flag.exists()
    with pytest.raises(CheckpointError, match="refused"):
        ckpt.load_checkpoint(tmp_path / "evil_entry", *_fresh(cfg))
    assert not flag.exists()

    # a crafted .metadata with matching checksums: tests/test_checkpoint.py


def test_activation_checkpointing_keeps_parameter_names_and_numerics(rows_file, tmp_path):
    """Checkpoints of a model with activation checkpointing load into one without, and both
    compute the same loss."""
    base, full, selective = (core_config(tmp_path, **{"train.activation_checkpointing": ac})
                             for ac in ("none", "full", "selective:2"))
    losses = [_losses(train(c, rows_file, tmp_path / c.train.activation_checkpointing.replace(":", "")))
              for c in (base, full, selective)]
    for other in losses[1:]:
        for step, loss in losses[0].items():
            assert other[step] == pytest.approx(loss, rel=1e-5)
    model, optimizer = _fresh(base)
    ckpt.load_checkpoint(tmp_path / "full" / ckpt.checkpoint_dir_name(STEPS), model, optimizer)
