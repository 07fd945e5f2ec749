"""Training on Ray: `fit(spec)` builds and fits one TorchTrainer whose workers run the core `Trainer`.

    fit(spec) -> TrainResult       the one function a run, a Tune trial and an elastic restart call:
                                   run directory, tokenizer, data, cluster check, TorchTrainer, fit
    train_func(config)             each Ray Train worker: device, data shards, `Trainer` + `RaySink`
    RaySink                        metrics to the run directory and the trackers (rank 0), reports and checkpoints
                                   to `ray.train.report`; it decides nothing about timing
    train_command(cfg)             `raylm train`: connect, SIGTERM as Ctrl-C, fit, samples

Runs and resuming. Every run has its own directory `run.output_dir/run.name` (Ray Train's
storage_path/name): config.yaml, tokenizer.model, metrics.jsonl, tensorboard/ and the
checkpoint_<step> directories (each carrying the config and tokenizer too). On object storage
(`run.output_dir=s3://...`) Ray Train gets the bucket as `storage_filesystem` (raylm's, with the
endpoint from the environment) and uploads the ranks' checkpoint directories there; raylm names
Ray's checkpoints by their URIs (`checkpoint_location`). Resuming is
explicit (`raylm.train.runs`). The driver that calls `fit` holds the run directory's lock
(`raylm.lock`) for the whole fit; its workers write as part of it. Ctrl-C or SIGTERM of the driver stops the workers; a
checkpoint is complete and verified or ignored, so the newest good one is where a resumed run
continues.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path
from typing import Any

import ray
import ray.train
import torch
# Ray's RunConfig and ScalingConfig are written ray.train.RunConfig / ray.train.ScalingConfig here:
# raylm.config has classes of both names.
from ray.train import Checkpoint, CheckpointConfig, FailureConfig, LoggingConfig
from ray.train.torch import TorchTrainer

from raylm import lock, storage
from raylm.config import Config
from raylm.errors import DataError, RunInterrupted
from raylm.ray.cluster import FREE_WAIT_S, check_cluster_fits
from raylm.ray.connect import ray_session
from raylm.ray.data import data_config, sample_documents, trainer_datasets, worker_sources
from raylm.ray.elastic import elastic_callbacks
from raylm.ray.errors import cluster_loss, user_errors
from raylm.train import checkpoint as ckpt
from raylm.train.metrics import MetricsWriter
from raylm.train.runs import (RunSpec, RunStart, TrainResult, check_storage, checkpoint_files, is_uri, log_bad_input,
                              next_steps, resolve_run, start_run)
from raylm.train.tracking import forwarded_env
from raylm.train.trainer import RankEnv, Trainer, tracking_options


# ---------------------------------------------------------------------------------------
# Driver


def fit(spec: RunSpec, *, wait_s: float | None = FREE_WAIT_S, callbacks: list | None = None,
        log=print) -> TrainResult:
    """Create the run's directory (or take a resumed one's lock), get its tokenizer and data, and fit a
    TorchTrainer (Ray must be up). The run directory's lock is held until the fit ends.

    `wait_s`: how long to wait for the cluster's resources to be free (None: as long as it
    takes, as in a Tune trial). `callbacks`: Ray Train `UserCallback`s (Tune's report callback).
    """
    check_cluster_fits(spec.cfg, wait_s=wait_s)
    with user_errors():  # this driver holds the run directory for the whole fit: the workers write as its part
        run = start_run(spec, sample_documents, log)
    try:
        return _fit_started(run, callbacks, log)
    finally:
        run.release()


def _fit_started(run: RunStart, callbacks: list | None, log) -> TrainResult:
    spec, cfg = run.spec, run.spec.cfg
    try:
        with user_errors():
            if cfg.data.prepared_path:
                datasets, counter = {}, None
            else:
                datasets, counter = trainer_datasets(cfg, run.tokenizer, run.listing, spec.run_dir,
                                                     spec.initial_checkpoint)
        trainer = _torch_trainer(spec, run.tokenizer, run.facts, datasets, counter, callbacks)
    except BaseException:
        run.discard()
        raise
    with cluster_loss(spec.run_dir), user_errors():
        try:
            result = trainer.fit()
        except (KeyboardInterrupt, SystemExit):  # Ray's own Ctrl-C handler aborts fit() with sys.exit
            raise RunInterrupted(spec.run_dir) from None
    if counter is not None:
        log_bad_input(ray.get(counter.report.remote()), log)
    metrics = dict(result.metrics or {})
    if "stream_ended" in metrics:
        raise DataError(f"data.stream_passes={cfg.data.stream_passes}: the training stream ended after step "
                        f"{int(metrics['stream_ended'])} of {cfg.train.max_steps}; continue with "
                        f"run.resume_from={spec.run_dir} and more passes (or data.stream_passes unset)")
    final = checkpoint_location(result.checkpoint, spec.run_dir) if result.checkpoint is not None else None
    marker = ckpt.read_marker(final) if final is not None and storage.is_dir(final) else None
    if marker is not None and marker["train_state"]["step"] < cfg.train.max_steps:
        raise RunInterrupted(spec.run_dir)  # fit() returned early: Ray's Ctrl-C handler stopped it gracefully
    return TrainResult(metrics, str(final) if final is not None else None, spec.run_dir)


def checkpoint_location(checkpoint: Checkpoint, run_dir: str) -> str:
    """A Ray Train checkpoint as raylm names it: its local path, or its URI when the run directory
    is on object storage (Ray keeps the path on its filesystem, `bucket/...`, without the scheme)."""
    if not storage.is_uri(run_dir):
        return checkpoint.path
    return f"{run_dir.split('://', 1)[0]}://{checkpoint.path.lstrip('/')}"


def storage_config(path: str | Path) -> dict:
    """A Ray RunConfig's (Train's or Tune's) storage_path for a local path or a URI, and on
    object storage its storage_filesystem: raylm's, with its endpoint and region."""
    if not storage.is_uri(path):
        return {"storage_path": str(path)}
    fs, fs_path = storage.resolve(path)
    return {"storage_path": fs_path, "storage_filesystem": fs}


def scaling_config(cfg: Config) -> ray.train.ScalingConfig:
    """Ray Train's ScalingConfig: a fixed worker count, or (min, max) with the resize check interval."""
    s = cfg.scaling
    resources: dict[str, float] = {"CPU": s.cpus_per_worker, **s.resources_per_worker}
    if s.use_gpu:
        resources["GPU"] = 1
    workers = (s.min_workers, s.max_workers) if s.elastic else s.min_workers
    return ray.train.ScalingConfig(num_workers=workers, use_gpu=s.use_gpu, resources_per_worker=resources,
                                   elastic_resize_monitor_interval_s=s.resize_check_s)


def _torch_trainer(spec: RunSpec, tokenizer, facts, datasets: dict, counter, callbacks) -> TorchTrainer:
    cfg = spec.cfg
    return TorchTrainer(
        train_func,
        train_loop_config={"spec": spec, "tokenizer": tokenizer, "facts": facts, "datasets": sorted(datasets),
                           "counter": counter, "tracking_env": forwarded_env()},
        scaling_config=scaling_config(cfg),
        run_config=ray.train.RunConfig(
            name=spec.name,
            **storage_config(spec.output_dir),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.run.keep_checkpoints),
            failure_config=FailureConfig(max_failures=cfg.run.max_failures,
                                         max_preemption_failures=cfg.run.max_preemptions),
            logging_config=LoggingConfig(log_level="WARNING"),
            callbacks=[*(callbacks or []), *elastic_callbacks(cfg.scaling)],  # a fresh cluster view for resizes
        ),
        datasets=datasets or None,
        dataset_config=data_config(cfg) if datasets else None,
    )


# ---------------------------------------------------------------------------------------
# `raylm train`


def train_command(cfg: Config, log=print) -> TrainResult:
    """`raylm train`: connect (or start a local cluster), fit, and show samples of the final model."""
    check_storage(cfg)  # before Ray starts: an unreachable store, a missing bucket,
    spec = resolve_run(cfg)  # an impossible resume or name fail at once
    if spec.in_place:  # and a run another process writes to (fit takes the lock itself)
        lock.check_free(spec.run_dir, "run directory")
    with ray_session(), _sigterm_as_interrupt():
        result = fit(spec, log=log)
    if result.checkpoint is None:
        log("no checkpoint was reported")
        return result
    log(f"final checkpoint: {result.checkpoint}")
    if cfg.run.sample_tokens and cfg.run.sample_prompts:
        from raylm.use.sample import print_final_samples  # the driver's entry point alone imports use/

        print_final_samples(result.checkpoint, log)
    if result.run_dir and not is_uri(result.run_dir):
        log(next_steps(result.run_dir))
    return result


@contextlib.contextmanager
def _sigterm_as_interrupt():
    """SIGTERM stops the driver like Ctrl-C: Ray shuts down, finished checkpoints stay."""
    def interrupt(signum, frame):
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, interrupt)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


# ---------------------------------------------------------------------------------------
# Worker


class RaySink:
    """A Ray Train worker's sink: metrics.jsonl/TensorBoard on rank 0, reports and checkpoints to Ray."""

    def __init__(self, run_dir: str, rank: int, cfg: Config | None = None):
        self.run_dir = storage.location(run_dir)
        self.writer = MetricsWriter(self.run_dir, enabled=rank == 0, **tracking_options(cfg))

    def write(self, record: dict) -> None:
        self.writer.write(record)

    def checkpoint_dir(self, step: int) -> Path:
        return Path(tempfile.mkdtemp(prefix="raylm-checkpoint-"))  # one per rank; Ray merges them on upload

    def report(self, record: dict, checkpoint: Path | None) -> None:
        if checkpoint is None:
            ray.train.report(_numbers(record))
            return
        self.writer.sync()  # a run directory on object storage gets the metrics so far
        try:
            ray.train.report(_numbers(record), checkpoint=Checkpoint.from_directory(str(checkpoint)),
                             checkpoint_dir_name=ckpt.checkpoint_dir_name(record["step"]))
        finally:
            shutil.rmtree(checkpoint, ignore_errors=True)

    def rewind(self, step: int) -> None:
        self.writer.rewind(step)

    def preempted(self) -> bool:
        """Ray Train's preemption notice (a barrier: every rank calls it at the same steps)."""
        return ray.train.get_preemption_info() is not None

    def restore_candidates(self) -> list[str | Path]:
        """Ray's latest reported checkpoint (after a restart, or a run continued in place) and the
        run's checkpoints in its directory: one completed while the driver was stopped is newer
        than Ray's. On object storage they are URIs, read in place (each rank its own byte ranges)."""
        out = []
        latest = ray.train.get_checkpoint()
        if latest is not None:
            if storage.is_uri(self.run_dir):
                out.append(checkpoint_location(latest, str(self.run_dir)))
            elif type(latest.filesystem).__name__ == "LocalFileSystem":
                out.append(Path(latest.path))
            else:
                out.append(Path(latest.to_directory()))
        return out + ckpt.list_checkpoints(self.run_dir)

    def set_aside_after(self, step: int, log) -> None:
        """Rank 0, after the restore: the run's checkpoints above `step` are moved aside
        (`checkpoint.set_aside_after`), except those Ray Train lists as reported.

        Ray keeps its own keep-K list (`CheckpointConfig.num_to_keep`; restored from its snapshot
        in the run directory on a resume in place, which Ray refuses when an entry's directory is
        gone), so an entry of it must stay where Ray put it. Ray deletes its entries itself,
        oldest report first, never its latest report; before this run's first save it deletes
        nothing, and after it the newest verified checkpoint is that latest report. A checkpoint
        cut short was never reported, so what Ray lists was whole when written; one damaged
        since is left to Ray's keep-K. Limit: Ray deletes an entry by its path, so when this run
        saves again at the step of such an entry and Ray evicts the old entry later, the new
        directory goes with it (Ray has no way to forget one entry)."""
        reported = ray.train.get_all_reported_checkpoints(
            consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED)
        held = [checkpoint_location(r.checkpoint, str(self.run_dir)) for r in reported]
        ckpt.set_aside_after(self.run_dir, step, log, leave=held)

    def close(self) -> None:
        self.writer.close()


def _numbers(record: dict) -> dict:
    return {k: v for k, v in record.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _worker_log(line: str) -> None:
    # Ray Train patches print() in workers to go to its logger and to stdout, which the driver
    # then shows twice; the worker's stdout alone reaches the driver and `ray job logs` once.
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def _quiet_train_logs() -> None:
    # Each report would otherwise print its whole metrics dict; raylm prints its own lines.
    from raylm.ray.compat import quiet_train_logs  # a Ray internal, guarded there

    quiet_train_logs()


def train_func(config: dict[str, Any]) -> None:
    """One Ray Train worker: device, data shards, and the core Trainer with a RaySink."""
    spec: RunSpec = config["spec"]
    cfg: Config = spec.cfg
    _quiet_train_logs()
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device() if cfg.scaling.use_gpu else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(max(1, math.ceil(cfg.scaling.cpus_per_worker)))
    train_data, val_data = worker_sources(cfg, config["datasets"], config["counter"])
    os.environ.update(config.get("tracking_env") or {})  # where the driver's trackers write
    sink = RaySink(spec.run_dir, rank, cfg)
    trainer = Trainer(cfg, RankEnv(rank, world, device), sink, train_data, val_data, facts=config["facts"],
                      initial_checkpoint=spec.initial_checkpoint,
                      extra_files=checkpoint_files(spec, config["tokenizer"]), log=_worker_log)
    try:
        trainer.fit()
    finally:
        sink.close()

