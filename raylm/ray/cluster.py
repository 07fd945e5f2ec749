"""The one cluster-fit check: do the run's training workers and data pipeline fit the Ray cluster?

Ray Train waits forever for workers that cannot be placed, and a Ray Data pipeline starved of
CPUs hangs silently, so a run checks first. Sizing (what `needs` adds up): Ray Train workers
hold scaling.num_workers x scaling.cpus_per_worker CPUs (and their GPUs and custom resources)
for the whole run; a streaming pipeline needs data.tokenize_actors x data.tokenize_cpus for
the tokenizer pool, PACK_CPUS for the packer and data.read_tasks x data.read_cpus for the read
tasks (their Ray Data concurrency). On 2 CPUs: 2 workers x 0.25 + 2 actors x 0.5 + 0.05 +
2 reads x 0.2 = 1.95 fits.

Two questions, two answers:
- more than the cluster *has*: one line naming the settings, at once;
- more than is *free* now (actors of a previous run still shutting down, another job, other
  Tune trials): wait; give up with one line after `wait_s`, or wait on (`wait_s=None`) where
  a scheduler queues work, as a Tune trial does.

An elastic run (scaling.num_workers [min, max]) checks only its data pipeline: its workers
may come from nodes the autoscaler has yet to launch, and Ray Train starts it once min fit.
"""

from __future__ import annotations

import gc
import time

import ray

from raylm.config import Config
from raylm.errors import ConfigError

PACK_CPUS = 0.05
"""The packing actor only concatenates arrays; it needs a sliver of a CPU."""
FREE_WAIT_S = 60.0
"""How long a command waits for the resources it needs to be free before it fails with one line."""


def data_cpus(cfg: Config) -> float:
    """CPUs the streaming Ray Data pipeline holds (see the module docstring)."""
    d = cfg.data
    return d.tokenize_actors * d.tokenize_cpus + PACK_CPUS + d.read_tasks * d.read_cpus


def needs(cfg: Config, workers: int | None = None, streaming: bool | None = None) -> dict[str, float]:
    """Resources the run holds at once: its training workers plus, when streaming, the pipeline."""
    s = cfg.scaling
    workers = s.min_workers if workers is None else workers
    streaming = not cfg.data.prepared_path if streaming is None else streaming
    out = {"CPU": workers * s.cpus_per_worker + (data_cpus(cfg) if streaming else 0.0)}
    if s.use_gpu and workers:
        out["GPU"] = float(workers)
    for name, amount in s.resources_per_worker.items():
        out[name] = out.get(name, 0.0) + workers * amount
    return out


def _explain(cfg: Config, resource: str, workers: int, streaming: bool) -> str:
    s, d = cfg.scaling, cfg.data
    if resource == "CPU":
        data = (f" + Ray Data {data_cpus(cfg):g} (data.tokenize_actors={d.tokenize_actors} x data.tokenize_cpus="
                f"{d.tokenize_cpus:g} + packer {PACK_CPUS:g} + data.read_tasks={d.read_tasks} x data.read_cpus="
                f"{d.read_cpus:g})") if streaming else ""
        return (f"scaling.num_workers={workers} x scaling.cpus_per_worker={s.cpus_per_worker:g}{data}; "
                "lower scaling.cpus_per_worker or data.tokenize_cpus")
    if resource == "GPU":
        return f"scaling.num_workers={workers} x 1 GPU each (scaling.use_gpu); lower scaling.num_workers"
    return (f"scaling.num_workers={workers} x scaling.resources_per_worker.{resource}="
            f"{s.resources_per_worker[resource]:g}; lower scaling.num_workers or the per-worker resources")


def check_cluster_fits(cfg: Config, *, workers: int | None = None, streaming: bool | None = None,
                       wait_s: float | None = FREE_WAIT_S) -> None:
    """One line if the run can never fit the cluster; wait (up to `wait_s`, None: forever) until it fits now."""
    if workers is None:
        # An elastic run starts once its minimum fits, which may be on nodes an autoscaler has
        # yet to add: Ray Train waits for the workers; the pipeline must fit what is here.
        workers = 0 if cfg.scaling.elastic else cfg.scaling.min_workers
    streaming = not cfg.data.prepared_path if streaming is None else streaming
    need = needs(cfg, workers, streaming)
    have = ray.cluster_resources()
    for resource, amount in need.items():
        if amount > have.get(resource, 0.0) + 1e-9:
            raise ConfigError(f"the Ray cluster has {have.get(resource, 0.0):g} {resource} but this run needs "
                              f"{amount:g}: {_explain(cfg, resource, workers, streaming)}")
    deadline = None if wait_s is None else time.monotonic() + wait_s
    if _short(need):
        # A failed pipeline's actors live as long as its executor, which a garbage cycle in
        # this process (an exception's traceback frames) can keep until the next collection.
        gc.collect()
    while short := _short(need):
        if deadline is not None and time.monotonic() > deadline:
            resource, free = short
            raise ConfigError(
                f"this run needs {need[resource]:g} {resource} but only {free:g} of the cluster's "
                f"{have.get(resource, 0.0):g} have been free for {wait_s:g} s (other jobs or actors hold the rest); "
                f"wait, or {_explain(cfg, resource, workers, streaming).split('; ', 1)[1]}")
        time.sleep(0.5)


def _short(need: dict[str, float]) -> tuple[str, float] | None:
    free = ray.available_resources()
    for resource, amount in need.items():
        if free.get(resource, 0.0) + 1e-9 < amount:
            return resource, free.get(resource, 0.0)
    return None
