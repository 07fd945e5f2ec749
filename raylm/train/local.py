"""`raylm train --local` and torchrun: the whole job without Ray (the run's start, data, trainer).

One process, or every rank of a torchrun group (`torchrun --nproc-per-node 2 -m raylm train
CONFIG`; torchrun implies --local): rank 0 starts the run (`raylm.train.runs.start_run`: its
directory, held for the run's life, and tokenizer) and tells the other ranks; every rank packs
the data in memory (or reads prepared shards) and runs the one `Trainer` with a `RunDirSink`, so
checkpoints, keep-K, resume and its checks follow the same rules as on Ray. The end-of-run
samples are the caller's (`samples`): the CLI passes `raylm.use.sample.print_samples`, since the
core does not import `raylm.use`.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
import torch.distributed as dist

from raylm.config import Config
from raylm.data import prepared
from raylm.data.local import local_datasets, tokenizer_sample
from raylm.errors import RunInterrupted
from raylm.storage import is_uri
from raylm.tokenizer import Tokenizer
from raylm.train import checkpoint as ckpt
from raylm.train.parallel import distributed_world, torchrun_group
from raylm.train.runs import (RunStart, TrainResult, check_storage, log_bad_input, next_steps, resolve_run,
                              start_run)
from raylm.train.trainer import RunDirSink, RankEnv, Trainer

Samples = Callable[[torch.nn.Module, Tokenizer, Config, Callable[[str], None]], object]
"""Shows the trained model at the end of a run: `raylm.use.sample.print_samples`."""


def training_device(cfg: Config) -> torch.device:
    """This process's device for training under `cfg` (train.device: auto takes the GPU when there is one)."""
    if cfg.train.device == "cuda" or (cfg.train.device == "auto" and torch.cuda.is_available()):
        return torch.device("cuda", torch.cuda.current_device() if torch.cuda.is_available() else 0)
    return torch.device("cpu")


def _share(value, rank: int):
    """Rank 0's `value` on every rank of the torchrun group (itself without one)."""
    if distributed_world()[1] == 1:
        return value
    box = [value if rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def train_local(cfg: Config, log: Callable[[str], None] = print, samples: Samples | None = None) -> TrainResult:
    """Train `cfg` in this process (or this torchrun group); return the result. With `samples`,
    one process shows its trained model with it (run.sample_prompts) at the end."""
    device = training_device(cfg)
    with torchrun_group(device.type) as (rank, world):
        log = log if rank == 0 else (lambda line: None)
        check_storage(cfg)
        run = start_run(resolve_run(cfg), tokenizer_sample, log, rank=rank, share=partial(_share, rank=rank))
        try:
            return _train_started(run, device, rank, world, log, samples)
        finally:
            run.release()


def _train_started(run: RunStart, device: torch.device, rank: int, world: int, log: Callable[[str], None],
                   samples: Samples | None) -> TrainResult:
    """The run, its directory held (by rank 0) and its inputs checked."""
    spec, cfg, tokenizer = run.spec, run.spec.cfg, run.tokenizer
    try:
        if cfg.data.prepared_path:
            train_data, val_data = prepared.prepared_sources(cfg)
        else:
            train_data, val_data = local_datasets(cfg, tokenizer, run.listing)
        log(f"data: {len(train_data):,} training and {len(val_data) if val_data else 0:,} held-out sequences "
            f"of {cfg.data.seq_len} tokens")
    except BaseException:
        run.discard()
        raise

    sink = RunDirSink(spec.run_dir, cfg.run.keep_checkpoints, rank, cfg)
    trainer = Trainer(cfg, RankEnv(rank, world, device), sink, train_data, val_data, facts=run.facts,
                      initial_checkpoint=spec.initial_checkpoint, extra_files=run.checkpoint_files(), log=log)
    try:
        final = trainer.fit()
    except KeyboardInterrupt:
        raise RunInterrupted(spec.run_dir) from None
    finally:
        sink.close()
    if "val_perplexity" in final:
        log(f"final held-out loss {final['val_loss']:.4f}, perplexity {final['val_perplexity']:.2f}")
    if hasattr(train_data, "bad_input"):
        log_bad_input(train_data.bad_input(), log)
    latest = ckpt.latest_checkpoint(spec.run_dir)
    if samples is not None and rank == 0 and world == 1 and cfg.run.sample_tokens and cfg.run.sample_prompts:
        samples(trainer.model, tokenizer, cfg, log)
    if latest is not None and rank == 0 and not is_uri(spec.run_dir):
        log(next_steps(spec.run_dir))
    return TrainResult(final, str(latest) if latest else None, spec.run_dir)
