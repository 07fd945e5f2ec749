"""Hugging Face Llama checkpoints: `raylm export --format hf` (the import, `model.init_from: hf:DIR`,
is the core's: `raylm.train.hf_import`, whose tensor names and RoPE permutation this uses).

docs/use.md, "Export", describes the directory, the RoPE permutation, µP folding and the
tokenizer for users. What this module does, and why:
- weights: read from a DCP checkpoint (any world size) one output shard's worth of tensors at a
  time, converted tensor by tensor, each safetensors file written before the next is read, so
  memory holds about two shards, never two copies of the model; nothing is unpickled (DCP
  metadata through `raylm.train.checkpoint`'s allow-listed reader);
- RoPE: wq and wk rows are permuted per head from raylm's adjacent pairs to transformers'
  rotate_half layout (`raylm.train.hf_import` applies the inverse: export then import is exact);
- µP: the logit multiplier and the attention scale's ratio are folded into lm_head and wq, so
  a plain Llama gives the same outputs;
- tokenizer.json is built here from the sentencepiece model, since transformers' own Llama
  tokenizer normalises text in a way raylm's training never did.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from raylm import storage
from raylm.errors import CheckpointError, ConfigError, RaylmError
from raylm.model import ModelConfig
from raylm.tokenizer import Tokenizer
from raylm.train.hf_import import INDEX_FILE, SINGLE_FILE, WeightEntry, rope_to_hf, weight_entries

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULT_MAX_SHARD_BYTES = 5 * 2**30


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
    from raylm.use.load import file_beside, load_run_config, resolve_checkpoint

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
    tokenizer = Tokenizer.load(file_beside(checkpoint, TOKENIZER_FILE))
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

    saved = ckpt.read_dcp_metadata(checkpoint).state_dict_metadata
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

    saved = ckpt.read_dcp_metadata(checkpoint).state_dict_metadata
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
