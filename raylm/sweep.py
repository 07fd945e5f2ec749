"""Hyperparameter sweeps, the pure part: the sweep file, its checks, and what a finished sweep writes.

No Ray here (`raylm.ray.tune` runs the trials). A sweep file names a base training config and a
search space whose keys are the dotted config paths of the CLI's overrides, read by the one
config loader:

    base: ../debug.yaml            # a training config, relative to this file
    set:                           # overrides applied to every trial (dotted keys)
      train.max_steps: 20
    resources:                     # per trial: scaling.* keys (workers, CPUs, GPUs)
      num_workers: 1
      cpus_per_worker: 0.9
    space:
      optimizer.lr: {loguniform: [1.0e-4, 3.0e-2]}
      optimizer.warmup_steps: {randint: [2, 8]}        # both ends included
      model.dim: {choice: [64, 128]}
      optimizer.schedule: {grid: [cosine, wsd]}        # every value, num_samples times each
    search: random                 # random (grid points too) | optuna (TPE; pip install 'raylm[tune]')
    scheduler: asha                # asha | none
    asha: {grace_period: 10, reduction_factor: 2}      # in optimizer steps
    metric: val_loss               # held-out loss (val_accuracy is maximised)
    num_samples: 4
    max_concurrent: null           # null: as many trials as the cluster fits at once
    seed: 0

Every key of the space is checked before any trial starts: each value a trial could get
(every choice/grid value, both ends of a range) is applied to the base config and validated,
so a key that is not a config path, or a value the config rejects, fails in one line.

A sweep directory holds `sweep.yaml` (the resolved sweep, for `--resume`), `prepared/` (the
shards every trial reads: the corpus is tokenised and packed once), `runs/<trial>/` (each
trial's raylm run directory, with its checkpoints), `tune/` (Ray Tune's state), and at the end
`results.csv`, `results.json`, `val_loss.png` and `best.yaml`. It is a local directory or a
prefix on object storage (`output_dir: s3://bucket/sweeps`, for a cluster whose nodes share no
disk): every file here is read and written through `raylm.storage`, one whole file at a time.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime as dt
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from raylm import storage
from raylm.config import NAME_RULE, Config, apply_override, is_plain_name, load_config, read_yaml
from raylm.errors import ConfigError

DISTRIBUTIONS = ("loguniform", "uniform", "randint", "choice", "grid")
SEARCHES = ("random", "optuna")
SCHEDULERS = ("asha", "none")
METRICS = {"val_loss": "min", "val_perplexity": "min", "val_accuracy": "max"}
SWEEP_FILE = "sweep.yaml"
PREPARED_DIR = "prepared"
RUNS_DIR = "runs"
TUNE_DIR = "tune"
SHARED_PREFIXES = ("data.", "tokenizer.")
"""Keys every trial must share: the trials read one prepared dataset."""
SHARED_KEYS = ("model.vocab_size",)
NOT_SEARCHABLE = ("run.", "scaling.")
"""Run identity is the sweep's; per-trial resources are `resources:`, the same for every trial."""


@dataclass(frozen=True)
class Distribution:
    kind: str
    values: tuple
    """loguniform/uniform/randint: (low, high); choice/grid: the values."""

    def candidates(self) -> list:
        """Values that bound what a trial can get: all of a choice or grid, both ends of a range."""
        return list(self.values)

    def label(self) -> str:
        return f"{self.kind}{list(self.values)}"


@dataclass
class AshaConfig:
    grace_period: int | None = None
    """Steps a trial runs before it can be stopped; None: the first evaluation (train.eval_every)."""
    reduction_factor: float = 2.0
    """At each rung, the best 1/reduction_factor of the trials go on."""


@dataclass
class Sweep:
    path: Path
    """The sweep file (relative paths in it are relative to its folder)."""
    base: Path
    """The training config every trial starts from."""
    space: dict[str, Distribution]
    overrides: list[str] = field(default_factory=list)
    """`set:` and `resources:` as dotted overrides, applied to every trial before its own values."""
    search: str = "random"
    scheduler: str = "asha"
    asha: AshaConfig = field(default_factory=AshaConfig)
    metric: str = "val_loss"
    num_samples: int = 1
    max_concurrent: int | None = None
    seed: int | None = 0
    name: str | None = None
    output_dir: str = "sweeps"
    """Where sweep directories go: a local folder or an s3:// / gs:// prefix."""
    trial_cpus: float = 0.01
    """CPUs of a trial's driver (it only waits on its TorchTrainer; the workers hold their own)."""
    max_trial_failures: int = 0
    """Tune retries of a trial that failed (each retry continues the trial's run from its checkpoint)."""

    @property
    def mode(self) -> str:
        return METRICS[self.metric]

    def trial_config(self, params: dict[str, Any], extra: list[str] = ()) -> Config:
        """The training config of one trial: base, then `set`/`resources`, then the trial's values."""
        return load_config(self.base, [*self.overrides, *(format_override(k, v) for k, v in params.items()),
                                       *extra])

    def base_config(self) -> Config:
        return load_config(self.base, self.overrides)

    def to_dict(self) -> dict:
        return {"path": str(self.path), "base": str(self.base), "overrides": list(self.overrides),
                "space": {k: {d.kind: list(d.values)} for k, d in self.space.items()},
                "search": self.search, "scheduler": self.scheduler, "asha": dataclasses.asdict(self.asha),
                "metric": self.metric, "num_samples": self.num_samples, "max_concurrent": self.max_concurrent,
                "seed": self.seed, "name": self.name, "output_dir": self.output_dir,
                "trial_cpus": self.trial_cpus, "max_trial_failures": self.max_trial_failures}


def format_override(key: str, value: Any) -> str:
    """`key=value` in the override syntax (the value as a YAML flow scalar or collection)."""
    if isinstance(value, float):
        text = repr(value)
    elif isinstance(value, str):
        text = value
    else:
        text = json.dumps(value)
    return f"{key}={text}"


# ---------------------------------------------------------------------------------------
# Loading and checking


_SWEEP_KEYS = ("base", "set", "resources", "space", "search", "scheduler", "asha", "metric", "num_samples",
               "max_concurrent", "seed", "name", "output_dir", "trial_cpus", "max_trial_failures")


def load_sweep(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Sweep:
    """Read a sweep file, apply command-line overrides, and check every key before any trial.

    An override whose first part is a sweep key (`num_samples=8`, `asha.grace_period=5`) sets
    that; any other (`train.max_steps=50`) is applied to every trial's config, like `set:`.
    """
    path = Path(path)
    raw = read_yaml(path, "sweep file")
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a sweep file is a mapping with base, space and settings")
    config_overrides = []
    for item in overrides:
        key, sep, value = item.partition("=")
        top = key.split(".")[0]
        if sep and top in _SWEEP_KEYS and top not in ("set", "space", "base"):
            apply_override(raw, item)  # the config loader's own dotted-key setter
        else:
            config_overrides.append(item)
    return sweep_from_dict(raw, path, config_overrides)


def sweep_from_dict(raw: dict, path: Path, extra_overrides: list[str] = ()) -> Sweep:
    where = str(path)
    unknown = sorted(set(raw) - set(_SWEEP_KEYS) - {"overrides"})
    if unknown:
        raise ConfigError(f"{where}: {unknown[0]}: unknown sweep key; valid keys: {', '.join(_SWEEP_KEYS)}")
    if "base" not in raw:
        raise ConfigError(f"{where}: base: missing; name the training config, e.g. base: ../debug.yaml")
    base = Path(str(raw["base"]))
    if not base.is_absolute():
        base = (path.parent / base).resolve()
    if not base.is_file():
        raise ConfigError(f"{where}: base: {base} not found")
    overrides = [*_override_list(raw.get("overrides"), where, "overrides"), *_override_list(raw.get("set"), where, "set")]
    resources = raw.get("resources") or {}
    if not isinstance(resources, dict):
        raise ConfigError(f"{where}: resources: expected a mapping of scaling keys, e.g. {{num_workers: 1}}")
    overrides += [format_override(f"scaling.{k}", v) for k, v in resources.items()]
    overrides += list(extra_overrides)
    space = _parse_space(raw.get("space"), where)
    sweep = Sweep(
        path=path.resolve(), base=base, space=space, overrides=overrides,
        search=_choice(raw.get("search", "random"), SEARCHES, where, "search"),
        scheduler=_choice(str(raw.get("scheduler", "asha")).lower(), SCHEDULERS, where, "scheduler"),
        asha=_asha(raw.get("asha"), where),
        metric=_choice(raw.get("metric", "val_loss"), tuple(METRICS), where, "metric"),
        num_samples=_positive_int(raw.get("num_samples", 1), where, "num_samples"),
        max_concurrent=None if raw.get("max_concurrent") is None else _positive_int(
            raw["max_concurrent"], where, "max_concurrent"),
        seed=_seed(raw.get("seed", 0), where),
        name=_name(raw.get("name"), where),
        output_dir=_output_dir(raw.get("output_dir", "sweeps"), where),
        trial_cpus=_positive_number(raw.get("trial_cpus", 0.01), where, "trial_cpus"),
        max_trial_failures=_count(raw.get("max_trial_failures", 0), where, "max_trial_failures"),
    )
    check_sweep(sweep)
    return sweep


def _override_list(value: Any, where: str, key: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, dict):
        return [format_override(k, v) for k, v in value.items()]
    if isinstance(value, list) and all(isinstance(v, str) and "=" in v for v in value):
        return list(value)
    raise ConfigError(f"{where}: {key}: expected a mapping of dotted config keys to values")


def _choice(value: Any, valid: tuple, where: str, key: str) -> str:
    if value not in valid:
        raise ConfigError(f"{where}: {key}={value!r}: must be one of {', '.join(valid)}")
    return value


def _positive_int(value: Any, where: str, key: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"{where}: {key}={value!r}: must be a positive integer")
    return value


def _count(value: Any, where: str, key: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 1000:
        raise ConfigError(f"{where}: {key}={value!r}: must be an integer from 0 to 1000")
    return value


def _positive_number(value: Any, where: str, key: str, high: float = 1e6) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 < value <= high:
        raise ConfigError(f"{where}: {key}={value!r}: must be a number above 0 and at most {high:g}")
    return float(value)


def _seed(value: Any, where: str) -> int | None:
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 2**32):
        raise ConfigError(f"{where}: seed={value!r}: must be an integer from 0 to 2**32-1, or null")
    return value


def _name(value: Any, where: str) -> str | None:
    if value is not None and not (isinstance(value, str) and is_plain_name(value)):
        raise ConfigError(f"{where}: name={value!r}: {NAME_RULE}")
    return value


def _output_dir(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{where}: output_dir={value!r}: must be a folder or an s3:// / gs:// prefix")
    return value


def _asha(value: Any, where: str) -> AshaConfig:
    value = value or {}
    if not isinstance(value, dict) or set(value) - {"grace_period", "reduction_factor"}:
        raise ConfigError(f"{where}: asha: expected {{grace_period: STEPS, reduction_factor: N}}, got {value!r}")
    asha = AshaConfig(**value)
    if asha.grace_period is not None and (not isinstance(asha.grace_period, int) or asha.grace_period < 1):
        raise ConfigError(f"{where}: asha.grace_period={asha.grace_period!r}: must be a positive number of steps")
    if not isinstance(asha.reduction_factor, (int, float)) or asha.reduction_factor <= 1:
        raise ConfigError(f"{where}: asha.reduction_factor={asha.reduction_factor!r}: must be a number above 1")
    return asha


def _parse_space(value: Any, where: str) -> dict[str, Distribution]:
    if not isinstance(value, dict) or not value:
        raise ConfigError(f"{where}: space: expected a mapping of config keys to distributions, "
                          "e.g. optimizer.lr: {loguniform: [1.0e-4, 1.0e-2]}")
    space = {}
    for key, spec in value.items():
        label = f"{where}: space.{key}"
        if not isinstance(spec, dict) or len(spec) != 1:
            raise ConfigError(f"{label}: expected one distribution, e.g. {{loguniform: [1.0e-4, 1.0e-2]}}; "
                              f"valid: {', '.join(DISTRIBUTIONS)}")
        (kind, args), = spec.items()
        if kind not in DISTRIBUTIONS:
            raise ConfigError(f"{label}: {kind!r}: unknown distribution; valid: {', '.join(DISTRIBUTIONS)}")
        if not isinstance(args, list) or not args:
            raise ConfigError(f"{label}: {kind} takes a list, e.g. {kind}: [1, 2]")
        if kind in ("loguniform", "uniform", "randint"):
            if len(args) != 2 or not all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in args) \
                    or not args[0] < args[1]:
                raise ConfigError(f"{label}: {kind}: expected [low, high] numbers with low < high, got {args}")
            if kind == "loguniform" and args[0] <= 0:
                raise ConfigError(f"{label}: loguniform: low must be above 0, got {args[0]}")
            if kind == "randint" and not all(isinstance(a, int) for a in args):
                raise ConfigError(f"{label}: randint: expected integers, got {args}")
        space[str(key)] = Distribution(kind, tuple(args))
    return space


def check_sweep(sweep: Sweep) -> None:
    """One line for the first bad key or value, before anything runs."""
    where = str(sweep.path)
    try:
        base = sweep.base_config()
    except ConfigError as e:
        raise ConfigError(f"{where}: set/resources: {e}") from None
    for key, dist in sweep.space.items():
        if key.startswith(NOT_SEARCHABLE):
            raise ConfigError(f"{where}: space.{key}: cannot be searched; per-trial resources go in resources:, "
                              "and each trial's run name and directory are the sweep's")
        if key.startswith(SHARED_PREFIXES) or key in SHARED_KEYS:
            raise ConfigError(f"{where}: space.{key}: cannot be searched: every trial reads the one prepared "
                              "dataset (tokenised and packed once); set it for the whole sweep with set:")
        for value in dist.candidates():
            try:
                sweep.trial_config({key: value})
            except ConfigError as e:
                msg = str(e)
                raise ConfigError(f"{where}: space.{msg}" if msg.startswith(key) else f"{where}: space.{key}: {msg}"
                                  ) from None
    if sweep.search == "optuna" and any(d.kind == "grid" for d in sweep.space.values()):
        raise ConfigError(f"{where}: search=optuna: grid is not a distribution Optuna samples; use choice, "
                          "or search: random")
    if sweep.metric.startswith("val_") and base.data.val_fraction <= 0:
        raise ConfigError(f"{where}: metric={sweep.metric}: the base config holds out no data "
                          "(data.val_fraction=0); set data.val_fraction above 0")
    if sweep.scheduler == "asha":
        steps = max_steps(sweep)
        grace = grace_period(sweep, base)
        if grace >= steps:
            raise ConfigError(f"{where}: asha.grace_period={grace}: must be below train.max_steps={steps}, "
                              "or no trial can be stopped early")


def trial_count(sweep: Sweep) -> int:
    """Trials a finished sweep has: num_samples of every grid point (one point without a grid)."""
    points = 1
    for d in sweep.space.values():
        if d.kind == "grid":
            points *= len(d.values)
    return sweep.num_samples * points


def max_steps(sweep: Sweep) -> int:
    dist = sweep.space.get("train.max_steps")
    return int(max(dist.values)) if dist is not None else sweep.base_config().train.max_steps


def grace_period(sweep: Sweep, base: Config | None = None) -> int:
    base = base or sweep.base_config()
    return sweep.asha.grace_period or base.train.eval_every or max(1, base.train.max_steps // 4)


def sweep_location(path: str | Path) -> str | Path:
    """A sweep directory as raylm keeps it: a URI as a string, a local path made absolute."""
    where = storage.location(path)
    return where if storage.is_uri(where) else where.expanduser().resolve()


def sweep_dir_for(sweep: Sweep, now: dt.datetime | None = None) -> str | Path:
    """`output_dir/name` (name: the sweep's, else `<file stem>-<time>`), local or on object storage."""
    name = sweep.name or f"{sweep.path.stem}-{(now or dt.datetime.now()).strftime('%Y%m%d-%H%M%S')}"
    return sweep_location(storage.child(sweep.output_dir, name))


def tracking_group(sweep_dir: str | Path) -> str:
    """The name the trials' tracking runs are grouped under (`run.tracking_group`): the sweep
    directory's, unique among sweeps (`sweep_dir_for`)."""
    return storage.name_of(sweep_dir)


def save_sweep(sweep: Sweep, sweep_dir: str | Path) -> None:
    storage.write_bytes(storage.child(sweep_dir, SWEEP_FILE), yaml.safe_dump(sweep.to_dict(), sort_keys=False).encode())


def read_saved_sweep(sweep_dir: str | Path) -> Sweep:
    """The sweep a directory was started with (for `raylm tune --resume`)."""
    sweep_dir = sweep_location(sweep_dir)
    path = storage.child(sweep_dir, SWEEP_FILE)
    if not storage.is_file(path):
        raise ConfigError(f"--resume {sweep_dir}: not a sweep directory (no {SWEEP_FILE})")
    raw = yaml.safe_load(storage.read_bytes(path))
    space = {k: Distribution(kind, tuple(values)) for k, v in raw.pop("space").items() for kind, values in v.items()}
    asha = AshaConfig(**raw.pop("asha"))
    # the sweep file it started from gives the results their name (best.yaml's config_name, the
    # plot's title); a sweep.yaml written before it was kept names none
    source = Path(raw.pop("path", SWEEP_FILE))
    return Sweep(path=source, base=Path(raw.pop("base")), space=space, asha=asha, **raw)


# ---------------------------------------------------------------------------------------
# Results


@dataclass
class TrialOutcome:
    trial_id: str
    params: dict[str, Any]
    metric: float | None
    """The final value of the sweep's metric (None: the trial reported none)."""
    steps: int
    status: str
    """completed | stopped early by ASHA at step N | unfinished at step N (interrupted) | error: ..."""
    curve: list[tuple[int, float]]
    """(step, metric) at every evaluation."""
    run_dir: str
    checkpoint: str | None
    state: str = "completed"
    """What `status` says, as a field: completed | stopped | unfinished | error (`trial_state`)."""


UNFINISHED = "unfinished"


def trial_state(steps: int, max_steps_: int, error: str | None, stopped_at: int | None = None) -> str:
    """completed | stopped (by ASHA) | unfinished (interrupted) | error."""
    if error:
        return "error"
    if stopped_at is not None:
        return "stopped"
    return "completed" if steps >= max_steps_ else UNFINISHED


def trial_status(steps: int, max_steps_: int, error: str | None, stopped_at: int | None = None) -> str:
    """`trial_state` in words, for the results table."""
    state = trial_state(steps, max_steps_, error, stopped_at)
    if state == "error":
        return f"error: {error.strip().splitlines()[-1][:200]}"
    if state == "stopped":
        return f"stopped early by ASHA at step {stopped_at}"
    return state if state == "completed" else f"{UNFINISHED} at step {steps}"


def best_trial(outcomes: list[TrialOutcome], mode: str) -> TrialOutcome | None:
    scored = [o for o in outcomes if o.metric is not None and math.isfinite(o.metric) and o.state != "error"]
    completed = [o for o in scored if o.state == "completed"] or scored
    if not completed:
        return None
    return (min if mode == "min" else max)(completed, key=lambda o: o.metric)


def results_table(outcomes: list[TrialOutcome], sweep: Sweep) -> str:
    keys = list(sweep.space)
    headers = ["trial", *keys, sweep.metric, "steps", "status"]
    rows = [[o.trial_id, *(short_value(o.params.get(k)) for k in keys),
             "-" if o.metric is None else f"{o.metric:.4f}", str(o.steps), o.status] for o in outcomes]
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([line(headers), line(["-" * w for w in widths]), *(line(r) for r in rows)])


def short_value(value: Any) -> str:
    """A parameter value as a table cell: floats to 4 significant digits, None as "-"."""
    if isinstance(value, float):
        return f"{value:.4g}"
    return "-" if value is None else str(value)


def write_results(outcomes: list[TrialOutcome], sweep: Sweep, sweep_dir: str | Path) -> dict[str, str | Path]:
    """results.csv, results.json and val_loss.png (the metric's curves) in the sweep directory."""
    keys = list(sweep.space)
    csv_path, json_path = storage.child(sweep_dir, "results.csv"), storage.child(sweep_dir, "results.json")
    table = io.StringIO()
    writer = csv.writer(table)
    writer.writerow(["trial", *keys, sweep.metric, "steps", "status", "run_dir", "checkpoint"])
    for o in outcomes:
        writer.writerow([o.trial_id, *(o.params.get(k) for k in keys), o.metric, o.steps, o.status, o.run_dir,
                         o.checkpoint or ""])
    storage.write_bytes(csv_path, table.getvalue().encode())
    storage.write_bytes(json_path, (json.dumps({"metric": sweep.metric, "mode": sweep.mode,
                                                "trials": [dataclasses.asdict(o) for o in outcomes]}, indent=2)
                                    + "\n").encode())
    plot_path = plot_curves(outcomes, sweep, storage.child(sweep_dir, f"{sweep.metric}.png"))
    return {"csv": csv_path, "json": json_path, "plot": plot_path}


def plot_curves(outcomes: list[TrialOutcome], sweep: Sweep, out: str | Path) -> str | Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8.0, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for o in outcomes:
        if not o.curve:
            continue
        steps, values = zip(*o.curve)
        params = ", ".join(f"{k.split('.')[-1]}={short_value(v)}" for k, v in o.params.items())
        style = "-" if o.state == "completed" else ":"
        ax.plot(steps, values, style, marker=".", label=f"{o.trial_id}: {params}")
    ax.set_xlabel("step")
    ax.set_ylabel(sweep.metric.replace("_", " "))
    ax.set_title(f"{sweep.path.stem}: {sweep.metric} of every trial (dotted: stopped early)")
    ax.grid(alpha=0.3)
    if any(o.curve for o in outcomes):
        ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png")
    storage.write_bytes(out, png.getvalue())  # one upload on object storage
    return out


# ---------------------------------------------------------------------------------------
# The winner, as a training config


def best_config(sweep: Sweep, best: TrialOutcome, prepared_path: str | None, to_preset: str | None = None,
                to_overrides: list[str] = ()) -> tuple[Config, list[str]]:
    """A complete training config of the winning trial, and notes on what was carried over.

    `to_preset` scales it to another model: the model becomes that preset, keeping the proxy's
    vocabulary (so the tokenizer and prepared data still fit) and parametrisation; the searched
    `model.*` keys are dropped and every other hyperparameter is carried over as found.
    `to_overrides` (dotted, e.g. `model.n_layers=24`) are applied last."""
    from raylm.config import apply_override, config_from_dict

    extra = [f"data.prepared_path={prepared_path}"] if prepared_path else []
    proxy = sweep.trial_config(best.params, extra)
    notes = []
    scaled = bool(to_preset) or any(o.startswith("model.") for o in to_overrides)
    raw = proxy.to_dict()
    raw["run"].update(name=None, resume_from=None)
    raw["config_name"] = f"{sweep.path.stem}-best"
    if to_preset:
        model = {"preset": to_preset, "vocab_size": proxy.model.vocab_size}
        for name in ("parametrization", "mup_base_dim"):
            if name in raw["model"]:
                model[name] = raw["model"][name]
        raw["model"] = model
        dropped = [k for k in best.params if k.startswith("model.")]
        if dropped:
            notes.append(f"searched model keys not carried to the {to_preset} model: {', '.join(dropped)}")
    for item in to_overrides:
        apply_override(raw, item)
    if scaled and raw["model"].get("parametrization", "standard") != "mup":
        notes.append("the learning rate was found under standard parametrisation, where the best rate drifts "
                     "with width; sweep with model.parametrization=mup for a rate that transfers")
    try:
        cfg = config_from_dict(raw)
    except ConfigError as e:
        raise ConfigError(f"best.yaml: {e}") from None
    return cfg, notes
