"""Every use raylm makes of Ray's internals, in one place: each with why it is needed, the public
API it waits for, and the upstream thread. tests/test_ray_compat.py checks each against the
installed Ray and fails loudly (naming the workaround) when a release removes or changes what it
relies on; pyproject's Ray range is the one those tests were run on.

One family lives beside the code that needs it: the module-named loggers that print a user
error's traceback (`raylm.ray.errors.TRACEBACK_LOGGERS`), guarded by tests/test_ray_errors.py.

Replaced by public APIs (nothing of them is left here):
- `ray._private.services.get_node_ip_address` -> `ray.util.get_node_ip_address`.
- The GCS port picked by bind-and-free and passed in `RAY_GCS_SERVER_PORT` (undocumented, and a
  race with any other process that binds the port in between): Ray picks the port itself, and
  each worker learns the cluster's address from `ray.get_runtime_context().gcs_address`
  (`raylm.ray.worker.setup`).
- ASHA's `_time_attr` and `_max_t`: `RecordedASHA` keeps the values it was made with.
- `DataConfig._resolve_execution_options` and `_enable_shard_locality`: `raylm.ray.data._TrainDataConfig` keeps the options it
  was given and hands out a copy.
- `map_batches(**ray_remote_args)` (deprecated in Ray 2.60, removed in 2.64; ray-project/ray#65228):
  `allow_out_of_order_execution=False` -> `ActorPoolStrategy(max_tasks_in_flight_per_actor=1)`
  (one batch at a time: none can overtake another); `max_restarts=0` -> the packing actor refuses
  to go on after Ray restarted it (`RuntimeContext.was_current_actor_reconstructed`), so the
  execution fails and the run restarts from its checkpoint, as before.
"""

from __future__ import annotations

import contextlib
import logging
import os

# ---------------------------------------------------------------------------------------
# 1. Idle worker processes of a local cluster: RAY_num_workers_soft_limit.
#
# The raylet kills idle task workers beyond `num_workers_soft_limit` (default: the node's CPUs)
# after a second (ray-project/ray#36766, #27863). A streaming run holds more processes than CPUs,
# so on a small machine every read task started a fresh worker that imported Ray Data and pyarrow
# again (17 vs 3 CPU-seconds for a 68 MB corpus on 2 CPUs; bench/RESULTS.md). Ray reads its
# `RAY_<config name>` variables at the raylet's start; there is no public `ray.init` argument
# (only the private `_system_config`, no more public than this).

WORKERS_SOFT_LIMIT_VAR = "RAY_num_workers_soft_limit"
WORKERS_SOFT_LIMIT_CONFIG = "num_workers_soft_limit"  # the name in Ray's ray_config_def.h


@contextlib.contextmanager
def environment(values: dict[str, str]):
    """Set `values` in this process's environment for the block (a value already there wins),
    and put the environment back as it was afterwards: for the processes `ray.init` starts."""
    added = {k: v for k, v in values.items() if k not in os.environ}
    os.environ.update(added)
    try:
        yield
    finally:
        for key, value in added.items():
            if os.environ.get(key) == value:
                os.environ.pop(key, None)


# ---------------------------------------------------------------------------------------
# 2. The user's exception inside Ray Train's UserExceptionWithTraceback: `_base_exc`.
#
# Ray Train V2 wraps an exception raised in the training function with its traceback text; Ray
# 2.60 already unwraps it in `WorkerGroupError.worker_failures` (ray-project/ray#61153), but the
# wrapper still reaches other paths (a controller or Tune trial error). There is no public
# accessor.

def train_user_exception(exc: BaseException) -> BaseException | None:
    """The exception Ray Train's UserExceptionWithTraceback wraps, or None for any other exception."""
    return getattr(exc, "_base_exc", None)


# ---------------------------------------------------------------------------------------
# 3. Ray Train's per-report INFO lines.
#
# Each `ray.train.report` logs its whole metrics dict at INFO on the worker's console, from a
# logger named by its module's *file path* (`logging.getLogger(__file__)` in
# ray/train/v2/_internal/execution/context.py), so neither the "ray.train" logger nor the public
# `RunConfig(logging_config=LoggingConfig(...))` (ray-project/ray#61550, which filters records
# named "ray.train*") reaches it. raylm prints its own progress lines instead.

TRAIN_REPORT_LOGGER_MODULE = "ray.train.v2._internal.execution.context"


def train_report_logger() -> logging.Logger | None:
    """The logger of Ray Train's per-report lines, or None where this Ray has no such module."""
    import importlib

    try:
        module = importlib.import_module(TRAIN_REPORT_LOGGER_MODULE)
    except ImportError:
        return None
    return getattr(module, "logger", None)


def quiet_train_logs() -> None:
    """In a Ray Train worker (its whole life): Ray Train's INFO lines off the console."""
    logging.getLogger("ray.train").setLevel(logging.WARNING)
    logger = train_report_logger()
    if logger is not None:
        logger.setLevel(logging.WARNING)


# ---------------------------------------------------------------------------------------
# 4. Ray Data's issue detectors ("high memory detector ... Found 1 issues. To disable issue
# detection, run DataContext...").
#
# Ray Data's executor logs these heuristics at WARNING on the console of the process that runs
# the execution (the driver, or Ray Train's split coordinator, whose output reaches the driver).
# They concern Ray Data's own operators, not anything a raylm user sets, so raylm keeps them in
# Ray's log files (ray-data.log) and off the console (`raylm.ray.errors`), rather than turning
# detection off. Where the logger is a module-named internal one, there is no public switch but
# `DataContext.issue_detectors_config.detectors = []`, which would lose them from the logs too.

ISSUE_DETECTOR_LOGGER = "ray.data._internal.issue_detection.issue_detector_manager"
PROGRESS_LOGGER = "ray.data._internal.progress"
"""Its "Progress bars disabled. To enable, set ..." (once a process) echoes raylm's own choice
(`raylm.ray.connect.quiet_console`) back at the user: kept in Ray's logs the same way."""
DIAGNOSTIC_LOGGERS = (ISSUE_DETECTOR_LOGGER, PROGRESS_LOGGER)


# ---------------------------------------------------------------------------------------
# 5. Ray Data's AutoscalingCoordinator (`raylm.ray.elastic`).
#
# Ray Train V2 sizes an elastic group from what this detached actor reserved, and the actor looks
# at the cluster only every `_AutoscalingCoordinatorActor.TICK_INTERVAL_S` (20 s, hard-coded), so
# a restart after a node left was sized from a stale view and waited out the worker-group start
# timeout (139 s for a 3 -> 2 shrink). Its `get_reserved_resources(..., recompute=True)` refreshes
# the view; the actor is reached by its name. No public API exposes either.

COORDINATOR_NAME = "AutoscalingCoordinator"
COORDINATOR_NAMESPACE = "AutoscalingCoordinator"
COORDINATOR_LOOK_S = 20.0
"""`_AutoscalingCoordinatorActor.TICK_INTERVAL_S` of the Ray versions pyproject allows."""


def refresh_coordinator(timeout_s: float) -> None:
    """Make Ray Data's AutoscalingCoordinator look at the cluster now (raises what Ray raises)."""
    import ray

    coordinator = ray.get_actor(COORDINATOR_NAME, namespace=COORDINATOR_NAMESPACE)
    # Any requester id: recompute=True looks at the cluster and re-reserves for every request.
    ray.get(coordinator.get_reserved_resources.remote("raylm-refresh", recompute=True), timeout=timeout_s)


# ---------------------------------------------------------------------------------------
# 6. ASHA's rungs (`raylm.ray.tune.RecordedASHA`).
#
# Ray Tune restores a sweep's scheduler from the pickle made when the sweep started, so every
# score recorded at ASHA's rungs is lost on `Tuner.restore` (ray-project/ray#15177: schedulers
# have no state API beyond pickling). raylm writes the rungs beside the sweep and merges them back;
# they live in `AsyncHyperBandScheduler._brackets[i]._rungs`, a list of (milestone, {trial_id:
# score}) per bracket.

def asha_rungs(scheduler) -> list[list[list]]:
    """ASHA's recorded scores: per bracket, [[milestone, {trial_id: score}], ...] (JSON-ready)."""
    return [[[milestone, recorded] for milestone, recorded in b._rungs] for b in scheduler._brackets]


def asha_merge_rungs(scheduler, saved: list) -> None:
    """Add `saved` (from `asha_rungs`) to the scheduler's rungs; a score it holds already wins."""
    for bracket, rungs in zip(scheduler._brackets, saved):
        for (milestone, recorded), (saved_milestone, saved_recorded) in zip(bracket._rungs, rungs):
            if milestone == saved_milestone:
                recorded.update({k: v for k, v in saved_recorded.items() if k not in recorded})


# ---------------------------------------------------------------------------------------
# 7. The resources of `Dataset.repartition(target_num_rows_per_block=...)` (`raylm.ray.data._small_blocks`).
#
# The row-count repartition runs 1-CPU tasks and takes no resource arguments (ray-project/ray#56824,
# closed unmerged). Under Ray Train's cap on Ray Data (under 1 CPU for a small pipeline) such a task
# gets no budget while the stages upstream have work, so the first rows reached the workers only
# once the whole planned stream was in the object store (72 s to the first batch, 13.5 s with the
# fix). An identity `map_batches(batch_size=rows)` is no substitute: Ray Data merges its small
# outputs back into blocks of up to `target_max_block_size` bytes. So the logical operator the
# repartition adds gets its CPUs and its concurrency set here; `object.__setattr__` because the
# operator is a frozen dataclass.

def set_last_operator_resources(ds, num_cpus: float, tasks: int) -> bool:
    """Give the operator `ds` ends with `num_cpus` per task and at most `tasks` tasks at once;
    False (nothing changed) where this Ray lays the plan out differently."""
    import ray

    op = getattr(getattr(ds, "_logical_plan", None), "dag", None)
    if not (isinstance(getattr(op, "ray_remote_args", None), dict) and hasattr(op, "compute")):
        return False
    op.ray_remote_args["num_cpus"] = num_cpus
    object.__setattr__(op, "compute", ray.data.TaskPoolStrategy(size=tasks))
    return True
