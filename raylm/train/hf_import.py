"""`model.init_from: hf:DIR`: a Hugging Face Llama directory's weights into a raylm model.

The import half of the Hugging Face bridge, in the core beside checkpoint loading, since a run
starts from it (`raylm.train.runs` checks it before anything is written, the `Trainer` loads it at
step 0); `raylm.use.hf` holds the export half and imports the shared tensor names from here.

Weights: the names map one to one (wq -> q_proj, w1 -> gate_proj, ...). RoPE is the one
difference in layout: raylm rotates adjacent channel pairs of each head, transformers channel i
with channel i + head_dim/2, so the rows of wq and wk are permuted per head (`rope_to_hf`,
`rope_from_hf`: inverses, so export then import gives the weights back bit for bit). µP's
multipliers, folded into lm_head and wq on export, are divided out again here.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from raylm.errors import ConfigError, RaylmError
from raylm.model import ModelConfig, Transformer
from raylm.tokenizer import hf_dir_of
from raylm.train.parallel import distributed_world

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


# ---------------------------------------------------------------------------------------
# Names and the RoPE permutation


_LAYER_NAMES = {
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}


@dataclass(frozen=True)
class WeightEntry:
    """One tensor in both namings; `rope_heads` is set for wq/wk (rows permuted per head);
    HF's tensor is raylm's times `scale` (µP's multipliers folded in, 1 otherwise)."""

    raylm: str
    hf: str
    shape: tuple[int, ...]
    rope_heads: int | None = None
    scale: float = 1.0


def weight_entries(cfg: ModelConfig) -> list[WeightEntry]:
    """Every tensor of the HF checkpoint, in transformers' order. With tied embeddings there is
    no lm_head: transformers ties it to embed_tokens from `tie_word_embeddings`."""
    if cfg.tie_embeddings and cfg.output_multiplier != 1.0:
        raise ConfigError(f"model.tie_embeddings=true with model.parametrization=mup at model.dim={cfg.dim} != "
                          f"model.mup_base_dim={cfg.mup_base_dim} has no Llama equivalent: its logit multiplier "
                          "would have to scale the shared embedding")
    q_scale = 1.0 if cfg.attention_scale is None else math.sqrt(cfg.base_head_dim / cfg.head_dim)
    with torch.device("meta"):
        shapes = {name: tuple(t.shape) for name, t in Transformer(cfg).state_dict().items()}
    entries = [WeightEntry("tok_embeddings.weight", "model.embed_tokens.weight", shapes["tok_embeddings.weight"])]
    for i in range(cfg.n_layers):
        for ours, theirs in _LAYER_NAMES.items():
            name = f"layers.{i}.{ours}"
            heads = cfg.n_heads if ours == "attention.wq.weight" else cfg.kv_heads if ours == "attention.wk.weight" else None
            scale = q_scale if ours == "attention.wq.weight" else 1.0
            entries.append(WeightEntry(name, f"model.layers.{i}.{theirs}", shapes[name], heads, scale))
    entries.append(WeightEntry("norm.weight", "model.norm.weight", shapes["norm.weight"]))
    if not cfg.tie_embeddings:
        entries.append(WeightEntry("output.weight", "lm_head.weight", shapes["output.weight"],
                                   scale=cfg.output_multiplier))
    return entries


def rope_to_hf(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows of wq/wk (heads * head_dim, dim) from adjacent pairs to split halves, per head:
    row 2k of a head goes to k, row 2k+1 to k + head_dim/2."""
    rows, dim = weight.shape
    head_dim = rows // n_heads
    return weight.reshape(n_heads, head_dim // 2, 2, dim).transpose(1, 2).reshape(rows, dim)


def rope_from_hf(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The inverse of `rope_to_hf`."""
    rows, dim = weight.shape
    head_dim = rows // n_heads
    return weight.reshape(n_heads, 2, head_dim // 2, dim).transpose(1, 2).reshape(rows, dim)


# ---------------------------------------------------------------------------------------
# Import




def hf_state_dict(hf_dir: str | Path, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """raylm's state dict (fp32, tied names both present) from a Hugging Face Llama directory.

    The directory's config.json must describe `cfg`'s shape: any difference is a ConfigError of
    one line naming both keys; a tensor of the wrong shape or a missing one names the tensor.
    """
    from safetensors import safe_open

    hf_dir = Path(hf_dir)
    where = f"model.init_from=hf:{hf_dir}"
    config = _read_json(hf_dir / "config.json", where)
    _check_hf_config(config, cfg, where)
    files = _safetensors_files(hf_dir, where)
    state: dict[str, torch.Tensor] = {}
    handles = {}
    try:
        for entry in weight_entries(cfg):
            file = files.get(entry.hf)
            if file is None:
                raise ConfigError(f"{where}: no tensor {entry.hf} in the checkpoint")
            if file not in handles:
                handles[file] = safe_open(str(file), framework="pt")
            weight = handles[file].get_tensor(entry.hf)
            if tuple(weight.shape) != entry.shape:
                raise ConfigError(f"{where}: {entry.hf} has shape {tuple(weight.shape)}, the model's {entry.raylm} "
                                  f"needs {entry.shape}")
            if entry.rope_heads is not None:
                weight = rope_from_hf(weight, entry.rope_heads)
            if entry.scale != 1.0:
                weight = weight.to(torch.float32) / entry.scale
            state[entry.raylm] = weight.to(torch.float32).contiguous()
    except (OSError, ValueError, RuntimeError) as e:  # safetensors reports damaged files as these
        if isinstance(e, RaylmError):
            raise
        raise ConfigError(f"{where}: unreadable safetensors ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    if cfg.tie_embeddings:
        state["output.weight"] = state["tok_embeddings.weight"]
    return state


def _read_json(path: Path, where: str) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{where}: no {path.name} in {path.parent}") from None
    except (OSError, ValueError) as e:
        raise ConfigError(f"{where}: {path.name} is not readable JSON ({e})") from None
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: {path.name} is not a JSON object")
    return value


def _check_hf_config(config: dict[str, Any], cfg: ModelConfig, where: str) -> None:
    if config.get("model_type") != "llama":
        raise ConfigError(f"{where}: config.json model_type={config.get('model_type')!r}; only llama is supported")
    rope = config.get("rope_parameters") or {}
    rope_type = rope.get("rope_type", "default") if isinstance(rope, dict) else "default"
    if config.get("rope_scaling") or rope_type != "default":
        raise ConfigError(f"{where}: config.json uses rope scaling ({config.get('rope_scaling') or rope_type}), "
                          "which raylm's model does not implement")
    for key, unsupported in [("attention_bias", True), ("mlp_bias", True)]:
        if config.get(key) == unsupported:
            raise ConfigError(f"{where}: config.json {key}=true; raylm's model has no biases")
    if config.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"{where}: config.json hidden_act={config['hidden_act']!r}; raylm's SwiGLU uses silu")
    heads = config.get("num_attention_heads")
    theta = config.get("rope_theta", rope.get("rope_theta") if isinstance(rope, dict) else None)
    checks = [
        ("vocab_size", config.get("vocab_size"), "model.vocab_size", cfg.vocab_size),
        ("hidden_size", config.get("hidden_size"), "model.dim", cfg.dim),
        ("num_hidden_layers", config.get("num_hidden_layers"), "model.n_layers", cfg.n_layers),
        ("num_attention_heads", heads, "model.n_heads", cfg.n_heads),
        ("num_key_value_heads", config.get("num_key_value_heads") or heads, "model.n_kv_heads", cfg.kv_heads),
        ("head_dim", config.get("head_dim") or cfg.head_dim, "model.dim / model.n_heads", cfg.head_dim),
        ("intermediate_size", config.get("intermediate_size"),
         "the SwiGLU hidden size from model.dim, model.multiple_of, model.ffn_dim_multiplier", cfg.ffn_hidden_dim),
        ("tie_word_embeddings", bool(config.get("tie_word_embeddings", False)), "model.tie_embeddings",
         cfg.tie_embeddings),
        ("rms_norm_eps", config.get("rms_norm_eps"), "model.norm_eps", cfg.norm_eps),
        ("rope_theta", theta, "model.rope_theta", cfg.rope_theta),
    ]
    for theirs, value, ours, expected in checks:
        if value != expected:
            raise ConfigError(f"{where}: config.json {theirs}={value!r} but {ours}={expected!r}; "
                              f"make the model config match the checkpoint")


def _safetensors_files(hf_dir: Path, where: str) -> dict[str, Path]:
    """{tensor name: file} from the index, or from the single model.safetensors."""
    from safetensors import safe_open

    index = hf_dir / INDEX_FILE
    if index.is_file():
        weight_map = _read_json(index, where).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ConfigError(f"{where}: {INDEX_FILE} has no weight_map object")
        files = {name: hf_dir / file for name, file in weight_map.items()}
        for file in set(files.values()):
            if not file.is_file():
                raise ConfigError(f"{where}: {file.name}, listed in {INDEX_FILE}, is missing")
        return files
    single = hf_dir / SINGLE_FILE
    if not single.is_file():
        raise ConfigError(f"{where}: no {SINGLE_FILE} or {INDEX_FILE} (only safetensors weights are read)")
    try:
        with safe_open(str(single), framework="pt") as f:
            return {name: single for name in f.keys()}
    except Exception as e:  # safetensors raises its own SafetensorError for a damaged header
        raise ConfigError(f"{where}: {SINGLE_FILE} is not a safetensors file ({str(e).splitlines()[0]})") from None


def check_init_from(cfg: ModelConfig) -> None:
    """The cheap checks of `model.init_from` (config.json against the model, a tokenizer.model
    there), so a run that cannot start says so before it creates anything."""
    hf_dir = hf_dir_of(cfg.init_from)
    where = f"model.init_from=hf:{hf_dir}"
    _check_hf_config(_read_json(hf_dir / "config.json", where), cfg, where)




def load_hf_weights(model: torch.nn.Module, cfg: ModelConfig) -> None:
    """Fill `model` (plain, or FSDP2-sharded over the default process group) with the weights
    of `cfg.init_from`. A collective when distributed: rank 0 alone reads the files and the
    others receive their shards, so a node never holds one full copy per rank; a mismatch is
    raised on every rank with rank 0's message."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    rank, world = distributed_world()
    state: dict[str, torch.Tensor] = {}
    error = None
    if rank == 0:
        try:
            state = hf_state_dict(hf_dir_of(cfg.init_from), cfg)
        except ConfigError as e:
            error = str(e)
    if world > 1:
        box = [error]
        dist.broadcast_object_list(box, src=0)
        error = box[0]
    if error is not None:
        raise ConfigError(error)
    options = StateDictOptions(full_state_dict=True, strict=True, broadcast_from_rank0=world > 1)
    set_model_state_dict(model, state, options=options)
