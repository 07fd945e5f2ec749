"""The one trainer: build the model, restore, run the loop, and decide when to evaluate, log, report and checkpoint.

Torch core, no Ray. `raylm train --local`, torchrun, a Ray Train worker and a Tune trial all
run this class; they differ only in the `Sink` they hand it, which decides *where* metrics
and checkpoints go (the run directory, or `ray.train.report`), never *when*:

    every step            sink.write(record)                  (metrics.jsonl, TensorBoard, run.tracking)
    report steps          sink.report(record, None)           log_every, eval steps
    checkpoint steps      save into sink.checkpoint_dir(step), then sink.report(record, dir)

Every rank reaches the same decisions at the same steps (they depend on the step alone), so a
sink whose report is a barrier (`ray.train.report`) never hangs.

Data in: `train_data.micro_batches(position, rank, world_size, micro_batch_size, step_sequences)`
yields this rank's micro-batches `{"tokens": (n, L+1), "index": (n,)}` (n <= B; short or
empty ones when the world size does not divide the batch, `raylm.data.order.step_slots`) of
the sequences `position` (a `DataPosition`) has not consumed; `val_data` the same for
held-out data, read from the start at each evaluation. A source may also offer
`bad_input()`, the counts of skipped bad input (`data.on_error=skip`), which go into the
metrics, and `finite = True` when it can run out (a streaming pass): then every step the
ranks agree whether all of them hold a full step, so none waits in a collective for one
that has stopped; a stream that ends checkpoints and stops the run (`stream_ended`).
A batch may carry `"anchor"` (n, 2): where each row begins in the corpus (file position,
token offset), from which a streaming restart resumes reading (`TrainState.data_anchor`).

Preemption: every `train.preemption_check_every` steps all ranks ask the sink whether a node
is being preempted (`sink.preempted()`, a barrier on Ray); the first time one is, they save a
checkpoint at once and train on until Ray restarts them elsewhere from it.

Background saves (`train.checkpoint_async`; auto: on GPU): at a checkpoint step the state is
staged and written by a thread (`checkpoint.begin_save`) while training goes on. At most one
save is in flight: after every step the ranks agree whether all of them have written theirs
(`checkpoint.all_written`, one small all-reduce while a save is in flight), and the first step
at which they have, the marker is written (`checkpoint.finish_save`) and only then is the
checkpoint reported, with its own step's record. The next checkpoint step, a preemption
notice (whose own save is blocking) and the end of the run first wait for the save in flight.
A run that fails while a save is in flight waits for its own thread and writes no marker, so
the previous checkpoint stays the newest verified one. The last step's save is blocking.

Metrics after a restore: `sink.rewind(step)` drops the records of steps after the restored
checkpoint (they are trained again), so metrics.jsonl and TensorBoard hold one curve.

Restore: the newest checkpoint that verifies among the sink's (a restart after a failure, a
run continued in place) and the one the run starts from (`run.resume_from`), each rank
verifying what it reads while it loads (`checkpoint.restore_newest`). A damaged one is skipped
by every rank together, with a warning. Its recorded `RunFacts` must match this run's (`runs.check_resume`).
Then rank 0 moves the run's checkpoints above the restored step aside (`sink.set_aside_after`,
`checkpoint.set_aside_after`): they belong to an abandoned future, and keep-K never counts them.

Non-finite steps: a step whose loss or gradient norm is not finite applies no update and is
counted (`skipped_steps`); `train.max_nonfinite_steps` of them in a row stop the run with a
`TrainingError`. Checkpoints therefore only ever hold finite weights.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.distributed as dist

from raylm import storage
from raylm.config import Config
from raylm.data.order import DataPosition, rounds_per_step, step_shares
from raylm.errors import CheckpointError, TrainingError
from raylm.optim import apply_group_settings, build_optimizer, lr_at, set_lr
from raylm.tokenizer import HF_PREFIX
from raylm.train import checkpoint as ckpt
from raylm.train.hf_import import load_hf_weights
from raylm.train.metrics import MetricsWriter, device_peak_flops, peak_memory_bytes
from raylm.train.parallel import build_model, distributed_world
from raylm.train.runs import RunFacts, check_resume, init_checkpoint
from raylm.train.step import evaluate, train_step


class BatchSource(Protocol):
    def micro_batches(self, position: DataPosition, rank: int, world_size: int, micro_batch_size: int,
                      step_sequences: int | None = None): ...


class Sink(Protocol):
    """Where a run's metrics and checkpoints go; every rank calls every method at the same steps."""

    def write(self, record: dict) -> None: ...
    def checkpoint_dir(self, step: int) -> str | Path: ...  # a local directory or a URI
    def report(self, record: dict, checkpoint: str | Path | None) -> None: ...
    def restore_candidates(self) -> list[str | Path]: ...
    def rewind(self, step: int) -> None: ...
    def preempted(self) -> bool: ...
    def close(self) -> None: ...
    def set_aside_after(self, step: int, log: Callable[[str], None]) -> None: ...
    """Called on rank 0 once after the restore, before the first save, with the step restored
    (0: a fresh start): move the run's checkpoints above that step aside
    (`checkpoint.set_aside_after`)."""


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
    """Optimizer steps completed (a skipped non-finite step counts: its data is consumed)."""
    tokens_consumed: int = 0
    """Training tokens (targets) seen over all workers."""
    skipped_steps: int = 0
    """Steps whose update was skipped because the loss or gradient was not finite."""
    data_position: DataPosition = field(default_factory=DataPosition)
    """Which global sequence indices have been trained on (up to the last `sync_position`)."""
    data_anchor: list[int] | None = None
    """[index, file position, token offset] of a consumed row below the watermark: where a
    streaming restart resumes reading (None: from the start, or the source has no anchors)."""
    pending_indices: list = field(default_factory=list)
    """This rank's consumed indices not yet merged into data_position."""
    pending_anchors: list = field(default_factory=list)
    """This rank's (index, file position, token offset) rows not yet merged (streaming only)."""

    def sync_position(self) -> None:
        """Merge every rank's consumed indices into data_position (a collective when distributed)."""
        local = np.concatenate([np.asarray(i, dtype=np.int64).ravel() for i in self.pending_indices]) \
            if self.pending_indices else np.zeros(0, dtype=np.int64)
        anchors = np.concatenate(self.pending_anchors) if self.pending_anchors else np.zeros((0, 3), np.int64)
        if distributed_world()[1] > 1:
            gathered: list = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, (local.tolist(), anchors.tolist()))
            local = np.asarray([i for part, _ in gathered for i in part], dtype=np.int64)
            anchors = np.asarray([a for _, part in gathered for a in part], dtype=np.int64).reshape(-1, 3)
        self.data_position = self.data_position.advance(local)
        self.pending_indices, self.pending_anchors = [], []
        below = anchors[anchors[:, 0] < self.data_position.watermark] if len(anchors) else anchors
        if len(below):
            best = below[np.argmax(below[:, 0])].tolist()
            if self.data_anchor is None or best[0] > self.data_anchor[0]:
                self.data_anchor = [int(v) for v in best]

    def state_dict(self) -> dict[str, Any]:
        """Plain ints and lists only: checkpoints never need to unpickle objects."""
        position = self.data_position.state_dict()
        return {"step": self.step, "tokens_consumed": self.tokens_consumed, "skipped_steps": self.skipped_steps,
                "data_watermark": position["watermark"], "data_extra": position["extra"],
                "data_anchor": self.data_anchor}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        self.tokens_consumed = int(state["tokens_consumed"])
        self.skipped_steps = int(state.get("skipped_steps", 0))
        self.data_position = DataPosition.from_state_dict(
            {"watermark": state["data_watermark"], "extra": state.get("data_extra", [])}
        )
        anchor = state.get("data_anchor")
        self.data_anchor = [int(v) for v in anchor] if anchor else None
        self.pending_indices, self.pending_anchors = [], []


class RunDirSink:
    """Metrics and checkpoints in a run directory (local, shared, or a URI on object storage, which
    every rank writes its shards to directly), keeping the newest K checkpoints. The checkpoint
    just written is the newest verified one (written by this process, after the restore moved
    every newer one aside), and the prune never deletes it."""

    def __init__(self, run_dir: str | Path, keep_checkpoints: int, rank: int = 0, cfg: Config | None = None):
        self.run_dir, self.keep, self.rank = storage.location(run_dir), keep_checkpoints, rank
        self.writer = MetricsWriter(self.run_dir, enabled=rank == 0, **tracking_options(cfg))

    def write(self, record: dict) -> None:
        self.writer.write(record)

    def checkpoint_dir(self, step: int) -> str | Path:
        return storage.child(self.run_dir, ckpt.checkpoint_dir_name(step))

    def report(self, record: dict, checkpoint: str | Path | None) -> None:
        if checkpoint is not None and self.rank == 0:
            self.writer.sync()
            ckpt.prune_checkpoints(self.run_dir, self.keep, protect=[checkpoint])

    def set_aside_after(self, step: int, log: Callable[[str], None]) -> None:
        ckpt.set_aside_after(self.run_dir, step, log)

    def restore_candidates(self) -> list[str | Path]:
        return ckpt.list_checkpoints(self.run_dir)

    def rewind(self, step: int) -> None:
        self.writer.rewind(step)

    def preempted(self) -> bool:
        return False  # a local run has no preemption notices

    def close(self) -> None:
        self.writer.close()


def tracking_options(cfg: Config | None) -> dict:
    """MetricsWriter's tracking arguments from a run's config (`run.tracking`; none without a config)."""
    if cfg is None or not cfg.run.tracking:
        return {}
    return {"tracking": list(cfg.run.tracking), "params": cfg.to_dict(), "tracking_group": cfg.run.tracking_group}


# ---------------------------------------------------------------------------------------
# When things happen: the one place that decides it.


def eval_due(cfg: Config, step: int) -> bool:
    t = cfg.train
    return step == t.max_steps or bool(t.eval_every and step % t.eval_every == 0)


def log_due(cfg: Config, step: int) -> bool:
    return step % cfg.train.log_every == 0 or step == 1 or step == cfg.train.max_steps


def checkpoint_due(cfg: Config, step: int) -> bool:
    t = cfg.train
    return step == t.max_steps or bool(t.checkpoint_every and step % t.checkpoint_every == 0)


def saves_in_background(cfg: Config, device_type: str) -> bool:
    """train.checkpoint_async: `auto` saves in the background on a GPU (the copy to host memory is
    cheap there); the planner (raylm.plan) asks the same question."""
    background = cfg.train.checkpoint_async
    return device_type == "cuda" if background == "auto" else bool(background)


def report_due(cfg: Config, step: int) -> bool:
    """Metrics reports (to Ray Train and Tune) at log and eval steps; checkpoints report themselves."""
    return step % cfg.train.log_every == 0 or eval_due(cfg, step)


def preemption_check_due(cfg: Config, step: int) -> bool:
    every = cfg.train.preemption_check_every
    return bool(every) and step % every == 0 and step < cfg.train.max_steps


class Trainer:
    """One rank's whole training: build -> restore -> loop, with decisions made here alone."""

    def __init__(self, cfg: Config, env: RankEnv, sink: Sink, train_data: BatchSource,
                 val_data: BatchSource | None = None, *, facts: RunFacts | None = None,
                 initial_checkpoint: str | Path | None = None, extra_files: dict[str, bytes] | None = None,
                 model: torch.nn.Module | None = None, optimizer: torch.optim.Optimizer | None = None,
                 log: Callable[[str], None] = print, on_indices: Callable[[int, np.ndarray], None] | None = None):
        self.cfg, self.env, self.sink = cfg, env, sink
        self.train_data, self.val_data = train_data, val_data
        self.facts, self.initial_checkpoint, self.extra_files = facts, initial_checkpoint, extra_files or {}
        self.log = log if env.is_main else (lambda line: None)
        self.on_indices = on_indices
        self._own_model = model is None and optimizer is None
        if model is None:
            model = build_model(cfg, env.device)
        self.model = model
        self.optimizer = optimizer or build_optimizer(model, cfg.optimizer, env.device.type)
        self.state = TrainState()
        self.restored_from: str | Path | None = None
        self.last_checkpoint: str | Path | None = None
        self.checkpointed_step: int | None = None
        self.in_flight: tuple[ckpt.Save, dict] | None = None
        """The background save not yet finished, and its step's record."""
        self.background_saves = saves_in_background(cfg, env.device.type)

    # -- restore ---------------------------------------------------------------------------

    def restore(self) -> TrainState:
        """Load the newest good checkpoint among the sink's and the initial one, if any; then set
        aside the sink's checkpoints above the step restored (`_set_aside_future`)."""
        state = self._restore()
        self._set_aside_future(state.step)
        return state

    def _set_aside_future(self, step: int) -> None:
        """Checkpoints of this run above the restored step (damaged, cut short, or newer than one
        that is) belong to an abandoned future: rank 0 moves them aside before any rank saves, so
        that they are never restored, overwritten piecemeal or counted by keep-K. A fresh start
        (step 0) in a directory that holds checkpoints moves them all: none was usable."""
        if self.env.is_main:
            self.sink.set_aside_after(step, self.log)
        if distributed_world()[1] > 1:
            dist.barrier()  # no rank writes into a checkpoint directory before it is moved

    def _restore(self) -> TrainState:
        """Each rank reads the checkpoint's bytes once, verifying what it reads as it loads it
        (`checkpoint.restore_newest`); a damaged one makes every rank fall back together."""
        candidates = list(self.sink.restore_candidates())
        if self.initial_checkpoint is not None:
            candidates.append(storage.location(self.initial_checkpoint))
        pristine = self._pristine() if candidates else None

        def check(path, marker):
            check_resume(path, marker.get("facts"), self.facts, self.cfg.run.resume_changes)
        found, damaged = ckpt.restore_newest(candidates, self.model, self.optimizer, log=self.log,
                                             check=check if self.facts is not None else None) \
            if candidates else (None, [])
        if damaged:
            self._after_damage(damaged, found)
        if found is None:
            if damaged:
                pristine()  # a damaged checkpoint was partly loaded
            if self.initial_checkpoint is not None:
                raise CheckpointError(f"run.resume_from: no usable checkpoint among {self.initial_checkpoint} "
                                           "and this run's own")
            return self._fresh_start()
        path, marker = found
        self.state.load_state_dict(marker["train_state"])
        apply_group_settings(self.optimizer, self.model, self.cfg.optimizer.weight_decay)  # the config's, not the saved
        self.restored_from = path
        self.sink.rewind(self.state.step)
        return self.state

    def _pristine(self) -> Callable[[], None]:
        """A function that puts the model and optimizer back as they are now, before any load: a
        fresh build for the trainer's own model (seeded, so the same weights), a copy taken now
        for a model the caller handed in."""
        if self._own_model:
            def rebuild():
                self.model = build_model(self.cfg, self.env.device)
                self.optimizer = build_optimizer(self.model, self.cfg.optimizer, self.env.device.type)
            return rebuild
        model_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        optim_state = copy.deepcopy(self.optimizer.state_dict())

        def put_back():
            self.model.load_state_dict(model_state)
            self.optimizer.load_state_dict(optim_state)
        return put_back

    def _after_damage(self, damaged: list, found) -> None:
        """A streaming source on Ray was built, before the workers started, from the newest
        checkpoint that passes the cheap check (`checkpoint.newest_complete`): the one found
        damaged here. Rank 0 notes the damage in each such checkpoint, so that the next choice
        made from markers alone skips it, and every rank stops: the restart (Ray Train's
        `run.max_failures`) builds the stream from the checkpoint restored now."""
        if not getattr(self.train_data, "starts_at_newest_complete", False):
            return
        if self.env.is_main:
            for path, reason in damaged:
                ckpt.mark_damaged(path, reason)
        if distributed_world()[1] > 1:
            dist.barrier()
        restored = found[0] if found is not None else "the start"
        raise CheckpointError(f"checkpoint {damaged[0][0]} was found damaged while loading ({damaged[0][1]}), and "
                              f"the training stream had been built from it; restarting the workers so that the "
                              f"stream starts from {restored} (one restart of run.max_failures)")

    def _fresh_start(self) -> TrainState:
        """Step 0: the random init, or the weights of `model.init_from` (continued pretraining).
        Only a run with no checkpoint of its own starts here: a restart of an imported run
        restores its own checkpoints, never the import."""
        self.sink.rewind(0)
        init_from = self.cfg.model.init_from
        if init_from.startswith(HF_PREFIX):
            load_hf_weights(self.model, self.cfg.model)
            self.log(f"initial weights from {init_from}")
        elif init_from:  # a raylm run or checkpoint: its weights only (not its optimizer, step or data)
            source = init_checkpoint(init_from)
            ckpt.load_checkpoint(source, self.model, verify=False)  # init_checkpoint verified it
            self.log(f"initial weights from {source}")
        return self.state

    # -- the loop --------------------------------------------------------------------------

    def fit(self) -> dict:
        """Restore, then train to train.max_steps; return the last metrics (held-out ones included).

        A finite training source that runs out checkpoints and returns early with
        `stream_ended` set to the last step in the result."""
        try:
            return self._fit()
        except BaseException:
            if self.in_flight is not None:  # no marker: the previous checkpoint stays the newest
                ckpt.abandon_save(self.in_flight[0])
                self.in_flight = None
            raise

    def _fit(self) -> dict:
        cfg, env, state = self.cfg, self.env, self.restore()
        t, W, B, G = cfg.train, env.world_size, cfg.train.micro_batch_size, cfg.sequences_per_step
        accum = cfg.grad_accum_steps(W)
        seq_len = cfg.data.seq_len
        flops_per_token = cfg.model.flops_per_token(seq_len)
        peak_flops = device_peak_flops(env.device, t.peak_flops)

        batches = self.train_data.micro_batches(state.data_position, env.rank, W, B, G)
        self.model.train()
        last: dict = {"step": state.step}
        if state.step == 0 and self.val_data is not None and t.eval_every:
            first = self._evaluate(0)
            if first:
                self.sink.write({"step": 0, **first})
                last.update(first)
        shares = step_shares(G, W, B)
        split = "" if len(set(shares)) == 1 else f" (uneven split: {'/'.join(map(str, shares))} sequences per worker)"
        self.log(f"training {cfg.model.num_params():,} parameters on {W} worker(s): {accum} micro-batch(es) of "
                 f"{B}x{seq_len} per worker per step{split}, {G * seq_len:,} tokens per step, "
                 f"from step {state.step}" + (f" ({self.restored_from})" if self.restored_from else ""))
        nonfinite_run = 0
        preemption_saved = False
        while state.step < t.max_steps:
            micro, wait_s = self._next_step_batches(batches, accum)
            if micro is None:
                return self._stream_ended(last)
            record = self._step(micro, wait_s, flops_per_token, peak_flops)
            nonfinite_run = 0 if record["update_applied"] else nonfinite_run + 1
            step = state.step
            if eval_due(cfg, step) and self.val_data is not None:
                record.update(self._evaluate(step))
            self._add_bad_input(record)
            self.sink.write(record)
            last.update(record)
            if log_due(cfg, step):
                self.log(_progress_line(record, t.max_steps))
            if nonfinite_run:
                self.log(f"step {step}: non-finite loss {record['loss']} or gradient norm {record['grad_norm']}; "
                         f"update skipped ({nonfinite_run} in a row, {state.skipped_steps} in all)")
                if nonfinite_run >= t.max_nonfinite_steps:
                    raise TrainingError(
                        f"train.max_nonfinite_steps={t.max_nonfinite_steps}: steps {step - nonfinite_run + 1}-{step} "
                        f"all had a non-finite loss or gradient; stopped (last checkpoint: {self.last_checkpoint or 'none'}"
                        "); lower optimizer.lr or set train.grad_clip")
            if self.in_flight is not None and ckpt.all_written(self.in_flight[0]):
                self._finish_in_flight()
            if checkpoint_due(cfg, step):
                self._checkpoint(record, background=self.background_saves and step < t.max_steps)
            elif not preemption_saved and preemption_check_due(cfg, step) and self.sink.preempted():
                self.log(f"step {step}: a node of this run is being preempted; checkpointing now")
                self._checkpoint(record)  # after the save in flight, if any; blocking
                preemption_saved = True
            elif report_due(cfg, step):
                self.sink.report(record, None)
        self._finish_in_flight()
        state.sync_position()
        return last

    def _next_step_batches(self, batches, accum: int) -> tuple[list | None, float]:
        """The step's micro-batches, or None when a finite source ran out on any rank (all agree)."""
        wait_start = time.perf_counter()
        micro = []
        try:
            for _ in range(accum):
                micro.append(next(batches))
        except StopIteration:
            micro = None
        if getattr(self.train_data, "finite", False) and distributed_world()[1] > 1:
            short = torch.tensor([0 if micro is not None else 1], dtype=torch.int32, device=self.env.device)
            dist.all_reduce(short, op=dist.ReduceOp.MAX)  # on the device: nccl reduces only CUDA tensors
            if int(short.item()):
                micro = None
        return micro, time.perf_counter() - wait_start

    def _stream_ended(self, last: dict) -> dict:
        """The training stream ran out before train.max_steps: checkpoint what was trained and stop."""
        state = self.state
        self.log(f"the training stream ended after step {state.step} of {self.cfg.train.max_steps} "
                 f"(data.stream_passes={self.cfg.data.stream_passes}); checkpointing and stopping")
        record = {**last, "step": state.step, "stream_ended": state.step}
        self._finish_in_flight()
        if self.checkpointed_step != state.step:
            self._checkpoint(record)
        else:
            state.sync_position()
            self.sink.report(record, None)
        return record

    def _step(self, micro: list, wait_s: float, flops_per_token: float, peak_flops: float | None) -> dict:
        cfg, env, state = self.cfg, self.env, self.state
        step_start = time.perf_counter() - wait_s
        indices = np.concatenate([np.asarray(m["index"]).ravel() for m in micro])
        if self.on_indices is not None:
            self.on_indices(state.step, indices)
        anchors = [np.column_stack([np.asarray(m["index"]).ravel(), np.asarray(m["anchor"]).reshape(-1, 2)])
                   for m in micro if "anchor" in m and len(m["index"])]
        lr = lr_at(state.step, cfg.train.max_steps, cfg.optimizer)
        set_lr(self.optimizer, lr)
        global_tokens = cfg.sequences_per_step * cfg.data.seq_len
        stats = train_step(self.model, self.optimizer, micro, env.device, cfg.train.precision, cfg.train.grad_clip,
                           env.world_size, global_tokens=global_tokens, grad_sync=cfg.train.grad_sync,
                           document_mask=cfg.data.documents_masked, supervised=cfg.data.supervised)
        step_s = time.perf_counter() - step_start  # train_step's host sync waited for the device

        state.step += 1
        state.pending_indices.append(indices)
        if anchors:
            state.pending_anchors.append(np.concatenate(anchors).astype(np.int64))
        state.tokens_consumed += global_tokens
        state.skipped_steps += 0 if stats.applied else 1
        tps = global_tokens / step_s
        record = {
            "step": state.step,
            "time": time.time(),
            "loss": stats.loss,
            "accuracy": stats.accuracy,
            "lr": lr,
            "grad_norm": stats.grad_norm,
            "update_applied": stats.applied,
            "skipped_steps": state.skipped_steps,
            "world_size": env.world_size,
            "tokens_per_second": tps,
            "tokens_per_second_per_worker": tps / env.world_size,
            "tokens_consumed": state.tokens_consumed,
            "step_time_s": step_s,
            "data_wait_fraction": wait_s / step_s,
            "peak_memory_bytes": peak_memory_bytes(env.device),
        }
        if peak_flops:
            record["mfu"] = tps / env.world_size * flops_per_token / peak_flops
        return record

    def _evaluate(self, step: int) -> dict:
        cfg, env = self.cfg, self.env
        B, E = cfg.train.micro_batch_size, cfg.eval_sequences
        it = self.val_data.micro_batches(DataPosition(), env.rank, env.world_size, B, E)
        result = evaluate(self.model, (next(it) for _ in range(rounds_per_step(E, env.world_size, B))),
                          env.device, cfg.train.precision, cfg.data.documents_masked, cfg.data.supervised)
        if result:
            self.log(f"eval at step {step}: held-out loss {result['val_loss']:.4f}, "
                     f"perplexity {result['val_perplexity']:.2f}, accuracy {result['val_accuracy']:.3f}")
        return result

    def _add_bad_input(self, record: dict) -> None:
        report = getattr(self.train_data, "bad_input", None)
        if report is None or not (self.env.is_main and log_due(self.cfg, record["step"])):
            return
        skipped = report().get("skipped", {})
        record["bad_input_skipped"] = sum(skipped.values())
        record.update({f"bad_input_skipped_{kind}": n for kind, n in skipped.items()})

    def _checkpoint(self, record: dict, background: bool = False) -> None:
        """Save a checkpoint of this step, after the save in flight (at most one is); report it now,
        or (`background`) once its files are written (`_finish_in_flight`)."""
        self._finish_in_flight()
        self.state.sync_position()
        path = self.sink.checkpoint_dir(self.state.step)
        save = ckpt.begin_save(path, self.model, self.optimizer, self.state.state_dict(),
                               facts=self.facts.to_dict() if self.facts else None, extra_files=self.extra_files,
                               background=background)
        self.checkpointed_step = self.state.step
        self.in_flight = (save, record)
        if not background:
            self._finish_in_flight()

    def _finish_in_flight(self) -> None:
        """Wait for the save in flight (if any) on every rank, write its marker and report it."""
        if self.in_flight is None:
            return
        save, record = self.in_flight
        self.in_flight = None
        path = ckpt.finish_save(save)
        self.last_checkpoint = path
        self.sink.report(record, path)


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
    if r.get("bad_input_skipped"):
        parts.append(f"skipped input {r['bad_input_skipped']}")
    return " | ".join(parts)
