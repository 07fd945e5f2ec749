"""`raylm plot RUN_DIR`: one PNG per recorded quantity of a real run, one curve per quantity after a
restore, a torn line skipped, and one-line errors for what a user can get wrong."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import matplotlib.image
import pytest

from hf_support import one_thread  # noqa: F401 (a fixture)
from raylm.cli import main as cli_main
from raylm.train import checkpoint as ckpt
from raylm.train.local import train_local
from raylm.train.metrics import MetricsWriter
from raylm.use.plot import DPI, FIGSIZE_IN, read_metrics
from support import LOCAL_CHECKPOINT_EVERY, LOCAL_EVAL_EVERY, LOCAL_STEPS as STEPS, local_config

pytestmark = pytest.mark.usefixtures("one_thread")
CHECKPOINT_AT = STEPS - LOCAL_CHECKPOINT_EVERY  # where the run continues once its last checkpoint is lost
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
IMAGE_SHAPE = (int(FIGSIZE_IN[1] * DPI), int(FIGSIZE_IN[0] * DPI), 4)  # rows, columns, RGBA


@pytest.fixture(scope="module")
def restored_run(local_run, tmp_path_factory) -> Path:
    """A finished CPU run (a copy of the session's) whose last checkpoint was lost: continued in
    place from step 4, it trained steps 5-6 again; then a crash tore the line it was writing."""
    run = tmp_path_factory.mktemp("plot_runs") / Path(local_run.run_dir).name
    shutil.copytree(local_run.run_dir, run)
    shutil.rmtree(run / ckpt.checkpoint_dir_name(STEPS))
    train_local(local_config(run.parent, f"run.resume_from={run}", "run.sample_tokens=0"), log=lambda line: None)
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 7, "time": 17')
    return run


def assert_png(path: Path) -> None:
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    image = matplotlib.image.imread(path)
    assert image.shape == IMAGE_SHAPE
    assert image[..., :3].std() > 0.05, "the image is blank"


def test_plot_writes_a_png_of_each_quantity_the_run_recorded(restored_run, tmp_path, capsys):
    """loss, lr and throughput are drawn, printed one path a line, into RUN_DIR/plots or --out; a CPU
    run knows no peak FLOP/s, records no MFU, and gets no mfu.png."""
    assert cli_main(["plot", str(restored_run)]) == 0
    names = ["loss.png", "lr.png", "throughput.png"]
    assert capsys.readouterr().out.splitlines() == [str(restored_run / "plots" / n) for n in names]
    for name in names:
        assert_png(restored_run / "plots" / name)
    assert not (restored_run / "plots" / "mfu.png").exists()

    assert cli_main(["plot", str(restored_run), "--out", str(tmp_path / "pictures")]) == 0
    assert sorted(p.name for p in (tmp_path / "pictures").iterdir()) == names


def test_a_restored_run_reads_as_one_curve_and_a_torn_line_is_skipped(restored_run):
    """After the restore at step 4 every step appears once, holding the values of its last training
    (the rewound file's records after the `restored` line); the torn step-7 line is not a record."""
    lines = (restored_run / "metrics.jsonl").read_text().splitlines()
    restored_at = next(i for i, line in enumerate(lines) if '"event": "restored"' in line)
    retrained = {r["step"]: r["loss"] for r in map(json.loads, lines[restored_at + 1:-1])}
    assert sorted(retrained) == list(range(CHECKPOINT_AT + 1, STEPS + 1))

    records, restores = read_metrics(restored_run / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(STEPS + 1)) and restores == [CHECKPOINT_AT]
    assert {r["step"]: r["loss"] for r in records if r["step"] > CHECKPOINT_AT} == retrained
    evaluated = list(range(0, STEPS + 1, LOCAL_EVAL_EVERY))  # 0: before the first step
    assert [r["step"] for r in records if "val_loss" in r] == evaluated


def test_a_later_record_for_a_step_replaces_the_earlier_and_mfu_is_drawn_when_recorded(tmp_path):
    """Records the writer appended twice for one step (no rewind between) count once, the later
    one; a run that recorded MFU (a GPU of a known kind, or train.peak_flops) gets mfu.png."""
    writer = MetricsWriter(tmp_path, tensorboard=False)
    for step, loss in [(1, 9.0), (2, 8.0), (2, 7.5), (3, 7.0)]:
        writer.write({"step": step, "loss": loss, "lr": 1e-3, "tokens_per_second": 1e5, "mfu": 0.4})
    writer.write({"step": 3, "loss": float("nan"), "lr": 1e-3, "tokens_per_second": 1e5, "mfu": 0.41})
    writer.close()
    records, _ = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["loss"] for r in records[:2]] == [9.0, 7.5] and records[2]["loss"] is None
    assert cli_main(["plot", str(tmp_path)]) == 0
    assert_png(tmp_path / "plots" / "mfu.png")


@pytest.mark.parametrize("setup, args, message", [
    (None, ["plot", "{run}"], "{run}: no such run directory"),
    ("", ["plot", "{run}"], "{run}/metrics.jsonl: not found; RUN_DIR must be a run directory"),
    ("\n", ["plot", "{run}"], "{run}/metrics.jsonl: holds no metrics records"),
    ('{"step": 1, "lo', ["plot", "{run}"], "{run}/metrics.jsonl: holds no metrics records"),
    ('{"step": 1, "loss": 2.0}\n', ["plot", "{run}", "--out", "{run}/metrics.jsonl"],
     "{run}/metrics.jsonl: cannot create the plots directory"),
], ids=["no-directory", "no-metrics-file", "empty-file", "only-a-torn-line", "out-is-a-file"])
def test_plot_errors_are_one_line_naming_the_path(tmp_path, capsys, setup, args, message):
    run = tmp_path / "run"
    if setup is not None:
        run.mkdir()
        if setup:
            (run / "metrics.jsonl").write_text(setup)
    code = cli_main([a.format(run=run) for a in args])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert message.format(run=run) in err, err
