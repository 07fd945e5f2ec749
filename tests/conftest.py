"""Shared fixtures: one local Ray cluster (2 CPUs) for the whole session, started on first use.

RAY_AUTH_MODE=disabled is set at import so every Ray client of the session agrees (Ray
2.59+ turns on token auth for new local clusters), and the repository root is put on
PYTHONPATH (with tests/) so Ray's worker processes import the same `raylm` and test modules.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
os.environ["RAY_AUTH_MODE"] = "disabled"
os.environ["PYTHONPATH"] = os.pathsep.join(  # train functions defined in test modules unpickle in workers
    p for p in (str(REPO_ROOT), str(REPO_ROOT / "tests"), os.environ.get("PYTHONPATH")) if p
)
# Ray Train's wait for a worker group's placement group (only that, not the workers' start): a
# group sized from a stale view of the cluster never places and is retried smaller after it,
# so the wait bounds that cost; raylm/ray/elastic.py keeps the view fresh, so Ray's default 60 s
# is kept: a group may also wait for a previous run's workers to free their CPUs on a busy machine.
os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "60")
# Ray Train's controller polls its workers every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (2 s) and takes
# one `ray.train.report` per poll from each worker's queue of 1: a run reporting every step (the
# tests' log_every=1, checkpoint_every=2) trains at most a step per 2 s, and every start, end,
# death and resize is seen up to 2 s late. 0.5 s here; a poll that takes longer is not a failure
# (Ray waits on it at the next poll; a worker is declared dead after 10 minutes, kept). Every Ray
# process of the session inherits it: in-process clusters, `ray start`, subprocesses' clusters.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))


# `pytest -n 2` (pytest-xdist; `--dist loadfile` in pyproject: a module's tests, and its module
# fixtures such as a cluster, stay in one worker). Most of the long modules' time is waiting (a
# node's death to be noticed, a worker group to start, an autoscaler's tick), so two workers on 2
# cores overlap those waits. The modules below start first, longest first (seconds of the last
# fresh-clone run of .ci/run), so that no long module starts last; the others follow in file order.
# A wrong or missing entry costs time, never a result.
LONGEST_FIRST = (
    "test_hosts.py",            # 748 s: one cluster of namespace hosts, three faults
    "test_hosts_autoscaler.py",
    "test_elastic.py",          # 271 s
    "test_train_ray.py",
    "test_autoscaler.py",       # 111-146 s
    "test_tune.py",             # 128 s
    "test_cluster_files.py",    # 117 s
    "test_ray_errors.py",
    "test_object_storage.py",
    "test_data_train.py",
    "test_tracking.py",
)


def pytest_configure(config):
    if hasattr(config.option, "loadscopereorder"):  # xdist: keep LONGEST_FIRST's order, not test counts
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(config, items):
    """The fast tier (`pytest -m "not slow"`) never starts the session's Ray cluster: a test that
    uses it, directly or through another fixture, must be marked slow (its collection fails otherwise).

    Items are ordered by LONGEST_FIRST (stable within and after it)."""
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
    unmarked = [item.nodeid for item in items
                if "ray_cluster" in getattr(item, "fixturenames", ()) and item.get_closest_marker("slow") is None]
    if unmarked:
        raise pytest.UsageError(f"uses the ray_cluster fixture but is not marked slow: {', '.join(unmarked)}")


def start_local_ray():
    """Start (if not up) the session's local Ray cluster: 2 CPUs and 400 MB of object store.

    A multi-node test module (`ray.cluster_utils.Cluster`) shuts it down for its own cluster
    and calls this again when it is done."""
    import ray

    from raylm.ray.connect import configure_local_cluster

    if not ray.is_initialized():
        configure_local_cluster()
        for attempt in range(1, STARTS + 1):
            try:
                ray.init(
                    address="local",  # a new cluster, never one another `ray start` left in /tmp/ray
                    num_cpus=2,
                    include_dashboard=False,
                    object_store_memory=400 * 2**20,
                    log_to_driver=False,
                    configure_logging=False,
                )
                break
            except Exception as e:  # Ray gives a raylet 30 s (not settable) to register with its GCS
                if "timed out during startup" not in str(e) or attempt == STARTS:
                    raise
                ray.shutdown()
    quiet_ray_data()
    return ray


# Ray's node start waits a fixed 30 s for the raylet to register (ray/_private/node.py); under a load
# average of 40 on 2 cores (a parallel test run beside other work) a restart of the session's cluster
# took longer. A slow machine makes the suite slower, not red: the start is tried again.
STARTS = 3


def quiet_ray_data():
    import ray

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """The test process computes on one thread: the models here are tiny, and on a 2-core machine
    shared with Ray's processes, intra-op threads mostly wait on each other (an overfitting test
    ran 18 s on two threads, 7 s on one). Spawned ranks and Ray workers set their own."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def local_run(tmp_path_factory):
    """Some finished run, for the tests that only need one: `support.local_config`'s run, trained
    once a session in this process (`raylm train --local`'s `train_local`); its TrainResult. Tests
    read it; a test that changes it works on a copy (`shutil.copytree(local_run.run_dir, ...)`)."""
    from support import local_config

    from raylm.train.local import train_local

    return train_local(local_config(tmp_path_factory.mktemp("shared_run")), log=lambda line: None)


@pytest.fixture(scope="session")
def tokenizer():
    """A real sentencepiece tokenizer (480 pieces) of hf_support's small mixed corpus, trained once a
    session (a module that needs a tokenizer of its own corpus defines its own `tokenizer`)."""
    from hf_support import train_tokenizer

    return train_tokenizer()


@pytest.fixture(scope="session")
def ray_cluster():
    """The session's local Ray cluster, shut down at the end."""
    ray = start_local_ray()
    yield ray
    ray.shutdown()


# ---------------------------------------------------------------------------------------
# Local object-storage servers (the test extra's), shared by the modules that use a bucket


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(exe: Path, *args: str, probe: str = ""):
    """Start the test extra's server `exe` on a free local port; its URL once it answers (any
    HTTP status counts), and the process."""
    if not exe.exists():
        pytest.fail(f"{exe} is missing: install the test extra (pip install -e '.[test]')")
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([str(exe), *[a.format(port=port) for a in args]], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(url + probe, timeout=1).close()
            break
        except urllib.error.HTTPError:
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"{exe.name} did not answer at {url}")
            time.sleep(0.2)
    return url, proc


@pytest.fixture(scope="session")
def s3_server():
    """A moto S3 server on a free local port for the session: its endpoint URL."""
    url, proc = _serve(Path(sys.executable).with_name("moto_server"), "-H", "127.0.0.1", "-p", "{port}")
    yield url
    proc.terminate()
    proc.wait(timeout=30)
