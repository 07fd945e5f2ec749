"""A fresh cluster view for Ray Train's elastic resizes (a controller callback).

Ray Train V2 sizes an elastic worker group from the resources that Ray's AutoscalingCoordinator
(a detached actor of Ray Data) has reserved for the run, and the coordinator looks at the
cluster (`ray.nodes()`) only every 20 s (`_AutoscalingCoordinatorActor.TICK_INTERVAL_S`).
Two costs follow, both measured on a local multi-node cluster (tests/test_elastic.py):

- **Shrink.** When a node leaves, the run fails, and the controller restarts it at once with a
  size counted from the coordinator's stale view, which still holds the dead node. The placement
  group for that size can never be placed, so the restart waits out
  RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S (60 s by default) before it retries with the nodes that
  are left: a 3 -> 2 shrink took 139 s, 120 of them in that wait.
- **Grow.** A node that joins is seen up to 20 s late, whatever `scaling.resize_check_s` says.

`FreshClusterView` asks the coordinator to look again (`get_reserved_resources(recompute=True)`,
one `ray.nodes()` and its usual bookkeeping) when a worker fails, before the controller decides
the restart's size, and, when `scaling.resize_check_s` is shorter than the coordinator's 20 s,
at most every `resize_check_s` at a report, so that a resize check sees the cluster as it is.
It only reads and refreshes; it never changes a request. Any error is logged and ignored: the
coordinator's own 20 s look still happens.
"""

from __future__ import annotations

import logging
import time

from ray.train import UserCallback

from raylm.ray.compat import COORDINATOR_LOOK_S, refresh_coordinator  # Ray internals, guarded there

logger = logging.getLogger(__name__)

REFRESH_TIMEOUT_S = 5.0


class FreshClusterView(UserCallback):
    """Refresh the AutoscalingCoordinator's view of the cluster after a worker failure and,
    if `every_s` is set, at most every `every_s` seconds at a report (runs on the controller)."""

    def __init__(self, every_s: float | None):
        self.every_s = every_s
        self._last = float("-inf")

    def after_report(self, run_context, metrics, checkpoint) -> None:
        if self.every_s is not None and time.monotonic() - self._last >= self.every_s:
            self.refresh()

    def after_exception(self, run_context, worker_exceptions) -> None:
        self.refresh()

    def refresh(self) -> None:
        self._last = time.monotonic()
        try:
            refresh_coordinator(REFRESH_TIMEOUT_S)
        except Exception as e:  # noqa: BLE001 - a refresh is an optimisation; the 20 s look remains
            logger.debug("could not refresh the AutoscalingCoordinator's cluster view: %r", e)


def elastic_callbacks(scaling) -> list[UserCallback]:
    """The controller callbacks of a run with `scaling` (raylm.config.ScalingConfig): one
    `FreshClusterView` for an elastic run, none for a fixed one (it has no coordinator)."""
    if not scaling.elastic:
        return []
    every = scaling.resize_check_s if scaling.resize_check_s < COORDINATOR_LOOK_S else None
    return [FreshClusterView(every)]
