"""Settings for the Ray cluster raylm starts itself (`ray.init` without an address).

Ray keeps at most `num_workers_soft_limit` worker processes alive (by default one per CPU)
and kills idle task workers beyond it after a second. A streaming run holds more processes
than CPUs even on a laptop (tokenizer actors, the packing actor, Ray Data's own actors,
training workers), so on a small machine every read task landed in a freshly started
worker that imported Ray Data and pyarrow again: measured on 2 CPUs, reading a 68 MB
corpus cost 17 CPU-seconds this way and 3 with the workers kept (bench/RESULTS.md).

A cluster started with `ray start` takes the same setting from the environment of its
nodes (see docs/cluster.md); raylm does not change a cluster it joins.
"""

from __future__ import annotations

import os

WORKERS_SOFT_LIMIT_VAR = "RAY_num_workers_soft_limit"


def workers_soft_limit(cpus: int | None = None) -> int:
    """Idle worker processes a local cluster keeps: enough for a streaming run's processes."""
    return max(16, 2 * (cpus or os.cpu_count() or 1))


def configure_local_cluster() -> None:
    """Call before `ray.init` starts a local cluster: its raylet reads these variables.
    A value already in the environment wins."""
    os.environ.setdefault(WORKERS_SOFT_LIMIT_VAR, str(workers_soft_limit()))
