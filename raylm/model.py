"""A Llama-style decoder-only transformer in one readable file.

This module is the project's torch core: it imports torch and nothing from Ray, so it can be
used (and tested) on a laptop without a cluster.

Design choices, and why
-----------------------
* **Pre-norm residual blocks** (``x + f(norm(x))``): the residual stream is never normalised,
  so gradients reach early layers unattenuated and deep stacks train without warm-up tricks.
* **RMSNorm instead of LayerNorm**: LMs train as well without re-centring (Zhang & Sennrich,
  2019), and dropping it saves a reduction and the bias. The statistics are computed in fp32
  because bf16 sums of squares lose precision over thousands of channels.
* **Rotary position embeddings (RoPE)**: positions enter as rotations of query/key pairs, so
  ``q_i . k_j`` depends only on ``i - j`` (tested). Relative positions suit language, and
  with no learned position table there are no parameters tied to a maximum length. The
  cos/sin tables are *non-persistent* buffers: they are derived from the config, so keeping
  them out of ``state_dict`` keeps checkpoints small and lets them be recomputed after a meta
  device build. Pairs are adjacent channels ``(0, 1), (2, 3), ...`` as in Meta's reference
  Llama code (Hugging Face checkpoints use split halves and permute ``wq``/``wk`` instead).
* **Grouped-query attention (GQA)**: ``n_kv_heads < n_heads`` shares each K/V head between a
  group of query heads. It shrinks the K/V projections and the KV cache with little quality
  loss; ``n_kv_heads = n_heads`` is ordinary multi-head attention.
* **SwiGLU feed-forward** ``w2(silu(w1 x) * w3 x)``: a gated MLP that beats GELU at equal
  compute. The hidden size is 2/3 of the usual 4*dim so the three matrices cost about the same
  as two 4*dim ones, then rounded up to ``multiple_of`` for matmul-friendly shapes.
* **No biases anywhere** (as in Llama): they add parameters, optimizer state and memory
  traffic without improving loss, and every tensor is one more thing to shard and checkpoint.
* **Untied output head by default**: Llama uses separate input and output embeddings; tying
  saves ``vocab * dim`` parameters, which matters only for small models, so it is an option
  (``tie_embeddings``).
* **Width transfer (µP), optional**: ``parametrization: mup`` is the maximal update
  parametrisation for Adam (Tensor Programs V, Yang et al. 2022) relative to a base width
  ``mup_base_dim``: hidden matrices get init std and Adam learning rate scaled with their
  fan-in, the logits a multiplier ``base_dim / dim``, attention the scale ``1 / head_dim``
  (equal to ``1 / sqrt(head_dim)`` at the base head dim). At the base width it is the standard
  model exactly, and a learning rate tuned at the base width holds at larger ones. The rules
  live here, in ``ModelConfig``; see docs/mup.md.
* **Meta-device friendly**: ``Transformer(config)`` under ``torch.device("meta")`` allocates
  nothing, and ``init_weights()`` re-initialises everything (parameters and rope buffers) in
  place. This is the FSDP2 path: build on meta, ``fully_shard`` every block, ``to_empty``,
  ``init_weights``, so a 7B model never exists unsharded on one device.

Note for FSDP2 mixed precision: the rope cos/sin tables are passed to every block as forward
arguments, so ``MixedPrecisionPolicy(cast_forward_inputs=True)`` delivers them to the blocks in
the parameter dtype (bf16). ``apply_rope`` still rotates in fp32; only the table entries are
rounded, which is what Hugging Face Llama does anyway. The same holds after
``model.to(torch.bfloat16)``, which casts the buffers; ``init_weights`` rebuilds them in fp32.

KV cache for generation: ``forward(tokens, cache, start_pos)`` writes the keys and values of
``tokens`` (at positions ``start_pos, start_pos + 1, ...``) into a ``KVCache`` and attends over
everything cached so far, so each new token costs one position's work instead of the whole
context's. The cache stores the ``n_kv_heads`` shared heads, not ``n_heads`` (GQA's memory
saving is the point). Training never passes a cache: that path runs exactly the operations it
ran before the cache existed, and blocks are still called as ``block(x, cos, sin)``, so FSDP2,
activation checkpointing and ``torch.compile`` wrap them as before.

FLOPs are counted in exactly one place, ``ModelConfig.flops_per_token``.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, fields
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from raylm.errors import ConfigError

__all__ = [
    "ModelConfig",
    "ModelConfigError",
    "Transformer",
    "TransformerBlock",
    "Attention",
    "FeedForward",
    "RMSNorm",
    "precompute_rope",
    "apply_rope",
    "document_layout",
    "KVCache",
    "LayerKV",
]


class ModelConfigError(ConfigError, ValueError):
    """An impossible model config value. A ValueError for library callers and a ConfigError
    (one-line message, exit 2) for the CLI."""


# `enable_gqa` appeared in torch 2.5; older versions must repeat K/V heads themselves. (Compared
# as numbers: as strings "2.13" < "2.5".)
SDPA_HAS_ENABLE_GQA = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 5)


# ----------------------------------------------------------------------------------------
# Config


@dataclass
class ModelConfig:
    """Shape of a Transformer. Field defaults are a small model; see ``preset`` for named
    shapes. Only ``validate`` decides what is legal (``Transformer`` calls it)."""

    dim: int = 256
    """Width of the residual stream (embedding size)."""
    n_layers: int = 4
    """Number of transformer blocks."""
    n_heads: int = 4
    """Number of query heads; must divide ``dim``."""
    n_kv_heads: int | None = None
    """Number of key/value heads. None means ``n_heads`` (multi-head attention); fewer gives
    grouped-query attention and must divide ``n_heads``."""
    vocab_size: int = 8000
    """Number of token ids (rows of the embedding and output matrices)."""
    multiple_of: int = 256
    """SwiGLU hidden size is rounded up to a multiple of this (Llama convention)."""
    ffn_dim_multiplier: float | None = None
    """Optional scale on the SwiGLU hidden size before rounding (Llama 2 70B / Llama 3 use it)."""
    norm_eps: float = 1e-5
    """Epsilon added to the mean square in RMSNorm."""
    rope_theta: float = 10000.0
    """RoPE base; larger values rotate slower and suit longer contexts."""
    max_seq_len: int = 2048
    """Longest sequence the model accepts; length of the rope tables."""
    tie_embeddings: bool = False
    """Share the token embedding matrix with the output head."""
    init_std: float = 0.02
    """Std of the normal init of linear and embedding weights (residual outputs are scaled
    down further, see ``Transformer.init_weights``)."""
    parametrization: Literal["standard", "mup"] = "standard"
    """``standard``: the usual init and one learning rate. ``mup``: maximal update
    parametrisation relative to ``mup_base_dim`` (width-scaled init of hidden matrices and
    their Adam LR, a logit multiplier, attention scale 1/head_dim), so that the learning rate
    transfers across widths; see docs/mup.md. Equal to ``standard`` at the base width."""
    mup_base_dim: int | None = None
    """µP's base width: the ``dim`` at which ``mup`` equals ``standard`` and at which its
    learning rate was tuned. None: this model's own ``dim`` (then ``mup`` changes nothing until
    ``dim`` moves away from it; a loaded run config holds the resolved number). Ignored by
    ``standard``."""
    mup_base_head_dim: int | None = None
    """µP's base head dim, where its attention scale equals 1/sqrt(head_dim). None:
    ``mup_base_dim / n_heads`` (the base model has the same heads, so head_dim grows with
    width); set it to ``head_dim`` when width grows by adding heads. Ignored by ``standard``."""
    init_from: str = ""
    """Start a fresh run from these weights instead of the random init: ``hf:DIR``, a Hugging
    Face Llama checkpoint directory (continued pretraining; see ``raylm.use.hf``). Empty: random
    init. Not part of the model's shape: ``Transformer`` ignores it."""

    # -- presets ------------------------------------------------------------------------

    @classmethod
    def preset(cls, name: str, **overrides) -> "ModelConfig":
        """A named config, optionally with some fields replaced; the result is validated."""
        if name not in PRESETS:
            raise ModelConfigError(
                f"model.preset={name!r}: unknown preset; valid presets: {', '.join(PRESETS)}"
            )
        valid = {f.name for f in fields(cls)}
        for key in overrides:
            if key not in valid:
                raise ModelConfigError(
                    f"model.{key}: unknown field; valid fields: {', '.join(sorted(valid))}"
                )
        config = cls(**{**PRESETS[name], **overrides})
        config.validate()
        return config

    # -- derived sizes ------------------------------------------------------------------

    @property
    def kv_heads(self) -> int:
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def ffn_hidden_dim(self) -> int:
        return self._ffn_hidden_dim(self.dim)

    def _ffn_hidden_dim(self, dim: int) -> int:
        # 2/3 of 4*dim keeps three SwiGLU matrices at the cost of two classic MLP matrices.
        hidden = int(2 * 4 * dim / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * math.ceil(hidden / self.multiple_of)

    # -- width transfer (µP): every rule in one place (docs/mup.md has the table) ---------

    @property
    def base_dim(self) -> int:
        """The width the parametrisation is relative to: ``dim`` itself under ``standard``."""
        if self.parametrization != "mup" or self.mup_base_dim is None:
            return self.dim
        return self.mup_base_dim

    @property
    def base_head_dim(self) -> float:
        """The head dim at which the attention scale is 1/sqrt(head_dim)."""
        if self.parametrization != "mup":
            return self.head_dim
        if self.mup_base_head_dim is not None:
            return self.mup_base_head_dim
        return self.base_dim / self.n_heads

    def hidden_lr_multiplier(self, ffn_down: bool = False) -> float:
        """Adam LR multiplier of a hidden matrix: base fan-in / fan-in (1 under standard).

        The fan-in is ``dim`` for wq, wk, wv, wo (its input is n_heads * head_dim = dim), w1
        and w3, and the SwiGLU hidden size for w2 (``ffn_down``), compared with the hidden
        size the same rounding gives at the base width. The init std of the matrix is scaled
        by the square root of the same ratio (variance ~ 1/fan-in)."""
        if self.parametrization != "mup":
            return 1.0
        if ffn_down:
            return self._ffn_hidden_dim(self.base_dim) / self.ffn_hidden_dim
        return self.base_dim / self.dim

    @property
    def output_multiplier(self) -> float:
        """Factor on the logits: base_dim / dim (1 under standard and at the base width)."""
        return self.base_dim / self.dim

    @property
    def attention_scale(self) -> float | None:
        """Softmax scale of q.k: None (SDPA's 1/sqrt(head_dim)) under standard and at the base
        head dim, else sqrt(base_head_dim) / head_dim, i.e. proportional to 1/head_dim."""
        if self.base_head_dim == self.head_dim:
            return None
        return math.sqrt(self.base_head_dim) / self.head_dim

    def lr_multiplier(self, name: str) -> float:
        """Adam LR multiplier of the parameter called ``name`` in ``named_parameters()`` (any
        wrapper prefix: FSDP2, activation checkpointing, torch.compile). Hidden matrices get
        ``hidden_lr_multiplier``; the embedding, the output head (its width scaling is the
        logit multiplier instead) and the norm gains get 1."""
        parts = name.split(".")
        if len(parts) >= 2 and parts[-1] == "weight" and parts[-2] in _HIDDEN_MATRICES:
            return self.hidden_lr_multiplier(ffn_down=parts[-2] == "w2")
        return 1.0

    # -- checks -------------------------------------------------------------------------

    def validate(self) -> None:
        """Raise ModelConfigError (a ValueError) with a one-line message naming the key."""

        def bad(name: str, what: str) -> ModelConfigError:
            return ModelConfigError(f"model.{name}={getattr(self, name)!r}: {what}")

        int_fields = ["dim", "n_layers", "n_heads", "vocab_size", "multiple_of", "max_seq_len"]
        if self.n_kv_heads is not None:
            int_fields.append("n_kv_heads")
        for name in int_fields:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise bad(name, "must be a positive integer")
        for name in ["norm_eps", "rope_theta", "init_std"]:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise bad(name, "must be a positive number")
        if self.ffn_dim_multiplier is not None:
            value = self.ffn_dim_multiplier
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise bad("ffn_dim_multiplier", "must be a positive number or null")
        if not isinstance(self.tie_embeddings, bool):
            raise bad("tie_embeddings", "must be true or false")
        if self.dim % self.n_heads != 0:
            raise bad("n_heads", f"must divide model.dim={self.dim}")
        if self.n_heads % self.kv_heads != 0:
            raise bad("n_kv_heads", f"must divide model.n_heads={self.n_heads}")
        if self.parametrization not in ("standard", "mup"):
            raise bad("parametrization", "must be standard or mup")
        for name in ["mup_base_dim", "mup_base_head_dim"]:
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
                raise bad(name, "must be a positive integer or null")
        if self.parametrization == "mup" and self._ffn_hidden_dim(self.base_dim) <= 0:
            raise bad("mup_base_dim", "gives a SwiGLU hidden size of 0 at the base width; choose a larger one")
        if (self.init_from and self.parametrization == "mup" and self.tie_embeddings
                and self.output_multiplier != 1.0):
            raise bad("init_from", f"a Hugging Face model cannot become a µP model with tied embeddings away from "
                      f"its base width (model.dim={self.dim}, model.mup_base_dim={self.mup_base_dim}): the logit "
                      "multiplier would scale the shared embedding; set model.tie_embeddings=false")
        if self.head_dim % 2 != 0:
            raise bad(
                "n_heads",
                f"head_dim = dim / n_heads = {self.head_dim} must be even (RoPE rotates pairs)",
            )

    # -- accounting ---------------------------------------------------------------------

    def _block_matmul_params(self) -> int:
        """Weights of one block's linear layers (everything except the two norm gains)."""
        q_out = self.n_heads * self.head_dim
        kv_out = self.kv_heads * self.head_dim
        attention = self.dim * q_out + 2 * self.dim * kv_out + q_out * self.dim
        feed_forward = 3 * self.dim * self.ffn_hidden_dim
        return attention + feed_forward

    def num_params(self, include_embedding: bool = True) -> int:
        """Parameter count from the config alone (equals the built model's, tested).

        ``include_embedding=False`` drops the token-embedding lookup table, which does no
        matmul work. With tied embeddings the shared matrix is still counted, because it is
        also the output head (nanoGPT's convention).
        """
        embedding = self.vocab_size * self.dim
        blocks = self.n_layers * (self._block_matmul_params() + 2 * self.dim)
        total = embedding + blocks + self.dim  # + final norm
        if not self.tie_embeddings:
            total += self.vocab_size * self.dim  # separate output head
        if not include_embedding and not self.tie_embeddings:
            total -= embedding
        return total

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward), PaLM appendix B / Chinchilla style:

            flops = 6 * N + 12 * L * H * Q * T

        * ``N``: parameters that take part in matmuls: every block's wq/wk/wv/wo/w1/w2/w3
          plus the output head. The embedding lookup (a gather) and the norm gains
          (elementwise) are excluded. Each such weight costs 2 FLOPs per token forward
          (multiply + add) and 4 backward (gradients w.r.t. input and weight), hence 6.
        * ``12 * L * H * Q * T``: attention scores ``q k^T`` and the weighted sum ``p v``,
          each 2*H*Q*T FLOPs per token per layer forward, times 3 for backward, with
          L = n_layers, H = n_heads, Q = head_dim, T = seq_len. The full T x T matrix is
          counted, not the causal half, as PaLM does, so MFU numbers are comparable with
          published ones.

        This is the one place in the project where FLOPs are counted.
        """
        if isinstance(seq_len, bool) or not isinstance(seq_len, numbers.Integral) or seq_len <= 0:
            raise ValueError(f"seq_len={seq_len!r}: must be a positive integer")
        matmul_params = self.n_layers * self._block_matmul_params() + self.vocab_size * self.dim
        attention = 12 * self.n_layers * self.n_heads * self.head_dim * seq_len
        return float(6 * matmul_params + attention)


# Linear layers of a block whose both dimensions grow with width ("hidden" in µP's terms).
_HIDDEN_MATRICES = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")

PRESETS: dict[str, dict] = {
    # ~0.9M params: unit tests on CPU.
    "debug": dict(
        dim=128, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=2048,
        multiple_of=32, max_seq_len=256,
    ),
    # ~4.6M params: the CPU demo model. dim 192 rather than 256 because it trains at seq 256,
    # batch 16 in ~0.8 s/step on 2 CPU cores (dim 256: ~1.3 s), i.e. 300 steps in ~4 minutes.
    "tiny": dict(
        dim=192, n_layers=4, n_heads=6, n_kv_heads=2, vocab_size=8000,
        multiple_of=64, max_seq_len=512,
    ),
    # GPT-3 Small shape (134M untied); SwiGLU hidden 2048.
    "125m": dict(
        dim=768, n_layers=12, n_heads=12, vocab_size=32000, multiple_of=256,
        max_seq_len=2048,
    ),
    # TinyLlama-1.1B shape: 22 layers, 32 query / 4 KV heads, hidden 5632.
    "1b": dict(
        dim=2048, n_layers=22, n_heads=32, n_kv_heads=4, vocab_size=32000,
        multiple_of=256, max_seq_len=4096,
    ),
    # Llama 2 7B: exactly 6,738,415,616 parameters; hidden 11008.
    "llama2-7b": dict(
        dim=4096, n_layers=32, n_heads=32, n_kv_heads=None, vocab_size=32000,
        multiple_of=256, max_seq_len=4096, norm_eps=1e-5,
    ),
}


# ----------------------------------------------------------------------------------------
# Rotary position embedding


def precompute_rope(
    head_dim: int, seq_len: int, theta: float, device: torch.device | str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the rotation angles, each (seq_len, head_dim // 2) in fp32.

    Pair k of position t is rotated by ``t * theta^(-2k / head_dim)``. The angles are formed
    in fp64 because ``t * freq`` reaches thousands of radians, where fp32 would already be
    off by ~1e-4 rad.
    """
    exponents = torch.arange(0, head_dim, 2, device=device, dtype=torch.float64) / head_dim
    inv_freq = 1.0 / (theta**exponents)  # (head_dim // 2,)
    positions = torch.arange(seq_len, device=device, dtype=torch.float64)  # (seq_len,)
    angles = torch.outer(positions, inv_freq)  # (seq_len, head_dim // 2)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent channel pairs of x (B, T, H, D) by the angles in cos/sin (T, D // 2),
    or (B, T, D // 2) when every row has its own positions.

    Computed in fp32 and cast back, so bf16 activations are rotated without extra rounding.
    """
    B, T, H, D = x.shape
    pairs = x.float().reshape(B, T, H, D // 2, 2)  # (B, T, H, D/2, 2)
    x_even, x_odd = pairs.unbind(-1)  # each (B, T, H, D/2)
    rows = cos.shape[0] if cos.dim() == 3 else 1  # (B, T, D/2): positions per row (document_layout)
    cos = cos.float().reshape(rows, T, 1, D // 2)  # (1 or B, T, 1, D/2): broadcast over heads
    sin = sin.float().reshape(rows, T, 1, D // 2)  # (1 or B, T, 1, D/2)
    rotated = torch.stack(
        (x_even * cos - x_odd * sin, x_even * sin + x_odd * cos), dim=-1
    )  # (B, T, H, D/2, 2)
    return rotated.reshape(B, T, H, D).type_as(x)  # (B, T, H, D)


def document_layout(documents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(RoPE positions (B, T), attention mask (B, 1, T, T), True = attend) of rows of packed
    documents, given each token's document number (B, T), non-decreasing along a row.

    Two mechanisms, both needed for a packed document to be computed exactly as alone: the
    block-diagonal causal mask keeps attention inside a document, and the position reset gives
    its tokens the positions 0, 1, ... they have alone and at generation. (RoPE makes scores
    depend on relative positions only, but the rotation tables at other absolute positions
    round differently, and the model never sees a prompt start anywhere but 0 at inference.)
    """
    B, T = documents.shape
    index = torch.arange(T, device=documents.device).expand(B, T)  # (B, T)
    starts = torch.ones_like(documents, dtype=torch.bool)
    starts[:, 1:] = documents[:, 1:] != documents[:, :-1]  # (B, T): a document begins here
    first = torch.where(starts, index, torch.zeros_like(index)).cummax(dim=1).values  # (B, T)
    same = documents.unsqueeze(2) == documents.unsqueeze(1)  # (B, T, T)
    causal = torch.ones(T, T, dtype=torch.bool, device=documents.device).tril()  # (T, T)
    return index - first, (same & causal).unsqueeze(1)  # (B, T), (B, 1, T, T)


# ----------------------------------------------------------------------------------------
# Layers


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # fp32 so the mean of squares does not lose precision in bf16.
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return (normed * self.weight.float()).type_as(x)


def _causal_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, native_gqa: bool, scale: float | None = None
) -> torch.Tensor:
    """Causal attention of q (B, H, T, D) over k, v (B, KV, T, D), KV dividing H.

    ``native_gqa`` lets SDPA broadcast the K/V heads itself; otherwise they are repeated so
    every SDPA backend can be used. ``scale`` None is SDPA's 1/sqrt(D).
    """
    return _grouped_attention(q, k, v, native_gqa, is_causal=True, scale=scale)


def _cached_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start_pos: int, native_gqa: bool,
    scale: float | None = None,
) -> torch.Tensor:
    """Attention of q (B, H, T, D) at positions ``start_pos ..`` over the cached k, v
    (B, KV, start_pos + T, D): query i sees keys 0 .. start_pos + i.

    SDPA's ``is_causal`` aligns the mask to the top-left corner, which is right only when
    queries and keys start together (the prompt, start_pos 0), so later chunks get an explicit
    mask; a single new token sees every cached key and needs none.
    """
    T, S = q.shape[2], k.shape[2]
    if start_pos == 0:
        return _grouped_attention(q, k, v, native_gqa, is_causal=True, scale=scale)
    mask = None
    if T > 1:
        query_pos = start_pos + torch.arange(T, device=q.device).unsqueeze(1)  # (T, 1)
        mask = torch.arange(S, device=q.device) <= query_pos  # (T, S), True = attend
    return _grouped_attention(q, k, v, native_gqa, is_causal=False, mask=mask, scale=scale)


def _grouped_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, native_gqa: bool, is_causal: bool,
    mask: torch.Tensor | None = None, scale: float | None = None,
) -> torch.Tensor:
    """SDPA of q (B, H, T, D) over k, v (B, KV, S, D) with KV dividing H."""
    n_heads, n_kv_heads = q.shape[1], k.shape[1]
    if n_kv_heads == n_heads:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, scale=scale)
    if native_gqa:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, scale=scale,
                                              enable_gqa=True)
    # Query head h uses K/V head h // group: repeat_interleave keeps that grouping.
    group = n_heads // n_kv_heads
    k = k.repeat_interleave(group, dim=1)  # (B, H, S, D)
    v = v.repeat_interleave(group, dim=1)  # (B, H, S, D)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, scale=scale)


# ----------------------------------------------------------------------------------------
# KV cache


class LayerKV:
    """One layer's cached keys and values, (B, KV, max_len, D) each, allocated on first use in
    the dtype and device of the keys written (fp32 on CPU, bf16 for a bf16 model).

    A plain class on purpose: FSDP2's forward-input casting copies tensors it finds inside
    containers and dataclasses, and writes into such a copy would be lost.
    """

    def __init__(self, max_len: int):
        self.max_len = max_len
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None

    def update(
        self, k: torch.Tensor, v: torch.Tensor, start_pos: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, KV, T, D) at positions start_pos .. start_pos + T - 1 and return the
        keys and values of positions 0 .. start_pos + T - 1."""
        B, KV, T, D = k.shape
        end = start_pos + T
        if self.k is None or self.k.shape[0] != B:
            self.k = k.new_zeros(B, KV, self.max_len, D)  # (B, KV, max_len, D)
            self.v = v.new_zeros(B, KV, self.max_len, D)  # (B, KV, max_len, D)
        self.k[:, :, start_pos:end] = k
        self.v[:, :, start_pos:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]  # (B, KV, end, D) each


class KVCache:
    """Keys and values of every layer for one generation, up to ``max_len`` positions.

    The caller tracks how many positions are filled (the next ``start_pos``); writing at a
    position overwrites it, so a generation can restart from position 0 with the same cache.
    """

    def __init__(self, config: ModelConfig, max_len: int | None = None):
        self.max_len = config.max_seq_len if max_len is None else min(max_len, config.max_seq_len)
        self.layers = [LayerKV(self.max_len) for _ in range(config.n_layers)]


class Attention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_heads = config.n_heads
        self.n_kv_heads = config.kv_heads
        self.head_dim = config.head_dim
        self.scale = config.attention_scale  # None: 1/sqrt(head_dim); µP away from its base: ~1/head_dim
        self.wq = nn.Linear(config.dim, self.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(config.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(config.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(self.n_heads * self.head_dim, config.dim, bias=False)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
        cache: LayerKV | None = None, start_pos: int = 0, mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim)  # (B, T, H, D)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim)  # (B, T, KV, D)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim)  # (B, T, KV, D)
        q = apply_rope(q, cos, sin)
        k = apply_rope(k, cos, sin)
        # SDPA wants heads before time.
        q = q.transpose(1, 2)  # (B, H, T, D)
        k = k.transpose(1, 2)  # (B, KV, T, D)
        v = v.transpose(1, 2)  # (B, KV, T, D)
        # Native GQA only pays off in half precision: for fp32 the fused CUDA kernels reject
        # unequal head counts and SDPA silently falls back to the O(T^2)-memory math kernel.
        native_gqa = SDPA_HAS_ENABLE_GQA and q.dtype in (torch.float16, torch.bfloat16)
        if mask is not None:  # packed documents: causal within each (document_layout)
            out = _grouped_attention(q, k, v, native_gqa, is_causal=False, mask=mask, scale=self.scale)
        elif cache is None:
            out = _causal_attention(q, k, v, native_gqa, self.scale)  # (B, H, T, D)
        else:
            k, v = cache.update(k, v, start_pos)  # (B, KV, start_pos + T, D) each
            out = _cached_attention(q, k, v, start_pos, native_gqa, self.scale)  # (B, H, T, D)
        out = out.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)  # (B, T, H*D)
        return self.wo(out)  # (B, T, dim)


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)  # gate
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)  # down projection (residual output)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)  # up projection

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    """Pre-norm block; the unit FSDP shards (``fully_shard`` per block)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.attention = Attention(config)
        self.feed_forward = FeedForward(config.dim, config.ffn_hidden_dim)
        self.attention_norm = RMSNorm(config.dim, config.norm_eps)
        self.ffn_norm = RMSNorm(config.dim, config.norm_eps)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
        cache: LayerKV | None = None, start_pos: int = 0, mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x), cos, sin, cache, start_pos, mask)
        return x + self.feed_forward(self.ffn_norm(x))


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        config.validate()
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(TransformerBlock(config) for _ in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.output = nn.Linear(config.dim, config.vocab_size, bias=False)
        if config.tie_embeddings:
            # One Parameter shared by both modules; to_empty and init keep it shared.
            self.output.weight = self.tok_embeddings.weight
        # Non-persistent: derived from the config, so not saved and not trained. Created on
        # the current default device, i.e. not allocated under torch.device("meta").
        cos, sin = precompute_rope(config.head_dim, config.max_seq_len, config.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)  # (max_seq_len, head_dim/2)
        self.register_buffer("rope_sin", sin, persistent=False)  # (max_seq_len, head_dim/2)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self, buffer_device: torch.device | str | None = None) -> None:
        """(Re)initialise every parameter and recompute the rope buffers, in place.

        Works on meta tensors (a no-op there), on real tensors, and on FSDP2-sharded
        parameters after ``to_empty``. ``buffer_device`` is where the rope tables are
        rebuilt; by default where they already live. With ``tie_embeddings`` it also
        re-ties the output head, which ``to_empty`` from meta unties.

        Linear and embedding weights are N(0, init_std). The residual output projections
        (attention ``wo`` and feed-forward ``w2``) use ``init_std / sqrt(2 * n_layers)``:
        every block adds two such outputs to the residual stream, so without the scaling the
        stream's variance at init grows with depth (GPT-2 / nanoGPT). Norm gains are 1.
        Under µP the hidden matrices' std is further multiplied by
        ``sqrt(config.hidden_lr_multiplier(...))`` (variance ~ base fan-in / fan-in); the
        embedding and output head keep ``init_std`` at every width (the output head's width
        scaling is the logit multiplier). At the base width every factor is 1, so the same
        seed gives the same weights as ``standard``.
        """
        config = self.config
        if config.tie_embeddings:
            # to_empty() from meta gives each module its own new Parameter, silently untying
            # them (a known PyTorch behaviour), so tie again before initialising.
            self.output.weight = self.tok_embeddings.weight
        std = config.init_std
        residual_std = std / math.sqrt(2 * config.n_layers)
        # µP: hidden std ~ 1/sqrt(fan-in); both factors are exactly 1 under standard.
        width = math.sqrt(config.hidden_lr_multiplier())
        width_ffn_down = math.sqrt(config.hidden_lr_multiplier(ffn_down=True))
        nn.init.normal_(self.tok_embeddings.weight, mean=0.0, std=std)
        for layer in self.layers:
            attention, feed_forward = layer.attention, layer.feed_forward
            inputs = (attention.wq, attention.wk, attention.wv, feed_forward.w1, feed_forward.w3)
            for linear in inputs:
                nn.init.normal_(linear.weight, mean=0.0, std=std * width)
            nn.init.normal_(attention.wo.weight, mean=0.0, std=residual_std * width)
            nn.init.normal_(feed_forward.w2.weight, mean=0.0, std=residual_std * width_ffn_down)
            layer.attention_norm.reset_parameters()
            layer.ffn_norm.reset_parameters()
        self.norm.reset_parameters()
        if not config.tie_embeddings:
            nn.init.normal_(self.output.weight, mean=0.0, std=std)

        device = self.rope_cos.device if buffer_device is None else torch.device(buffer_device)
        cos, sin = precompute_rope(config.head_dim, config.max_seq_len, config.rope_theta, device)
        # Rebinding (not copy_) so a change of device through buffer_device takes effect.
        self.rope_cos = cos  # (max_seq_len, head_dim/2)
        self.rope_sin = sin  # (max_seq_len, head_dim/2)

    def num_params(self, include_embedding: bool = True) -> int:
        """Count of the actual parameters (a tied matrix once); same convention as
        ``ModelConfig.num_params``."""
        total = sum(p.numel() for p in self.parameters())  # parameters() de-duplicates
        if not include_embedding and not self.config.tie_embeddings:
            total -= self.tok_embeddings.weight.numel()
        return total

    def forward(
        self, tokens: torch.Tensor, cache: KVCache | None = None, start_pos: int = 0,
        documents: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits (B, T, vocab_size) for token ids (B, T), in the activation dtype.

        With a ``cache``, ``tokens`` sit at positions ``start_pos ..``; their keys and values are
        cached and they attend over the cached positions before them as well. With
        ``documents`` (B, T), the document number of each token in its row (non-decreasing),
        each token attends only to the tokens of its own document before it, and RoPE positions
        restart at 0 with every document (`document_layout`): a packed document is computed as
        it would be alone.
        """
        if tokens.dim() != 2:
            raise ValueError(f"tokens must have shape (batch, seq_len), got {tuple(tokens.shape)}")
        T = tokens.shape[1]
        end = start_pos + T
        if end > self.config.max_seq_len:
            raise ValueError(
                f"sequence length {end} exceeds model.max_seq_len={self.config.max_seq_len}"
            )
        if cache is not None and end > cache.max_len:
            raise ValueError(f"positions up to {end} exceed the KV cache's {cache.max_len}")
        h = self.tok_embeddings(tokens)  # (B, T, dim)
        cos = self.rope_cos[start_pos:end]  # (T, head_dim/2)
        sin = self.rope_sin[start_pos:end]  # (T, head_dim/2)
        mask = None
        if documents is not None:
            if cache is not None:
                raise ValueError("documents and a KV cache do not go together (generation is one document)")
            positions, mask = document_layout(documents)  # (B, T), (B, 1, T, T)
            cos, sin = self.rope_cos[positions], self.rope_sin[positions]  # (B, T, head_dim/2) each
        for i, layer in enumerate(self.layers):
            if mask is not None:
                h = layer(h, cos, sin, None, 0, mask)  # (B, T, dim)
            elif cache is None:  # training: blocks are called exactly as FSDP2 and compile saw them
                h = layer(h, cos, sin)  # (B, T, dim)
            else:
                h = layer(h, cos, sin, cache.layers[i], start_pos)  # (B, T, dim)
        h = self.norm(h)  # (B, T, dim)
        if self.config.output_multiplier != 1.0:  # µP away from its base width
            # The logit multiplier, applied before the (linear) head: a (B, T, dim) product
            # instead of another (B, T, vocab_size) tensor of logits.
            h = h * self.config.output_multiplier  # (B, T, dim)
        return self.output(h)  # (B, T, vocab_size)
