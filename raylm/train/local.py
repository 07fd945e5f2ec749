"""`raylm train --local` and torchrun: the whole job without Ray (run dir, tokenizer, data, trainer, samples).

One process, or every rank of a torchrun group (`torchrun --nproc-per-node 2 -m raylm train
CONFIG`; torchrun implies --local): rank 0 creates the run directory (or takes a resumed run's),
holds its lock for the run's life (`raylm.lock`), obtains the tokenizer and tells the other
ranks; every rank packs the data in memory (or reads prepared shards) and runs the one `Trainer`
with a `LocalSink`, so checkpoints, keep-K, resume and its checks follow the same rules as on Ray.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from raylm.config import Config
from raylm.data import prepared
from raylm.data.local import local_datasets, tokenizer_sample
from raylm.data.plan import corpus_files, data_fingerprint, list_corpus
from raylm.errors import RaylmError, RunInterrupted
from raylm.tokenizer import Tokenizer
from raylm.train import checkpoint as ckpt
from raylm.train.parallel import distributed_world, torchrun_group
from raylm.storage import is_uri
from raylm.train.runs import (CONFIG_FILE, TOKENIZER_FILE, RunFacts, RunSpec, check_resume, check_storage,
                              discard_run_dir, obtain_tokenizer, open_run_dir, resolve_run)
from raylm.train.trainer import LocalSink, RankEnv, Trainer


@dataclass(frozen=True)
class TrainResult:
    """What a finished (or stopped) training leaves: its last metrics, newest checkpoint and run directory."""

    metrics: dict
    checkpoint: str | None
    run_dir: str


def resolve_device(cfg: Config) -> torch.device:
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


def run_facts(cfg: Config, tokenizer: Tokenizer, listing=None) -> RunFacts:
    """This run's facts; `listing` is the corpus listed once (streaming), unused with prepared data."""
    if cfg.data.prepared_path:
        fingerprint = prepared.data_fingerprint(prepared.read_manifest(cfg.data.prepared_path), cfg)
        return RunFacts(tokenizer.sha256, cfg.data.seq_len, fingerprint)
    listing = listing or list_corpus(cfg)
    return RunFacts(tokenizer.sha256, cfg.data.seq_len, data_fingerprint(cfg, listing), corpus_files(cfg, listing))


def check_initial(spec: RunSpec, facts: RunFacts) -> None:
    """Fail before training starts when the checkpoint a run starts from does not match it."""
    if spec.initial_checkpoint is not None:
        marker = ckpt.read_marker(spec.initial_checkpoint) or {}
        check_resume(spec.initial_checkpoint, marker.get("facts"), facts, spec.cfg.run.resume_changes)


def checkpoint_files(spec: RunSpec, tokenizer: Tokenizer) -> dict[str, bytes]:
    """Files every checkpoint carries, so that it loads on its own (generate, eval, export)."""
    return {TOKENIZER_FILE: tokenizer.to_bytes(), CONFIG_FILE: spec.cfg.to_yaml().encode()}


def train_local(cfg: Config, log: Callable[[str], None] = print) -> TrainResult:
    """Train `cfg` in this process (or this torchrun group); return the result."""
    device = resolve_device(cfg)
    with torchrun_group(device.type) as (rank, world):
        return _train_local(cfg, device, rank, world, log)


def _train_local(cfg: Config, device: torch.device, rank: int, world: int, log: Callable[[str], None]) -> TrainResult:
    log = log if rank == 0 else (lambda line: None)
    check_storage(cfg)
    spec = resolve_run(cfg)
    held = None
    if rank == 0:  # rank 0 holds the run directory for the group: the other ranks write as its part
        try:
            spec, held = open_run_dir(spec)
        except RaylmError as e:
            if world == 1:
                raise
            spec = e
    spec = _share(spec, rank)
    if isinstance(spec, RaylmError):
        raise spec
    try:
        return _train_held(spec, device, rank, world, log, held)
    finally:
        if held is not None:
            held.release()


def _train_held(spec: RunSpec, device: torch.device, rank: int, world: int, log: Callable[[str], None],
                held) -> TrainResult:
    """The run, its directory held (by rank 0)."""
    cfg = spec.cfg
    try:
        listing = None if cfg.data.prepared_path else list_corpus(spec.cfg)
        tokenizer = None
        if rank == 0:
            log(f"run directory: {spec.run_dir}" + (f" (from {spec.initial_checkpoint})" if spec.initial_checkpoint
                                                    else ""))
            tokenizer = obtain_tokenizer(spec, lambda: tokenizer_sample(spec.cfg, listing), log,
                                         cfg.data.prepared_path)
            log(f"tokenizer: {tokenizer.vocab_size} pieces, sha256 {tokenizer.sha256[:12]}")
        tokenizer = _share(tokenizer, rank)
        facts = run_facts(spec.cfg, tokenizer, listing)
        check_initial(spec, facts)
        if cfg.data.prepared_path:
            prepared.check_prepared(spec.cfg, tokenizer.sha256)
            train_data, val_data = prepared.prepared_sources(spec.cfg)
        else:
            train_data, val_data = local_datasets(spec.cfg, tokenizer, listing)
        log(f"data: {len(train_data):,} training and {len(val_data) if val_data else 0:,} held-out sequences "
            f"of {cfg.data.seq_len} tokens")
    except BaseException:
        if rank == 0:
            discard_run_dir(spec, held)
        raise

    sink = LocalSink(spec.run_dir, cfg.run.keep_checkpoints, rank, cfg)
    trainer = Trainer(spec.cfg, RankEnv(rank, world, device), sink, train_data, val_data, facts=facts,
                      initial_checkpoint=spec.initial_checkpoint, extra_files=checkpoint_files(spec, tokenizer),
                      log=log)
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
    if rank == 0 and world == 1 and cfg.run.sample_tokens and cfg.run.sample_prompts:
        from raylm.use.sample import print_samples

        print_samples(trainer.model, tokenizer, cfg, log)
    if latest is not None and rank == 0 and not is_uri(spec.run_dir):
        from raylm.use.sample import next_steps

        log(next_steps(spec.run_dir))
    return TrainResult(final, str(latest) if latest else None, spec.run_dir)


def log_bad_input(report: dict, log: Callable[[str], None]) -> None:
    """The end-of-run summary of bad input skipped under data.on_error=skip (BadInputTally.report())."""
    for kind, n in report.get("skipped", {}).items():
        log(f"skipped {n} {kind} (data.on_error=skip): e.g. {report['examples'][kind]}")
