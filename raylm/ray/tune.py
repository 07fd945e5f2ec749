"""`raylm tune`: Ray Tune runs a sweep's trials, each a real training through `fit(spec)`.

    tune_command(sweep, ...)   prepare the data once, run the Tuner, write results and best.yaml
    resume_command(dir, ...)   `raylm tune --resume DIR`: Tuner.restore, the finished trials kept
    trial(config, context)     one trial: its config from the sweep, then raylm's one fit function

A trial is a Tune function trainable that fits a TorchTrainer (the Train V2 pattern;
`Tuner(TorchTrainer)` is not a trainable in Ray 2.60). `EvalReports` forwards the trainer's
evaluation reports to Tune, so ASHA sees the held-out loss at every evaluation and each Tune
result is one evaluation. The sweep's logic (the file, its checks, the results) is
`raylm.sweep`, which knows nothing of Ray.

Trials read one prepared dataset in the sweep directory, tokenised and packed once before the
first trial. Each trial's run directory is `runs/<trial id>` with its checkpoints; a trial
restarted by Tune (a retry, or a resumed sweep) continues that run from its newest checkpoint.
The `raylm tune` process holds the sweep directory's lock (made and locked in one step; taken
first by `--resume`), and each trial holds its run directory's (`raylm.lock`).

Tracking (`run.tracking` in the base config): each trial is one tracking run, grouped under the
sweep (`run.tracking_group`, the sweep directory's name): a W&B group, and an MLflow parent run
made here before the first trial (`open_tracking_group`), under which every trial's run is made.

The sweep directory may be on object storage (`output_dir: s3://...`): every file raylm keeps
there goes through `raylm.storage`, and Tune's own state (`tune/`) is written through the same
pyarrow filesystem (`RunConfig(storage_path, storage_filesystem)`, as `raylm.ray.train` gives
Ray Train a run directory on a bucket), so a cluster whose nodes share no disk can run and
resume a sweep.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import time
from pathlib import Path
from typing import Any

import ray
from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler

from raylm import lock, storage
from raylm import sweep as sweeps
from raylm.errors import ConfigError, RaylmError
from raylm.ray.cluster import needs
from raylm.ray.compat import asha_merge_rungs, asha_rungs
from raylm.ray.connect import ray_session
from raylm.ray.errors import user_errors
from raylm.ray.train import storage_config
from raylm.sweep import Sweep, TrialOutcome
from raylm.train import checkpoint as ckpt
from raylm.train.tracking import check_available, close_sweep_parent, forwarded_env, open_sweep_parent


class SweepInterrupted(KeyboardInterrupt):
    def __init__(self, sweep_dir: str | Path):
        super().__init__(str(sweep_dir))
        self.sweep_dir = sweep_dir


# ---------------------------------------------------------------------------------------
# One trial


class EvalReports(TuneReportCallback):
    """Tune's report callback, forwarding only the trainer's evaluation reports (those that hold
    the sweep's metric): ASHA and the searchers see one result per evaluation."""

    def __init__(self, metric: str):
        super().__init__()
        self.metric = metric

    def after_report(self, run_context, metrics, checkpoint):
        if metrics and self.metric in metrics[0]:
            super().after_report(run_context, metrics, checkpoint)


@dataclasses.dataclass(frozen=True)
class TrialContext:
    sweep: Sweep
    sweep_dir: str
    prepared_path: str
    tracking_env: dict = dataclasses.field(default_factory=forwarded_env)
    """The sweep driver's tracker locations (MLFLOW_TRACKING_URI, ...), for the trials' trackers."""


def trial(config: dict[str, Any], context: TrialContext) -> None:
    """One Tune trial: the sweep's config with this trial's values, fitted by raylm's one fit function."""
    from raylm.ray.train import fit
    from raylm.train.runs import resolve_run

    os.environ.update(context.tracking_env)  # this trial's process: fit carries them to its workers
    trial_id = tune.get_context().get_trial_id()
    runs = storage.child(context.sweep_dir, sweeps.RUNS_DIR)
    run_dir = storage.child(runs, trial_id)
    extra = [f"run.output_dir={runs}", f"run.name={trial_id}", f"data.prepared_path={context.prepared_path}",
             f"run.tracking_group={sweeps.tracking_group(context.sweep_dir)}"]  # tracking runs under the sweep
    if storage.exists(run_dir):
        wait_for_lost_holder(run_dir)
        if ckpt.latest_checkpoint(run_dir) is not None:
            extra.append(f"run.resume_from={run_dir}")  # a retry or a resumed sweep continues the trial's run
        else:
            set_aside(runs, trial_id)
    cfg = context.sweep.trial_config(config["params"], extra)
    fit(resolve_run(cfg), wait_s=None, callbacks=[EvalReports(context.sweep.metric)])  # holds the run's lock


def wait_for_lost_holder(run_dir: str | Path) -> None:
    """A trial retried after its host was lost (a crash, a partition) finds its run directory's
    lock still held by the lost host's process, whose lease another host can only judge stale
    once its heartbeat is older than `lock.STALE_AFTER_S`: wait that long for it, rather than fail
    the retry at once. A holder still alive after that is one the next step names (LockHeld)."""
    deadline = time.monotonic() + lock.STALE_AFTER_S + lock.REFRESH_S
    while time.monotonic() < deadline:
        try:
            lock.check_free(run_dir, "trial run directory")
            return
        except lock.LockHeld:
            time.sleep(1.0)


def set_aside(runs: str | Path, trial_id: str) -> None:
    """A trial run that stopped before its first checkpoint starts again: what it wrote is copied
    to `<trial>.failed-<n>` and removed, under its lock, so a run another process still writes
    (a live lock) is never removed: LockHeld names that process instead."""
    run_dir = storage.child(runs, trial_id)
    with lock.acquire(run_dir, "trial run directory"):
        n = 1
        while storage.exists(aside := storage.child(runs, f"{trial_id}.failed-{n}")):
            n += 1
        # object storage has no rename; a run with no checkpoint is a few small files
        storage.make_dirs(aside)  # pyarrow's copy_files makes no local destination folder itself
        storage.copy_dir(run_dir, aside)
        storage.delete_file(storage.child(aside, lock.LOCK_FILE))
        storage.delete_dir_except(run_dir, lock.LOCK_FILE)
    if not storage.is_uri(run_dir):
        with contextlib.suppress(OSError):
            Path(run_dir).rmdir()  # empty once its lock is released; fit makes it again


# ---------------------------------------------------------------------------------------
# The Tuner


def _search_space(sweep: Sweep) -> dict[str, Any]:
    out = {}
    for key, d in sweep.space.items():
        lo_hi = d.values
        if d.kind == "loguniform":
            out[key] = tune.loguniform(*lo_hi)
        elif d.kind == "uniform":
            out[key] = tune.uniform(*lo_hi)
        elif d.kind == "randint":
            out[key] = tune.randint(lo_hi[0], lo_hi[1] + 1)  # both ends included
        elif d.kind == "choice":
            out[key] = tune.choice(list(d.values))
        else:
            out[key] = tune.grid_search(list(d.values))
    return out


def _search_alg(sweep: Sweep, max_concurrent: int = 1):
    if sweep.search == "optuna":
        try:
            from ray.tune.search import ConcurrencyLimiter
            from ray.tune.search.optuna import OptunaSearch

            searcher = OptunaSearch(metric=sweep.metric, mode=sweep.mode, seed=sweep.seed)
        except (ImportError, AssertionError):
            raise ConfigError(f"{sweep.path}: search=optuna needs the optuna package: "
                              "pip install 'raylm[tune]' (or search: random)") from None
        return ConcurrencyLimiter(searcher, max_concurrent=max_concurrent)
    from ray.tune.search.basic_variant import BasicVariantGenerator

    # TuneConfig.max_concurrent_trials does not reach a variant generator: it takes its own
    return BasicVariantGenerator(random_state=sweep.seed, max_concurrent=max_concurrent)


ASHA_STATE = "asha.json"


class RecordedASHA(ASHAScheduler):
    """ASHA that keeps its rungs and its early stops in the sweep directory.

    The results table says which trials ASHA stopped (and at which step) from this record
    rather than guessing from a short trial, and a resumed sweep (`Tuner.restore` unpickles the
    scheduler as it was at the start) reloads the rungs, so its decisions go on from the same
    evidence."""

    def __init__(self, state_path: str, *, time_attr: str, max_t: int, **kwargs):
        super().__init__(time_attr=time_attr, max_t=max_t, **kwargs)
        self.state_path, self.step_key, self.max_steps = state_path, time_attr, max_t
        self.stopped: dict[str, int] = {}

    def on_trial_result(self, tune_controller, trial, result):
        action = super().on_trial_result(tune_controller, trial, result)
        step = result.get(self.step_key)
        if action == self.STOP and step is not None and step < self.max_steps:
            self.stopped[trial.trial_id] = int(step)
        self._save()
        return action

    def _save(self) -> None:
        state = {"stopped": self.stopped,
                 "rungs": asha_rungs(self)}
        storage.write_bytes(self.state_path, json.dumps(state).encode())  # whole or not at all

    def __setstate__(self, state):
        self.__dict__.update(state)
        saved = read_asha_state(self.state_path)
        self.stopped = {**saved.get("stopped", {}), **self.stopped}
        asha_merge_rungs(self, saved.get("rungs", []))


def read_asha_state(path: str | Path) -> dict:
    try:
        return json.loads(storage.read_bytes(path))
    except (OSError, ValueError):
        return {}


def _scheduler(sweep: Sweep, sweep_dir: str | Path):
    if sweep.scheduler == "none":
        return None
    # stop_last_trials=False: a trial that reaches max_t ends by its fit() returning, so its
    # TorchTrainer releases its workers' placement group itself. A trial Tune stops is killed,
    # and Ray Train's PlacementGroupCleaner frees its group once it sees the controller gone
    # (through the State API: the cluster needs its dashboard).
    return RecordedASHA(str(storage.child(sweep_dir, ASHA_STATE)), time_attr="step", max_t=sweeps.max_steps(sweep),
                        grace_period=sweeps.grace_period(sweep), reduction_factor=sweep.asha.reduction_factor,
                        stop_last_trials=False)


def trials_that_fit(sweep: Sweep) -> int:
    """How many trials the cluster holds at once: its resources over one trial's (workers + driver)."""
    need = needs(sweep.base_config(), streaming=False)
    need["CPU"] = need.get("CPU", 0.0) + sweep.trial_cpus
    total = ray.cluster_resources()
    fits = [math.floor(total.get(name, 0.0) / amount + 1e-9) for name, amount in need.items() if amount > 0]
    return max(1, min(fits) if fits else 1)


def _trainable(sweep: Sweep, sweep_dir: str | Path, prepared_path: str):
    context = TrialContext(sweep, str(sweep_dir), prepared_path)
    return tune.with_resources(tune.with_parameters(trial, context=context), {"CPU": sweep.trial_cpus})


class Progress(tune.Callback):
    """One line per evaluation and per finished trial, in place of Tune's status tables."""

    def __init__(self, sweep: Sweep):
        self.sweep = sweep  # no logger held: Tune pickles its callbacks with its state

    @staticmethod
    def log(line: str) -> None:
        print(line, flush=True)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        value = result.get(self.sweep.metric)
        if value is not None:
            self.log(f"trial {trial.trial_id}: step {result.get('step')} {self.sweep.metric} {value:.4f}")

    def on_trial_complete(self, iteration, trials, trial, **info):
        step = (trial.last_result or {}).get("step", 0)
        done = "completed" if step >= sweeps.max_steps(self.sweep) else f"stopped at step {step}"
        self.log(f"trial {trial.trial_id}: {done} ({_params_text(trial.config.get('params', {}))})")

    def on_trial_error(self, iteration, trials, trial, **info):
        self.log(f"trial {trial.trial_id}: failed ({_params_text(trial.config.get('params', {}))})")


def _params_text(params: dict) -> str:
    return ", ".join(f"{k}={sweeps.short_value(v)}" for k, v in params.items())


def prepare_shared_data(sweep: Sweep, sweep_dir: str | Path, log) -> str:
    """Tokenise and pack once for every trial: the base config's prepared_path, else `prepared/`."""
    from raylm.ray.prepare import prepare

    base = sweep.base_config()
    path = base.data.prepared_path or str(storage.child(sweep_dir, sweeps.PREPARED_DIR))
    cfg = dataclasses.replace(base, data=dataclasses.replace(base.data, prepared_path=path))
    with user_errors():
        return str(prepare(cfg, log=log))


def _tuner(sweep: Sweep, sweep_dir: str | Path, prepared_path: str, log):
    max_concurrent = sweep.max_concurrent or trials_that_fit(sweep)
    tune_config = tune.TuneConfig(
        metric=sweep.metric, mode=sweep.mode, search_alg=_search_alg(sweep, max_concurrent),
        scheduler=_scheduler(sweep, sweep_dir), num_samples=sweep.num_samples,
        trial_dirname_creator=lambda t: t.trial_id)
    run_config = tune.RunConfig(
        name=sweeps.TUNE_DIR, **storage_config(sweep_dir), verbose=0, callbacks=[Progress(sweep)],
        failure_config=tune.FailureConfig(max_failures=sweep.max_trial_failures))
    log(f"sweep directory: {sweep_dir}; up to {max_concurrent} trial(s) at once")
    return tune.Tuner(_trainable(sweep, sweep_dir, prepared_path), param_space={"params": _search_space(sweep)},
                      tune_config=tune_config, run_config=run_config)


def tune_command(sweep: Sweep, *, to_preset: str | None = None, to_overrides: list[str] = (),
                 log=print) -> str | Path:
    """`raylm tune SWEEP.yaml`: run every trial, then write the results and best.yaml; the sweep directory."""
    sweep_dir = sweeps.sweep_dir_for(sweep)
    try:  # an unreachable endpoint or a missing bucket: one line, before anything runs
        storage.check_reachable(sweep.output_dir, "output_dir")
    except ConfigError as e:
        raise ConfigError(f"{sweep.path}: {e}") from None
    if sweep.search == "optuna":
        _search_alg(sweep)  # a missing optuna is said before anything is written
    with storage.errors(sweep_dir, "output_dir", ConfigError):
        try:  # the sweep directory is made and locked at once: of two sweeps of one name, one starts
            held = lock.create(sweep_dir, "sweep directory")
        except FileExistsError:
            raise ConfigError(f"{sweep_dir}: already exists; continue it with raylm tune --resume {sweep_dir}, "
                              "or choose another name") from None
    with held, ray_session(worker_logs=False):
        sweeps.save_sweep(sweep, sweep_dir)
        open_tracking_group(sweep, sweep_dir, log)
        prepared_path = prepare_shared_data(sweep, sweep_dir, log)
        grid = _fit(_tuner(sweep, sweep_dir, prepared_path, log), sweep_dir)
        return finish(sweep, sweep_dir, grid, prepared_path, to_preset, to_overrides, log)


def resume_command(sweep_dir: str | Path, *, to_preset: str | None = None, to_overrides: list[str] = (),
                   log=print) -> str | Path:
    """`raylm tune --resume DIR`: restore the Tuner; finished trials are kept, unfinished ones continue.
    The sweep directory is locked first: a second --resume of it stops in one line naming the first."""
    sweep_dir = sweeps.sweep_location(sweep_dir)
    storage.check_reachable(sweep_dir, "--resume")
    sweep = sweeps.read_saved_sweep(sweep_dir)
    with lock.acquire(sweep_dir, "sweep directory"):
        tune_path = storage.child(sweep_dir, sweeps.TUNE_DIR)
        where = storage_config(tune_path)
        tune_fs_path, tune_fs = where["storage_path"], where.get("storage_filesystem")
        if not tune.Tuner.can_restore(tune_fs_path, storage_filesystem=tune_fs):
            raise ConfigError(f"--resume {sweep_dir}: no Tune state to resume ({tune_path} is missing or empty); "
                              "start the sweep again")
        with ray_session(worker_logs=False):
            open_tracking_group(sweep, sweep_dir, log)
            prepared_path = prepare_shared_data(sweep, sweep_dir, log)
            tuner = tune.Tuner.restore(tune_fs_path, trainable=_trainable(sweep, sweep_dir, prepared_path),
                                       resume_unfinished=True, resume_errored=True, storage_filesystem=tune_fs)
            log(f"resuming sweep {sweep_dir}")
            grid = _fit(tuner, sweep_dir)
            return finish(sweep, sweep_dir, grid, prepared_path, to_preset, to_overrides, log)


def open_tracking_group(sweep: Sweep, sweep_dir: str | Path, log) -> None:
    """With MLflow tracking, the sweep's parent run, made (or found again) before any trial starts,
    so that concurrent trials never race to make it; W&B groups by name alone."""
    trackers = sweep.base_config().run.tracking
    check_available(trackers)  # a missing package is said before any trial starts
    if "mlflow" in trackers:
        open_sweep_parent(sweeps.tracking_group(sweep_dir), log)


def _fit(tuner, sweep_dir: str | Path):
    with user_errors():
        return tuner.fit()


# ---------------------------------------------------------------------------------------
# Results


def outcomes(sweep: Sweep, sweep_dir: str | Path, grid) -> list[TrialOutcome]:
    steps_max = sweeps.max_steps(sweep)
    stopped = read_asha_state(storage.child(sweep_dir, ASHA_STATE)).get("stopped", {})
    out = []
    for result in grid:
        trial_id = (result.metrics or {}).get("trial_id") or storage.name_of(result.path)
        metrics = result.metrics or {}
        value = metrics.get(sweep.metric)
        steps = int(metrics.get("step", 0) or 0)
        run_dir = storage.child(sweep_dir, sweeps.RUNS_DIR, trial_id)
        latest = ckpt.latest_checkpoint(run_dir)  # None when the trial wrote no run directory
        curve = _curve(run_dir, sweep.metric)
        error = str(result.error) if result.error else None
        out.append(TrialOutcome(
            trial_id=trial_id, params=dict((result.config or {}).get("params", {})),
            metric=float(value) if value is not None else None, steps=steps,
            status=sweeps.trial_status(steps, steps_max, error, stopped.get(trial_id)),
            curve=curve, run_dir=str(run_dir), checkpoint=str(latest) if latest else None,
            state=sweeps.trial_state(steps, steps_max, error, stopped.get(trial_id))))
    return sorted(out, key=lambda o: o.trial_id)


def _curve(run_dir: str | Path, metric: str) -> list[tuple[int, float]]:
    """(step, metric) at every evaluation of the trial's run, from step 0, as its metrics.jsonl holds them."""
    from raylm.use.plot import read_metrics, series

    path = storage.child(run_dir, "metrics.jsonl")
    if not storage.is_file(path):
        return []
    steps, values = series(read_metrics(path)[0], metric)
    return [(s, v) for s, v in zip(steps, values) if v == v]


def finish(sweep: Sweep, sweep_dir: str | Path, grid, prepared_path: str, to_preset: str | None,
           to_overrides: list[str], log) -> str | Path:
    results = outcomes(sweep, sweep_dir, grid)
    log(sweeps.results_table(results, sweep))
    # Ctrl-C: Tune saved its state and returned, with trials unfinished or not yet created
    if len(results) < sweeps.trial_count(sweep) or any(o.state == sweeps.UNFINISHED for o in results):
        raise SweepInterrupted(sweep_dir)
    paths = sweeps.write_results(results, sweep, sweep_dir)
    best = sweeps.best_trial(results, sweep.mode)
    if best is None:
        raise RaylmError(f"{sweep_dir}: no trial reported {sweep.metric}; see results.csv for each trial's status")
    cfg, notes = sweeps.best_config(sweep, best, prepared_path, to_preset, list(to_overrides))
    best_path = storage.child(sweep_dir, "best.yaml")
    storage.write_bytes(best_path, cfg.to_yaml().encode())
    if "mlflow" in sweep.base_config().run.tracking:
        close_sweep_parent(sweeps.tracking_group(sweep_dir), [paths["csv"], paths["json"], paths["plot"], best_path])
    log(f"best trial {best.trial_id}: {sweep.metric} {best.metric:.4f} ({_params_text(best.params)})")
    for note in notes:
        log(f"note: {note}")
    log(f"results: {paths['csv']}, {paths['json']}, {paths['plot']}")
    log(f"train the winner: raylm train {best_path}")
    return sweep_dir
