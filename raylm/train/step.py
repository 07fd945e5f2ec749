"""One optimizer step and one evaluation pass: forward, loss, backward, clip, update (or skip).

Works the same on a plain module and on an FSDP2-sharded one. Under FSDP2, `grad_sync`
(`train.grad_sync`) decides when gradients are reduce-scattered: "every" micro-batch, so a rank
only ever holds its 1/W shard between micro-batches (as torchtitan does), or only the "last",
so each rank accumulates the whole unsharded gradient and reduces once per step (less
communication, W times the gradient memory: docs/plan.md says which to use when). The gradient
norm comes back as a DTensor that is made whole before logging.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from raylm.tokenizer import BOS_ID, EOS_ID
from raylm.train.parallel import distributed_world, uses_bf16

IGNORE_INDEX = -100
"""cross_entropy's default ignore_index: a target that is not trained."""


@dataclass
class StepStats:
    loss: float
    """Mean next-token cross-entropy over the global batch (nats/token); may be non-finite."""
    accuracy: float
    """Share of next tokens predicted exactly (argmax), over the global batch."""
    grad_norm: float
    """Global gradient norm before clipping; may be non-finite."""
    tokens: int
    """Tokens trained on by this rank in this step."""
    applied: bool
    """False when the loss or the gradient was not finite and the update was skipped."""


def autocast_for(device: torch.device, precision: str):
    if not uses_bf16(precision, device):
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def to_device(batch: dict, device: torch.device) -> tuple[torch.Tensor, float]:
    """(tokens (n, L + 1) on the device, weight): an empty micro-batch (an uneven split's
    idle slot) becomes one row of zeros with weight 0, so every rank runs the same forwards
    and backwards and the FSDP collectives stay in step."""
    tokens = batch["tokens"]
    if not isinstance(tokens, torch.Tensor):
        tokens = torch.from_numpy(tokens)
    if tokens.shape[0] == 0:
        return torch.zeros((1, tokens.shape[1]), dtype=torch.long, device=device), 0.0
    return tokens.to(device=device, dtype=torch.long, non_blocking=True), 1.0


def target_count(batch: dict) -> int:
    """Targets (next tokens) a micro-batch trains on: rows x seq_len."""
    shape = batch["tokens"].shape
    return int(shape[0]) * (int(shape[1]) - 1)


def inputs_targets(tokens: torch.Tensor, document_mask: bool = False, supervised: bool = False
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(inputs (B, L), targets (B, L), documents (B, L) or None) of stored rows (B, L + 1).

    A negative stored token is a no-loss token (`raylm.data.transforms.masked_ids`): its id is
    restored and, as a target, it becomes IGNORE_INDEX. Plain text has none, so its inputs and
    targets are the rows' own slices. Documents (`Transformer.forward`) count the EOS tokens
    before each input. `supervised` (pairs, chat) also drops the targets that no pair trains:
    a BOS (the next document's start, after an EOS) and those of a row's leading document when
    the row does not start with its BOS (a pair cut by the row boundary: its prompt is in the
    row before, out of reach)."""
    kept = tokens >= 0  # (B, L + 1)
    ids = torch.where(kept, tokens, -1 - tokens)  # (B, L + 1)
    inputs = ids[:, :-1]  # (B, L)
    targets = ids[:, 1:].masked_fill(~kept[:, 1:], IGNORE_INDEX)  # (B, L)
    documents = None
    if document_mask or supervised:
        eos = (inputs == EOS_ID).int()  # (B, L)
        documents = eos.cumsum(dim=1) - eos  # (B, L): EOS tokens strictly before each input
    if supervised:
        cut = (documents == 0) & (inputs[:, :1] != BOS_ID)  # (B, L)
        targets = targets.masked_fill(cut | (targets == BOS_ID), IGNORE_INDEX)
    return inputs, targets, documents if document_mask else None


def trained_count(batch: dict, supervised: bool = False) -> int:
    """Targets a micro-batch trains on: rows x seq_len for plain text; for supervised data the
    targets `inputs_targets` keeps (counted on the host, where the rows are)."""
    if not supervised:
        return target_count(batch)
    tokens = batch["tokens"]
    tokens = tokens if isinstance(tokens, torch.Tensor) else torch.from_numpy(tokens)
    if tokens.shape[0] == 0:
        return 0
    _, targets, _ = inputs_targets(tokens.long(), False, True)
    return int((targets != IGNORE_INDEX).sum())


def loss_and_correct(model: torch.nn.Module, tokens: torch.Tensor, precision: str,
                     document_mask: bool = False, supervised: bool = False):
    """Summed cross-entropy and correct-prediction count over the trained targets of `tokens`
    (all B*L of them for plain text)."""
    inputs, targets, documents = inputs_targets(tokens, document_mask, supervised)  # (B, L) each
    with autocast_for(tokens.device, precision):
        logits = model(inputs) if documents is None else model(inputs, documents=documents)  # (B, L, V)
    logits = logits.float()
    loss_sum = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), reduction="sum")
    correct = (logits.argmax(dim=-1) == targets).sum()  # an ignored target (-100) is never the argmax
    return loss_sum, correct


GRAD_SYNC_MODES = ("every", "last")
"""`train.grad_sync`: reduce-scatter after every micro-batch, or only after the last of a step."""


def _set_grad_sync(model: torch.nn.Module, enabled: bool) -> None:
    setter = getattr(model, "set_requires_gradient_sync", None)  # present on FSDP2 modules
    if setter is not None:
        setter(enabled)


def _all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    if distributed_world()[1] > 1:
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def train_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    micro_batches: list[dict],
    device: torch.device,
    precision: str,
    grad_clip: float,
    world_size: int = 1,
    global_tokens: int | None = None,
    document_mask: bool = False,
    supervised: bool = False,
    grad_sync: str = "every",
) -> StepStats:
    """Accumulate gradients over `micro_batches`, clip and update. Loss is the global mean.

    Each micro-batch's summed loss is divided by `global_tokens`, the targets of the whole
    global batch (default: this rank's times world_size, for an even split); FSDP's gradient
    reduction averages over ranks, so multiplying by world_size makes the update the exact
    mean over the global batch. Ranks may hold different numbers of sequences (an uneven
    split, where a micro-batch may be short or empty); every rank runs the same number of
    micro-batches, and the result is the same at every world size up to summation order.
    `grad_sync` ("every" or "last", see the module docstring) changes only where the sum is
    taken, so the losses and the update are the same in both up to summation order.

    Loss and accuracy sums stay on the device; the step makes one host sync, after the
    gradient norm, to decide whether to apply the update: a non-finite loss or gradient norm
    (agreed by every rank, since both are global) skips it, so the weights stay finite.

    `supervised` (pairs, chat: a loss mask in the rows) replaces `global_tokens` by the global
    count of trained targets, summed over the ranks (one all-reduce, no host sync) before the
    first backward, so a prompt token weighs nothing, not even in the mean.
    """
    if grad_sync not in GRAD_SYNC_MODES:
        raise ValueError(f"grad_sync={grad_sync!r}: must be one of {', '.join(GRAD_SYNC_MODES)}")
    local_tokens = sum(target_count(b) for b in micro_batches)
    if global_tokens is None:
        global_tokens = local_tokens * world_size
    denominator: float | torch.Tensor = global_tokens
    if supervised:
        trained = torch.tensor([float(sum(trained_count(b, supervised=True) for b in micro_batches))],
                               dtype=torch.float64, device=device)
        denominator = _all_reduce_sum(trained)[0].clamp(min=1.0)  # a step of prompts only: loss 0, not nan
    sums = torch.zeros(2, dtype=torch.float64, device=device)  # (loss sum, correct count) of this rank
    for i, batch in enumerate(micro_batches):
        _set_grad_sync(model, grad_sync == "every" or i == len(micro_batches) - 1)
        tokens, weight = to_device(batch, device)
        loss_sum, correct = loss_and_correct(model, tokens, precision, document_mask, supervised)
        loss_sum, correct = loss_sum * weight, correct * weight
        if supervised:
            (loss_sum * (world_size / denominator).float()).backward()
        else:
            (loss_sum * (world_size / global_tokens)).backward()
        sums += torch.stack([loss_sum.detach().double(), correct.double()])
    max_norm = grad_clip if grad_clip > 0 else float("inf")
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    if hasattr(grad_norm, "full_tensor"):  # DTensor under FSDP2
        grad_norm = grad_norm.full_tensor()
    _all_reduce_sum(sums)
    count = denominator.reshape(1) if supervised else sums.new_tensor([float(global_tokens)])
    loss_total, correct_total, norm, n_targets = torch.cat(
        [sums, grad_norm.detach().double().reshape(1), count]).tolist()  # the sync
    applied = math.isfinite(loss_total) and math.isfinite(norm)
    if applied:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return StepStats(
        loss=loss_total / n_targets,
        accuracy=correct_total / n_targets,
        grad_norm=norm,
        tokens=local_tokens,
        applied=applied,
    )


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches, device: torch.device, precision: str,
             document_mask: bool = False, supervised: bool = False) -> dict[str, float]:
    """Held-out loss, perplexity and accuracy, summed over every rank's batches (one host sync);
    over the trained targets only for supervised data (`train_step`)."""
    was_training = model.training
    model.eval()
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # (loss sum, correct, tokens)
    for batch in batches:  # every rank runs as many (an empty one runs with weight 0)
        tokens, weight = to_device(batch, device)
        batch_loss, batch_correct = loss_and_correct(model, tokens, precision, document_mask, supervised)
        n_tokens = torch.tensor(float(trained_count(batch, supervised=supervised)), dtype=torch.float64,
                                device=device)
        sums += torch.stack([batch_loss.double() * weight, batch_correct.double() * weight, n_tokens])
    loss_sum, correct, n_tokens = _all_reduce_sum(sums).tolist()
    model.train(was_training)
    if n_tokens == 0:
        return {}
    loss = loss_sum / n_tokens
    return {"val_loss": loss, "val_perplexity": math.exp(min(loss, 700.0)), "val_accuracy": correct / n_tokens}
