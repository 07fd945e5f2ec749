"""Background checkpoint saves (issue 20, item 4: `train.checkpoint_async`): training goes on while
a save is written, the marker comes only after every rank's files, and a save cut by a kill, a
write error or Ctrl-C leaves the previous checkpoint as the newest verified one.

Real `raylm train --local` runs of a small debug model: two real ranks (gloo) started as torchrun
starts them, so that the test can kill one; in this process where one rank will do. A rank's save
is held at a chosen file by a patched DCP file system in that process (the test waits for the
event it announces, never for time).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from raylm.config import load_config
from raylm.errors import CheckpointError
from raylm.model import Transformer
from raylm.optim import build_optimizer
from raylm.train import checkpoint as ckpt
from raylm.train.local import train_local
from support import wait_for

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs/debug.yaml"
SEQUENCES_PER_STEP = 8  # train.global_batch_tokens=256 / data.seq_len=32


def small(out: Path) -> list[str]:
    """The debug preset, smaller (seconds a run), with background saves on (the CPU default is off)."""
    return ["model.vocab_size=512", "model.max_seq_len=64", "data.seq_len=32", "data.sources.0.max_bytes=200000",
            "tokenizer.sample_bytes=100000", "train.global_batch_tokens=256", "train.micro_batch_size=4",
            "train.eval_every=0", "train.log_every=1", "run.sample_tokens=0", f"run.output_dir={out}",
            "train.checkpoint_async=true"]


def name(step: int) -> str:
    return ckpt.checkpoint_dir_name(step)


def loss_steps(run: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()
            if "loss" in json.loads(line)]


# A rank's `raylm train`, whose save of checkpoint HOLD (on rank HOLD_RANK) announces itself by
# creating FLAG when it opens its first shard, then waits there until the process is killed, or
# (SIGINT set) sends the process a Ctrl-C and goes on.
DRIVER = textwrap.dedent("""
    import contextlib, os, signal, sys, threading
    # A terminal's Ctrl-C raises KeyboardInterrupt even where this test was started with SIGINT
    # ignored (a background job of a non-interactive shell: the ignore is inherited).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    from pathlib import Path
    from raylm.cli import main
    from raylm.train import checkpoint

    hold, flag, action = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
    create_stream = checkpoint._HashingFileSystem.create_stream

    @contextlib.contextmanager
    def held(self, path, mode):
        with create_stream(self, path, mode) as stream:
            if (mode.startswith("w") and hold in str(path) and str(path).endswith(".distcp")
                    and os.environ.get("RANK", "0") == os.environ.get("HOLD_RANK", "0") and not flag.exists()):
                flag.touch()
                if action == "sigint":
                    os.kill(os.getpid(), signal.SIGINT)
                else:
                    threading.Event().wait()  # held until killed
            yield stream

    checkpoint._HashingFileSystem.create_stream = held
    sys.exit(main(sys.argv[4:]))
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_a_worker_killed_during_a_background_save_resumes_from_the_previous_checkpoint_with_every_step_once(
        tmp_path):
    """Two ranks save checkpoint 3 and 6 in the background. Rank 1's save of 6 is held at its first
    shard: training goes on meanwhile (step 8 is recorded), rank 0's shard of 6 is written, and
    there is no marker. Rank 1 is killed: rank 0 stops, checkpoint 6 never gets a marker and 3
    stays the newest verified checkpoint. Resumed, the run continues from step 3, sets 6 aside
    and trains steps 4-9 once each: metrics hold steps 1-9 once, and the last checkpoint has
    consumed exactly the first 9 steps' sequences."""
    driver, flag, out = tmp_path / "driver.py", tmp_path / "held", tmp_path / "runs"
    driver.write_text(DRIVER)
    # No run.name: every rank resolves it, and a rank finding rank 0's new directory would refuse it.
    args = ["train", str(CONFIG), "--local", *small(out), "train.max_steps=9", "train.checkpoint_every=3"]
    port = _free_port()
    ranks = []
    for rank in range(2):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
               "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "HOLD_RANK": "1",
               "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        with open(tmp_path / f"rank{rank}.log", "w") as log_file:  # read on failure
            ranks.append(subprocess.Popen([sys.executable, str(driver), name(6), str(flag), "hold", *args],
                                          env=env, cwd=ROOT, stdout=log_file, stderr=subprocess.STDOUT))
    try:
        ended = lambda: any(p.poll() is not None for p in ranks)  # noqa: E731
        wait_for(flag.exists, 300, "rank 1's save of checkpoint 6 to open its shard", ended=ended)
        run = next(out.iterdir())
        wait_for(lambda: (run / name(6) / "__0_0.distcp").exists(), 120, "rank 0's shard of checkpoint 6",
                 ended=ended)
        wait_for(lambda: 8 in loss_steps(run), 120, "step 8 trained while checkpoint 6 is being written",
                 ended=ended)
        assert not (run / name(6) / ckpt.MARKER).exists()  # rank 1's files are not written: no marker
        assert ckpt.verify_checkpoint(run / name(3)) is None  # the earlier background save is whole
        ranks[1].send_signal(signal.SIGKILL)
        assert ranks[0].wait(timeout=300) != 0, (tmp_path / "rank0.log").read_text()
    finally:
        for p in ranks:
            if p.poll() is None:
                p.kill()
                p.wait()

    assert not ckpt.is_complete(run / name(6)) and not (run / name(6) / ckpt.MARKER).exists()
    assert ckpt.latest_checkpoint(run) == run / name(3)

    log: list[str] = []
    cfg = load_config(CONFIG, [*small(out), f"run.resume_from={run}", "train.max_steps=9", "train.checkpoint_every=3"])
    result = train_local(cfg, log=log.append)
    assert any("from step 3 (" in line for line in log), log
    assert [p.name.split(".")[0] for p in (run / ckpt.ABANDONED).iterdir()] == [name(6)]
    assert loss_steps(run) == list(range(1, 10))
    assert result.checkpoint == str(run / name(9)) and ckpt.verify_checkpoint(run / name(9)) is None
    assert ckpt.verify_checkpoint(run / name(6)) is None  # written again, in the background, whole
    state = ckpt.read_marker(run / name(9))["train_state"]
    assert (state["data_watermark"], state["data_extra"]) == (9 * SEQUENCES_PER_STEP, [])


def test_a_background_save_holds_its_steps_state_and_its_marker_comes_only_after_the_files(tmp_path):
    """The staged copy is the state at begin_save: weights changed at once after it (as the next
    step changes them) are not in the checkpoint. Until finish_save there is no marker; after
    it, the marker lists every file in the directory and each checksum matches."""
    torch.manual_seed(0)
    cfg = load_config(CONFIG)
    model = Transformer(cfg.model)
    optimizer = build_optimizer(model, cfg.optimizer, "cpu")
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    path = tmp_path / name(1)
    save = ckpt.begin_save(path, model, optimizer, {"step": 1}, extra_files={"note.txt": b"x"}, background=True)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    assert not (path / ckpt.MARKER).exists()
    ckpt.finish_save(save)
    marker = ckpt.read_marker(path)
    assert sorted(marker["files"]) == sorted(p.name for p in path.iterdir() if p.name != ckpt.MARKER)
    assert ckpt.verify_checkpoint(path) is None
    loaded = Transformer(cfg.model)
    assert ckpt.load_checkpoint(path, loaded)["step"] == 1
    assert all(torch.equal(saved[k], v) for k, v in loaded.state_dict().items())


def test_a_write_error_during_a_background_save_leaves_the_previous_checkpoint_the_newest(tmp_path, monkeypatch):
    """Checkpoint 4's files fail to write (a full disk) while training goes on: the run stops with
    one line naming the checkpoint and the error, checkpoint 4 has no marker, and checkpoint 2 is
    the newest verified one."""
    write = ckpt._HashingStream.write
    target = name(4)

    def failing(self, data):
        if target in str(getattr(self._raw, "name", "")):
            raise OSError(28, "No space left on device")
        return write(self, data)

    monkeypatch.setattr(ckpt._HashingStream, "write", failing)
    out = tmp_path / "runs"
    cfg = load_config(CONFIG, [*small(out), "run.name=full", "train.max_steps=6", "train.checkpoint_every=2"])
    run = out / "full"
    with pytest.raises(CheckpointError) as failed:
        train_local(cfg, log=lambda line: None)
    assert str(failed.value) == (f"{run / name(4)}: saving the checkpoint failed on rank 0 ([Errno 28] No space left "
                                 "on device); the newest complete checkpoint before it is kept")
    assert (run / name(4)).is_dir() and not (run / name(4) / ckpt.MARKER).exists()
    assert ckpt.latest_checkpoint(run) == run / name(2)
    assert ckpt.newest_good(ckpt.list_checkpoints(run), log=lambda line: None)[0] == run / name(2)


def test_ctrl_c_during_a_background_save_is_the_one_interrupted_line_and_keeps_the_previous_checkpoint(tmp_path):
    """Ctrl-C while checkpoint 6 is written in the background: exit 130 and the one interrupted line
    as for a Ctrl-C anywhere else (issue 18), and checkpoint 4 (also written in the background)
    is the newest complete one; 6 has no marker."""
    driver, flag, out = tmp_path / "driver.py", tmp_path / "held", tmp_path / "runs"
    driver.write_text(DRIVER)
    done = subprocess.run([sys.executable, str(driver), name(6), str(flag), "sigint", "train", str(CONFIG), "--local",
                           *small(out), "run.name=cut", "train.max_steps=8", "train.checkpoint_every=2"],
                          capture_output=True, text=True, cwd=ROOT, timeout=600,
                          env={**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"})
    run = out / "cut"
    assert flag.exists(), done.stderr
    assert done.returncode == 130, done.stderr
    assert done.stderr.strip().splitlines() == [
        f"raylm: interrupted: the newest good checkpoint is kept; continue with run.resume_from={run}"]
    assert not ckpt.is_complete(run / name(6))
    assert ckpt.latest_checkpoint(run) == run / name(4) and ckpt.verify_checkpoint(run / name(4)) is None


def test_raylm_plan_counts_the_staged_copy_of_a_background_save_in_host_memory():
    """A background save holds each worker's shard of the fp32 weights and both AdamW moments in
    host memory (12 bytes a parameter / workers): on GPU by default, none when saves block or
    (auto) on CPU; `raylm plan` prints the figure."""
    from raylm.plan import format_plan, plan, staged_checkpoint_bytes

    cfg = load_config(ROOT / "configs/llama2-7b.yaml")
    n = cfg.model.num_params()
    p = plan(cfg, 8, "h100")
    assert p.staged_checkpoint_bytes == 12 * n // 8 == staged_checkpoint_bytes(cfg, 8, "cuda")
    assert "host memory per GPU for a background save's staged copy, GiB" in format_plan(p)
    assert staged_checkpoint_bytes(cfg, 8, "cpu") == 0
    off = load_config(ROOT / "configs/llama2-7b.yaml", ["train.checkpoint_async=false"])
    assert plan(off, 8, "h100").staged_checkpoint_bytes == 0
    assert staged_checkpoint_bytes(load_config(CONFIG, ["train.checkpoint_async=true"]), 2, "cpu") > 0


def test_a_preemption_notice_during_a_background_save_waits_for_it_then_saves_its_own(tmp_path, monkeypatch):
    """Checkpoint 3 is being written in the background (its writer held) when the preemption
    notice comes at step 4: the trainer first finishes 3 (marker, then its report) and only then
    saves 4, blocking; both verify, and the reports come in step order."""
    import threading

    import numpy as np

    from raylm.data.order import PackedDataset
    from raylm.train.trainer import RankEnv, Trainer
    from support import ListSink

    release = threading.Event()
    create_stream = ckpt._HashingFileSystem.create_stream

    @contextlib.contextmanager
    def held(self, path, mode):
        if mode.startswith("w") and name(3) in str(path):
            release.wait(timeout=300)  # until the preemption notice (the bound only ends a hang)
        with create_stream(self, path, mode) as stream:
            yield stream

    monkeypatch.setattr(ckpt._HashingFileSystem, "create_stream", held)
    seen: dict[str, bool] = {}

    class PreemptedAt4(ListSink):
        def preempted(self) -> bool:
            seen["3 complete at the notice"] = ckpt.is_complete(tmp_path / name(3))
            release.set()
            return True

        def report(self, record, checkpoint):
            if checkpoint is not None and record["step"] == 4:
                seen["3 complete before 4 is reported"] = ckpt.is_complete(tmp_path / name(3))
            super().report(record, checkpoint)

    cfg = load_config(CONFIG, ["model.vocab_size=512", "model.max_seq_len=64", "data.seq_len=32",
                               "train.global_batch_tokens=256", "train.micro_batch_size=4", "train.eval_every=0",
                               "train.max_steps=6", "train.checkpoint_every=3", "train.checkpoint_async=true",
                               "train.preemption_check_every=4"])
    sink = PreemptedAt4(tmp_path)
    rows = np.random.default_rng(0).integers(0, 512, size=(64, 33))
    Trainer(cfg, RankEnv(), sink, PackedDataset(rows), None, log=lambda line: None).fit()
    assert seen == {"3 complete at the notice": False, "3 complete before 4 is reported": True}
    assert [(step, Path(path).name) for step, path in sink.reports if path is not None] == [
        (3, name(3)), (4, name(4)), (6, name(6))]
    assert all(ckpt.verify_checkpoint(tmp_path / name(s)) is None for s in (3, 4, 6))
