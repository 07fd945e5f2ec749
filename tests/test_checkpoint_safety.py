"""Checkpoint safety (issue 18, items 1, 4 and 5): keep-K after a fallback, Ctrl-C during a save,
and generate / eval / export on a run whose newest checkpoint is damaged.

Real `raylm train --local` runs of the debug model (in this process, or a subprocess where a real
SIGINT must land), and real checkpoint files damaged as a disk, a kill or a user damages them:
zero-filled at the same size, a flipped byte, cut short, the marker gone.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from raylm.cli import main as cli_main
from raylm.config import load_config
from raylm.data.order import PackedDataset
from raylm.model import Transformer
from raylm.optim import build_optimizer
from raylm.train import checkpoint as ckpt
from raylm.train.local import train_local
from raylm.train.trainer import RunDirSink, RankEnv, Trainer

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs/debug.yaml"
ABANDONED = "abandoned"  # RUN/abandoned/<checkpoint>.<UTC time>: where checkpoints above a restore go


def small(out: Path) -> list[str]:
    """The debug preset, smaller: a `raylm train configs/debug.yaml --local` run of seconds."""
    return ["model.vocab_size=512", "model.max_seq_len=64", "data.seq_len=32", "data.sources.0.max_bytes=200000",
            "tokenizer.sample_bytes=100000", "train.global_batch_tokens=256", "train.micro_batch_size=4",
            "train.eval_every=0", "train.log_every=1", "run.sample_tokens=0", f"run.output_dir={out}"]


def name(step: int) -> str:
    return ckpt.checkpoint_dir_name(step)


def steps_of(run: Path) -> list[int]:
    return [int(p.name.split("_")[1]) for p in ckpt.list_checkpoints(run)]


def abandoned(run: Path) -> list[str]:
    """Names (without the time stamp) of the checkpoints set aside in `run`."""
    where = run / ABANDONED
    return sorted(p.name.split(".")[0] for p in where.iterdir()) if where.exists() else []


def digest(directory: Path) -> str:
    """Every file's name and bytes: the same for a directory moved, not for one rewritten."""
    h = hashlib.blake2b()
    for f in sorted(directory.iterdir()):
        h.update(f.name.encode() + b"\0" + f.read_bytes())
    return h.hexdigest()


def damage(checkpoint: Path, kind: str) -> None:
    shards = sorted(checkpoint.glob("*.distcp"))
    if kind == "zero":  # zero-filled at the same size: only the checksum can tell
        for shard in shards:
            shard.write_bytes(bytes(shard.stat().st_size))
    elif kind == "flip":  # one bit flipped
        data = bytearray(shards[0].read_bytes())
        data[len(data) // 2] ^= 1
        shards[0].write_bytes(bytes(data))
    elif kind == "cut":  # a shard cut short, as a full disk leaves it
        shards[0].write_bytes(shards[0].read_bytes()[:-100])
    elif kind == "no_marker":  # a save killed before its marker
        (checkpoint / ckpt.MARKER).unlink()
    else:
        raise ValueError(kind)


@pytest.fixture(scope="module")
def base_run(local_run) -> Path:
    """The session's --local run (conftest.py): checkpoints at steps 2, 4 and 6 (keep 5), trained on
    what `small` trains on. Tests change copies of it, never it."""
    run = Path(local_run.run_dir)
    assert steps_of(run) == [2, 4, 6]
    return run


def copy_run(base: Path, tmp_path: Path) -> Path:
    run = tmp_path / "runs" / base.name
    shutil.copytree(base, run)
    return run


# ---------------------------------------------------------------------------------------
# Item 1: keep-K after a fallback


def test_resume_after_a_fallback_keeps_the_good_checkpoints_and_sets_the_damaged_future_aside(base_run, tmp_path,
                                                                                              capsys):
    """The issue's run, scaled: checkpoints 2, 4, 6; 4 and 6 zero-filled at their size; resumed in
    place with checkpoints every step and keep 2. The resume falls back to 2; 4 and 6 (above the
    step restored: an abandoned future) are moved aside whole, with one warning line, and never
    take a keep slot; the prune keeps the two newest checkpoints written, and the run's newest
    checkpoint is the good one just written, not a damaged one."""
    run = copy_run(base_run, tmp_path)
    for step in (4, 6):
        damage(run / name(step), "zero")
    before = {step: digest(run / name(step)) for step in (4, 6)}
    code = cli_main(["train", str(CONFIG), "--local", *small(run.parent), f"run.resume_from={run}",
                     "train.checkpoint_every=1", "run.keep_checkpoints=2", "train.max_steps=5"])
    out = capsys.readouterr().out
    assert code == 0
    assert "from step 2 (" in out
    assert ckpt.latest_checkpoint(run) == run / name(5)
    assert steps_of(run) == [4, 5]
    assert all(ckpt.verify_checkpoint(p) is None for p in ckpt.list_checkpoints(run))
    warnings = [line for line in out.splitlines() if "abandoned future" in line]
    assert len(warnings) == 1 and f"moved {name(4)}, {name(6)} to {run / ABANDONED}/" in warnings[0]
    assert abandoned(run) == [name(4), name(6)]
    moved = {int(p.name.split(".")[0].split("_")[1]): digest(p) for p in (run / ABANDONED).iterdir()}
    assert moved == before  # the user's files, untouched


def test_a_prune_never_deletes_a_protected_checkpoint_even_when_damaged_ones_fill_the_slots(base_run, tmp_path):
    """Complete-by-size is all a prune can afford to check: two newer checkpoints zero-filled at
    their size look complete. With keep 1 they would push out step 2; protected (the checkpoint
    just written or the newest verified one), it stays."""
    run = copy_run(base_run, tmp_path)
    for step in (4, 6):
        damage(run / name(step), "zero")
    ckpt.prune_checkpoints(run, keep=1, protect=[run / name(2)])
    assert steps_of(run) == [2, 6]
    assert ckpt.verify_checkpoint(run / name(2)) is None


def _trainer_config(run: Path, *overrides: str):
    return load_config(None, ["model.preset=debug", "model.vocab_size=512", "model.max_seq_len=64",
                              "data.seq_len=32", "train.global_batch_tokens=256", "train.micro_batch_size=4",
                              "train.eval_every=0", "train.log_every=100", "optimizer.warmup_steps=1",
                              f"run.output_dir={run.parent}", *overrides])


ROWS = np.random.default_rng(0).integers(4, 500, size=(256, 33)).astype(np.int32)


def _fit(run: Path, max_steps: int, every: int, keep: int, log: list[str]) -> Trainer:
    """The trainer of `raylm train --local` continuing `run` in place (RunDirSink, fixed rows)."""
    cfg = _trainer_config(run, f"train.max_steps={max_steps}", f"train.checkpoint_every={every}",
                          f"run.keep_checkpoints={keep}")
    torch.manual_seed(0)
    model = Transformer(cfg.model)
    model.init_weights()
    sink = RunDirSink(run, keep)
    trainer = Trainer(cfg, RankEnv(), sink, PackedDataset(ROWS), model=model,
                      optimizer=build_optimizer(model, cfg.optimizer), log=log.append)
    try:
        trainer.fit()
    finally:
        sink.close()
    return trainer


KINDS = ("zero", "flip", "cut", "no_marker")


@pytest.mark.parametrize("seed", range(4))
def test_after_any_damage_resume_and_prune_the_newest_verified_checkpoint_exists(tmp_path, seed):
    """Property, over random sequences of rounds (each: damage a random subset of the run's
    checkpoints in random ways, then resume in place with a random keep, checkpoint interval and
    last step): the run restores the newest undamaged checkpoint (or starts fresh when none is
    left); the newest checkpoint of the run afterwards is the verified one it wrote at its last
    step; the prune keeps at most `keep`; every checkpoint above the restored step is set aside
    whole, never deleted."""
    rng = random.Random(seed)
    run = tmp_path / "run"
    run.mkdir()
    log: list[str] = []
    _fit(run, max_steps=6, every=2, keep=5, log=log)
    damaged: dict[str, str] = {}  # name -> digest of the damaged directory still in the run
    set_aside = 0
    for _round in range(3):
        present = steps_of(run)
        undamaged = [s for s in present if name(s) not in damaged]
        hit = rng.sample(undamaged, rng.randint(1, len(undamaged)))
        for step in hit:
            damage(run / name(step), rng.choice(KINDS))
            damaged[name(step)] = digest(run / name(step))
        good = [s for s in present if name(s) not in damaged]
        expected = max(good, default=0)
        above = {s: digest(run / name(s)) for s in present if s > expected}
        keep, every = rng.randint(1, 3), rng.randint(1, 2)
        max_steps = expected + rng.randint(1, 4)  # below the damaged ones, or past them
        trainer = _fit(run, max_steps, every, keep, log)

        restored = trainer.restored_from
        assert (int(Path(restored).name.split("_")[1]) if restored else 0) == expected, log
        now = steps_of(run)
        assert now[-1] == max_steps and ckpt.verify_checkpoint(run / name(max_steps)) is None, (now, log)
        assert len([s for s in now if ckpt.is_complete(run / name(s))]) <= keep
        set_aside += len(above)
        moved = [digest(p) for p in (run / ABANDONED).iterdir()] if (run / ABANDONED).exists() else []
        assert len(moved) == set_aside and all(d in moved for d in above.values())  # set aside whole, never deleted
        # Pruned, moved aside, or a new checkpoint of that step written since: no longer damaged.
        damaged = {n: d for n, d in damaged.items() if (run / n).exists() and digest(run / n) == d}


# ---------------------------------------------------------------------------------------
# Item 4: Ctrl-C during a checkpoint save

# A SIGINT sent by the process to itself while DCP writes the named checkpoint's first shard
# (its file just opened, in DCP's own write loop): Python raises KeyboardInterrupt there, and
# DCP wraps it in its CheckpointException, as a Ctrl-C in a terminal would be.
DRIVER = textwrap.dedent("""
    import contextlib, os, signal, sys
    # A terminal's Ctrl-C raises KeyboardInterrupt even where this test was started with SIGINT
    # ignored (a background job of a non-interactive shell: the ignore is inherited).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    from raylm.cli import main
    from raylm.train import checkpoint

    target = sys.argv[1]
    create_stream = checkpoint._HashingFileSystem.create_stream

    @contextlib.contextmanager
    def interrupted(self, path, mode):
        with create_stream(self, path, mode) as stream:
            if mode.startswith("w") and target in str(path) and str(path).endswith(".distcp"):
                os.kill(os.getpid(), signal.SIGINT)
            yield stream

    checkpoint._HashingFileSystem.create_stream = interrupted
    sys.exit(main(sys.argv[2:]))
""")


@pytest.mark.slow
def test_ctrl_c_during_a_save_is_the_one_interrupted_line_and_the_half_written_checkpoint_is_ignored(base_run,
                                                                                                      tmp_path):
    """Ctrl-C while DCP writes step 6's checkpoint: the same line and exit status 130 as a Ctrl-C
    between saves, no traceback. Resumed in place, the run continues from step 4 (the half-written
    6 is never restored; it is set aside) and writes a whole step 6."""
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    out = tmp_path / "runs"
    done = subprocess.run([sys.executable, str(driver), name(6), "train", str(CONFIG), "--local", *small(out),
                           f"run.resume_from={base_run / name(2)}", "train.max_steps=6", "train.checkpoint_every=2"],
                          capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"}, timeout=600)
    run = next(out.iterdir())
    assert done.returncode == 130, done.stderr
    assert done.stderr.strip().splitlines() == [
        f"raylm: interrupted: the newest good checkpoint is kept; continue with run.resume_from={run}"]
    assert (run / name(6)).is_dir() and not ckpt.is_complete(run / name(6))  # the save was cut
    assert ckpt.latest_checkpoint(run) == run / name(4)

    log: list[str] = []
    cfg = load_config(CONFIG, [*small(out), f"run.resume_from={run}", "train.max_steps=6", "train.checkpoint_every=2"])
    result = train_local(cfg, log=log.append)
    assert any("from step 4 (" in line for line in log), log
    assert abandoned(run) == [name(6)]
    assert result.checkpoint == str(run / name(6)) and ckpt.verify_checkpoint(run / name(6)) is None
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [3, 4, 5, 6]


def test_ctrl_c_at_any_write_of_a_save_is_a_keyboard_interrupt(tmp_path, monkeypatch):
    """A Ctrl-C may land at any write of a save, also while torch.save is inside a shard's zip
    file: its writer, cut mid-file, raises its own RuntimeError ("unexpected pos") on the way out
    with the KeyboardInterrupt as its context, and DCP wraps that. At every write position the
    save ends as a KeyboardInterrupt (by hand, 1 Ctrl-C in 12 gave a traceback and exit 1
    before), and the directory it was writing has no marker."""
    torch.manual_seed(0)
    cfg = load_config(CONFIG)
    model = Transformer(cfg.model)
    optimizer = build_optimizer(model, cfg.optimizer, "cpu")
    write = ckpt._HashingStream.write
    calls = [0, 0]  # writes so far, the write to interrupt

    def interrupted_write(self, data):
        calls[0] += 1
        if calls[0] == calls[1]:
            raise KeyboardInterrupt  # what Python's SIGINT handler raises between bytecodes
        return write(self, data)

    monkeypatch.setattr(ckpt._HashingStream, "write", interrupted_write)
    for k in range(1, 41):
        calls[:] = [0, k]
        with pytest.raises(KeyboardInterrupt):
            ckpt.save_checkpoint(tmp_path / f"k{k}" / name(1), model, optimizer, {"step": 1})
        assert not ckpt.is_complete(tmp_path / f"k{k}" / name(1))


# ---------------------------------------------------------------------------------------
# Item 5: generate, eval and export on a run whose newest checkpoint is damaged


@pytest.fixture(scope="module")
def damaged_run(base_run, tmp_path_factory) -> Path:
    run = copy_run(base_run, tmp_path_factory.mktemp("safety_use"))
    damage(run / name(6), "zero")
    return run


def _use_commands(path: Path, tmp_path: Path) -> dict[str, list[str]]:
    return {
        "generate": ["generate", str(path), "--prompt", "def", "--max-new-tokens", "2", "--device", "cpu",
                     "--seed", "0"],
        "eval": ["eval", str(path), "--max-sequences", "2", "--device", "cpu"],
        "export": ["export", str(path), "--out", str(tmp_path / "hf")],
    }


@pytest.mark.parametrize("command", ["generate", "eval", "export"])
def test_a_run_directory_whose_newest_checkpoint_is_damaged_uses_the_newest_verified_one(damaged_run, tmp_path,
                                                                                          capsys, command):
    """`raylm generate|eval|export RUN`: the newest checkpoint (6) fails its checksum, so the
    command uses 4, the newest that passes, with one warning line naming 6 and the damaged file."""
    code = cli_main(_use_commands(damaged_run, tmp_path)[command])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert captured.err.strip().splitlines() == [
        f"raylm: warning: checkpoint {damaged_run / name(6)} is not usable ({damaged_run / name(6)}/__0_0.distcp: "
        "checksum mismatch (damaged or from another save)); trying an older one"]
    if command != "generate":
        assert str(damaged_run / name(4)) in captured.out
    if command == "export":
        assert (tmp_path / "hf" / "config.json").is_file()


@pytest.mark.parametrize("command", ["generate", "eval", "export"])
def test_a_damaged_checkpoint_named_by_the_user_is_one_line_and_exit_2(damaged_run, tmp_path, capsys, command):
    """Given the damaged checkpoint directory itself, each command refuses it in one line naming
    the damaged file, and exits 2; export leaves nothing behind."""
    code = cli_main(_use_commands(damaged_run / name(6), tmp_path)[command])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err == [f"raylm: error: {damaged_run / name(6)}/__0_0.distcp: checksum mismatch (damaged or from another "
                   "save); name its run directory to use the newest good checkpoint"]
    assert not (tmp_path / "hf").exists()


def test_on_a_bucket_a_damaged_future_is_moved_aside_and_one_cut_short_is_deleted(base_run, s3_server, monkeypatch):
    """Object storage, where a move is a copy of every byte: above the step restored (2), the
    zero-filled 6 (a complete marker: it might be good data read badly) is copied to
    RUN/abandoned/ whole and removed from the run; the cut-short 4 (no marker: nothing vouches
    for its files) is deleted; one warning line says both. 2 stays."""
    import pyarrow.fs as pafs

    from raylm import storage

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    pafs.S3FileSystem(endpoint_override=s3_server.removeprefix("http://"), scheme="http",
                      allow_bucket_creation=True).create_dir("raylm-safety")
    run = "s3://raylm-safety/run"
    for step in (2, 4, 6):
        storage.copy_dir(base_run / name(step), f"{run}/{name(step)}")
    shard = f"{run}/{name(6)}/__0_0.distcp"
    zeros = bytes(len(storage.read_bytes(shard)))
    storage.write_bytes(shard, zeros)
    storage.delete_file(f"{run}/{name(4)}/{ckpt.MARKER}")
    log: list[str] = []
    moved = ckpt.set_aside_after(run, 2, log.append)
    assert [storage.name_of(p) for p in ckpt.list_checkpoints(run)] == [name(2)]
    assert len(moved) == 1 and moved[0].startswith(f"{run}/{ABANDONED}/{name(6)}.")
    assert storage.read_bytes(f"{moved[0]}/__0_0.distcp") == zeros
    assert ckpt.read_marker(moved[0]) is not None  # whole: every file there, at its size
    assert not storage.exists(f"{run}/{name(4)}") and not storage.exists(f"{run}/{name(6)}")
    assert log == [f"warning: {run}: checkpoints above step 2, the one this run continues from, belong to an "
                   f"abandoned future: moved {name(6)} to {run}/{ABANDONED}/; deleted {name(4)} (cut short)"]
