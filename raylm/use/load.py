"""`load_model(run dir or checkpoint) -> (model, tokenizer, config)`: the one way generate, eval and export get a model.

Any world size may have saved the checkpoint; it loads into one plain (unsharded) model. A
checkpoint carries its own config.yaml and tokenizer.model; older ones fall back to the files
of the run directory that holds them.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
import yaml

from raylm import storage
from raylm.config import Config, config_from_dict
from raylm.errors import CheckpointError, ConfigError
from raylm.tokenizer import Tokenizer
from raylm.train import checkpoint as ckpt
from raylm.train.parallel import build_model
from raylm.train.runs import CONFIG_FILE, TOKENIZER_FILE


def resolve_checkpoint(path: str | Path) -> str | Path:
    """A checkpoint directory as given, or the newest complete one of a run directory; a
    CheckpointError naming the path when there is none."""
    try:
        return ckpt.resolve_resume(path)[1]
    except CheckpointError as e:  # said for run.resume_from; here the path is a command's argument
        raise CheckpointError(str(e).removeprefix("run.resume_from=")) from None


def _beside(checkpoint: str | Path, name: str) -> str | Path:
    for candidate in (storage.child(checkpoint, name), storage.child(storage.parent_of(checkpoint), name)):
        if storage.is_file(candidate):
            return candidate
    raise CheckpointError(f"{checkpoint}: no {name} in the checkpoint or its run directory")


def load_run_config(checkpoint: str | Path) -> Config:
    path = _beside(checkpoint, CONFIG_FILE)
    try:
        return config_from_dict(yaml.safe_load(storage.read_bytes(path).decode()) or {})
    except (yaml.YAMLError, ConfigError) as e:
        raise CheckpointError(f"{path}: not a raylm config ({str(e).splitlines()[0]})") from None


def load_model(path: str | Path, device: torch.device | str = "cpu") -> tuple[torch.nn.Module, Tokenizer, Config]:
    """The model of a run directory (its newest complete checkpoint) or of a checkpoint, in eval mode."""
    checkpoint = resolve_checkpoint(path)
    cfg = load_run_config(checkpoint)
    tokenizer = Tokenizer.load(_beside(checkpoint, TOKENIZER_FILE))
    plain = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, activation_checkpointing="none",
                                                               compile=False))
    model, _ = build_model(plain, torch.device(device))
    ckpt.load_checkpoint(checkpoint, model)
    model.eval()
    return model, tokenizer, cfg
