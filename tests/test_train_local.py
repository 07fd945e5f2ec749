"""The core trainer without Ray: `raylm train --local` runs, run directories, resume checks, non-finite steps, sampling.

`train_local` is the same Trainer and checkpoint rules a Ray worker runs, with a RunDirSink. The
tests that only need a finished run read the session's (`local_run`, conftest.py).
"""

from __future__ import annotations

import datetime as dt
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from raylm.cli import main as cli_main
from raylm.data.order import PackedDataset
from raylm.errors import CheckpointError, TrainingError
from raylm.model import Transformer
from raylm.optim import build_optimizer
from raylm.train import checkpoint as ckpt
from raylm.train.local import train_local
from raylm.train.runs import create_run_dir, discard_run_dir, resolve_run
from raylm.train.trainer import RunDirSink, RankEnv, Trainer

from support import LOCAL_CHECKPOINT_EVERY, LOCAL_STEPS as STEPS, local_config

ROOT = Path(__file__).resolve().parents[1]
RESUME_AT = STEPS - LOCAL_CHECKPOINT_EVERY  # a checkpoint of the shared run before its last


def losses(run_dir: str | Path) -> dict[int, float]:
    records = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def test_local_run_checkpoints_evaluates_and_leaves_a_self_contained_checkpoint(local_run):
    run = Path(local_run.run_dir)
    assert sorted(losses(run)) == list(range(1, STEPS + 1))
    assert [p.name for p in ckpt.list_checkpoints(run)] == [ckpt.checkpoint_dir_name(s) for s in
                                                           range(LOCAL_CHECKPOINT_EVERY, STEPS + 1, LOCAL_CHECKPOINT_EVERY)]
    assert local_run.checkpoint == str(run / ckpt.checkpoint_dir_name(STEPS))
    assert "val_loss" in local_run.metrics
    final = Path(local_run.checkpoint)
    assert ckpt.verify_checkpoint(final) is None
    marker = ckpt.read_marker(final)
    assert marker["facts"]["seq_len"] == 32 and len(marker["facts"]["data_fingerprint"]) == 64
    assert (final / "tokenizer.model").read_bytes() == (run / "tokenizer.model").read_bytes()
    from raylm.use.load import load_model

    model, tokenizer, cfg = load_model(final)
    assert tokenizer.sha256 == marker["facts"]["tokenizer_sha256"] and cfg.run.name == run.name


def test_local_resume_from_step_k_matches_the_uninterrupted_run(local_run, tmp_path):
    """Stopped after step k and resumed (`--local`, a new run from the step-k checkpoint), step k+1
    has the uninterrupted loss: the same test the Ray path has."""
    start = Path(local_run.run_dir) / ckpt.checkpoint_dir_name(RESUME_AT)
    resumed = train_local(local_config(tmp_path, f"run.resume_from={start}"), log=lambda line: None)
    after, uninterrupted = losses(resumed.run_dir), losses(local_run.run_dir)
    assert sorted(after) == list(range(RESUME_AT + 1, STEPS + 1))
    for step in after:
        assert after[step] == pytest.approx(uninterrupted[step], rel=1e-5)


def test_resume_in_place_keeps_the_runs_tokenizer_and_config(local_run, tmp_path):
    """A run continued in place loads (never retrains or rewrites) its tokenizer.model and config.yaml."""
    import shutil

    run = tmp_path / "copy"
    shutil.copytree(local_run.run_dir, run)
    shutil.rmtree(run / ckpt.checkpoint_dir_name(STEPS))  # as if stopped after step k
    kept = {name: (run / name).read_bytes() for name in ("tokenizer.model", "config.yaml")}
    stamp = {name: (run / name).stat().st_mtime_ns for name in kept}
    result = train_local(local_config(tmp_path, f"run.resume_from={run}", "tokenizer.sample_docs=3"),
                         log=lambda line: None)
    assert Path(result.run_dir) == run.resolve()
    assert {name: (run / name).read_bytes() for name in kept} == kept
    assert {name: (run / name).stat().st_mtime_ns for name in kept} == stamp
    assert losses(run)[STEPS] == pytest.approx(losses(local_run.run_dir)[STEPS], rel=1e-5)


@pytest.mark.parametrize("change, expected", [
    ("data.seq_len=16", "data.seq_len 32, this run has 16; resume with the same seq_len"),
    ("data.sources.0.max_bytes=150000", "corpus fingerprint"),
])
def test_resuming_with_a_changed_seq_len_or_corpus_is_one_line_unless_allowed(local_run, tmp_path, capsys, change,
                                                                                expected):
    start = Path(local_run.run_dir) / ckpt.checkpoint_dir_name(RESUME_AT)
    config = tmp_path / "local.yaml"
    config.write_text(local_config(tmp_path).to_yaml())
    code = cli_main(["train", str(config), "--local", f"run.resume_from={start}", change, "run.sample_tokens=0"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("raylm: error: run.resume_from: ") and expected in err, err
    assert len(err.splitlines()) == 1
    assert not any(tmp_path.glob("raylm-*"))  # the failed start left no run directory
    if change.startswith("data.sources"):
        allowed = train_local(local_config(tmp_path, f"run.resume_from={start}", change,
                                           "run.resume_changes=[data]", "run.sample_tokens=0"), log=lambda line: None)
        assert sorted(losses(allowed.run_dir)) == list(range(RESUME_AT + 1, STEPS + 1))


def test_two_runs_started_in_the_same_second_get_their_own_directories(tmp_path):
    cfg = local_config(tmp_path)
    now = dt.datetime(2026, 11, 25, 12, 0, 0)
    first, second = (create_run_dir(resolve_run(cfg, now)) for _ in range(2))
    assert first.run_dir != second.run_dir and Path(second.run_dir).name == Path(first.run_dir).name + "-2"
    assert (Path(first.run_dir) / "config.yaml").is_file() and (Path(second.run_dir) / "config.yaml").is_file()
    assert first.cfg.run.name == Path(first.run_dir).name and cfg.run.name is None  # resolving mutates nothing
    # Cleaning up after a failed start removes only what that start wrote.
    (Path(first.run_dir) / "someone-elses.txt").write_text("keep me")
    discard_run_dir(first)
    discard_run_dir(second)
    assert (Path(first.run_dir) / "someone-elses.txt").is_file() and not (Path(first.run_dir) / "config.yaml").exists()
    assert not Path(second.run_dir).exists()


def test_object_store_output_dir_stays_a_uri(tmp_path):
    spec = resolve_run(local_config(tmp_path, "run.output_dir=s3://bucket/runs"))
    assert spec.output_dir == "s3://bucket/runs" and spec.run_dir.startswith("s3://bucket/runs/raylm-")


def _nan_after(step_from: int, model: torch.nn.Module, step_to: int | None = None):
    """A real NaN gradient on one weight during the given steps: (hook for on_indices, the flag)."""
    flag = {"on": False}
    param = next(p for n, p in model.named_parameters() if n.endswith("wq.weight"))
    param.register_hook(lambda g: g * float("nan") if flag["on"] else g)

    def on_indices(step: int, indices) -> None:
        flag["on"] = step + 1 >= step_from and (step_to is None or step + 1 <= step_to)

    return on_indices


def _trainer(cfg, out: Path, on_indices_for):
    torch.manual_seed(0)
    model = Transformer(cfg.model)
    model.init_weights()
    rows = np.random.default_rng(0).integers(4, 500, size=(64, 33)).astype(np.int32)
    sink = RunDirSink(out, cfg.run.keep_checkpoints)
    trainer = Trainer(cfg, RankEnv(), sink, PackedDataset(rows), model=model,
                      optimizer=build_optimizer(model, cfg.optimizer), on_indices=on_indices_for(model),
                      log=lambda line: None)
    return trainer, sink


def test_a_non_finite_gradient_skips_the_update_and_is_counted(tmp_path):
    """Step 3's gradient is NaN: no update (weights unchanged through it), counted, training goes on."""
    cfg = local_config(tmp_path, "train.eval_every=0")
    trainer, sink = _trainer(cfg, tmp_path, lambda m: _nan_after(3, m, step_to=3))
    final = trainer.fit()
    sink.close()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    by_step = {r["step"]: r for r in records if "update_applied" in r}
    assert [s for s, r in by_step.items() if not r["update_applied"]] == [3]
    assert by_step[3]["grad_norm"] is None  # NaN is written as null
    assert by_step[STEPS]["skipped_steps"] == 1 and final["skipped_steps"] == 1
    assert math.isfinite(by_step[4]["loss"]) and by_step[STEPS]["loss"] < by_step[1]["loss"]
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


def test_non_finite_steps_in_a_row_stop_with_one_line_and_every_checkpoint_stays_finite(tmp_path):
    """From step 4 on every gradient is NaN: after train.max_nonfinite_steps in a row the run stops
    with one line; keep-K never deleted the good checkpoints for bad ones (there are none)."""
    cfg = local_config(tmp_path, "train.eval_every=0", "train.max_steps=20", "train.checkpoint_every=2",
                       "train.max_nonfinite_steps=3", "run.keep_checkpoints=2")
    trainer, sink = _trainer(cfg, tmp_path, lambda m: _nan_after(4, m))
    with pytest.raises(TrainingError) as err:
        trainer.fit()
    sink.close()
    message = str(err.value)
    assert "\n" not in message and message.startswith("train.max_nonfinite_steps=3: steps 4-6")
    kept = ckpt.list_checkpoints(tmp_path)
    assert [p.name for p in kept] == [ckpt.checkpoint_dir_name(s) for s in (2, 4)]
    for path in kept:
        assert ckpt.verify_checkpoint(path) is None
        model = Transformer(cfg.model)
        ckpt.load_checkpoint(path, model)
        assert all(torch.isfinite(p).all() for p in model.parameters())


def test_sampling_never_picks_an_id_the_tokenizer_does_not_have(local_run):
    """A model's vocab_size may exceed the tokenizer's pieces (a small corpus yields fewer). Here
    the run's model is widened by 64 ids the tokenizer lacks, whose logits win every draw (half
    the rows along +1, half along -1: whatever the hidden state, one half scores ~1e4 |sum(h)|),
    and still every id sampled, greedy or at temperature 1, is one the tokenizer has; `sample`
    returns the decoding of exactly those ids. Without the limit the same model and seed pick
    out-of-range ids (so the setup does make them win)."""
    import dataclasses

    from raylm.use.generate import SamplingOptions, generate_ids
    from raylm.use.load import load_model
    from raylm.use.sample import sample

    trained, tokenizer, cfg = load_model(local_run.run_dir)
    vocab = tokenizer.vocab_size
    model_vocab = vocab + 64  # ids vocab..model_vocab-1 exist in the model only
    model = Transformer(dataclasses.replace(cfg.model, vocab_size=model_vocab))
    weights = trained.state_dict()
    for name, tensor in model.state_dict().items():  # the trained weights, the new rows zero
        with torch.no_grad():
            tensor.zero_()
            tensor[tuple(slice(0, n) for n in weights[name].shape)] = weights[name]
    with torch.no_grad():
        outside = model.output.weight[vocab:]  # (model_vocab - vocab, dim)
        outside[0::2] = 1e4
        outside[1::2] = -1e4
    prompt = [tokenizer.bos_id, *tokenizer.encode_one("def ")]
    for temperature in (1.0, 0.0):
        options = SamplingOptions(max_new_tokens=8, temperature=temperature, top_k=0, seed=0, stop_at_eos=False)
        unlimited = list(generate_ids(model, prompt, options, vocab_limit=model_vocab, eos_id=None,
                                      generator=options.generator()))
        assert unlimited and all(i >= vocab for i in unlimited), unlimited  # they do win when allowed
        ids = list(generate_ids(model, prompt, options, vocab_limit=vocab, eos_id=None,
                                generator=options.generator()))
        assert len(ids) == 8 and all(0 <= i < vocab for i in ids), ids

    options = SamplingOptions(max_new_tokens=8, temperature=1.0, top_k=0, seed=0)
    ids = list(generate_ids(model, prompt, options, vocab_limit=vocab, eos_id=tokenizer.eos_id,
                            generator=torch.Generator().manual_seed(0)))
    assert all(0 <= i < vocab for i in ids)
    text = sample(model, tokenizer, "def ", 8, temperature=1.0, top_k=0, generator=torch.Generator().manual_seed(0))
    assert text == tokenizer.decode(ids)


def test_a_checkpoint_of_another_run_is_never_resumed_silently(local_run, tmp_path):
    """A resume_from naming a directory with no good checkpoint is one line."""
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        resolve_run(local_config(tmp_path, f"run.resume_from={empty}"))


@pytest.mark.slow  # a torchrun group
def test_torchrun_two_ranks_train_local_checkpoints_and_resume_in_place_on_one(local_run, tmp_path):
    """`torchrun -m raylm train CONFIG` (torchrun implies --local): two FSDP2 ranks, one run
    directory, a checkpoint both ranks wrote; then the same run continued in place by one process."""
    import os
    import subprocess
    import sys

    config = tmp_path / "tr.yaml"
    config.write_text(local_config(tmp_path, "train.max_steps=4", "train.checkpoint_every=2").to_yaml())
    torchrun = Path(sys.executable).with_name("torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node=2", "-m", "raylm", "train", str(config)],
                          capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    (run,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    marker = ckpt.read_marker(run / ckpt.checkpoint_dir_name(4))
    assert marker["world_size"] == 2 and {"__0_0.distcp", "__1_0.distcp"} <= set(marker["files"])
    assert done.stdout.count("run directory:") == 1  # rank 0 speaks for the group
    result = train_local(local_config(tmp_path, f"run.resume_from={run}", "train.max_steps=6"), log=lambda line: None)
    assert Path(result.run_dir) == run and sorted(losses(run)) == list(range(1, 7))
