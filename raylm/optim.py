"""AdamW with decay/no-decay parameter groups, and the learning-rate schedules.

Weight decay applies to 2-D weight matrices of linear layers only; norms and embeddings are
not decayed (decaying an embedding row that rarely gets gradient just shrinks it to zero).
Schedules are pure functions of the step, so a resumed run needs only the step to be exact.

Per-layer learning rates (µP, `model.parametrization: mup`): every group carries `lr_mult`,
the model config's `lr_multiplier` of its parameters, and `set_lr` gives each group
`lr * lr_mult`. A group's `weight_decay` is `optimizer.weight_decay / lr_mult`, so AdamW's
decoupled decay per step, `lr * lr_mult * weight_decay`, is the same at every width (as in the
`mup` package's default). Under `standard` every multiplier is 1 and the groups are the two
they always were. Groups hold parameter objects, so the optimizer is built after FSDP2 has
sharded the model (as the trainer does) and DCP matches the groups by parameter name.
"""

from __future__ import annotations

import math

import torch

from raylm.config import OptimizerConfig


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Decayed groups first, then undecayed, one per learning-rate multiplier (in order of
    first appearance); a model without a `config` (not a raylm Transformer) gets multiplier 1."""
    model_cfg = getattr(model, "config", None)
    decay: dict[float, list] = {}
    no_decay: dict[float, list] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        is_embedding = "tok_embeddings" in name
        mult = model_cfg.lr_multiplier(name) if model_cfg is not None else 1.0
        (decay if param.ndim >= 2 and not is_embedding else no_decay).setdefault(mult, []).append(param)
    return [
        *({"params": params, "weight_decay": weight_decay / mult, "lr_mult": mult} for mult, params in decay.items()),
        *({"params": params, "weight_decay": 0.0, "lr_mult": mult} for mult, params in no_decay.items()),
    ]


def build_optimizer(model: torch.nn.Module, cfg: OptimizerConfig, device_type: str = "cpu") -> torch.optim.AdamW:
    # fused AdamW is one kernel per step on GPU; on CPU the foreach path is the fast one.
    extra = {"fused": True} if device_type == "cuda" else {"foreach": True}
    optimizer = torch.optim.AdamW(
        param_groups(model, cfg.weight_decay),
        lr=cfg.lr,
        betas=(cfg.beta1, cfg.beta2),
        eps=cfg.eps,
        **extra,
    )
    set_lr(optimizer, cfg.lr)
    return optimizer


def apply_group_settings(optimizer: torch.optim.Optimizer, model: torch.nn.Module, weight_decay: float) -> None:
    """Give each group the `lr_mult` and `weight_decay` this model and config call for.

    Loading an optimizer state (DCP) brings the saved groups' settings with it; calling this
    afterwards keeps the run's config the authority (a checkpoint from before `lr_mult`
    existed, or one from another parametrisation, would otherwise run with the old ones)."""
    fresh = param_groups(model, weight_decay)
    wanted = {id(p): i for i, group in enumerate(fresh) for p in group["params"]}
    for group in optimizer.param_groups:
        matches = {wanted.get(id(p)) for p in group["params"]}
        if len(matches) == 1 and None not in matches:  # an optimizer grouped otherwise is left as it is
            settings = fresh[matches.pop()]
            group["lr_mult"], group["weight_decay"] = settings["lr_mult"], settings["weight_decay"]


def lr_at(step: int, max_steps: int, cfg: OptimizerConfig) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup, then the schedule."""
    floor = cfg.lr * cfg.min_lr_ratio
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.schedule == "wsd":
        decay_steps = max(1, int(round(cfg.decay_fraction * max_steps)))
        decay_start = max(cfg.warmup_steps, max_steps - decay_steps)
        if step < decay_start:
            return cfg.lr
        progress = min(1.0, (step - decay_start + 1) / max(1, max_steps - decay_start))
        return cfg.lr - (cfg.lr - floor) * progress
    span = max(1, max_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return floor + 0.5 * (cfg.lr - floor) * (1 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """The schedule's `lr` times each group's own multiplier (1 for a group without one)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_mult", 1.0)
