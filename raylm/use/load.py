"""`load_model(run dir or checkpoint) -> (model, tokenizer, config)`: the one way generate, eval and export get a model.

`resolve_checkpoint` is the one way they pick a checkpoint: a run directory gives its newest
checkpoint that passes its checksums (`checkpoint.newest_good`, as a resumed training picks
it), with a warning line on stderr for each newer one skipped; a checkpoint directory named
by the user is verified and, when damaged, refused in one line naming the file.

Any world size may have saved the checkpoint; it loads into one plain (unsharded) model. A
checkpoint carries its own config.yaml and tokenizer.model; older ones fall back to the files
of the run directory that holds them.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable
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


def _warn(line: str) -> None:
    print(f"raylm: {line}", file=sys.stderr)


def resolve_checkpoint(path: str | Path, log: Callable[[str], None] = _warn) -> str | Path:
    """The checkpoint directory `path`, or the newest verified checkpoint of the run directory
    `path`; a CheckpointError naming the path (or the damaged file) when there is none."""
    try:
        run_dir, checkpoint = ckpt.resolve_resume(path)
    except CheckpointError as e:  # said of run.resume_from; here the path is a command's argument
        if e.key != "run.resume_from":
            raise
        raise e.said_of(path=e.value) from None
    if run_dir is None:
        if (reason := ckpt.verify_checkpoint(checkpoint)) is not None:
            raise CheckpointError(f"{reason}; name its run directory to use the newest good checkpoint")
        return checkpoint
    found = ckpt.newest_good(ckpt.list_checkpoints(run_dir), log=log)
    if found is None:
        raise CheckpointError(f"{run_dir}: no checkpoint passes its checksums")
    return found[0]


def file_beside(checkpoint: str | Path, name: str) -> str | Path:
    """The file `name` a checkpoint carries (config.yaml, tokenizer.model), else its run directory's."""
    for candidate in (storage.child(checkpoint, name), storage.child(storage.parent_of(checkpoint), name)):
        if storage.is_file(candidate):
            return candidate
    raise CheckpointError(f"{checkpoint}: no {name} in the checkpoint or its run directory")


def load_run_config(checkpoint: str | Path) -> Config:
    path = file_beside(checkpoint, CONFIG_FILE)
    try:
        return config_from_dict(yaml.safe_load(storage.read_bytes(path).decode()) or {})
    except (yaml.YAMLError, ConfigError) as e:
        raise CheckpointError(f"{path}: not a raylm config ({str(e).splitlines()[0]})") from None


def load_model(path: str | Path, device: torch.device | str = "cpu", *,
               verified: bool = False) -> tuple[torch.nn.Module, Tokenizer, Config]:
    """The model of a run directory (its newest verified checkpoint) or of a checkpoint, in eval
    mode. `verified`: `path` is what `resolve_checkpoint` returned, so its checksums passed."""
    checkpoint = path if verified else resolve_checkpoint(path)
    cfg = load_run_config(checkpoint)
    tokenizer = Tokenizer.load(file_beside(checkpoint, TOKENIZER_FILE))
    plain = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, activation_checkpointing="none",
                                                               compile=False))
    model = build_model(plain, torch.device(device))
    ckpt.load_checkpoint(checkpoint, model, verify=False)  # verified above
    model.eval()
    return model, tokenizer, cfg
