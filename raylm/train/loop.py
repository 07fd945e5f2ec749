"""The per-rank training loop: runs in one plain process, under torchrun, or in a Ray Train worker.

It knows nothing of Ray. Its seams are:
- data in: `train_data.micro_batches(position, rank, world_size, micro_batch_size)` yields
  this rank's micro-batches `{"tokens": (B, L+1), "index": (B,)}` of the sequences that
  `position` (a `DataPosition`) has not consumed (see raylm.data.order); `val_data` the same
  for held-out data, read from the start at each evaluation;
- metrics out: every record goes to `hooks.on_metrics` (rank 0 writes metrics.jsonl);
- checkpoints out: `hooks.save_checkpoint(state, metrics)` every `train.checkpoint_every`
  steps and at the end, on every rank (saving is a collective).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
import torch.distributed as dist

from raylm.config import Config
from raylm.data.order import DataPosition
from raylm.optim import lr_at, set_lr
from raylm.train.metrics import device_peak_flops, peak_memory_bytes
from raylm.train.step import evaluate, train_step


class BatchSource(Protocol):
    def micro_batches(self, position: DataPosition, rank: int, world_size: int, micro_batch_size: int): ...


@dataclass
class RankEnv:
    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0


@dataclass
class TrainState:
    """Where training stands: saved in every checkpoint beside model and optimizer."""

    step: int = 0
    """Optimizer steps completed."""
    tokens_consumed: int = 0
    """Training tokens (targets) seen over all workers."""
    data_position: DataPosition = field(default_factory=DataPosition)
    """Which global sequence indices have been trained on (up to the last `sync_position`)."""
    pending_indices: list = field(default_factory=list)
    """This rank's consumed indices not yet merged into data_position."""

    def sync_position(self) -> None:
        """Merge every rank's consumed indices into data_position (a collective when distributed)."""
        local = np.concatenate([np.asarray(i, dtype=np.int64).ravel() for i in self.pending_indices]) \
            if self.pending_indices else np.zeros(0, dtype=np.int64)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            gathered: list = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, local.tolist())
            local = np.asarray([i for part in gathered for i in part], dtype=np.int64)
        self.data_position = self.data_position.advance(local)
        self.pending_indices = []

    def state_dict(self) -> dict[str, Any]:
        """Plain ints and lists only: checkpoints never need to unpickle objects."""
        return {"step": self.step, "tokens_consumed": self.tokens_consumed, **_prefixed(self.data_position)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        self.tokens_consumed = int(state["tokens_consumed"])
        self.data_position = DataPosition.from_state_dict(
            {"watermark": state["data_watermark"], "extra": state.get("data_extra", [])}
        )
        self.pending_indices = []


def _prefixed(position: DataPosition) -> dict[str, Any]:
    state = position.state_dict()
    return {"data_watermark": state["watermark"], "data_extra": state["extra"]}


@dataclass
class Hooks:
    on_metrics: Callable[[dict], None] = lambda record: None
    """Called on every rank with each metrics record (step, eval and final)."""
    save_checkpoint: Callable[[TrainState, dict], None] | None = None
    """Called on every rank when a checkpoint is due."""
    on_indices: Callable[[int, Any], None] | None = None
    """Called with (step, global indices of this rank's step); for data-order tests and audits."""
    log: Callable[[str], None] = print
    """Progress lines (rank 0 only)."""


def resolve_device(cfg: Config) -> torch.device:
    if cfg.train.device == "cuda" or (cfg.train.device == "auto" and torch.cuda.is_available()):
        return torch.device("cuda", torch.cuda.current_device() if torch.cuda.is_available() else 0)
    return torch.device("cpu")


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def run_training(
    cfg: Config,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    train_data: BatchSource,
    val_data: BatchSource | None,
    env: RankEnv,
    state: TrainState | None = None,
    hooks: Hooks | None = None,
) -> dict:
    """Train from `state` (fresh or restored) to `train.max_steps`; return the final metrics."""
    state = state or TrainState()
    hooks = hooks or Hooks()
    t, W, B = cfg.train, env.world_size, cfg.train.micro_batch_size
    accum = cfg.grad_accum_steps(W)
    seq_len = cfg.data.seq_len
    flops_per_token = cfg.model.flops_per_token(seq_len)
    peak_flops = device_peak_flops(env.device, t.peak_flops)
    log = hooks.log if env.is_main else (lambda line: None)

    batches = train_data.micro_batches(state.data_position, env.rank, W, B)
    model.train()
    last: dict = {}
    if state.step == 0 and t.eval_every and val_data is not None:
        last = _evaluate(cfg, model, val_data, env, state, hooks, log)
    log(f"training {cfg.model.num_params():,} parameters on {W} worker(s): {accum} micro-batch(es) of {B}x{seq_len} "
        f"per worker per step, {cfg.sequences_per_step * seq_len:,} tokens per step, from step {state.step}")

    while state.step < t.max_steps:
        step_start = time.perf_counter()
        wait_s = 0.0
        micro = []
        for _ in range(accum):
            wait_start = time.perf_counter()
            micro.append(next(batches))
            wait_s += time.perf_counter() - wait_start
        indices = np.concatenate([np.asarray(m["index"]).ravel() for m in micro])
        if hooks.on_indices is not None:
            hooks.on_indices(state.step, indices)
        lr = lr_at(state.step, t.max_steps, cfg.optimizer)
        set_lr(optimizer, lr)
        stats = train_step(model, optimizer, micro, env.device, t.precision, t.grad_clip, W)
        if env.device.type == "cuda":
            torch.cuda.synchronize(env.device)
        step_s = time.perf_counter() - step_start

        state.step += 1
        state.pending_indices.append(indices)
        state.tokens_consumed += stats.tokens * W
        worker_tps = stats.tokens / step_s
        record = {
            "step": state.step,
            "loss": stats.loss,
            "accuracy": stats.accuracy,
            "lr": lr,
            "grad_norm": stats.grad_norm,
            "tokens_per_second": worker_tps * W,
            "tokens_per_second_per_worker": worker_tps,
            "tokens_consumed": state.tokens_consumed,
            "step_time_s": step_s,
            "data_wait_fraction": wait_s / step_s,
            "peak_memory_bytes": peak_memory_bytes(env.device),
        }
        if peak_flops:
            record["mfu"] = worker_tps * flops_per_token / peak_flops
        is_last = state.step == t.max_steps
        if t.eval_every and val_data is not None and (state.step % t.eval_every == 0 or is_last):
            record.update(_evaluate(cfg, model, val_data, env, state, hooks, log, emit=False))
        hooks.on_metrics(record)
        last.update(record)
        if state.step % t.log_every == 0 or state.step == 1 or is_last:
            log(_progress_line(record, t.max_steps))
        if hooks.save_checkpoint is not None and (
            is_last or (t.checkpoint_every and state.step % t.checkpoint_every == 0)
        ):
            state.sync_position()
            hooks.save_checkpoint(state, record)
    state.sync_position()
    return last


def _evaluate(cfg, model, val_data, env, state, hooks, log, emit: bool = True) -> dict:
    it = val_data.micro_batches(DataPosition(), env.rank, env.world_size, cfg.train.micro_batch_size)
    result = evaluate(model, (next(it) for _ in range(cfg.train.eval_batches)), env.device, cfg.train.precision)
    if result:
        log(f"eval at step {state.step}: held-out loss {result['val_loss']:.4f}, "
            f"perplexity {result['val_perplexity']:.2f}, accuracy {result['val_accuracy']:.3f}")
        if emit:
            hooks.on_metrics({"step": state.step, **result})
    return result


def _progress_line(r: dict, max_steps: int) -> str:
    parts = [
        f"step {r['step']}/{max_steps}",
        f"loss {r['loss']:.4f}",
        f"acc {r['accuracy']:.3f}",
        f"lr {r['lr']:.2e}",
        f"gnorm {r['grad_norm']:.2f}",
        f"{r['tokens_per_second']:,.0f} tok/s",
    ]
    if "mfu" in r:
        parts.append(f"mfu {100 * r['mfu']:.1f}%")
    return " | ".join(parts)
