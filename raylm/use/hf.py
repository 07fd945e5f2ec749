"""Hugging Face Llama checkpoints: `raylm export --format hf` and `model.init_from: hf:DIR`.

An exported directory loads with `AutoModelForCausalLM.from_pretrained(DIR)` and
`AutoTokenizer.from_pretrained(DIR)`, with no custom code and no network:

    config.json                  LlamaConfig fields (architectures ["LlamaForCausalLM"])
    generation_config.json       bos/eos/pad ids, the run's sampling settings, and
                                 suppress_tokens: the model's ids beyond the tokenizer's pieces
    model.safetensors            weights; above --max-shard-size, model-0000i-of-0000n.safetensors
                                 and model.safetensors.index.json
    tokenizer.model              raylm's sentencepiece model, as trained
    tokenizer.json               the same tokenizer for the `tokenizers` library (written here)
    tokenizer_config.json        PreTrainedTokenizerFast, special tokens, BOS added like raylm,
                                 the chat template of a `format: chat` run (Jinja)
    special_tokens_map.json

Weights: the names map one to one (wq -> q_proj, w1 -> gate_proj, w3 -> up_proj, w2 -> down_proj,
...). RoPE is the one difference in layout: raylm rotates adjacent channel pairs (0, 1), (2, 3),
... of each head, as Meta's reference code does, while transformers rotates channel i with
channel i + head_dim/2 ("rotate_half"). Both use the same frequency for pair k, so permuting the
output rows of wq and wk per head, channel 2k -> k and 2k+1 -> k + head_dim/2, gives the same
attention scores (q.k is unchanged when q and k are permuted alike); v and wo are untouched.
Import applies the inverse permutation, so export then import gives the weights back bit for bit.

µP models (`model.parametrization: mup`, docs/mup.md) export to a plain Llama with the same
outputs: the logit multiplier base_dim / dim is folded into lm_head, and the attention scale's
ratio to Llama's 1/sqrt(head_dim), sqrt(base_head_dim / head_dim), into wq (RoPE is a rotation,
linear, so it commutes with the factor). Import into a µP config divides them out again (exact
when the factors are powers of two). A µP model with tied embeddings away from its base width
has no such export (the head is the embedding) and is refused in one line.

Export reads a DCP checkpoint written by any number of ranks one shard's worth of tensors at a
time (DCP reads only the byte ranges of the tensors asked for), converts tensor by tensor and
writes each safetensors file before reading the next: memory holds at most about two output
shards, never two copies of the model. Nothing is unpickled: DCP metadata goes through the
checkpoint module's allow-listed reader, and the HF side is safetensors and JSON only.

Tokenizer: transformers 5 builds Llama tokenizers with its own normalizer (a dummy-prefix
Metaspace), which is not how raylm trains sentencepiece (no dummy prefix, no normalisation,
newline and tab as user symbols). tokenizer.json is therefore written here from the
sentencepiece model itself: the BPE merges are every split of every piece ranked by piece score,
which is how sentencepiece's BPE chooses its merges, plus byte fallback, user symbols isolated
before the model, and literal "<s>" text kept as text (`split_special_tokens`). For BPE models
the encoding equals sentencepiece's (tested on code, Unicode and whitespace runs). For unigram
models transformers' Viterbi may break ties between equal-score segmentations differently (for
instance a run of spaces split 1+8 or 8+1): the text is the same, the ids can differ.
"""

from __future__ import annotations

import base64
import contextlib
import json
import math
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from raylm import storage
from raylm.errors import CheckpointError, ConfigError, RaylmError
from raylm.model import ModelConfig, Transformer
from raylm.tokenizer import Tokenizer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULT_MAX_SHARD_BYTES = 5 * 2**30
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
HF_PREFIX = "hf:"


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
# config.json, generation_config.json


def hf_config(cfg: ModelConfig, dtype: torch.dtype, tokenizer: Tokenizer) -> dict[str, Any]:
    """LlamaConfig fields for a raylm model (rope_theta both top level, for transformers 4, and
    in rope_parameters, for 5)."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.dim,
        "intermediate_size": cfg.ffn_hidden_dim,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "rope_scaling": None,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "pretraining_tp": 1,
        "initializer_range": cfg.init_std,
        "tie_word_embeddings": cfg.tie_embeddings,
        "bos_token_id": tokenizer.bos_id,
        "eos_token_id": tokenizer.eos_id,
        "pad_token_id": tokenizer.pad_id,
        "torch_dtype": str(dtype).removeprefix("torch."),
        "use_cache": True,
    }


def generation_config(cfg: ModelConfig, tokenizer: Tokenizer, temperature: float, top_k: int) -> dict[str, Any]:
    """Defaults for transformers' `generate`: the run's sampling settings, and the model's ids
    beyond the tokenizer's vocabulary suppressed, as raylm's own generation never samples them."""
    out: dict[str, Any] = {"bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id,
                           "pad_token_id": tokenizer.pad_id, "do_sample": temperature > 0}
    if temperature > 0:
        out.update(temperature=temperature, top_k=top_k)
    if cfg.vocab_size > tokenizer.vocab_size:
        out["suppress_tokens"] = list(range(tokenizer.vocab_size, cfg.vocab_size))
    return out


# ---------------------------------------------------------------------------------------
# Tokenizer files

_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _BYTE = 1, 2, 3, 4, 6  # sentencepiece piece types


def tokenizer_json(tokenizer: Tokenizer, add_bos: bool) -> dict[str, Any]:
    """`tokenizers` serialisation of a sentencepiece model that encodes as sentencepiece does
    (see the module docstring for what is exact)."""
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(tokenizer.to_bytes())
    pieces, trainer, norm = list(proto.pieces), proto.trainer_spec, proto.normalizer_spec
    special = [{"id": i, "content": p.piece, "single_word": False, "lstrip": False, "rstrip": False,
                "normalized": False, "special": True}
               for i, p in enumerate(pieces) if p.type in (_UNKNOWN, _CONTROL)]
    user = sorted((p.piece for p in pieces if p.type == _USER_DEFINED), key=len, reverse=True)
    unk = trainer.unk_piece or "<unk>"
    if trainer.model_type == 2:  # BPE
        model = {"type": "BPE", "dropout": None, "unk_token": unk, "continuing_subword_prefix": None,
                 "end_of_word_suffix": None, "fuse_unk": True, "byte_fallback": trainer.byte_fallback,
                 "ignore_merges": False, "vocab": {p.piece: i for i, p in enumerate(pieces)},
                 "merges": _bpe_merges(pieces)}
    elif trainer.model_type == 1:  # unigram; only normal and user pieces may be matched in text
        vocab = [[p.piece, p.score if p.type in (_NORMAL, _USER_DEFINED) else -1e9] for p in pieces]
        model = {"type": "Unigram", "unk_id": trainer.unk_id, "vocab": vocab, "byte_fallback": trainer.byte_fallback}
    else:
        raise ConfigError(f"tokenizer {tokenizer.source}: sentencepiece model type {trainer.model_type} "
                          "cannot be exported (only bpe and unigram)")

    normalizers: list[dict[str, Any]] = []
    if norm.precompiled_charsmap:
        normalizers.append({"type": "Precompiled",
                            "precompiled_charsmap": base64.b64encode(norm.precompiled_charsmap).decode()})
    if norm.remove_extra_whitespaces:
        normalizers += [{"type": "Replace", "pattern": {"Regex": r"\A +| +\z"}, "content": ""},
                        {"type": "Replace", "pattern": {"Regex": " {2,}"}, "content": " "}]
    if norm.add_dummy_prefix:
        normalizers.append({"type": "Prepend", "prepend": " "})
    if norm.escape_whitespaces:
        normalizers.append({"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"})
    decoders: list[dict[str, Any]] = [{"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "}]
    if trainer.byte_fallback:
        decoders.append({"type": "ByteFallback"})
    decoders.append({"type": "Fuse"})
    if norm.add_dummy_prefix:
        decoders.append({"type": "Strip", "content": " ", "start": 1, "stop": 0})

    bos = pieces[tokenizer.bos_id].piece
    prefix = [{"SpecialToken": {"id": bos, "type_id": 0}}] if add_bos else []
    post = {"type": "TemplateProcessing",
            "single": prefix + [{"Sequence": {"id": "A", "type_id": 0}}],
            "pair": prefix + [{"Sequence": {"id": "A", "type_id": 0}}]
            + ([{"SpecialToken": {"id": bos, "type_id": 1}}] if add_bos else [])
            + [{"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {bos: {"id": bos, "ids": [tokenizer.bos_id], "tokens": [bos]}} if add_bos else {}}
    return {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": special,
        "normalizer": {"type": "Sequence", "normalizers": normalizers},
        # sentencepiece matches user symbols (newline, tab) first and never merges them
        "pre_tokenizer": ({"type": "Split", "pattern": {"Regex": "|".join(re.escape(u) for u in user)},
                           "behavior": "Isolated", "invert": False} if user else None),
        "post_processor": post,
        "decoder": {"type": "Sequence", "decoders": decoders},
        "model": model,
    }


def _bpe_merges(pieces: list) -> list[list[str]]:
    """Every (left, right) split of every normal piece into two normal pieces, best piece score
    first. Sentencepiece BPE merges the adjacent pair whose concatenation scores highest, so
    listing all splits (not only the one training made) gives transformers the same choices."""
    normal = {p.piece: (p.score, i) for i, p in enumerate(pieces) if p.type == _NORMAL}
    ranked = []
    for piece, (score, i) in normal.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in normal and right in normal:
                ranked.append((-score, i, cut, left, right))
    return [[left, right] for *_, left, right in sorted(ranked)]


def chat_template_of(cfg) -> str | None:
    """The Jinja chat template of the run's first `format: chat` source (`raylm.data.chat`), or None."""
    from raylm.data.chat import JINJA

    return next((JINJA[src.template] for src in cfg.data.sources if src.format == "chat"), None)


def tokenizer_files(tokenizer: Tokenizer, add_bos: bool, max_seq_len: int,
                    chat_template: str | None = None) -> dict[str, bytes]:
    """The tokenizer files of an exported directory, by name; `chat_template` (Jinja) goes into
    tokenizer_config.json, where `apply_chat_template` finds it."""
    names = {"bos_token": tokenizer.bos_id, "eos_token": tokenizer.eos_id, "unk_token": tokenizer.unk_id,
             "pad_token": tokenizer.pad_id}
    special = {key: tokenizer.sp.id_to_piece(i) for key, i in names.items()}
    config = {
        # The generic class loads tokenizer.json as written; LlamaTokenizer would rebuild it with
        # its own (dummy-prefix) normalizer.
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special,
        "add_bos_token": add_bos,
        "add_eos_token": False,
        "split_special_tokens": True,  # "<s>" in text is text, as in sentencepiece
        "clean_up_tokenization_spaces": False,
        "model_max_length": max_seq_len,
        "padding_side": "left",
    }
    if chat_template is not None:
        config["chat_template"] = chat_template
    return {
        "tokenizer.model": tokenizer.to_bytes(),
        "tokenizer.json": _json_bytes(tokenizer_json(tokenizer, add_bos)),
        "tokenizer_config.json": _json_bytes(config),
        "special_tokens_map.json": _json_bytes(special),
    }


def _json_bytes(value: Any) -> bytes:
    return (json.dumps(value, indent=2, ensure_ascii=False) + "\n").encode("utf-8")


# ---------------------------------------------------------------------------------------
# Export


def parse_size(text: str) -> int:
    """Bytes from `500MB`, `5GB`, `2GiB` or a plain number of bytes (decimal units as transformers)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)\s*", text.upper())
    if not match:
        raise ConfigError(f"--max-shard-size={text!r}: expected a size such as 500MB, 5GB or 2GiB")
    number, unit = float(match.group(1)), match.group(2).rstrip("B")
    scale = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
             "KI": 2**10, "MI": 2**20, "GI": 2**30, "TI": 2**40}[unit]
    size = int(number * scale)
    if size <= 0:
        raise ConfigError(f"--max-shard-size={text!r}: must be more than 0 bytes")
    return size


def plan_shards(entries: list[WeightEntry], itemsize: int, max_shard_bytes: int) -> list[list[WeightEntry]]:
    """Consecutive tensors packed into files of at most max_shard_bytes (a larger tensor gets a file alone)."""
    shards: list[list[WeightEntry]] = [[]]
    size = 0
    for entry in entries:
        nbytes = _numel(entry.shape) * itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += nbytes
    return shards


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def export_hf(path: str | Path, out: str | Path, *, dtype: str = "float32",
              max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, log: Callable[[str], None] = print) -> str | Path:
    """Write the run's newest verified checkpoint (or the checkpoint `path`) as a Hugging Face
    Llama directory `out`, which must not exist yet or be empty. Returns `out`.

    The directory is assembled next to `out`, in a hidden directory made for this export alone
    (`.OUT.partial-XXXX`: another export's, or a user's folder of any name, is never touched),
    and renamed into place at the end, so a failed export leaves nothing that looks finished. A
    link to an empty directory is followed: the export lands in the directory it names, and the
    link stays. `out` may be an s3:// or gs:// prefix that holds no file yet: the directory is
    then assembled in a local temporary directory and uploaded file by file, config.json last
    (a prefix without it is not a loadable export); a failed upload deletes exactly the files
    it wrote, never the prefix nor another writer's objects (`storage.WriteLog`).
    """
    from raylm.train.runs import TOKENIZER_FILE
    from raylm.use.load import _beside, load_run_config, resolve_checkpoint

    if dtype not in DTYPES:
        raise ConfigError(f"--dtype={dtype!r}: must be one of {', '.join(DTYPES)}")
    storage.check_scheme(out, "--out", storage.SCHEMES)
    remote = storage.is_uri(out)
    if remote:
        out = storage.location(out)
        storage.check_reachable(out, "--out")
        with storage.errors(out, "--out", ConfigError):
            taken = storage.holds_files(out)
        if taken:
            raise ConfigError(f"--out {out}: already holds objects; choose a new prefix")
    else:
        out = _local_out(Path(out).expanduser())
    checkpoint = resolve_checkpoint(path)
    run_cfg = load_run_config(checkpoint)
    tokenizer = Tokenizer.load(_beside(checkpoint, TOKENIZER_FILE))
    cfg, torch_dtype = run_cfg.model, DTYPES[dtype]
    entries = weight_entries(cfg)
    _check_saved_shapes(checkpoint, entries)

    if remote:
        staging, made = Path(tempfile.mkdtemp(prefix="raylm-export-")), []
        uploads = storage.WriteLog(out, "--out", RaylmError)
    else:
        made = [d for d in [out.parent, *out.parent.parents] if not d.exists()]  # deepest first
        out.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        _write_weights(checkpoint, entries, staging, torch_dtype, max_shard_bytes)
        files = {
            "config.json": _json_bytes(hf_config(cfg, torch_dtype, tokenizer)),
            "generation_config.json": _json_bytes(
                generation_config(cfg, tokenizer, run_cfg.run.temperature, run_cfg.run.top_k)),
            **tokenizer_files(tokenizer, run_cfg.data.add_bos, cfg.max_seq_len, chat_template_of(run_cfg)),
        }
        if remote:
            _upload(staging, uploads, files)
        else:
            for name, data in files.items():
                (staging / name).write_bytes(data)
            try:
                os.replace(staging, out)  # atomic, onto an empty directory too; never onto a non-empty one
            except OSError:
                raise ConfigError(f"--out {out}: was filled while this export ran (another export?); "
                                  "it was left alone") from None
    except BaseException:
        if remote:
            with contextlib.suppress(OSError):
                uploads.remove()
        shutil.rmtree(staging, ignore_errors=True)
        for directory in made:  # only the parents this export made, and only while empty
            with contextlib.suppress(OSError):
                directory.rmdir()
        raise
    if remote:
        shutil.rmtree(staging, ignore_errors=True)
    log(f"exported {checkpoint} to {out} ({cfg.num_params():,} parameters, {dtype})")
    return out


def _local_out(out: Path) -> Path:
    """`--out` on a local disk, checked: a new or empty directory in a place this process can
    write. A link is followed when it names a directory (the export lands there, the link is
    kept); a link to nothing is refused rather than replaced."""
    shown = out
    if out.is_symlink():
        try:
            target = out.resolve(strict=True)
        except (OSError, RuntimeError):  # a link to nothing, or a loop of links
            raise ConfigError(f"--out {out}: is a link to {os.readlink(out)}, which does not exist; "
                              "give a directory") from None
        shown, out = f"{out} (a link to {target})", target
    storage.check_writable_dir(out, "--out")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"--out {shown}: exists and is not an empty directory; choose a new one")
    return out


def _upload(staging: Path, uploads: storage.WriteLog, files: dict[str, bytes]) -> None:
    """The staged weights and `files` to the prefix `uploads.root`, one file at a time (each
    recorded, so a failure deletes exactly these), config.json last and only while no other
    writer has put files there."""
    for name, data in files.items():
        if name != "config.json":
            (staging / name).write_bytes(data)
    with storage.errors(uploads.root, "--out", RaylmError):
        for path in sorted(staging.iterdir()):
            uploads.copy_file(path, storage.child(uploads.root, path.name))
        uploads.check_alone()
        uploads.write_bytes(storage.child(uploads.root, "config.json"), files["config.json"])


def _check_saved_shapes(checkpoint: Path, entries: list[WeightEntry]) -> None:
    """One line when the checkpoint's tensors are not the shapes its config.yaml describes."""
    from raylm.train import checkpoint as ckpt

    saved = ckpt._read_metadata(checkpoint).state_dict_metadata
    for entry in entries:
        meta = saved.get(f"model.{entry.raylm}")
        if meta is None or not hasattr(meta, "size"):
            raise CheckpointError(f"{checkpoint}: no tensor model.{entry.raylm} in the checkpoint")
        if tuple(meta.size) != entry.shape:
            raise CheckpointError(f"{checkpoint}: model.{entry.raylm} has shape {tuple(meta.size)} but its "
                                  f"config.yaml gives {entry.shape}")


def _write_weights(checkpoint: Path, entries: list[WeightEntry], out: Path, dtype: torch.dtype,
                   max_shard_bytes: int) -> None:
    """The safetensors files (and index when there are several), one shard in memory at a time."""
    from safetensors.torch import save_file
    from tqdm import tqdm

    itemsize = torch.empty((), dtype=dtype).element_size()
    shards = plan_shards(entries, itemsize, max_shard_bytes)
    names = ([SINGLE_FILE] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    total_bytes = sum(_numel(e.shape) for e in entries) * itemsize
    weight_map: dict[str, str] = {}
    with tqdm(total=total_bytes, unit="B", unit_scale=True, desc="export", disable=not sys.stderr.isatty()) as bar:
        for shard, name in zip(shards, names):
            source = _read_tensors(checkpoint, [e.raylm for e in shard])
            tensors: dict[str, torch.Tensor] = {}
            for entry in shard:
                weight = source.pop(entry.raylm)  # dropped as soon as converted
                if entry.rope_heads is not None:
                    weight = rope_to_hf(weight, entry.rope_heads)
                if entry.scale != 1.0:
                    weight = weight * entry.scale  # in the checkpoint's fp32, before any cast
                tensors[entry.hf] = weight.to(dtype).contiguous()
                weight_map[entry.hf] = name
                bar.update(tensors[entry.hf].numel() * itemsize)
            save_file(tensors, str(out / name), metadata={"format": "pt"})
            del tensors
    if len(shards) > 1:
        index = {"metadata": {"total_size": total_bytes}, "weight_map": weight_map}
        (out / INDEX_FILE).write_bytes(_json_bytes(index))


def _read_tensors(checkpoint: Path, names: list[str]) -> dict[str, torch.Tensor]:
    """Full tensors `model.<name>` of a DCP checkpoint (any world size saved it), only these read."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import CheckpointException

    from raylm.train import checkpoint as ckpt

    saved = ckpt._read_metadata(checkpoint).state_dict_metadata
    tensors = {name: torch.empty(tuple(saved[f"model.{name}"].size), dtype=saved[f"model.{name}"].properties.dtype)
               for name in names}
    try:
        with ckpt.single_process_dcp():
            dcp.load({"model": tensors}, storage_reader=ckpt.SafeFileSystemReader(str(checkpoint)),
                     planner=ckpt.SafeLoadPlanner())
    except CheckpointException as e:
        for failure, _traceback in e.failures.values():
            if isinstance(failure, CheckpointError):
                raise CheckpointError(str(failure)) from None
        raise
    return tensors


# ---------------------------------------------------------------------------------------
# Import


def hf_dir_of(init_from: str) -> Path:
    """DIR of `model.init_from: hf:DIR`."""
    if not init_from.startswith(HF_PREFIX) or len(init_from) == len(HF_PREFIX):
        raise ConfigError(f"model.init_from={init_from!r}: must be hf:DIR (a Hugging Face Llama directory)")
    return Path(init_from[len(HF_PREFIX):]).expanduser()


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


def hf_tokenizer_path(hf_dir: str | Path) -> Path:
    """The sentencepiece model of an HF directory, for a run that continues its training."""
    path = Path(hf_dir) / "tokenizer.model"
    if not path.is_file():
        raise ConfigError(f"model.init_from=hf:{hf_dir}: no sentencepiece tokenizer.model there; "
                          "set tokenizer.path to the model's sentencepiece tokenizer")
    return path


def load_hf_weights(model: torch.nn.Module, cfg: ModelConfig) -> None:
    """Fill `model` (plain, or FSDP2-sharded over the default process group) with the weights
    of `cfg.init_from`. A collective when distributed: rank 0 alone reads the files and the
    others receive their shards, so a node never holds one full copy per rank; a mismatch is
    raised on every rank with rank 0's message."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    from raylm.train.parallel import distributed_world

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
