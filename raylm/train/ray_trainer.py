"""`raylm train` on Ray: a TorchTrainer whose workers run the torch core's loop on FSDP2 shards.

The driver (`train_on_ray`) joins the cluster at RAY_ADDRESS (as under `ray job submit`) or
starts a local one, checks everything a user can get wrong before any worker starts (batch
arithmetic, workers vs cluster CPUs, data paths, the run name), gets the tokenizer and the
streaming datasets, fits, and finally loads the last checkpoint into a plain model to print
samples. Each worker (`train_func`) builds its model shards (raylm.train.parallel), restores
from Ray's latest checkpoint after a failure or from `run.resume_from`, and runs
raylm.train.loop.run_training with hooks that report to Ray.

Runs and resuming. Every run has its own directory `run.output_dir/run.name` (Ray Train's
storage_path/name): config.yaml, tokenizer.model, metrics.jsonl, tensorboard/ and the
checkpoint_<step> directories. A new run always gets a fresh name; naming an existing run
without asking to resume is an error, because Ray Train would silently continue it.
Resuming is explicit: `run.resume_from=<run dir>` continues that run in place (same name,
newest complete checkpoint, any number of workers), `run.resume_from=<checkpoint dir>`
starts a new run from that checkpoint. Ctrl-C or SIGTERM of the driver stops the workers;
checkpoints are complete or ignored (raylm.train.checkpoint), so the newest complete one
is where the resumed run continues.

`ray.train.report` is a barrier: every rank calls it at the same steps (every
`train.log_every` steps with metrics, and with each checkpoint), only rank 0's metrics count.
"""

from __future__ import annotations

import contextlib
import logging
import dataclasses
import math
import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from raylm.config import Config
from raylm.data.order import DataPosition
from raylm.errors import ConfigError
from raylm.optim import build_optimizer
from raylm.ray_env import configure_local_cluster
from raylm.runs import create_run_dir
from raylm.train import checkpoint as ckpt
from raylm.train.loop import Hooks, RankEnv, TrainState, run_training
from raylm.train.metrics import MetricsWriter
from raylm.train.parallel import build_model


# ---------------------------------------------------------------------------------------
# Driver


def train_on_ray(cfg: Config, log=print) -> Path:
    """Train `cfg` with Ray Train; return the run directory (config, metrics, checkpoints)."""
    import ray

    cfg.grad_accum_steps(cfg.scaling.num_workers)  # one-line ConfigError if the batch cannot split
    initial = resolve_run(cfg)
    started = connect(cfg)
    run_dir: Path | None = None
    created = False
    try:
        check_cluster(cfg)
        created = cfg.run.name is None or not (Path(cfg.run.output_dir) / cfg.run.name).exists()
        run_dir = create_run_dir(cfg)
        log(f"run directory: {run_dir}" + (f" (from {initial})" if initial else ""))
        position = None
        if initial is not None:
            marker = ckpt.read_marker(initial)
            position = TrainState()
            position.load_state_dict(marker["train_state"])
            position = position.data_position
        tokenizer, datasets, dataset_config = driver_data(cfg, run_dir, position, log)
        trainer = make_trainer(cfg, run_dir, tokenizer, datasets, dataset_config, initial)
        created = False  # from here on the run directory holds a real run
        with _sigterm_as_interrupt(), _data_errors():
            hint = f"interrupted: the newest complete checkpoint is kept; continue with run.resume_from={run_dir}"
            try:
                result = trainer.fit()
            except (KeyboardInterrupt, SystemExit):  # Ray's own Ctrl-C handler aborts with sys.exit
                log(hint)
                raise KeyboardInterrupt from None
        final = result.checkpoint
        marker = ckpt.read_marker(final.path) if final is not None and os.path.isdir(final.path) else None
        if marker is not None and marker["train_state"]["step"] < cfg.train.max_steps:
            log(hint)  # fit() returned early: Ray's Ctrl-C handler aborted the run gracefully
            raise KeyboardInterrupt
        if final is None:
            log("no checkpoint was reported")
            return run_dir
        log(f"final checkpoint: {final.path}")
        if cfg.run.sample_tokens and cfg.run.sample_prompts:
            with final.as_directory() as path:
                print_final_samples(cfg, Path(path), run_dir, log)
        return run_dir
    finally:
        if created and run_dir is not None:
            shutil.rmtree(run_dir, ignore_errors=True)  # failed before any worker: leave no half run
        if started:
            ray.shutdown()


def resolve_run(cfg: Config) -> Path | None:
    """Settle the run's name and storage, and return the checkpoint to start from (or None).

    Makes output_dir absolute (Ray needs it). Raises a one-line error for an existing run
    name without resume_from, and for a resume_from with nothing complete to resume.
    """
    cfg.run.output_dir = str(Path(cfg.run.output_dir).expanduser().resolve())
    if cfg.run.resume_from:
        run_dir, initial = ckpt.resolve_resume(cfg.run.resume_from)
        if run_dir is not None:  # continue that run in place
            if cfg.run.name not in (None, run_dir.name):
                raise ConfigError(f"run.name={cfg.run.name}: resuming {run_dir} continues that run; "
                                  "drop run.name or pass a checkpoint directory to start a new run from it")
            cfg.run.name, cfg.run.output_dir = run_dir.name, str(run_dir.parent)
            return initial
    else:
        initial = None
    if cfg.run.name is not None and (Path(cfg.run.output_dir) / cfg.run.name).exists():
        existing = Path(cfg.run.output_dir) / cfg.run.name
        raise ConfigError(f"run.name={cfg.run.name}: {existing} already exists; continue it with "
                          f"run.resume_from={existing}, or choose another run.name")
    return initial


def connect(cfg: Config) -> bool:
    """Join the cluster at RAY_ADDRESS, or start a local one; True if this call started Ray."""
    import ray

    if ray.is_initialized():
        return False
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        # Workers must import raylm even where it is not installed (a source checkout).
        root = str(Path(__file__).resolve().parents[2])
        path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
        configure_local_cluster()
        ray.init(address="local", runtime_env={"env_vars": {"PYTHONPATH": path}}, log_to_driver=True)
    quiet_console()
    return True


def quiet_console() -> None:
    """Keep the console to raylm's progress lines: Ray Data's per-dataset progress reports and
    Ray Train's per-report INFO lines repeat what metrics.jsonl and the dashboard hold."""
    import ray.data

    ctx = ray.data.DataContext.get_current()  # captured by trainer.fit() and sent to the workers
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)


def check_cluster(cfg: Config) -> None:
    """One line if the workers cannot fit the cluster (Train would wait for them forever)."""
    import ray

    s = cfg.scaling
    have = ray.cluster_resources()
    needs = {"CPU": s.num_workers * s.cpus_per_worker, **{k: s.num_workers * v for k, v in s.resources_per_worker.items()}}
    if s.use_gpu:
        needs["GPU"] = float(s.num_workers)
    for resource, need in needs.items():
        if need > have.get(resource, 0.0) + 1e-9:
            per = {"CPU": f"scaling.cpus_per_worker={s.cpus_per_worker:g}", "GPU": "1 GPU each (scaling.use_gpu)"}.get(
                resource, f"scaling.resources_per_worker.{resource}={s.resources_per_worker.get(resource, 0):g}")
            raise ConfigError(
                f"scaling.num_workers={s.num_workers} with {per} needs {need:g} {resource} but the Ray cluster has "
                f"{have.get(resource, 0.0):g}; lower scaling.num_workers or the per-worker resources"
            )


def driver_data(cfg: Config, run_dir: Path, position: DataPosition | None, log=print):
    """(tokenizer, datasets for TorchTrainer, DataConfig or None): the one switch for where data comes from.

    Streaming Ray Data pipeline (raylm.data.pipeline) when it is present; otherwise every
    worker packs the default corpus in memory (raylm.data.local).
    """
    try:
        from raylm.data import pipeline
    except ImportError:
        pipeline = None
    if pipeline is None:
        from raylm.train.single import load_or_train_tokenizer

        return load_or_train_tokenizer(cfg, run_dir, log), {}, None
    with pipeline.data_errors():
        log("tokenizer ...")
        tokenizer = pipeline.get_tokenizer(cfg, run_dir)
        log(f"tokenizer: {tokenizer.vocab_size} pieces, sha256 {tokenizer.sha256[:12]}")
        datasets = pipeline.trainer_datasets(cfg, tokenizer, position)
    return tokenizer, datasets, pipeline.data_config(cfg)


def make_trainer(cfg: Config, run_dir: Path, tokenizer, datasets: dict, dataset_config, initial: Path | None):
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    s = cfg.scaling
    resources: dict[str, float] = {"CPU": s.cpus_per_worker, **s.resources_per_worker}
    if s.use_gpu:
        resources["GPU"] = 1
    return TorchTrainer(
        train_func,
        train_loop_config={
            "cfg": cfg,
            "tokenizer": tokenizer,
            "run_dir": str(run_dir),
            "initial_checkpoint": str(initial) if initial else None,
            "datasets": sorted(datasets),
        },
        scaling_config=ScalingConfig(num_workers=s.num_workers, use_gpu=s.use_gpu, resources_per_worker=resources),
        run_config=RunConfig(
            name=cfg.run.name,
            storage_path=cfg.run.output_dir,
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.run.keep_checkpoints),
            failure_config=FailureConfig(max_failures=cfg.run.max_failures),
            logging_config=LoggingConfig(log_level="WARNING"),
        ),
        datasets=datasets or None,
        dataset_config=dataset_config,
    )


def print_final_samples(cfg: Config, checkpoint_dir: Path, run_dir: Path, log=print) -> None:
    """Load the checkpoint into a plain model on the driver (any world size saved it) and sample."""
    from raylm.tokenizer import Tokenizer
    from raylm.train.single import print_samples

    if cfg.model.num_params() > 2e9:
        log("samples skipped: the model is too large to sample on the driver; use raylm generate")
        return
    plain = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, activation_checkpointing="none",
                                                               compile=False))
    model, info = build_model(plain, torch.device("cpu"))  # the driver has no process group: a plain model
    assert not info.sharded
    ckpt.load_checkpoint(checkpoint_dir, model)
    print_samples(model, Tokenizer.load(run_dir / "tokenizer.model"), cfg, log)


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


@contextlib.contextmanager
def _data_errors():
    try:
        from raylm.data.pipeline import data_errors
    except ImportError:
        yield
        return
    with data_errors():
        yield


# ---------------------------------------------------------------------------------------
# Worker


def train_func(config: dict[str, Any]) -> None:
    """One Ray Train worker: shards, restore, loop, report."""
    import ray.train

    cfg: Config = config["cfg"]
    # Each report would otherwise print its whole metrics dict; raylm prints its own lines.
    logging.getLogger("ray.train").setLevel(logging.WARNING)
    with contextlib.suppress(ImportError):  # Ray 2.60 names this logger by its file path
        from ray.train.v2._internal.execution import context as _train_context

        logging.getLogger(_train_context.__file__).setLevel(logging.WARNING)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device() if cfg.scaling.use_gpu else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(max(1, math.ceil(cfg.scaling.cpus_per_worker)))

    model, _ = build_model(cfg, device)
    optimizer = build_optimizer(model, cfg.optimizer, device.type)
    state = TrainState()
    # Start from the newer of Ray's latest reported checkpoint (a restart after a failure, a
    # run resumed in place) and the one the driver chose: a checkpoint completed on disk while
    # the driver was interrupted is newer than any Ray recorded.
    initial = config["initial_checkpoint"]
    initial_step = ((ckpt.read_marker(initial) or {}).get("train_state") or {}).get("step", -1) if initial else -1
    loaded = False
    restored = ray.train.get_checkpoint()
    if restored is not None:
        with restored.as_directory() as path:
            marker = ckpt.read_marker(path)
            if marker is None or marker["train_state"]["step"] >= initial_step:
                state.load_state_dict(ckpt.load_checkpoint(path, model, optimizer))
                loaded = True
    if not loaded and initial:
        state.load_state_dict(ckpt.load_checkpoint(initial, model, optimizer))

    train_data, val_data = worker_data(cfg, config["tokenizer"], config["datasets"])
    writer = MetricsWriter(config["run_dir"], enabled=rank == 0)
    reporter = _Reporter(cfg, model, optimizer, writer)
    try:
        run_training(
            cfg, model, optimizer, train_data, val_data, RankEnv(rank, world, device), state,
            Hooks(on_metrics=reporter.on_metrics, save_checkpoint=reporter.save_checkpoint, log=_worker_log),
        )
    finally:
        writer.close()


def _worker_log(line: str) -> None:
    # Ray Train patches print() in workers to go to its logger and to stdout, which the driver
    # then shows twice; the worker's stdout alone reaches the driver and `ray job logs` once.
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def worker_data(cfg: Config, tokenizer, datasets: list[str]):
    """(train, validation) BatchSources in a worker; pairs with `driver_data`."""
    try:
        from raylm.data import pipeline
    except ImportError:
        pipeline = None
    if pipeline is None:
        from raylm.data.local import local_datasets

        return local_datasets(cfg, tokenizer)
    train = pipeline.worker_batch_source(cfg, "train")
    has_val = "validation" in datasets or (cfg.data.prepared_path and cfg.data.val_fraction > 0)
    return train, pipeline.worker_batch_source(cfg, "validation") if has_val else None


class _Reporter:
    """The loop's hooks in a Ray worker: metrics to metrics.jsonl/TensorBoard and Ray, checkpoints to Ray."""

    def __init__(self, cfg: Config, model, optimizer, writer: MetricsWriter):
        self.cfg, self.model, self.optimizer, self.writer = cfg, model, optimizer, writer

    def _checkpoint_due(self, step: int) -> bool:
        t = self.cfg.train
        return step == t.max_steps or bool(t.checkpoint_every and step % t.checkpoint_every == 0)

    def on_metrics(self, record: dict) -> None:
        import ray.train

        self.writer.write(record)
        step = record.get("step", 0)
        # Every rank reaches the same records, so every rank reports at the same steps.
        if "loss" in record and step % self.cfg.train.log_every == 0 and not self._checkpoint_due(step):
            ray.train.report(_numbers(record))

    def save_checkpoint(self, state: TrainState, record: dict) -> None:
        import ray.train
        from ray.train import Checkpoint

        local = Path(tempfile.mkdtemp(prefix="raylm-checkpoint-"))  # one per rank; Ray merges them
        try:
            ckpt.save_checkpoint(local, self.model, self.optimizer, state.state_dict())
            ray.train.report(_numbers(record), checkpoint=Checkpoint.from_directory(str(local)),
                             checkpoint_dir_name=ckpt.checkpoint_dir_name(state.step))
        finally:
            shutil.rmtree(local, ignore_errors=True)


def _numbers(record: dict) -> dict:
    return {k: v for k, v in record.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}

