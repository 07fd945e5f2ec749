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
from raylm.ray.errors import ClusterLost, cluster_loss, user_error_tracebacks_hidden

WORKERS_SOFT_LIMIT_VAR = "RAY_num_workers_soft_limit"


def workers_soft_limit(cpus: int | None = None) -> int:
    """Idle worker processes a local cluster keeps: enough for a streaming run's processes."""
    return max(16, 2 * (cpus or os.cpu_count() or 1))


def configure_local_cluster() -> None:
    """Call before `ray.init` starts a local cluster: its raylet reads these variables.
    A value already in the environment wins."""
    os.environ.setdefault(WORKERS_SOFT_LIMIT_VAR, str(workers_soft_limit()))


SETUP_HOOK = "raylm.ray.worker.setup"


@dataclasses.dataclass
class Session:
    """What this process joined: whether it started the cluster, and where Ray's logs are."""

    started: bool
    cluster: str = "the Ray cluster"
    logs: str | None = None


def connect(progress_bars: bool = False, worker_logs: bool = True) -> bool:
    """Join RAY_ADDRESS or start a local cluster (no-op when Ray is up); True if this call started Ray.

    `worker_logs`: show the workers' output on this console (a sweep's trials keep theirs in
    their run directories instead)."""
    return _connect(progress_bars, worker_logs).started


def _connect(progress_bars: bool, worker_logs: bool) -> Session:
    if ray.is_initialized():
        quiet_console(progress_bars)
        return Session(False)
    address = os.environ.get("RAY_ADDRESS")
    if address:
        context = ray.init(address=address, log_to_driver=worker_logs, runtime_env=_job_setup_hook())
        url = getattr(context, "dashboard_url", None)
        session = Session(True, f"the Ray cluster at RAY_ADDRESS={address}",
                          "Ray's logs: `ray logs` on the cluster" + (f", or its dashboard http://{url}" if url else ""))
    else:
        # Workers must import raylm even where it is not installed (a source checkout).
        root = str(Path(__file__).resolve().parents[2])
        path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
        configure_local_cluster()
        with _gcs_port() as gcs_address:
            # RAY_ADDRESS in the workers: Ray's own in-cluster State API calls (Ray Train's
            # PlacementGroupCleaner, which frees the workers of a trial Tune stops) otherwise
            # look for "the" Ray instance and fail when the machine runs more than one.
            env = {"env_vars": {"PYTHONPATH": path, "RAY_ADDRESS": gcs_address},
                   "worker_process_setup_hook": SETUP_HOOK}
            context = ray.init(address="local", runtime_env=env, log_to_driver=worker_logs)
        session_dir = context.address_info.get("session_dir")
        session = Session(True, "the local Ray cluster",
                          f"Ray's logs: {Path(session_dir) / 'logs'}" if session_dir else None)
    quiet_console(progress_bars)
    return session


def _job_setup_hook() -> dict:
    """The job's runtime_env addition for a cluster raylm joins: the console hook, unless the job
    was submitted (`ray job submit`, which passes its config in RAY_JOB_CONFIG_JSON_ENV_VAR)
    with a hook of its own: Ray refuses to merge two."""
    submitted = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") or "{}").get("runtime_env") or {}
    return {} if "worker_process_setup_hook" in submitted else {"worker_process_setup_hook": SETUP_HOOK}


@contextlib.contextmanager
def _gcs_port():
    """A free port for the local cluster's GCS (RAY_GCS_SERVER_PORT, read when Ray starts) and its address."""
    import socket

    from ray._private.services import get_node_ip_address

    with socket.socket() as s:
        s.bind(("", 0))
        port = s.getsockname()[1]
    before = os.environ.get("RAY_GCS_SERVER_PORT")
    os.environ["RAY_GCS_SERVER_PORT"] = str(port)
    try:
        yield f"{get_node_ip_address()}:{port}"
    finally:
        if before is None:
            os.environ.pop("RAY_GCS_SERVER_PORT", None)
        else:
            os.environ["RAY_GCS_SERVER_PORT"] = before


@contextlib.contextmanager
def ray_session(progress_bars: bool = False, worker_logs: bool = True):
    """Connect for the duration of a command; shut down only a cluster this call started.

    A user error raised in Ray comes out as its one line naming Ray's logs (where its traceback
    went), a lost cluster as `ClusterLost`."""
    session = _connect(progress_bars, worker_logs)
    try:
        with _one_line(session), cluster_loss(), user_error_tracebacks_hidden():
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


def quiet_console(progress_bars: bool = False) -> None:
    """Keep the console to raylm's progress lines: Ray Data's per-dataset progress reports and
    Ray Train's per-report INFO lines repeat what metrics.jsonl and the dashboard hold."""
    ctx = ray.data.DataContext.get_current()  # captured by trainer.fit() and sent to the workers
    ctx.enable_progress_bars = progress_bars and sys.stderr.isatty()
    ctx.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
