"""Experiment tracking: a run's metrics, resolved config and final files sent to MLflow and/or W&B.

Torch core, no Ray. `run.tracking: [mlflow]`, `[wandb]` or `[mlflow, wandb]` (default `[]`: none).
The trackers get copies: metrics.jsonl and TensorBoard (`raylm.train.metrics.MetricsWriter`,
which owns the `Tracking`) are written as before, whatever a tracker does.

    one tracking run per raylm run   only rank 0's MetricsWriter opens a Tracking (on the Ray
                                     path, under --local and torchrun alike)
    resumes continue it              its ids are kept in the run directory's tracking.json
                                     (written through raylm.storage: works on s3:// too); a run
                                     continued in place, a restart or a resize reopen that run
    sweeps group their trials        `run.tracking_group` (set by `raylm tune` to the sweep's
                                     name): an MLflow parent run tagged `raylm.sweep`, a W&B group
    where                            MLflow: MLFLOW_TRACKING_URI (else mlflow's default), the
                                     experiment MLFLOW_EXPERIMENT_NAME (else "raylm"). W&B: the
                                     project WANDB_PROJECT (else "raylm"), WANDB_MODE=offline
                                     honoured, its files under WANDB_DIR, else the run directory
                                     (a local one), else the working directory

Failures never reach training: every tracker call runs on one background thread fed by a
queue, so a slow or dead server never stalls a step. A tracker that fails (down at the start,
refusing, or dying mid-run) is one warning line, then left alone for the rest of the run;
the others go on. Closing waits at most CLOSE_WAIT_S for what is queued.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import queue
import shutil
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from raylm import storage
from raylm.errors import ConfigError

TRACKING_FILE = "tracking.json"
"""In the run directory: each tracker's run id (and MLflow's URI), so a resume continues that run."""
EXTRA = "raylm[track]"
CLOSE_WAIT_S = 60.0
"""Longest wait, when the run ends, for the tracker calls still queued."""
MAX_QUEUED = 10_000
"""Records held for a tracker that falls behind; beyond it they are dropped (one warning line)."""
MLFLOW_HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                        "MLFLOW_HTTP_REQUEST_TIMEOUT": "20"}
"""MLflow's client retries a dead server for minutes by default; a training run gives up sooner
(a user's own values of these variables win)."""
ARTIFACT_SUFFIXES = (".png", ".json", ".yaml", ".jsonl")
ARTIFACT_FOLDERS = ("plots",)
"""Sent as artifacts when the run ends: the run directory's top-level files with these suffixes
(config.yaml, metrics.jsonl, an eval JSON written there; not tracking.json) and those of
plots/ (`raylm plot`, e.g. before a resume)."""


FORWARDED_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "WANDB_MODE", "WANDB_PROJECT", "WANDB_ENTITY",
                 "WANDB_DIR", "WANDB_BASE_URL")
"""Where the trackers write, as the command's environment says: carried from the driver to the
Ray workers (and Tune trials) that track, whose processes were started with the cluster's
environment. Credentials (WANDB_API_KEY, MLFLOW_TRACKING_TOKEN, ...) are never carried: set them
on the cluster."""


def forwarded_env() -> dict[str, str]:
    """This process's FORWARDED_ENV variables that are set (the driver's, for its workers)."""
    return {k: os.environ[k] for k in FORWARDED_ENV if os.environ.get(k)}


def check_available(names: list[str]) -> None:
    """A tracker whose package is missing: one line naming the extra (before any step runs)."""
    missing = [n for n in names if importlib.util.find_spec(n) is None]
    if missing:
        raise ConfigError(f"run.tracking: {', '.join(missing)} not installed; pip install '{EXTRA}'")


def flat_params(tree: dict, prefix: str = "") -> dict[str, Any]:
    """The resolved config as dotted keys (model.dim, optimizer.lr, ...): numbers, text, true/false
    and null as they are, lists as JSON text."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flat_params(value, dotted + "."))
        else:
            out[dotted] = json.dumps(value) if isinstance(value, (list, tuple)) else value
    return out


def param_text(value: Any) -> str:
    """An MLflow param's text (at most 6000 characters): text as it is, anything else as JSON."""
    return (value if isinstance(value, str) else json.dumps(value))[:6000]


def numeric_metrics(record: dict) -> dict[str, float]:
    """A metrics row's finite numbers, without its step and wall time (they are its coordinates)."""
    return {k: float(v) for k, v in record.items()
            if k not in ("step", "time") and isinstance(v, (int, float)) and not isinstance(v, bool)
            and math.isfinite(v)}


def _warn(line: str) -> None:
    sys.stderr.write(f"raylm: warning: {line}\n")
    sys.stderr.flush()


def _info(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:300]}" if text else type(e).__name__


# ---------------------------------------------------------------------------------------
# Backends: each runs on the Tracking thread only.


class _MLflow:
    name = "mlflow"

    def __init__(self, saved: dict | None, run_name: str, group: str | None, params: dict[str, Any]):
        for key, value in MLFLOW_HTTP_DEFAULTS.items():
            os.environ.setdefault(key, value)
        import mlflow
        from mlflow.tracking import MlflowClient

        self.uri = os.environ.get("MLFLOW_TRACKING_URI") or (saved or {}).get("tracking_uri") \
            or mlflow.get_tracking_uri()
        self.where = f"mlflow at {self.uri}"
        self.client = MlflowClient(self.uri)
        self.resumed = bool(saved and saved.get("run_id"))
        if self.resumed:
            self.run_id = saved["run_id"]
            self.client.update_run(self.run_id, status="RUNNING")
            return
        experiment_id = experiment(self.client)
        tags = {"raylm.run": run_name}
        if group:
            tags["raylm.sweep"] = group
            parent = find_sweep_parent(self.client, experiment_id, group)
            if parent is not None:
                tags["mlflow.parentRunId"] = parent
        self.run_id = self.client.create_run(experiment_id, run_name=run_name, tags=tags).info.run_id
        from mlflow.entities import Param

        items = [Param(k, param_text(v)) for k, v in params.items()]
        for i in range(0, len(items), 100):  # the REST API takes 100 params per request
            self.client.log_batch(self.run_id, params=items[i:i + 100], synchronous=True)

    def state(self) -> dict:
        return {"tracking_uri": self.uri, "run_id": self.run_id}

    def describe(self) -> str:
        return f"MLflow run {self.run_id} at {self.uri}"

    def metrics(self, rows: list[tuple[int, float, dict[str, float]]]) -> None:
        from mlflow.entities import Metric

        items = [Metric(k, v, int(t * 1000), step) for step, t, values in rows for k, v in values.items()]
        for i in range(0, len(items), 1000):
            self.client.log_batch(self.run_id, metrics=items[i:i + 1000], synchronous=True)

    def note(self, key: str, value: str) -> None:
        self.client.set_tag(self.run_id, key, value)

    def artifacts(self, files: list[tuple[Path, str | None]]) -> None:
        for path, folder in files:
            self.client.log_artifact(self.run_id, str(path), artifact_path=folder)

    def close(self, status: str) -> None:
        self.client.set_terminated(self.run_id, status)


def experiment(client) -> str:
    name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or "raylm"
    found = client.get_experiment_by_name(name)
    return found.experiment_id if found is not None else client.create_experiment(name)


def find_sweep_parent(client, experiment_id: str, group: str) -> str | None:
    runs = client.search_runs([experiment_id], filter_string=f"tags.`raylm.sweep_parent` = '{group}'",
                              max_results=1, order_by=["attributes.start_time ASC"])
    return runs[0].info.run_id if runs else None


def open_sweep_parent(group: str, log: Callable[[str], None]) -> str | None:
    """`raylm tune`, before its trials start: the sweep's MLflow parent run (found again on a
    resumed sweep), under which each trial's run is created. A server that is down: one
    warning line, and the trials log without a parent (still tagged `raylm.sweep`)."""
    for key, value in MLFLOW_HTTP_DEFAULTS.items():
        os.environ.setdefault(key, value)
    try:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(os.environ.get("MLFLOW_TRACKING_URI") or None)
        experiment_id = experiment(client)
        run_id = find_sweep_parent(client, experiment_id, group)
        if run_id is None:
            run_id = client.create_run(experiment_id, run_name=group,
                                       tags={"raylm.sweep_parent": group, "raylm.sweep": group}).info.run_id
        log(f"tracking: sweep {group} is MLflow run {run_id} at {client.tracking_uri}")
        return run_id
    except Exception as e:  # noqa: BLE001 - a tracker never stops a sweep
        _warn(f"tracking: the sweep's MLflow parent run could not be made ({_first_line(e)}); "
              "trials are logged without it")
        return None


def close_sweep_parent(group: str, files: list[str | Path]) -> None:
    """`raylm tune`, when the sweep has finished: its results (table, plot, best.yaml) as the
    parent run's artifacts, and the parent run FINISHED. A failure is one warning line."""
    try:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(os.environ.get("MLFLOW_TRACKING_URI") or None)
        run_id = find_sweep_parent(client, experiment(client), group)
        if run_id is None:
            return
        with tempfile.TemporaryDirectory(prefix="raylm-tracking-") as tmp:
            for path in files:
                local = Path(tmp) / storage.name_of(path)
                local.write_bytes(storage.read_bytes(path))
                client.log_artifact(run_id, str(local))
        client.set_terminated(run_id, "FINISHED")
    except Exception as e:  # noqa: BLE001 - the sweep's own results are written already
        _warn(f"tracking: the sweep's results could not be sent to its MLflow parent run ({_first_line(e)})")


class _Wandb:
    name = "wandb"

    def __init__(self, saved: dict | None, run_name: str, group: str | None, params: dict[str, Any],
                 local_dir: Path | None):
        import wandb

        run_id = (saved or {}).get("run_id") or uuid.uuid4().hex[:12]
        directory = os.environ.get("WANDB_DIR") or (str(local_dir) if local_dir is not None else None)
        self.where = f"wandb ({os.environ.get('WANDB_MODE') or 'online'})"
        self.resumed = bool(saved)
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT") or "raylm", id=run_id, name=run_name, group=group,
            resume="allow", dir=directory, config=params if not saved else None, reinit="create_new",
            settings=wandb.Settings(console="off", silent=True, x_disable_stats=True))
        self.run.define_metric("*", step_metric="step")  # a rewound step is logged again at its step
        self.run_id = run_id

    def state(self) -> dict:
        return {"run_id": self.run_id}

    def describe(self) -> str:
        return f"W&B run {self.run_id} ({self.where}) in {self.run.dir}"

    def metrics(self, rows: list[tuple[int, float, dict[str, float]]]) -> None:
        for step, _, values in rows:
            self.run.log({"step": step, **values})

    def note(self, key: str, value: str) -> None:
        self.run.summary[key] = value

    def artifacts(self, files: list[tuple[Path, str | None]]) -> None:
        # Copied (run.save only links, and these copies are temporary) into the run's files
        # folder, which W&B uploads when the run finishes (or `wandb sync` an offline run);
        # under raylm/ so that W&B's own config.yaml there is left alone.
        for path, folder in files:
            dest = Path(self.run.dir) / "raylm" / (folder or "") / path.name
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, dest)

    def close(self, status: str) -> None:
        self.run.finish(exit_code=0 if status == "FINISHED" else 1)


# ---------------------------------------------------------------------------------------


class Tracking:
    """Rank 0's tracking runs for one raylm run: `metrics(record)` every row, `rewind(step)` after a
    restore, `close(status)` at the end (sends the run directory's final files). Never raises."""

    def __init__(self, names: list[str], run_dir: str | Path, params: dict, *, group: str | None = None):
        self.names, self.run_dir = list(names), run_dir
        self.params = flat_params(params)
        self.group = group
        self.run_name = storage.name_of(run_dir)
        self._queue: queue.Queue = queue.Queue(maxsize=MAX_QUEUED)
        self._dropped = 0
        self._closed = False
        self.backends: list = []
        self.warnings: list[str] = []
        self._thread = threading.Thread(target=self._work, name="raylm-tracking", daemon=True)
        self._thread.start()

    # -- the training side: enqueue only ------------------------------------------------------

    def metrics(self, record: dict) -> None:
        if "step" not in record:
            return
        self._put(("metrics", (int(record["step"]), float(record.get("time") or time.time()),
                               numeric_metrics(record))))

    def rewind(self, step: int) -> None:
        if step > 0:
            self._put(("note", ("raylm.restored_at_step", str(step))))

    def close(self, status: str = "FINISHED") -> None:
        """Send the final files, end the tracking runs (FINISHED, FAILED or KILLED), and wait (at
        most CLOSE_WAIT_S) for the queue."""
        if self._closed:
            return
        self._closed = True
        self._queue.put(("close", status))  # blocks only while the queue is full, which the worker drains
        self._thread.join(CLOSE_WAIT_S)
        if self._thread.is_alive():
            _warn(f"tracking: gave up after {CLOSE_WAIT_S:.0f} s waiting for "
                  f"{', '.join(b.where for b in self.backends) or ', '.join(self.names)}; "
                  f"{self._queue.qsize()} queued item(s) not sent (metrics.jsonl has every record)")
        if self._dropped:
            _warn(f"tracking: {self._dropped} metrics row(s) were dropped: the tracker fell behind by "
                  f"{MAX_QUEUED} rows (metrics.jsonl has every record)")

    def _put(self, item) -> None:
        if self._closed:
            return
        try:
            self._queue.put_nowait(item)
        except queue.Full:
            self._dropped += 1

    # -- the tracking thread --------------------------------------------------------------------

    def _fail(self, where: str, e: BaseException) -> None:
        line = (f"tracking: {where} failed ({_first_line(e)}); training goes on without it "
                "(metrics.jsonl and TensorBoard keep every record)")
        self.warnings.append(line)
        _warn(line)

    def _work(self) -> None:
        self._open()
        held = None  # an item read while gathering a backlog of metrics rows
        while True:
            kind, payload = held or self._queue.get()
            held = None
            if kind == "metrics":
                rows = [payload]
                while len(rows) < 100:  # a backlog goes in one request per tracker
                    try:
                        item = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if item[0] != "metrics":
                        held = item
                        break
                    rows.append(item[1])
                self._each(lambda b: b.metrics(rows))
            elif kind == "note":
                self._each(lambda b: b.note(*payload))
            elif kind == "close":
                self._finish(payload)
                return

    def _each(self, call) -> None:
        for backend in list(self.backends):
            try:
                call(backend)
            except Exception as e:  # noqa: BLE001 - a tracker never fails the run
                self.backends.remove(backend)
                self._fail(backend.where, e)

    def _open(self) -> None:
        saved = self._read_saved()
        local_dir = None if storage.is_uri(self.run_dir) else Path(self.run_dir)
        for name in self.names:
            try:
                if name == "mlflow":
                    backend = _MLflow(saved.get(name), self.run_name, self.group, self.params)
                else:
                    backend = _Wandb(saved.get(name), self.run_name, self.group, self.params, local_dir)
            except Exception as e:  # noqa: BLE001 - a tracker that is down is one warning line
                where = name if name != "mlflow" else f"mlflow at {os.environ.get('MLFLOW_TRACKING_URI') or 'its default URI'}"
                self._fail(where, e)
                continue
            self.backends.append(backend)
            saved[name] = backend.state()
            _info(f"tracking: {'continuing' if backend.resumed else 'new'} {backend.describe()}")
        if self.backends:
            try:
                storage.write_bytes(storage.child(self.run_dir, TRACKING_FILE),
                                    (json.dumps(saved, indent=1) + "\n").encode())
            except Exception as e:  # noqa: BLE001
                _warn(f"tracking: {TRACKING_FILE} could not be written ({_first_line(e)}); "
                      "a resume will start a new tracking run")

    def _read_saved(self) -> dict:
        try:
            saved = json.loads(storage.read_bytes(storage.child(self.run_dir, TRACKING_FILE)))
            return saved if isinstance(saved, dict) else {}
        except FileNotFoundError:
            return {}
        except Exception as e:  # noqa: BLE001 - damaged: new tracking runs, and say so
            _warn(f"tracking: {storage.child(self.run_dir, TRACKING_FILE)} is not readable ({_first_line(e)}); "
                  "starting new tracking runs")
            return {}

    def _finish(self, status: str) -> None:
        with tempfile.TemporaryDirectory(prefix="raylm-tracking-") as tmp:
            files = self._final_files(Path(tmp))
            if files:
                self._each(lambda b: b.artifacts(files))
            self._each(lambda b: b.close(status))

    def _final_files(self, tmp: Path) -> list[tuple[Path, str | None]]:
        """Local copies of the run directory's final files, each with the folder it goes under:
        its top-level config, metrics, JSON (an eval JSON written there) and PNGs, and plots/."""
        out = []
        for folder in (None, ARTIFACT_FOLDERS[0]):
            where = self.run_dir if folder is None else storage.child(self.run_dir, folder)
            try:
                infos = storage.list_dir(where)
            except Exception:  # noqa: BLE001 - no such folder
                continue
            for info in infos:
                name = storage.name_of(info.path)
                if info.type.name != "File" or not name.endswith(ARTIFACT_SUFFIXES) or name == TRACKING_FILE:
                    continue
                local = tmp / (folder or "") / name
                local.parent.mkdir(parents=True, exist_ok=True)
                try:
                    local.write_bytes(storage.read_bytes(storage.child(where, name)))
                except Exception:  # noqa: BLE001 - a file that went away is not sent
                    continue
                out.append((local, folder))
        return sorted(out)
