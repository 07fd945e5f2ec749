"""`raylm plan`: before paying for GPUs, will a config fit, how long will it train, what will it cost.

Arithmetic on the config (no device, no Ray): `plan(cfg, gpus, gpu)` returns a `Plan` (a
dataclass a benchmark can compare with a measurement), `format_plan` prints it, its last line
the verdict. Parameters come from `ModelConfig.num_params`, FLOPs from
`ModelConfig.flops_per_token` (the project's one FLOP counter), the batch split from
`raylm.data.order`, the checkpointed blocks and the compute dtype from `raylm.train.parallel`.
The memory model follows what raylm's code does, step by step: `raylm.train.parallel.build_model`
(FSDP2 over W > 1 workers, a plain module on one), `raylm.train.step.train_step` (gradient sync
after every micro-batch or only the last, `train.grad_sync`; fp32 logits and loss),
`raylm.optim.build_optimizer` (AdamW; fused on GPU, foreach on CPU); bench/plan_memory.py and
bench/scale_memory.py measure the peaks it predicts.

docs/plan.md states the model for users: its symbols (used below), the terms of the peak,
the headroom, the FLOP count, time and cost, and how it was checked against measurement
(bench/RESULTS.md). What follows is why each memory term is what it is, from the code it follows.

Memory per GPU: peak = resident + max(forward/backward, optimizer step)
------------------------------------------------------------------------
resident (always there after the first step):
* parameters, fp32 master weights: 4N / W (FSDP2 shards every parameter over the W workers;
  W = 1 is a plain module).
* optimizer state, AdamW exp_avg and exp_avg_sq in fp32: 8N / W.

forward/backward of the last micro-batch of a step, the peak of the step (the start of its
backward, when every saved activation and the loss's gradients are alive, or the end of
its forward under autocast, below):
* gradients carried across micro-batches, when k > 1 (`train.grad_sync`):
  - every (the default): 4N / W. train_step leaves FSDP2's gradient sync on, so each
    micro-batch's backward reduce-scatters every block's gradient and adds it to the
    worker's fp32 shard (`foreach_reduce` accumulates into `sharded_param.grad`): between
    micro-batches a worker holds only its shard, whatever k. The unsharded gradient of one
    block lives only while that block's reduce-scatter runs (the working term below).
  - last: 4N. Gradient sync is off on all but the last micro-batch, so every worker
    accumulates the *unsharded* gradient of every parameter, upcast to fp32 (FSDP2's
    `to_accumulated_grad_if_needed`). With a large model over many GPUs this is the largest
    term: 25.1 GiB per GPU for Llama 2 7B whatever W, as long as W * B < the sequences per
    step.
  On one GPU (a plain module) both are the plain fp32 `.grad`, 4N. When k = 1 the modes are
  the same: the gradients are produced while activations are freed, and count in the
  optimizer step instead.
* activations: saved tensors per token per block, counted from raylm.model as written
  (residual stream in fp32 on one GPU under autocast, in the compute dtype under FSDP2):
  - each RMSNorm saves its fp32 input and normalised value (8D) and hands the linears a
    c-byte input (cD): 2 norms per block;
  - RoPE rotates q and k in fp32 and saves those fp32 copies: 4D + 4Dg;
  - SDPA (flash / memory-efficient: no T x T matrix) saves q, k, v, its output and the
    log-sum-exp: cD(2 + 2g') + 4H, where g' = g when raylm.model passes the grouped K/V
    heads (native GQA: bf16, and `raylm.model.SDPA_HAS_ENABLE_GQA`), else 1 (it repeats
    them to H heads first). The planner reads that flag rather than guessing, so it follows
    the model on the torch it runs with;
  - the attention output's reshape copy (wo's input): cD;
  - SwiGLU saves w1's and w3's outputs, silu's output and the product: 4cF.
  One block: A = 20D + 4Dg + cD(5 + 2g') + 4cF + 4H bytes per token (Llama 2 7B, bf16:
  243,840 = 59.5 D). A checkpointed block saves only its input, rD (r = 4 on one GPU, where
  autocast keeps the residual stream fp32; c under FSDP2). Activation checkpointing modes are
  `raylm.train.parallel.checkpointed_blocks`: none, full, selective:N (every N-th block).
  The head saves the final norm (8D + cD per token); the loss holds fp32 logits and their
  gradients, 12V bytes per token (log_softmax output, the gradient of its output and of its
  input, at the start of backward: `loss_and_correct` upcasts the logits to fp32). Later in
  backward one recomputed block (A) plus its gradient temporaries (~3cF) is alive instead.
    activations = BT * (n_ckpt*rD + (L - n_ckpt)*A + 8D + cD + max(12V, [n_ckpt > 0]*A + 3cF))
* working weights.
  - W > 1: FSDP2 all-gathers each block's parameters in the compute dtype before it runs;
    the root's Pr stay unsharded for the whole forward and backward (FSDP2 does not reshard
    the root after forward), and so does the last block (`apply_fsdp`). The peak is the
    larger of two instants: the start of backward, c*(Pr + Pb) with the loss's 12V per
    token alive; and a block's backward, with the loss's gradients gone: c*(Pr + 2*Pb) (the
    block and the one prefetched), its gradient reduce buffers (unsharded gradients c*Pb and
    the fp32 reduce-scatter input 4*Pb), the output head's unsharded gradient (c*V*D, until
    the root reduces at the end of backward), and a recomputed block (A + 3cF per token).
    Counting c*(Pr + 2*Pb) + (c+4)*Pb with the loss's gradients, as a first version did,
    overstated the 125m preset over 2 CPU ranks by 8%. A third instant is the end of
    backward, when the root reduces: c*Pr (its weights, still gathered) + (c+4)*Pr (its unsharded gradient and the fp32
    reduce-scatter input) + 4*(N - Pr)/W (every block's shard, already made; with k > 1 they
    are the carried term), no activations. It is the peak when the root is a large share of
    the model and the micro-batch is small (125m over 2 CPU ranks at 128 tokens per
    micro-batch: a version without it read 16% low, bench/scale_memory.py). Under grad_sync
    last with k > 1 the root does not reduce on the micro-batches before the last: c*Pr
    instead of (c+4)*Pr, beside the carried 4N.
  - W = 1, bf16: autocast casts each matmul weight to bf16 as the forward reaches it and
    caches the copy until its context exits after the forward. The peak is the larger of
    two instants: the end of the forward, with every copy (2*Nm) and the logits (cV per
    token) alive, and the start of backward, when the copies of checkpointed blocks are gone
    (2*(Nm - n_ckpt*Pbm), the others stay saved for backward) and the loss's 12V are alive
    (or, later, a recomputed block and its copy, 2*Pbm). A first version counted 2*Nm with
    the loss's gradients, which are never alive together with all the copies: 2.4 GiB too
    much for Llama 2 7B on one GPU (BT*(12V - cV)).
  - W = 1, fp32: nothing (the weights are used as stored).

optimizer step (activations freed):
* gradients at the step: 4N / W (FSDP2's reduce-scatter leaves each worker its fp32 shard).
* optimizer temporaries: fused AdamW (GPU) none; foreach AdamW (CPU) one fp32 tensor per
  parameter of one parameter group at a time (sqrt of exp_avg_sq; `raylm.optim.param_groups`
  makes a decayed group of the linears and the rest): 4 * max(decayed, N - decayed) / W.
  Counting all of N here overstated the 125m preset's measured peak by 3% on CPU.

Gradient communication per GPU per step (not in the time estimate, which takes it as hidden
under compute at the stated MFU; it is what `train.grad_sync` trades against memory): FSDP2
all-gathers every parameter in the compute dtype twice per micro-batch (forward, and backward
after the forward resharded it), c*N*(W-1)/W bytes received each time, and reduce-scatters the
fp32 gradient (`MixedPrecisionPolicy(reduce_dtype=float32)`), 4N*(W-1)/W bytes sent, once per
micro-batch under every and once per step under last:
    every: k*(2c + 4)*N*(W-1)/W        last: (2c*k + 4)*N*(W-1)/W
With bf16 and k = 8 that is 64 against 36 units of N*(W-1)/W: every moves 1.8x the bytes.

Not counted in the peak, but covered by a fixed headroom (`OVERHEAD_FIXED_GIB` + 10% of the
peak, `OVERHEAD_FRACTION`): the CUDA context, cuBLAS workspaces, NCCL buffers, the caching
allocator's fragmentation. With train.compile the activation figure is an upper bound (compiled
blocks save fewer fp32 intermediates). Time and cost are the FLOP count at an MFU (`--mfu`,
`MEASURED_MFU`, else `ASSUMED_MFU`) on the datasheet peak (raylm.train.metrics.PEAK_BF16_FLOPS),
at a rough list price (`GpuSpec.price_per_hour`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from raylm.config import Config
from raylm.data.order import rounds_per_step, step_shares
from raylm.errors import ConfigError
from raylm.model import SDPA_HAS_ENABLE_GQA, ModelConfig
from raylm.train.metrics import PEAK_BF16_FLOPS
from raylm.train.parallel import checkpointed_blocks, uses_bf16
from raylm.train.trainer import saves_in_background

GIB = 2**30
OVERHEAD_FIXED_GIB = 2.0
"""Headroom per GPU for what the model does not count: CUDA context, cuBLAS, NCCL buffers."""
OVERHEAD_FRACTION = 0.10
"""Headroom for the caching allocator's fragmentation, as a share of the estimated peak."""
ASSUMED_MFU = 0.40
"""MFU when neither --mfu nor MEASURED_MFU gives one: torchtitan reports 33-39% for Llama
3.1 8B FSDP2 on H100 (500 W) and 56-58% for Llama 3 8B on A100; Llama 2 7B implies 44.5%."""
MEASURED_MFU: dict[str, tuple[float, str]] = {}
"""MFU per GPU key measured by bench/gpu_mfu.py, with how it was measured, e.g.
`"h100": (0.43, "bench/gpu_mfu.py, 64 x H100, llama2-7b, 2027-01-05; bench/RESULTS.md, GPU MFU")`.
Empty: no GPU run is recorded yet (bench/RESULTS.md, "GPU MFU": not measured)."""


@dataclass(frozen=True)
class GpuSpec:
    key: str
    name: str
    memory_gib: float
    """Usable memory: the total CUDA reports (`torch.cuda.mem_get_info`, and the "total
    capacity" of an out-of-memory message), ~1% under the datasheet's 80/141/180 GB."""
    peak_bf16_flops: float
    """Dense bf16 tensor-core FLOP/s (no sparsity): raylm.train.metrics.PEAK_BF16_FLOPS."""
    price_per_hour: float
    """Rough on-demand list price, USD per GPU-hour at the large clouds' 8-GPU instances (AWS p5 /
    GCP a3-highgpu-8g class) as of 2025: it differs by region and changes often, and spot or
    committed prices are far lower; the output says when it used one (--price sets yours)."""


GPUS: dict[str, GpuSpec] = {
    "h100": GpuSpec("h100", "H100 SXM 80GB", 79.1, PEAK_BF16_FLOPS["H100"], 7.0),
    "h200": GpuSpec("h200", "H200 SXM 141GB", 139.8, PEAK_BF16_FLOPS["H200"], 10.0),
    "a100": GpuSpec("a100", "A100 SXM 80GB", 79.1, PEAK_BF16_FLOPS["A100"], 4.0),
    "b200": GpuSpec("b200", "B200 (HGX) 180GB", 178.3, PEAK_BF16_FLOPS["B200"], 14.0),
}


@dataclass(frozen=True)
class MemoryEstimate:
    """Peak memory of one worker, in bytes, split as the module docstring explains."""

    world_size: int
    sharded: bool
    """FSDP2 (raylm shards whenever world_size > 1); False: a plain module under autocast."""
    bf16: bool
    activation_checkpointing: str
    micro_batch_size: int
    grad_accum_steps: int
    grad_sync: str
    """`train.grad_sync`: "every" carries the gradient sharded across micro-batches, "last" whole."""
    params_bytes: int
    optimizer_bytes: int
    working_bytes: int
    """Gathered or autocast-cast weights and reduce buffers, at the forward/backward peak."""
    carried_grad_bytes: int
    """Gradients accumulated over the step's micro-batches (0 without accumulation)."""
    activation_bytes: int
    """Saved and transient activations at the same instant as `working_bytes`."""
    grad_bytes: int
    """Gradients at the optimizer step (this worker's shard)."""
    step_temp_bytes: int
    comm_bytes: int = 0
    """FSDP2 traffic per step of this worker: all-gathered weights and reduce-scattered gradients."""

    @property
    def resident_bytes(self) -> int:
        return self.params_bytes + self.optimizer_bytes

    @property
    def forward_backward_bytes(self) -> int:
        return self.working_bytes + self.carried_grad_bytes + self.activation_bytes

    @property
    def optimizer_step_bytes(self) -> int:
        return self.grad_bytes + self.step_temp_bytes

    @property
    def total_bytes(self) -> int:
        """The peak: resident + the larger of the forward/backward and optimizer-step phases."""
        return self.resident_bytes + max(self.forward_backward_bytes, self.optimizer_step_bytes)

    @property
    def overhead_bytes(self) -> int:
        return int(OVERHEAD_FIXED_GIB * GIB + OVERHEAD_FRACTION * self.total_bytes)

    @property
    def needed_bytes(self) -> int:
        return self.total_bytes + self.overhead_bytes


@dataclass(frozen=True)
class Plan:
    config_name: str
    gpu: GpuSpec
    gpus: int
    params: int
    flops_per_token: float
    seq_len: int
    micro_batch_size: int
    global_batch_tokens: int
    sequences_per_step: int
    grad_accum_steps: int
    max_sequences_per_gpu: int
    memory: MemoryEstimate
    memory_by_mode: dict[str, MemoryEstimate]
    """The estimate under each activation checkpointing mode: none, full and the config's own."""
    memory_by_grad_sync: dict[str, MemoryEstimate]
    """The estimate under each `train.grad_sync` mode: every and last."""
    capacity_bytes: int
    fits: bool
    min_gpus: int | None
    """Smallest worker count (<= sequences per step) at which this config fits; None if none."""
    min_gpus_smallest_batch: int | None
    """When no count fits: the smallest that would with micro-batch 1 and full checkpointing."""
    mfu: float
    mfu_source: str
    tokens_per_second: float
    step_time_s: float
    train_tokens: float
    train_tokens_source: str
    steps: int
    total_time_s: float
    gpu_hours: float
    price_per_gpu_hour: float
    price_source: str
    cost: float
    notes: list[str] = field(default_factory=list)
    staged_checkpoint_bytes: int = 0
    """Host memory per GPU worker for the staged copy of a background save (0: saves block)."""
    storage: "StorageEstimate | None" = None
    """Checkpoint and data traffic to object storage."""


@dataclass(frozen=True)
class StorageEstimate:
    """What the run moves to and from storage (a bucket), per checkpoint and per step.

    A checkpoint holds the fp32 parameters and AdamW's two fp32 moments (12 bytes a parameter),
    written as each worker's 1/W shard by that worker; a restart reads each byte once
    (bench/scale_restart.py measured 1.00-1.02 x the checkpoint's bytes), so each worker reads
    1/W. Prepared data is read by each worker as its own rows only (bench/scale_data.py: bytes
    read 1.07-1.08 x the rows trained, RSS flat in the dataset's size), `seq_len + 1` tokens a
    row at 2 bytes (uint16) when the vocabulary fits, else 4. Times assume the bucket gives the
    cluster `storage_gbps` GB/s in aggregate, shared evenly by the workers."""

    checkpoint_bytes: int
    checkpoint_bytes_per_gpu: int
    checkpoint_every: int
    checkpoint_interval_s: float
    storage_gbps: float
    storage_source: str
    save_s: float
    """Writing one checkpoint; a background save (train.checkpoint_async) hides it behind steps."""
    background: bool
    restore_s: float
    """Reading one checkpoint at a restart, each byte once."""
    data_bytes_per_step: int
    data_bytes_per_gpu_step: int
    dataset_bytes: int
    """The prepared rows of the whole run (train.max_steps' worth or --tokens)."""
    data_read_share: float
    """Data read time per step over step time (the read-ahead overlaps it with compute)."""


# ---------------------------------------------------------------------------------------
# Memory


def checkpointed_count(mode: str, n_layers: int) -> int:
    """How many blocks activation checkpointing wraps (`checkpointed_blocks`, the trainer's own)."""
    return len(checkpointed_blocks(mode, n_layers))


def block_params(m: ModelConfig) -> int:
    """Parameters of one transformer block (its linears and its two norm gains)."""
    return m._block_matmul_params() + 2 * m.dim


def matmul_params(m: ModelConfig) -> int:
    """Weights that take part in matmuls (autocast casts them): blocks' linears + output head."""
    return m.n_layers * m._block_matmul_params() + m.vocab_size * m.dim


def decayed_params(m: ModelConfig) -> int:
    """Parameters of the optimizer's weight-decay group (`raylm.optim.param_groups`: every 2-D
    weight but the token embedding; a tied output head is the embedding)."""
    return m.n_layers * m._block_matmul_params() + (0 if m.tie_embeddings else m.vocab_size * m.dim)


def sdpa_kv_share(m: ModelConfig, c: int) -> float:
    """K/V bytes SDPA saves, as a share of the query's: n_kv_heads / n_heads when raylm.model
    hands SDPA the grouped heads (native GQA: bf16 on a torch it believes has `enable_gqa`),
    else 1 (it repeats the K/V heads to n_heads first)."""
    if m.kv_heads == m.n_heads:
        return 1.0
    return m.kv_heads / m.n_heads if (c == 2 and SDPA_HAS_ENABLE_GQA) else 1.0


def activation_bytes_per_token(m: ModelConfig, mode: str, c: int, r: int) -> dict[str, float]:
    """Activation bytes per token of a micro-batch, by part (see the module docstring).

    c: bytes of the compute dtype; r: bytes of the residual stream a checkpointed block saves.
    "saved": every block's saved tensors; "head": the final norm's; "loss": the fp32 logits'
    at the start of backward; "recompute": a checkpointed block rebuilt in backward, with its
    gradient temporaries; "logits": the model's output at the end of the forward.
    """
    D, F, H, L, V = m.dim, m.ffn_hidden_dim, m.n_heads, m.n_layers, m.vocab_size
    g = m.kv_heads / m.n_heads
    block = 20 * D + 4 * D * g + c * D * (5 + 2 * sdpa_kv_share(m, c)) + 4 * c * F + 4 * H
    n_ckpt = checkpointed_count(mode, L)
    return {"block": block, "saved": n_ckpt * r * D + (L - n_ckpt) * block, "head": 8 * D + c * D,
            "loss": 12 * V, "recompute": (block if n_ckpt else 0) + 3 * c * F, "logits": c * V}


def activation_bytes(m: ModelConfig, mode: str, tokens: int, c: int, r: int) -> int:
    """Activations at the start of backward (the loss's gradient) or, if larger, while a
    checkpointed block is recomputed."""
    parts = activation_bytes_per_token(m, mode, c, r)
    return int(tokens * (parts["saved"] + parts["head"] + max(parts["loss"], parts["recompute"])))


def autocast_peak(m: ModelConfig, mode: str, tokens: int) -> tuple[int, int]:
    """(working weights, activations) at the forward/backward peak of one process under bf16
    autocast, whose fp32 weights are cast to bf16 copies as the forward reaches them.

    Autocast caches every copy until its context exits after the forward, so at the end of the
    forward all 2*Nm bytes are alive with the logits; then the copies of checkpointed blocks
    are freed (the recompute casts one block again) and those of the others stay saved for
    backward while the loss's fp32 gradients are made (later, a recomputed block casts its
    weights again). The largest of these instants."""
    parts = activation_bytes_per_token(m, mode, 2, 4)
    n_ckpt = checkpointed_count(mode, m.n_layers)
    saved = parts["saved"] + parts["head"]
    kept = 2 * (matmul_params(m) - n_ckpt * m._block_matmul_params())
    end_of_forward = (2 * matmul_params(m), int(tokens * (saved + parts["logits"])))
    loss = (kept, int(tokens * (saved + parts["loss"])))
    recompute = (kept + (2 * m._block_matmul_params() if n_ckpt else 0), int(tokens * (saved + parts["recompute"])))
    return max(end_of_forward, loss, recompute, key=sum)


def fsdp_peak(m: ModelConfig, mode: str, tokens: int, c: int, world_size: int = 2, k: int = 1,
              grad_sync: str = "every") -> tuple[int, int]:
    """(working weights and buffers, activations) at the forward/backward peak of an FSDP2
    worker, besides the gradients carried from earlier micro-batches (`carried_grad_bytes`):
    at the start of backward (the root and the last block, which is not resharded after
    forward, gathered; the loss's gradients alive) or, if larger, during a block's backward
    (the root and two blocks gathered, the block's unsharded gradients and fp32 reduce-scatter
    input, the output head's unsharded gradient; a recomputed block alive) or at the end of
    backward, when the root reduces (its weights still gathered, its unsharded gradient and
    that gradient's fp32 reduce-scatter input, and, without accumulation, every block's
    gradient shard made so far; no activations). Under grad_sync "last" with accumulation the
    root does not reduce: its new gradient is added to the carried whole one."""
    parts = activation_bytes_per_token(m, mode, c, c)
    Pb = block_params(m)
    N = m.num_params()
    Pr = N - m.n_layers * Pb
    saved = parts["saved"] + parts["head"]
    loss = (c * (Pr + Pb), int(tokens * (saved + parts["loss"])))
    block = (c * (Pr + 2 * Pb) + (c + 4) * Pb + c * m.vocab_size * m.dim,
             int(tokens * (parts["saved"] + parts["recompute"])))
    reduces = k == 1 or grad_sync == "every"
    shards_so_far = 4 * (N - Pr) // world_size if k == 1 else 0  # with k > 1 they are in the carried term
    end = (c * Pr + (c + 4 if reduces else c) * Pr + shards_so_far, 0)
    return max(loss, block, end, key=sum)


def carried_grad_bytes(N: int, W: int, k: int, sharded: bool, grad_sync: str) -> int:
    """Gradient bytes a worker holds between micro-batches (see the module docstring): none
    without accumulation, the fp32 shard under FSDP2 with grad_sync "every", else the whole."""
    if k == 1:
        return 0
    return 4 * N // W if sharded and grad_sync == "every" else 4 * N


def fsdp_comm_bytes(N: int, W: int, k: int, c: int, sharded: bool, grad_sync: str) -> int:
    """FSDP2 bytes per step per worker: two all-gathers of c-byte weights per micro-batch and
    a 4-byte reduce-scatter per micro-batch (every) or per step (last); 0 unsharded."""
    if not sharded or W == 1:
        return 0
    reduces = k if grad_sync == "every" else 1
    return int((2 * c * k + 4 * reduces) * N * (W - 1) / W)


def staged_checkpoint_bytes(cfg: Config, world_size: int, device: str = "cuda") -> int:
    """Host memory of one worker's staged checkpoint copy under train.checkpoint_async (auto: on on
    GPU): its shard of the fp32 parameters and AdamW's two fp32 moments (12 bytes a parameter,
    1/W each), copied at the checkpoint step and held until the background write ends. 0 when
    saves block. On a GPU it is host RAM, not GPU memory: a node of 8 GPUs holds 8 copies."""
    if not saves_in_background(cfg, device):
        return 0
    return 12 * cfg.model.num_params() // world_size


def estimate_memory(cfg: Config, world_size: int, device: str = "cuda",
                    activation_checkpointing: str | None = None,
                    micro_batch_size: int | None = None, fsdp: bool | None = None,
                    grad_sync: str | None = None) -> MemoryEstimate:
    """Peak memory of one of `world_size` workers training `cfg` on `device` ("cuda" or "cpu").

    `activation_checkpointing`, `micro_batch_size` and `grad_sync` replace the config's (the
    accumulation steps follow the micro-batch). `fsdp` defaults to what raylm does (FSDP2 when
    world_size > 1); True models a one-rank FSDP2 group, which bench/plan_memory.py measures on one GPU."""
    m = cfg.model
    mode = cfg.train.activation_checkpointing if activation_checkpointing is None else activation_checkpointing
    B = cfg.train.micro_batch_size if micro_batch_size is None else micro_batch_size
    BT = B * cfg.data.seq_len
    bf16 = uses_bf16(cfg.train.precision, torch.device(device))
    c = 2 if bf16 else 4
    W = world_size
    N = m.num_params()
    k = rounds_per_step(cfg.sequences_per_step, W, B)
    sharded = W > 1 if fsdp is None else fsdp
    sync = cfg.train.grad_sync if grad_sync is None else grad_sync
    if sharded:  # FSDP2 gathers in the compute dtype; the residual stream is in it too
        working, activations = fsdp_peak(m, mode, BT, c, W, k, sync)
    elif bf16:
        working, activations = autocast_peak(m, mode, BT)
    else:  # fp32 weights are used as they are
        working, activations = 0, activation_bytes(m, mode, BT, 4, 4)
    return MemoryEstimate(
        world_size=W,
        sharded=sharded,
        bf16=bf16,
        activation_checkpointing=mode,
        micro_batch_size=B,
        grad_accum_steps=k,
        grad_sync=sync,
        params_bytes=4 * N // W,
        optimizer_bytes=8 * N // W,
        working_bytes=working,
        carried_grad_bytes=carried_grad_bytes(N, W, k, sharded, sync),
        activation_bytes=activations,
        grad_bytes=4 * N // W,
        step_temp_bytes=0 if device == "cuda" else 4 * max(decayed_params(m), N - decayed_params(m)) // W,
        comm_bytes=fsdp_comm_bytes(N, W, k, c, sharded, sync),
    )


def smallest_fitting_world(cfg: Config, capacity_bytes: int, device: str = "cuda",
                           activation_checkpointing: str | None = None,
                           micro_batch_size: int | None = None) -> int | None:
    """Smallest worker count (at most one per sequence of a step) whose estimate with headroom
    fits `capacity_bytes`; None if none does. Memory is not monotone in the count (one GPU is
    a plain module; the carried gradients go when a step needs no accumulation), so every
    count is tried."""
    for world in range(1, cfg.sequences_per_step + 1):
        memory = estimate_memory(cfg, world, device, activation_checkpointing, micro_batch_size)
        if memory.needed_bytes <= capacity_bytes:
            return world
    return None


# ---------------------------------------------------------------------------------------
# Time and cost


def implied_mfu(m: ModelConfig, seq_len: int, tokens: float, gpu_hours: float, peak_flops: float) -> float:
    """The MFU a published (tokens, GPU-hours) pair implies under this project's FLOP count."""
    return tokens * m.flops_per_token(seq_len) / (gpu_hours * 3600 * peak_flops)


ASSUMED_STORAGE_GBPS = 10.0
"""Aggregate GB/s between a bucket and the cluster when --storage-gbps is not given: a figure of
the order S3 or GCS gives one prefix-spread workload; measure yours and pass it."""


def storage_estimate(cfg: Config, gpus: int, step_time_s: float, train_tokens: float, gbps: float | None = None,
                     device: str = "cuda") -> StorageEstimate:
    """Checkpoint and data traffic of `cfg` on `gpus` workers (see StorageEstimate)."""
    if gbps is None:
        gbps, source = ASSUMED_STORAGE_GBPS, f"assumed {ASSUMED_STORAGE_GBPS:g} GB/s; set --storage-gbps"
    else:
        source = "--storage-gbps"
    t, N = cfg.train, cfg.model.num_params()
    ckpt = 12 * N
    per_gpu_rate = gbps * 1e9 / gpus
    token_bytes = 2 if cfg.model.vocab_size <= 2**16 else 4
    row_bytes = (cfg.data.seq_len + 1) * token_bytes
    per_step = cfg.sequences_per_step * row_bytes
    background = saves_in_background(cfg, device)
    return StorageEstimate(
        checkpoint_bytes=ckpt, checkpoint_bytes_per_gpu=ckpt // gpus, checkpoint_every=t.checkpoint_every,
        checkpoint_interval_s=t.checkpoint_every * step_time_s, storage_gbps=gbps, storage_source=source,
        save_s=ckpt / (gbps * 1e9), background=background, restore_s=ckpt / (gbps * 1e9),
        data_bytes_per_step=per_step, data_bytes_per_gpu_step=math.ceil(per_step / gpus),
        dataset_bytes=int(train_tokens / cfg.data.seq_len * row_bytes),
        data_read_share=(per_step / gpus / per_gpu_rate) / step_time_s,
    )


def plan(cfg: Config, gpus: int, gpu: str, tokens: float | None = None, mfu: float | None = None,
         price: float | None = None, measured: dict[str, tuple[float, str]] | None = None, storage_gbps: float | None = None) -> Plan:
    """Memory, time and cost of training `cfg` on `gpus` GPUs of kind `gpu` (see the docstring)."""
    if gpu not in GPUS:
        raise ConfigError(f"--gpu {gpu}: unknown GPU; valid: {', '.join(GPUS)}")
    spec = GPUS[gpu]
    G = cfg.sequences_per_step
    if isinstance(gpus, bool) or not isinstance(gpus, int) or not 1 <= gpus <= G:
        raise ConfigError(f"--gpus {gpus}: must be an integer in [1, {G}]: a step holds {G} sequences "
                          f"(train.global_batch_tokens / data.seq_len) and each GPU needs one")
    if tokens is not None and not (math.isfinite(tokens) and tokens > 0):
        raise ConfigError(f"--tokens {tokens}: must be a positive number of training tokens, e.g. 2e12")
    if mfu is not None and not (math.isfinite(mfu) and 0 < mfu <= 1):
        raise ConfigError(f"--mfu {mfu}: must be a fraction in (0, 1], e.g. 0.4")
    if price is not None and not (math.isfinite(price) and price >= 0):
        raise ConfigError(f"--price {price}: must be >= 0 (USD per GPU-hour)")
    if storage_gbps is not None and not (math.isfinite(storage_gbps) and storage_gbps > 0):
        raise ConfigError(f"--storage-gbps {storage_gbps}: must be a positive number of GB/s, e.g. 10")

    m, t = cfg.model, cfg.train
    memory = estimate_memory(cfg, gpus, "cuda")
    capacity = int(spec.memory_gib * GIB)
    modes = ["none", "full"] + ([t.activation_checkpointing] if t.activation_checkpointing.startswith("selective") else [])
    by_mode = {mode: estimate_memory(cfg, gpus, "cuda", mode) for mode in modes}
    by_sync = {sync: estimate_memory(cfg, gpus, "cuda", grad_sync=sync) for sync in ("every", "last")}
    min_gpus = smallest_fitting_world(cfg, capacity)
    fallback = None
    if min_gpus is None and (t.micro_batch_size > 1 or t.activation_checkpointing != "full"):
        fallback = smallest_fitting_world(cfg, capacity, activation_checkpointing="full", micro_batch_size=1)

    if mfu is not None:
        mfu_value, mfu_source = mfu, "--mfu"
    elif found := (MEASURED_MFU if measured is None else measured).get(gpu):
        mfu_value, mfu_source = found[0], f"measured: {found[1]}"
    else:
        mfu_value, mfu_source = ASSUMED_MFU, f"assumed: no measured MFU for {gpu} in raylm.plan.MEASURED_MFU"
    flops = m.flops_per_token(cfg.data.seq_len)
    tokens_per_second = gpus * spec.peak_bf16_flops * mfu_value / flops
    if tokens is None:
        train_tokens = float(t.max_steps * t.global_batch_tokens)
        tokens_source = f"train.max_steps {t.max_steps:,} x {t.global_batch_tokens:,}"
    else:
        train_tokens, tokens_source = float(tokens), "--tokens"
    total_time_s = train_tokens / tokens_per_second
    gpu_hours = gpus * total_time_s / 3600
    if price is None:
        price_value, price_source = spec.price_per_hour, "rough list price; set --price"
    else:
        price_value, price_source = price, "--price"
    notes = []
    if t.compile:
        notes.append("train.compile is on: activations are estimated eager, an upper bound")
    if not cfg.scaling.use_gpu:
        notes.append("scaling.use_gpu is false in this config: the plan assumes one GPU per worker")
    return Plan(
        config_name=cfg.config_name, gpu=spec, gpus=gpus, params=m.num_params(), flops_per_token=flops,
        seq_len=cfg.data.seq_len, micro_batch_size=t.micro_batch_size, global_batch_tokens=t.global_batch_tokens,
        sequences_per_step=G, grad_accum_steps=cfg.grad_accum_steps(gpus),
        max_sequences_per_gpu=max(step_shares(G, gpus, t.micro_batch_size)),
        memory=memory, memory_by_mode=by_mode, memory_by_grad_sync=by_sync, capacity_bytes=capacity,
        fits=memory.needed_bytes <= capacity,
        min_gpus=min_gpus, min_gpus_smallest_batch=fallback, mfu=mfu_value, mfu_source=mfu_source,
        tokens_per_second=tokens_per_second, step_time_s=t.global_batch_tokens / tokens_per_second,
        train_tokens=train_tokens, train_tokens_source=tokens_source,
        steps=math.ceil(train_tokens / t.global_batch_tokens), total_time_s=total_time_s, gpu_hours=gpu_hours,
        price_per_gpu_hour=price_value, price_source=price_source, cost=gpu_hours * price_value, notes=notes,
        staged_checkpoint_bytes=staged_checkpoint_bytes(cfg, gpus),
        storage=storage_estimate(cfg, gpus, t.global_batch_tokens / tokens_per_second, train_tokens, storage_gbps),
    )


# ---------------------------------------------------------------------------------------
# The table

LABEL_WIDTH = 62
VALUE_WIDTH = 18


def _gib(n: float) -> str:
    return f"{n / GIB:,.1f}"


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.1f} min"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def _count(n: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6)):
        if n >= scale:
            return f"{n / scale:,.2f}{unit}"
    return f"{n:,.0f}"


def _row(label: str, *values: str) -> str:
    return f"{label:<{LABEL_WIDTH}}" + "".join(f"{v:>{VALUE_WIDTH // 2 if len(values) > 1 else VALUE_WIDTH}}"
                                               for v in values)


def verdict(p: Plan) -> str:
    """One line: whether the config fits on `p.gpus` GPUs and, if not, the smallest count that would."""
    mem, on = p.memory, f"{p.gpus} x {p.gpu.name}"
    need = f"{_gib(mem.needed_bytes)} of {_gib(p.capacity_bytes)} GiB per GPU"
    if p.fits:
        return f"fits: {on} needs {need} ({1 - mem.needed_bytes / p.capacity_bytes:.0%} free)"
    if p.min_gpus is not None:
        return f"does not fit: {on} needs {need}; the smallest count that fits is {p.min_gpus} (--gpus {p.min_gpus})"
    where = f"no count up to {p.sequences_per_step:,} GPUs (one sequence each) fits"
    if p.min_gpus_smallest_batch is not None:
        return (f"does not fit: {on} needs {need}; {where}; with train.micro_batch_size=1 and "
                f"train.activation_checkpointing=full, {p.min_gpus_smallest_batch} would")
    return f"does not fit: {on} needs {need}; {where}, even with micro-batch 1 and full checkpointing"


def format_plan(p: Plan) -> str:
    """The table `raylm plan` prints; its last line is the verdict (`verdict`)."""
    mem, W = p.memory, p.gpus
    dtype = "bf16" if mem.bf16 else "fp32"
    share = f", 1/{W} each" if mem.sharded else ""
    layout = f"FSDP2 over {W} GPUs" if mem.sharded else "one GPU, a plain module"
    if mem.sharded:
        working = f"gathered {dtype} weights, gradient reduce buffers"
    else:
        working = "autocast's bf16 copies of the weights" if mem.bf16 else "working weights (none: fp32 used as stored)"
    if mem.carried_grad_bytes and mem.sharded and mem.grad_sync == "every":
        grads = f"gradients, fp32, 1/{W} each: reduced every micro-batch"
    elif mem.carried_grad_bytes and mem.sharded:
        grads = f"gradients, fp32: whole over {mem.grad_accum_steps} micro-batches, 1/{W} at update"
    elif mem.carried_grad_bytes:
        grads = f"gradients, fp32: accumulated over {mem.grad_accum_steps} micro-batches"
    else:
        grads = f"gradients, fp32{share}: made as activations are freed"
    peak_phase = "forward/backward" if mem.forward_backward_bytes >= mem.optimizer_step_bytes else "optimizer step"
    rows = [
        f"raylm plan: {p.config_name} on {W} x {p.gpu.name} "
        f"({p.gpu.memory_gib:g} GiB usable, {p.gpu.peak_bf16_flops / 1e12:,.0f} TFLOP/s bf16 dense each)",
        "",
        _row("parameters", f"{p.params:,}"),
        _row(f"FLOPs per token (ModelConfig.flops_per_token, seq {p.seq_len:,})",
             f"{p.flops_per_token:,.4g}"),
        _row("tokens per step (train.global_batch_tokens)", f"{p.global_batch_tokens:,}"),
        _row("sequences per step / per GPU (at most)", f"{p.sequences_per_step:,} / {p.max_sequences_per_gpu:,}"),
        _row("micro-batch x seq_len; micro-batches per GPU per step",
             f"{p.micro_batch_size} x {p.seq_len:,}; {p.grad_accum_steps}"),
        "",
        _row(f"memory per GPU, GiB ({layout}, {dtype} compute)", "fwd/bwd", "update"),
        _row(f"  parameters, fp32{share}", _gib(mem.params_bytes), _gib(mem.params_bytes)),
        _row(f"  optimizer state, AdamW 2 x fp32{share}", _gib(mem.optimizer_bytes), _gib(mem.optimizer_bytes)),
        _row(f"  {grads}", _gib(mem.carried_grad_bytes), _gib(mem.grad_bytes)),
        _row(f"  activations, checkpointing {mem.activation_checkpointing} (micro-batch {mem.micro_batch_size})",
             _gib(mem.activation_bytes), "-"),
        _row(f"  {working}", _gib(mem.working_bytes), "-"),
        _row("  optimizer temporaries", "-", _gib(mem.step_temp_bytes)),
        _row("  total", _gib(mem.resident_bytes + mem.forward_backward_bytes),
             _gib(mem.resident_bytes + mem.optimizer_step_bytes)),
        _row(f"  peak (the {peak_phase})", _gib(mem.total_bytes)),
        _row(f"  + headroom: CUDA, NCCL, fragmentation ({OVERHEAD_FIXED_GIB:g} GiB + {OVERHEAD_FRACTION:.0%})",
             _gib(mem.overhead_bytes)),
        _row("  needed / GPU memory", f"{_gib(mem.needed_bytes)} / {_gib(p.capacity_bytes)}"),
        "",
        _row("activation checkpointing: activations / needed, GiB", "act.", "needed"),
    ]
    for mode, est in p.memory_by_mode.items():
        fits = "fits" if est.needed_bytes <= p.capacity_bytes else "does not fit"
        mine = ", this config" if mode == mem.activation_checkpointing else ""
        rows.append(_row(f"  {mode} ({fits}{mine})", _gib(est.activation_bytes), _gib(est.needed_bytes)))
    rows += [
        _row("smallest GPU count that fits (same batch, checkpointing)",
             f"{p.min_gpus}" if p.min_gpus is not None else "none"),
        _row("host memory per GPU for a background save's staged copy, GiB"
             if p.staged_checkpoint_bytes else "host memory for a staged copy (train.checkpoint_async=false)",
             _gib(p.staged_checkpoint_bytes)),
    ]
    if mem.sharded and mem.grad_accum_steps > 1:
        rows += ["", _row("train.grad_sync: carried gradients / needed, GiB", "grads", "needed")]
        for sync, est in p.memory_by_grad_sync.items():
            fits = "fits" if est.needed_bytes <= p.capacity_bytes else "does not fit"
            mine = ", this config" if sync == mem.grad_sync else ""
            rows.append(_row(f"  {sync} ({fits}{mine}; FSDP2 traffic {_gib(est.comm_bytes)} GiB/step)",
                             _gib(est.carried_grad_bytes), _gib(est.needed_bytes)))
    rows += [
        "",
        f"time at MFU {p.mfu:.1%} ({p.mfu_source})",
        _row("  tokens/s, all GPUs / per GPU", f"{p.tokens_per_second:,.0f} / {p.tokens_per_second / W:,.0f}"),
        _row("  step time", _duration(p.step_time_s)),
        _row(f"  training tokens ({p.train_tokens_source})", _count(p.train_tokens)),
        _row("  steps", f"{p.steps:,}"),
        _row("  wall time", _duration(p.total_time_s)),
        _row("  GPU-hours", f"{p.gpu_hours:,.0f}"),
        _row(f"  cost at ${p.price_per_gpu_hour:,.2f} per GPU-hour ({p.price_source})", f"${p.cost:,.0f}"),
    ]
    if (st := p.storage) is not None:
        save = "written in the background" if st.background else "training waits"
        rows += [
            "",
            f"storage at {st.storage_gbps:g} GB/s for the cluster ({st.storage_source})",
            _row("  checkpoint: all / per GPU, GiB (fp32 weights + AdamW)",
                 f"{_gib(st.checkpoint_bytes)} / {_gib(st.checkpoint_bytes_per_gpu)}"),
            _row(f"  save every {st.checkpoint_every:,} steps ({_duration(st.checkpoint_interval_s)}), {save}",
                 _duration(st.save_s)),
            _row("  restart: reads each byte once (1/W per GPU)", _duration(st.restore_s)),
            _row("  data per step: all / per GPU, MiB (prepared rows)",
                 f"{st.data_bytes_per_step / 2**20:,.1f} / {st.data_bytes_per_gpu_step / 2**20:,.2f}"),
            _row("  data read time / step time (overlapped by read-ahead)", f"{st.data_read_share:.2%}"),
            _row("  prepared data for the whole run, GiB", _gib(st.dataset_bytes)),
        ]
    rows += [f"note: {n}" for n in p.notes]
    rows += ["", verdict(p)]
    return "\n".join(rows)
