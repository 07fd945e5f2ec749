"""The one way raylm joins Ray: the cluster at RAY_ADDRESS (as under `ray job submit`), or a local one it starts.

Token authentication stays as Ray sets it (on by default for new clusters since Ray 2.59):
raylm never sets RAY_AUTH_MODE. A local cluster raylm starts also keeps idle worker processes:
Ray keeps at most `num_workers_soft_limit` of them (by default one per CPU) and kills idle
task workers beyond it after a second. A streaming run holds more processes than CPUs even on
a laptop (tokenizer actors, the packing actor, Ray Data's own actors, training workers), so
on a small machine every read task landed in a freshly started worker that imported Ray Data
and pyarrow again: measured on 2 CPUs, reading a 68 MB corpus cost 17 CPU-seconds this way
and 3 with the workers kept (bench/RESULTS.md). A cluster started with `ray start` takes the
same setting from its nodes' environment (docs/cluster.md); raylm does not change a cluster
it joins.

The process is left as it was found: `RAY_num_workers_soft_limit` is in the environment only
while `ray.init` starts the raylet, and Ray Data's console settings (the current DataContext's
progress bars, the "ray.data" logger's level) are put back when the session ends. Ray picks
the local cluster's GCS port itself; nothing is bound and freed in between.

What the console shows. A user error raised in a worker reaches the user as raylm's one line:
every worker process of the job (a local cluster's or one joined at RAY_ADDRESS) runs
`raylm.ray.errors.hide_user_error_tracebacks` when it starts (Ray's
`worker_process_setup_hook`), and the driver does for the duration of the command, so Ray's
copies of the traceback go to Ray's log files only; the line names where those are. A lost
cluster is one line too (`raylm.ray.errors.ClusterLost`, exit status 1).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import sys
from pathlib import Path

import ray

from raylm.errors import RaylmError
from raylm.ray.compat import WORKERS_SOFT_LIMIT_VAR, environment
from raylm.ray.errors import ClusterLost, cluster_loss, user_error_tracebacks_hidden


def workers_soft_limit(cpus: int | None = None) -> int:
    """Idle worker processes a local cluster keeps: enough for a streaming run's processes."""
    return max(16, 2 * (cpus or os.cpu_count() or 1))


def local_cluster_env() -> dict[str, str]:
    """What the raylet of a local cluster raylm starts reads from the environment at its start
    (`raylm.ray.compat.environment` sets it for that start only; a value already set wins)."""
    return {WORKERS_SOFT_LIMIT_VAR: str(workers_soft_limit())}


def configure_local_cluster() -> None:
    """For a process that will start local clusters itself (the test session, bench scripts):
    set `local_cluster_env` for good. A value already in the environment wins. `ray_session`
    sets it only while it starts its cluster."""
    for key, value in local_cluster_env().items():
        os.environ.setdefault(key, value)


SETUP_HOOK = "raylm.ray.worker.setup"


@dataclasses.dataclass
class Session:
    """What this process joined: whether it started the cluster, and where Ray's logs are."""

    started: bool
    cluster: str = "the Ray cluster"
    logs: str | None = None


def _connect(worker_logs: bool) -> Session:
    """Join RAY_ADDRESS or start a local cluster (no-op when Ray is up).

    `worker_logs`: show the workers' output on this console (a sweep's trials keep theirs in
    their run directories instead)."""
    if ray.is_initialized():
        return Session(False)
    address = os.environ.get("RAY_ADDRESS")
    if address:
        context = ray.init(address=address, log_to_driver=worker_logs, runtime_env=_job_setup_hook())
        url = getattr(context, "dashboard_url", None)
        return Session(True, f"the Ray cluster at RAY_ADDRESS={address}",
                       "Ray's logs: `ray logs` on the cluster" + (f", or its dashboard http://{url}" if url else ""))
    # Workers must import raylm even where it is not installed (a source checkout). Ray picks
    # the GCS port itself; each worker learns the address from its runtime context
    # (`raylm.ray.worker.setup` sets RAY_ADDRESS there).
    root = str(Path(__file__).resolve().parents[2])
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
    env = {"env_vars": {"PYTHONPATH": path}, "worker_process_setup_hook": SETUP_HOOK}
    with environment(local_cluster_env()):  # read by the raylet as it starts; not kept after
        context = ray.init(address="local", runtime_env=env, log_to_driver=worker_logs)
    session_dir = context.address_info.get("session_dir")
    return Session(True, "the local Ray cluster", f"Ray's logs: {Path(session_dir) / 'logs'}" if session_dir else None)


def _job_setup_hook() -> dict:
    """The job's runtime_env addition for a cluster raylm joins: the console hook, unless the job
    was submitted (`ray job submit`, which passes its config in RAY_JOB_CONFIG_JSON_ENV_VAR)
    with a hook of its own: Ray refuses to merge two."""
    submitted = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") or "{}").get("runtime_env") or {}
    return {} if "worker_process_setup_hook" in submitted else {"worker_process_setup_hook": SETUP_HOOK}


@contextlib.contextmanager
def ray_session(progress_bars: bool = False, worker_logs: bool = True):
    """Connect for the duration of a command; shut down only a cluster this call started.

    A user error raised in Ray comes out as its one line naming Ray's logs (where its traceback
    went), a lost cluster as `ClusterLost`."""
    session = _connect(worker_logs)
    try:
        with _one_line(session), cluster_loss(), user_error_tracebacks_hidden(), quiet_console(progress_bars):
            yield
    finally:
        if session.started:
            ray.shutdown()


@contextlib.contextmanager
def _one_line(session: Session):
    """Say which cluster went away, and where a user error's traceback is."""
    amended = None
    try:
        yield
    except ClusterLost as e:
        amended = ClusterLost(e.cause, e.run_dir, session.cluster, session.logs)
    except RaylmError as e:
        if not (getattr(e, "raised_in_ray", False) and session.logs):
            raise
        amended = type(e)(f"{e} ({session.logs})")
    if amended is not None:
        raise amended


@contextlib.contextmanager
def quiet_console(progress_bars: bool = False):
    """For the session: keep the console to raylm's progress lines. Ray Data's per-dataset
    progress reports and its INFO lines repeat what metrics.jsonl and the dashboard hold. The
    DataContext is captured by trainer.fit() and sent to the workers, so it is set on the
    driver's current context; both it and the logger's level are put back afterwards."""
    ctx = ray.data.DataContext.get_current()
    logger = logging.getLogger("ray.data")
    before = (ctx.enable_progress_bars, ctx.print_on_execution_start, logger.level)
    ctx.enable_progress_bars = progress_bars and sys.stderr.isatty()
    ctx.print_on_execution_start = False
    logger.setLevel(max(logging.WARNING, logger.getEffectiveLevel()))
    try:
        yield
    finally:
        ctx.enable_progress_bars, ctx.print_on_execution_start, level = before
        logger.setLevel(level)
