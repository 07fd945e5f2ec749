"""Ray's internals raylm relies on (raylm/ray/compat.py), each checked against the installed Ray,
and the public replacements of the ones that had a public API.

Each test names the workaround it guards: when a Ray upgrade breaks one, it fails here, loudly,
instead of the workaround quietly stopping to apply (a slower stream start, a noisy console, a
stale elastic resize, a sweep that forgets its rungs)."""

from __future__ import annotations

import inspect
import io
import json
import logging
import mmap
import os
import subprocess
import sys
import tomllib
import warnings
from pathlib import Path

import numpy as np
import pytest

from raylm.ray import compat

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------
# The Ray range pyproject allows


def test_installed_ray_is_inside_the_range_pyproject_allows_and_the_constraints_pin_it():
    """pyproject's Ray requirement is a range these tests guard; CI installs the pinned one."""
    from packaging.requirements import Requirement

    import ray

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    req = next(Requirement(d) for d in deps if Requirement(d).name == "ray")
    assert "==" not in str(req.specifier) and req.specifier.contains(ray.__version__), (str(req.specifier), ray.__version__)
    pins = [line for line in (ROOT / "constraints/cpu.txt").read_text().splitlines() if line.startswith("ray==")]
    assert pins and req.specifier.contains(pins[0].split("==")[1]), pins


# ---------------------------------------------------------------------------------------
# 1. RAY_num_workers_soft_limit, set only while a local cluster starts


def test_workers_soft_limit_is_still_a_setting_the_raylet_reads():
    """compat 1: Ray reads `RAY_<name>` for each name in its config; a raylet without the name
    `num_workers_soft_limit` would ignore the variable, and read tasks would again pay a fresh
    worker process each (17 vs 3 CPU-seconds for 68 MB on 2 CPUs)."""
    import ray

    raylet = Path(ray.__file__).parent / "core" / "src" / "ray" / "raylet" / "raylet"
    assert raylet.is_file(), f"no raylet binary at {raylet}: find where this Ray keeps it"
    with raylet.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        assert m.find(compat.WORKERS_SOFT_LIMIT_CONFIG.encode()) >= 0, \
            "the raylet no longer knows num_workers_soft_limit: raylm.ray.compat item 1 is dead"
    assert compat.WORKERS_SOFT_LIMIT_VAR == "RAY_" + compat.WORKERS_SOFT_LIMIT_CONFIG


def test_environment_is_set_only_for_its_block_and_a_value_already_set_wins(monkeypatch):
    """connect() leaves the process's environment as it found it."""
    monkeypatch.delenv("RAYLM_TEST_A", raising=False)
    monkeypatch.setenv("RAYLM_TEST_B", "user")
    with compat.environment({"RAYLM_TEST_A": "1", "RAYLM_TEST_B": "raylm"}):
        assert (os.environ["RAYLM_TEST_A"], os.environ["RAYLM_TEST_B"]) == ("1", "user")
    assert "RAYLM_TEST_A" not in os.environ and os.environ["RAYLM_TEST_B"] == "user"


# ---------------------------------------------------------------------------------------
# 2. Ray Train's UserExceptionWithTraceback._base_exc


def test_a_user_error_wrapped_by_ray_train_is_found_through_its_wrapper():
    """compat 2: a DataError inside Ray Train's UserExceptionWithTraceback comes out as raylm's line."""
    from ray.train.v2._internal.exceptions import UserExceptionWithTraceback

    from raylm.errors import DataError
    from raylm.ray.errors import find_user_error

    inner = DataError("corpus/a.jsonl line 3: not JSON")
    wrapped = UserExceptionWithTraceback(inner, "Traceback ...")
    assert compat.train_user_exception(wrapped) is inner, "Ray Train's wrapper no longer holds _base_exc"
    found = find_user_error(wrapped)
    assert isinstance(found, DataError) and str(found) == str(inner)
    assert compat.train_user_exception(ValueError("x")) is None


# ---------------------------------------------------------------------------------------
# 3. Ray Train's per-report logger, named by its file


def test_ray_trains_report_logger_exists_and_is_outside_what_its_public_logging_config_reaches():
    """compat 3: the logger of the per-report INFO lines is found; the day Ray names it under
    "ray.train", `RunConfig(logging_config=LoggingConfig("WARNING"))` replaces the workaround."""
    logger = compat.train_report_logger()
    assert logger is not None, f"{compat.TRAIN_REPORT_LOGGER_MODULE} has no `logger`: report lines are back"
    assert not (logger.name == "ray.train" or logger.name.startswith("ray.train.")), \
        "Ray Train's report logger is now under ray.train: use LoggingConfig instead of compat item 3"
    before = logger.level
    try:
        compat.quiet_train_logs()
        assert not logger.isEnabledFor(logging.INFO) and not logging.getLogger("ray.train").isEnabledFor(logging.INFO)
    finally:
        logger.setLevel(before)
        logging.getLogger("ray.train").setLevel(logging.NOTSET)


# ---------------------------------------------------------------------------------------
# 4. Ray Data's issue detectors: in Ray's log files, off the console


@pytest.mark.parametrize("name", compat.DIAGNOSTIC_LOGGERS)
def test_ray_datas_diagnostics_reach_its_log_file_and_not_the_console(tmp_path, name):
    """compat 4: the issue detector and the progress-bar notice still log through the loggers
    raylm hides from consoles; a record of each reaches a file handler and no stream handler
    during a session."""
    import importlib

    from raylm.ray.errors import user_error_tracebacks_hidden

    assert importlib.import_module(name).logger.name == name, \
        f"{name} logs elsewhere now: Ray Data's diagnostics are back on the console (compat item 4)"
    parent = logging.getLogger("raylm-test-ray-data")  # stands for "ray.data" with its two handlers
    console, file_path = io.StringIO(), tmp_path / "ray-data.log"
    parent.addHandler(logging.StreamHandler(console))
    parent.addHandler(logging.FileHandler(file_path))
    logger = logging.getLogger(name)
    saved = (logger.parent, logger.propagate)
    logger.parent, logger.propagate = parent, True
    try:
        with user_error_tracebacks_hidden():
            logger.warning("Found 1 issues. To disable issue detection, run DataContext...")
        for handler in parent.handlers:
            handler.flush()
        assert console.getvalue() == ""
        assert "Found 1 issues" in file_path.read_text()
    finally:
        logger.parent, logger.propagate = saved
        for handler in list(parent.handlers):
            parent.removeHandler(handler)
            handler.close()


# ---------------------------------------------------------------------------------------
# 5. Ray Data's AutoscalingCoordinator


def test_autoscaling_coordinator_has_the_name_tick_and_refresh_compat_uses():
    """compat 5: the actor raylm reaches by name, its 20 s tick and `recompute=`; otherwise an
    elastic shrink waits out the worker-group start timeout again (139 s for 3 -> 2)."""
    from ray.data._internal.cluster_autoscaler import default_autoscaling_coordinator as coordinator

    actor = coordinator._AutoscalingCoordinatorActor
    assert actor.TICK_INTERVAL_S == compat.COORDINATOR_LOOK_S, \
        f"the coordinator's tick is {actor.TICK_INTERVAL_S} s: update COORDINATOR_LOOK_S"
    assert "recompute" in inspect.signature(actor.get_reserved_resources).parameters
    source = inspect.getsource(coordinator.get_or_create_autoscaling_coordinator)
    assert f'name="{compat.COORDINATOR_NAME}"' in source and f'namespace="{compat.COORDINATOR_NAMESPACE}"' in source


# ---------------------------------------------------------------------------------------
# 6. ASHA's rungs


def test_asha_rungs_read_out_as_json_and_merge_back_into_a_fresh_scheduler():
    """compat 6: the rungs a restored sweep reloads are where compat reads and writes them."""
    from ray.tune.experiment import Trial
    from ray.tune.schedulers import AsyncHyperBandScheduler

    def scheduler():
        return AsyncHyperBandScheduler(time_attr="step", metric="loss", mode="min", max_t=8, grace_period=1,
                                       reduction_factor=2, brackets=1)

    first = scheduler()
    for trial_id, loss in (("a", 2.0), ("b", 1.0)):
        trial = Trial("__fake", trial_id=trial_id, stub=True)
        first.on_trial_add(None, trial)
        first.on_trial_result(None, trial, {"step": 1, "loss": loss})
    saved = json.loads(json.dumps(compat.asha_rungs(first)))
    assert any(recorded for bracket in saved for _, recorded in bracket), saved
    restored = scheduler()
    compat.asha_merge_rungs(restored, saved)
    assert json.loads(json.dumps(compat.asha_rungs(restored))) == saved


# ---------------------------------------------------------------------------------------
# Public replacements, on the session's Ray cluster


@pytest.mark.slow
def test_the_training_stream_uses_no_deprecated_ray_argument_and_cuts_small_blocks(ray_cluster, tmp_path, tokenizer):
    """Item 7: building the training stream warns nothing (ray_remote_args goes in Ray 2.64).
    compat 7: the re-blocking fix still changes the repartition's operator (else the 72 s wait
    for the first batch comes back), which still cuts blocks of at most `rows` rows, in order."""
    import ray
    from ray.util.annotations import RayDeprecationWarning

    from raylm.config import load_config
    from raylm.data.plan import plan_files
    from raylm.ray.cluster import PACK_CPUS
    from raylm.ray.data import TrainStream, _small_blocks, bad_input_counter

    cfg = load_config(None, ["model.preset=debug", "model.vocab_size=512", "data.seq_len=32",
                             "train.global_batch_tokens=256", "train.micro_batch_size=4", "train.max_steps=20",
                             "data.sources.0.max_bytes=100000"])
    with warnings.catch_warnings():
        warnings.simplefilter("error", RayDeprecationWarning)
        TrainStream(cfg, tokenizer, plan_files(cfg, "train"), bad_input_counter(), str(tmp_path), None)()
    ds = _small_blocks(ray.data.range(100, override_num_blocks=1), 8)
    op = ds._logical_plan.dag  # what compat item 7 changes: it must be the repartition, changed
    assert type(op).__name__ == "StreamingRepartition" and op.ray_remote_args["num_cpus"] == PACK_CPUS \
        and op.compute.size == 1, f"the re-blocking fix no longer applies to {op!r} (raylm.ray.compat item 7)"
    blocks = [b["id"].tolist() for b in ds.iter_batches(batch_size=None, batch_format="numpy")]
    assert max(len(b) for b in blocks) <= 8 and sum(blocks, []) == list(range(100)), blocks


@pytest.mark.slow
def test_a_packing_actor_ray_restarted_refuses_to_go_on(ray_cluster):
    """Replaces `max_restarts=0`: a packer Ray restarts has lost the stream's state and raises
    instead of numbering the rest of the rows from the start."""
    import ray

    from raylm.ray.stages import PackIndex

    empty = {"stream": [], "seg_pos": [], "seg_len": [], "span": np.full((1, 4), -1)}
    packer = ray.remote(num_cpus=0, max_restarts=1)(PackIndex).remote(4, None)
    assert len(ray.get(packer.__call__.remote(empty))["index"]) == 0
    ray.kill(packer, no_restart=False)
    with pytest.raises(RuntimeError, match="packing actor was restarted"):
        for _ in range(60):  # calls made while Ray restarts it fail with ActorDiedError/Unavailable
            try:
                ray.get(packer.__call__.remote(empty))
            except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError):
                continue
    ray.kill(packer)


@pytest.mark.slow
def test_a_worker_names_its_own_cluster_in_ray_address(ray_cluster):
    """Replaces the GCS port picked by bind-and-free: the set-up hook gives every worker its
    cluster's address from the runtime context; a value already set is kept."""
    import ray

    @ray.remote(num_cpus=0)
    def hooked(preset):
        from raylm.ray import worker

        os.environ.pop("RAY_ADDRESS", None)
        if preset:
            os.environ["RAY_ADDRESS"] = preset
        worker.setup()
        return os.environ["RAY_ADDRESS"]

    assert ray.get(hooked.remote(None)) == ray.get_runtime_context().gcs_address
    assert ray.get(hooked.remote("10.0.0.1:6379")) == "10.0.0.1:6379"


@pytest.mark.slow
def test_ray_session_leaves_the_process_as_it_found_it(tmp_path):
    """Item 5, end to end in a fresh process: a session on a local cluster it starts sets
    RAY_num_workers_soft_limit only while Ray starts, puts the DataContext and the "ray.data"
    logger back, and its workers know the cluster's address without a port chosen beforehand."""
    script = tmp_path / "session.py"
    script.write_text(
        "import logging, os, json\n"
        "import ray\n"
        "from raylm.ray.connect import ray_session\n"
        "ctx = ray.data.DataContext.get_current()\n"
        "before = (ctx.enable_progress_bars, ctx.print_on_execution_start, logging.getLogger('ray.data').level)\n"
        "with ray_session():\n"
        "    inside = (ctx.enable_progress_bars, ctx.print_on_execution_start, logging.getLogger('ray.data').level)\n"
        "    env_inside = os.environ.get('RAY_num_workers_soft_limit')\n"
        "    worker = ray.get(ray.remote(num_cpus=0)(lambda: os.environ.get('RAY_ADDRESS')).remote())\n"
        "    gcs = ray.get_runtime_context().gcs_address\n"
        "after = (ctx.enable_progress_bars, ctx.print_on_execution_start, logging.getLogger('ray.data').level)\n"
        "print(json.dumps(dict(before=before, inside=inside, after=after, env_inside=env_inside,\n"
        "      env_after=os.environ.get('RAY_num_workers_soft_limit'), worker=worker, gcs=gcs)))\n")
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_num_workers_soft_limit")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    out = subprocess.run([sys.executable, str(script)], env=env, cwd=tmp_path, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["inside"][:2] == [False, False] and got["inside"][2] == logging.WARNING, got
    assert got["after"] == got["before"], got
    assert got["env_inside"] is None and got["env_after"] is None, got
    assert got["worker"] == got["gcs"], got
