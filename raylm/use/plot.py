"""`raylm plot RUN_DIR`: PNGs of a run's metrics.jsonl (loss, learning rate, throughput, MFU) against step.

One file per quantity, in `RUN_DIR/plots` unless `--out` says otherwise (RUN_DIR and `--out`
may be s3:// or gs:// URIs: metrics.jsonl is read from the bucket and each PNG is one upload):

    loss.png        training loss per step and held-out loss at each evaluation, one axes
    lr.png          the learning rate of each step
    throughput.png  tokens per second of the whole run (all workers)
    mfu.png         model FLOPs utilisation, only when the run knew its peak FLOP/s (a GPU of a
                    known kind, or train.peak_flops); CPU runs record none, so none is drawn

metrics.jsonl is read the way the trainer means it: a `{"event": "restored"}` line at step S
drops the records of the steps after S (they were trained again), and a later record for a step
replaces an earlier one, so each plot shows one curve; a restart (from a checkpoint, or from
step 0 when there was none) is a dotted line.
A line that is not a JSON record (a torn last line after a crash) is skipped. Non-finite values
(written as null) leave gaps. Figures are drawn with matplotlib's Agg canvas, without pyplot, so
no display and no global backend are involved.
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator, PercentFormatter

from raylm import storage
from raylm.errors import DataError

FIGSIZE_IN = (8.0, 4.5)
DPI = 100  # 800 x 450 pixels


def read_metrics(path: str | Path) -> tuple[list[dict], list[int]]:
    """The step records of a metrics.jsonl (a local path or a URI), one per step in step order,
    and the steps restored to."""
    by_step: dict[int, dict] = {}
    restores: list[int] = []
    for line in storage.read_bytes(path).decode(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        step = record.get("step") if isinstance(record, dict) else None
        if not isinstance(step, int) or isinstance(step, bool):
            continue
        if record.get("event") == "restored":
            by_step = {s: r for s, r in by_step.items() if s <= step}
            restores.append(step)
        elif "event" not in record:
            by_step[step] = record
    return [by_step[s] for s in sorted(by_step)], sorted(set(restores))


def series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of the records that hold `key`; a null or non-finite value is NaN (a gap)."""
    steps, values = [], []
    for r in records:
        if key in r and not isinstance(r[key], bool) and (r[key] is None or isinstance(r[key], (int, float))):
            value = float("nan") if r[key] is None else float(r[key])
            steps.append(r["step"])
            values.append(value if math.isfinite(value) else float("nan"))
    return steps, values


SMOOTH_MIN_POINTS = 40
"""Runs with at least this many training steps also get a moving mean of the training loss: one
step's loss is that of one batch, which on a small batch is mostly the loss of the file it read."""


def _smoothed(line: tuple[list[int], list[float]], label: str, style: dict) -> list:
    """[((steps, trailing mean of about 1/20 of the run), label, style)], or [] for a short run."""
    steps, values = line
    if len(values) < SMOOTH_MIN_POINTS:
        return []
    window = max(2, len(values) // 20)
    means = []
    for i in range(len(values)):
        recent = [v for v in values[max(0, i - window + 1):i + 1] if math.isfinite(v)]
        means.append(sum(recent) / len(recent) if recent else float("nan"))
    return [((steps, means), f"{label} (mean of {window} steps)", style)]


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> list[str | Path]:
    """Write the run's PNGs into `out` (default RUN_DIR/plots); return their paths. A task
    evaluation's --json file instead gives its confusion matrix (`plot_confusion`)."""
    if str(run_dir).endswith(".json"):
        return [plot_confusion(run_dir, out)]
    run_dir = storage.location(run_dir)
    # A prefix on a bucket is a directory only through its objects: there, metrics.jsonl is the check.
    if not storage.is_uri(run_dir) and not run_dir.is_dir():
        raise DataError(f"{run_dir}: no such run directory" if not run_dir.exists()
                        else f"{run_dir}: not a directory; pass the run directory that holds metrics.jsonl")
    path = storage.child(run_dir, "metrics.jsonl")
    with storage.errors(path, None, DataError):
        found = storage.is_file(path)
    if not found:
        raise DataError(f"{path}: not found; RUN_DIR must be a run directory (runs/<name>), which holds metrics.jsonl")
    try:
        records, restores = read_metrics(path)
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or str(e).splitlines()[0]})") from None
    if not records:
        raise DataError(f"{path}: holds no metrics records (empty, or no line is a JSON record with a step)")
    out = storage.child(run_dir, "plots") if out is None else storage.location(out)
    try:
        storage.make_dirs(out)
    except OSError as e:
        raise DataError(f"{out}: cannot create the plots directory ({e.strerror})") from None

    name = storage.name_of(run_dir) if storage.is_uri(run_dir) else run_dir.resolve().name
    written = [p for p in (
        _plot(storage.child(out, "loss.png"), f"{name}: training and held-out loss", "cross-entropy (nats per token)",
              [(series(records, "loss"), "training (each step)", {"lw": 1, "alpha": 0.4, "color": "C0"}),
               *_smoothed(series(records, "loss"), "training", {"lw": 2, "color": "C0"}),
               (series(records, "val_loss"), "held-out (each evaluation)",
                {"lw": 1.5, "marker": "o", "ms": 4, "color": "C1"})],
              restores),
        _plot(storage.child(out, "lr.png"), f"{name}: learning rate", "learning rate",
              [(series(records, "lr"), None, {"lw": 1.5})], restores, from_zero=True),
        _plot(storage.child(out, "throughput.png"), f"{name}: throughput, all workers", "tokens per second",
              [(series(records, "tokens_per_second"), None, {"lw": 1})], restores, from_zero=True),
        _plot(storage.child(out, "mfu.png"), f"{name}: model FLOPs utilisation", "MFU (% of peak bf16 FLOP/s per worker)",
              [(series(records, "mfu"), None, {"lw": 1})], restores, from_zero=True, percent=True),
    ) if p is not None]
    if not written:
        raise DataError(f"{path}: no record holds loss, val_loss, lr or tokens_per_second")
    return written


def _plot(target: str | Path, title: str, ylabel: str, lines: list, restores: list[int], from_zero: bool = False,
          percent: bool = False) -> str | Path | None:
    """One PNG of `lines` ((steps, values), legend label, line style) against step; None if all are empty.

    `from_zero` starts the y axis at 0, so a rate's wobble is not drawn as a collapse."""
    lines = [line for line in lines if line[0][0]]
    if not lines:
        return None  # the run recorded no such value (mfu on CPU)
    fig = Figure(figsize=FIGSIZE_IN, dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for (steps, values), label, style in lines:
        ax.plot(steps, values, label=label, **style)
    for i, step in enumerate(restores):
        ax.axvline(step, color="gray", ls=":", lw=1, label="restarted from this step" if i == 0 else None)
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if from_zero:
        ax.set_ylim(bottom=0)
    if percent:
        ax.yaxis.set_major_formatter(PercentFormatter(1.0))
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="best", fontsize=9)
    if storage.is_uri(target):
        png = io.BytesIO()
        fig.savefig(png, format="png")
        with storage.errors(target, None, DataError):
            storage.write_bytes(target, png.getvalue())
        return target
    try:
        fig.savefig(target)
    except OSError as e:
        raise DataError(f"{target}: cannot write ({e.strerror})") from None
    return target


def plot_confusion(eval_json: str | Path, out: str | Path | None = None) -> str | Path:
    """`raylm plot EVAL.json`: the confusion matrix of a choice task's `raylm eval --task --json`
    file as confusion.png (rows: gold label, columns: predicted; counts in the cells), in `out`
    (default: beside the JSON file)."""
    eval_json = storage.location(eval_json)
    try:
        record = json.loads(storage.read_bytes(eval_json))
    except FileNotFoundError:
        raise DataError(f"{eval_json}: no such file") from None
    except (OSError, ValueError) as e:
        raise DataError(f"{eval_json}: not a JSON file ({str(e).splitlines()[0]})") from None
    confusion = record.get("metrics", {}).get("confusion") if isinstance(record, dict) else None
    if not confusion:
        raise DataError(f"{eval_json}: holds no confusion matrix (write one with raylm eval RUN --task "
                        "CHOICE_TASK.yaml --json FILE)")
    labels, matrix = confusion["labels"], confusion["matrix"]
    side = min(12.0, 2.5 + 0.5 * len(labels))
    fig = Figure(figsize=(side + 1.0, side), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    image = ax.imshow(matrix, cmap="Blues")
    fig.colorbar(image, ax=ax, shrink=0.8, label="examples")
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    peak = max((v for row in matrix for v in row), default=0)
    for i, row in enumerate(matrix):
        for j, value in enumerate(row):
            ax.text(j, i, str(value), ha="center", va="center", fontsize=8,
                    color="white" if value > peak / 2 else "black")
    accuracy = record["metrics"].get("accuracy")
    ax.set_title(f"{storage.name_of(eval_json)}: confusion" + (f" (accuracy {accuracy:.3f})" if accuracy is not None else ""))
    ax.set_xlabel("predicted")
    ax.set_ylabel("gold")
    out = storage.parent_of(eval_json) if out is None else storage.location(out)
    if not storage.is_uri(out):
        Path(out).mkdir(parents=True, exist_ok=True)
    target = storage.child(out, "confusion.png")
    png = io.BytesIO()
    fig.savefig(png, format="png")
    with storage.errors(target, None, DataError):
        storage.write_bytes(target, png.getvalue())
    return target
