"""One optimizer step and one evaluation pass: forward, loss, backward, clip, update.

Works the same on a plain module and on an FSDP2-sharded one: under FSDP the gradient sync
is skipped on all but the last micro-batch of a step (one reduce-scatter per step), and the
gradient norm comes back as a DTensor that is made whole before logging.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F


@dataclass
class StepStats:
    loss: float
    """Mean next-token cross-entropy over the global batch (nats/token)."""
    accuracy: float
    """Share of next tokens predicted exactly (argmax), over the global batch."""
    grad_norm: float
    """Global gradient norm before clipping."""
    tokens: int
    """Tokens trained on by this rank in this step."""


def autocast_for(device: torch.device, precision: str):
    use_bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    if not use_bf16:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def to_device(batch: dict, device: torch.device) -> torch.Tensor:
    tokens = batch["tokens"]
    if not isinstance(tokens, torch.Tensor):
        tokens = torch.from_numpy(tokens)
    return tokens.to(device=device, dtype=torch.long, non_blocking=True)  # (B, L + 1)


def loss_and_correct(model: torch.nn.Module, tokens: torch.Tensor, precision: str):
    """Summed cross-entropy and correct-prediction count over the B*L targets of `tokens`."""
    inputs, targets = tokens[:, :-1], tokens[:, 1:]  # (B, L) each
    with autocast_for(tokens.device, precision):
        logits = model(inputs)  # (B, L, V)
    logits = logits.float()
    loss_sum = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), reduction="sum")
    correct = (logits.argmax(dim=-1) == targets).sum()
    return loss_sum, correct


def _set_grad_sync(model: torch.nn.Module, enabled: bool) -> None:
    setter = getattr(model, "set_requires_gradient_sync", None)  # present on FSDP2 modules
    if setter is not None:
        setter(enabled)


def _all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def train_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    micro_batches: list[dict],
    device: torch.device,
    precision: str,
    grad_clip: float,
    world_size: int = 1,
) -> StepStats:
    """Accumulate gradients over `micro_batches`, clip and update. Loss is the global mean.

    Each micro-batch's summed loss is divided by the tokens of the whole global batch; FSDP's
    gradient reduction averages over ranks, so multiplying by world_size makes the update
    the exact mean over the global batch, independent of the world size.
    """
    tokens_per_micro = [int(b["tokens"].shape[0]) * (int(b["tokens"].shape[1]) - 1) for b in micro_batches]
    global_tokens = sum(tokens_per_micro) * world_size
    loss_total, correct_total = 0.0, 0.0
    for i, batch in enumerate(micro_batches):
        _set_grad_sync(model, i == len(micro_batches) - 1)
        tokens = to_device(batch, device)
        loss_sum, correct = loss_and_correct(model, tokens, precision)
        (loss_sum * (world_size / global_tokens)).backward()
        loss_total += loss_sum.item()
        correct_total += correct.item()
    max_norm = grad_clip if grad_clip > 0 else float("inf")
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    if hasattr(grad_norm, "full_tensor"):  # DTensor under FSDP2
        grad_norm = grad_norm.full_tensor()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    loss_total, correct_total = _all_reduce_sum([loss_total, correct_total], device)
    return StepStats(
        loss=loss_total / global_tokens,
        accuracy=correct_total / global_tokens,
        grad_norm=float(grad_norm),
        tokens=sum(tokens_per_micro),
    )


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches, device: torch.device, precision: str) -> dict[str, float]:
    """Held-out loss, perplexity and accuracy, summed over every rank's batches."""
    was_training = model.training
    model.eval()
    loss_sum = correct = n_tokens = 0.0
    for batch in batches:
        tokens = to_device(batch, device)
        batch_loss, batch_correct = loss_and_correct(model, tokens, precision)
        loss_sum += batch_loss.item()
        correct += batch_correct.item()
        n_tokens += tokens.shape[0] * (tokens.shape[1] - 1)
    loss_sum, correct, n_tokens = _all_reduce_sum([loss_sum, correct, n_tokens], device)
    model.train(was_training)
    if n_tokens == 0:
        return {}
    loss = loss_sum / n_tokens
    return {"val_loss": loss, "val_perplexity": float(torch.tensor(loss).exp()), "val_accuracy": correct / n_tokens}
