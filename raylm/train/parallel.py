"""Device mesh and FSDP2 sharding of the model: build on meta, shard, materialise, initialise.

Torch core: no Ray. The same `build_model` serves one plain process (world 1: a plain model,
no process group needed), torchrun and Ray Train workers (any world size > 1: FSDP2).

Order of operations, and why:
1. `Transformer(cfg)` under `torch.device("meta")` allocates nothing, so a 7B model never
   exists unsharded on one device.
2. Activation checkpointing wraps blocks (`none`, `full`, or `selective:N` = every N-th
   block), then `torch.compile` compiles each block (one small graph reused per layer
   instead of one huge graph), then `fully_shard` shards every block and finally the root
   (embedding, final norm, output head) over a 1-D data-parallel mesh. Each block is one
   all-gather / reduce-scatter unit, so communication overlaps the neighbouring block's work.
3. `to_empty` allocates only this rank's shards on the device; `init_weights` fills them.

Mixed precision: bf16 parameters for compute with fp32 gradient reduction on GPU (the
master weights and optimizer state stay fp32 in the sharded parameters); fp32 throughout
on CPU, where bf16 matmuls are slow and buy nothing.

Initialisation is world-size independent where it can be: on CPU, where DTensor has no
sharded RNG, every rank computes the same full initial weights (cheap for CPU-sized
models) and keeps its shard, so 1, 2 or N workers start from identical weights. On GPU
the shards are initialised in place with DTensor's sharded RNG.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator

import torch
import torch.distributed as dist
import torch.nn as nn

from raylm.config import Config

from raylm.model import ModelConfig, Transformer


def distributed_world() -> tuple[int, int]:
    """(rank, world size) of the default process group; (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_from_env(device_type: str) -> tuple[int, int]:
    """Join the process group torchrun describes in the environment (a no-op for one process).

    Ray Train sets up its own group before the worker function runs; this is for torchrun.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
        if device_type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return distributed_world()


@contextlib.contextmanager
def torchrun_group(device_type: str) -> Iterator[tuple[int, int]]:
    """`init_from_env`, and destroy the group on the way out if this call made it.

    A gloo group left to the interpreter's shutdown can abort the process ("terminate called
    without an active exception") after a run that succeeded, which fails the torchrun launch.
    """
    made = not (dist.is_available() and dist.is_initialized())
    rank_world = init_from_env(device_type)
    try:
        yield rank_world
    finally:
        if made and dist.is_initialized():
            dist.destroy_process_group()


def uses_bf16(precision: str, device: torch.device) -> bool:
    """Whether training computes in bf16: the one decision the train step's autocast, FSDP2's
    mixed precision and the planner's memory model (raylm.plan) all follow."""
    return precision == "bf16" or (precision == "auto" and device.type == "cuda")


def mixed_precision_policy(precision: str, device: torch.device):
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if uses_bf16(precision, device):
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()  # parameters and reductions in fp32


def checkpointed_blocks(mode: str, n_layers: int) -> list[int]:
    """Indices of the blocks whose activations are recomputed in backward."""
    if mode == "none":
        return []
    every = 1 if mode == "full" else int(mode.split(":", 1)[1])
    return [i for i in range(n_layers) if i % every == 0]


def apply_activation_checkpointing(model: Transformer, mode: str) -> None:
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    for i in checkpointed_blocks(mode, len(model.layers)):
        # The wrapper forwards attribute access, so init_weights still sees the block's layers;
        # get_state_dict strips its name prefix, so checkpoints keep the plain parameter names.
        model.layers.register_module(str(i), checkpoint_wrapper(model.layers[i], preserve_rng_state=False))


def apply_compile(model: Transformer) -> None:
    for i, block in enumerate(model.layers):
        model.layers.register_module(str(i), torch.compile(block))


def apply_fsdp(model: Transformer, mesh, mp_policy) -> None:
    from torch.distributed.fsdp import fully_shard

    last = len(model.layers) - 1
    for i, block in enumerate(model.layers):
        # The last block's parameters are needed again right away by backward: keep them.
        fully_shard(block, mesh=mesh, mp_policy=mp_policy, reshard_after_forward=i < last)
    fully_shard(model, mesh=mesh, mp_policy=mp_policy)


def reference_init_state(model_cfg: ModelConfig, seed: int) -> dict[str, torch.Tensor]:
    """The full initial weights for `seed`, exactly as a world-1 `build_model` makes them."""
    with torch.device("meta"):
        model = Transformer(model_cfg)
    model.to_empty(device="cpu")
    torch.manual_seed(seed)
    model.init_weights(buffer_device="cpu")
    return model.state_dict()


def build_model(cfg: Config, device: torch.device, seed: int | None = None) -> nn.Module:
    """The model for this rank, sharded over the default process group when it has > 1 rank."""
    seed = cfg.train.seed if seed is None else seed
    _, world = distributed_world()
    with torch.device("meta"):
        model = Transformer(cfg.model)
    apply_activation_checkpointing(model, cfg.train.activation_checkpointing)
    if cfg.train.compile:
        apply_compile(model)
    sharded = world > 1
    mesh = None
    if sharded:
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh(device.type, (world,), mesh_dim_names=("dp",))
        apply_fsdp(model, mesh, mixed_precision_policy(cfg.train.precision, device))
    # (one process: the train step's autocast gives bf16 compute over fp32 weights)
    model.to_empty(device=device)
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        # On a CPU mesh the weights are set below as one process makes them (tested), so
        # DTensor's warning about CPU random ops says nothing a user can act on.
        warnings.filterwarnings("ignore", message="DTensor random operators may not have complete support on cpu")
        model.init_weights(buffer_device=device)
    if sharded and not _sharded_rng_supported(mesh):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        full = reference_init_state(cfg.model, seed)
        set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True))
    return model


def _sharded_rng_supported(mesh) -> bool:
    import warnings

    from torch.distributed.tensor._random import is_rng_supported_mesh

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return is_rng_supported_mesh(mesh)
