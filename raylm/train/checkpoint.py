"""Sharded checkpoints: torch.distributed.checkpoint (DCP) of model, optimizer and RNG, plus train state.

Torch core: no Ray. A checkpoint is a directory:

    .metadata, __<rank>_<i>.distcp     DCP: model and optimizer (sharded tensors, resharded on
                                       load to any world size), torch RNG state
    raylm_checkpoint.json              train state (step, tokens, data position) and the list
                                       of DCP files with their sizes, written last

The schedule is a pure function of the step (raylm.optim.lr_at), so the step is all it needs.

Integrity: `raylm_checkpoint.json` is written by rank 0 after every rank's shards are on disk,
atomically (tmp + rename), and lists each DCP file and the bytes it must hold. A directory is
complete only if the marker parses and every file it lists is there and long enough, so a
checkpoint cut short by a crash, a kill or an interrupted upload is never taken as the latest.

Safe loading: DCP in torch 2.13 reads `.metadata` with `pickle.load` and non-tensor entries
(the optimizer's param_groups) with `torch.load(weights_only=False)`, either of which would
run code from a crafted checkpoint. Here `.metadata` is read by an unpickler that admits only
DCP's own metadata classes and torch dtypes/sizes, non-tensor entries go through
`torch.load(weights_only=True)` (plain numbers, strings, lists, tuples, dicts), tensors are
already read with weights_only=True by DCP, and the train state is JSON.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

# Loading a sharded checkpoint into one process (the driver, a 1-worker resume) is intended.
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import CheckpointException, FileSystemReader
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_state_dict,
    set_state_dict,
)

from raylm.errors import CheckpointError

MARKER = "raylm_checkpoint.json"
FORMAT = "raylm-dcp-1"
_DIR_RE = re.compile(r"^checkpoint_(\d+)$")


def checkpoint_dir_name(step: int) -> str:
    return f"checkpoint_{step:08d}"


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _rng_state() -> dict[str, torch.Tensor]:
    state = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["torch_cuda"] = torch.cuda.get_rng_state()
    return state


# ---------------------------------------------------------------------------------------
# Save


def save_checkpoint(path: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    train_state: dict[str, Any]) -> Path:
    """Write this rank's shards to `path` (a collective: every rank calls it) and, on rank 0,
    the marker that makes the checkpoint complete. `train_state` is TrainState.state_dict().

    Ranks may write to different local directories (Ray Train merges them on upload);
    rank 0's directory gets `.metadata` and the marker.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    rank, world = _rank_world()
    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd, "rng": _rng_state()}, checkpoint_id=str(path))
    if rank == 0:
        marker = {
            "format": FORMAT,
            "world_size": world,
            "train_state": _plain(train_state),
            "files": _dcp_file_sizes(path),
        }
        tmp = path / (MARKER + ".tmp")
        tmp.write_text(json.dumps(marker))
        os.replace(tmp, path / MARKER)
    return path


def _plain(value: Any) -> Any:
    """JSON-ready copy of ints, floats, strings and (nested) lists/dicts; nothing else passes."""
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, (list, tuple, np.ndarray)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    raise TypeError(f"train state value {value!r} is not a plain number, string or list")


def _dcp_file_sizes(path: Path) -> dict[str, int]:
    """Each file DCP's metadata refers to and the bytes it must hold at least."""
    metadata = _read_metadata(path)
    sizes: dict[str, int] = {".metadata": (path / ".metadata").stat().st_size}
    for info in metadata.storage_data.values():
        name = str(info.relative_path)
        sizes[name] = max(sizes.get(name, 0), int(info.offset) + int(info.length))
    return sizes


# ---------------------------------------------------------------------------------------
# Safe reading


class _MetadataUnpickler(pickle.Unpickler):
    _ALLOWED = {
        ("torch.distributed.checkpoint.metadata", name)
        for name in ("Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
                     "BytesStorageMetadata", "ChunkStorageMetadata", "_MEM_FORMAT_ENCODING")
    } | {
        ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
        ("torch.serialization", "_get_layout"),
        ("torch", "Size"),
        ("collections", "OrderedDict"),
        ("pathlib", "PosixPath"),
        ("pathlib", "PurePosixPath"),
        ("pathlib", "WindowsPath"),
        ("pathlib", "PureWindowsPath"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), (torch.dtype, torch.layout, torch.memory_format)):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"checkpoint metadata refers to {module}.{name}, which is not allowed")


def _read_metadata(path: Path):
    try:
        with open(path / ".metadata", "rb") as f:
            return _MetadataUnpickler(f).load()
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no DCP .metadata file; not a checkpoint") from None
    except (pickle.UnpicklingError, EOFError, AttributeError, ValueError) as e:
        raise CheckpointError(f"{path}/.metadata: refused or unreadable ({e})") from None


class SafeFileSystemReader(FileSystemReader):
    """DCP's reader with `.metadata` read by the allow-listed unpickler."""

    def read_metadata(self, *args: Any, **kwargs: Any):
        if kwargs.get("rank") is not None:
            raise CheckpointError(f"{self.path}: per-rank metadata files are not supported")
        metadata = _read_metadata(Path(self.path))
        from torch.distributed.checkpoint.metadata import StorageMeta

        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's planner with non-tensor entries read by `torch.load(weights_only=True)`."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        try:
            obj = torch.load(value, weights_only=True)
        except pickle.UnpicklingError as e:
            raise CheckpointError(f"checkpoint entry {read_item.dest_index.fqn}: refused ({str(e).splitlines()[0]})") from None
        fqn = read_item.dest_index.fqn
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[fqn], obj)
        else:
            self.state_dict[fqn] = obj


def read_marker(path: str | Path) -> dict[str, Any] | None:
    """The parsed marker of a complete checkpoint, or None when `path` is not complete."""
    path = Path(path)
    try:
        marker = json.loads((path / MARKER).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(marker, dict) or marker.get("format") != FORMAT or not isinstance(marker.get("files"), dict):
        return None
    for name, size in marker["files"].items():
        file = path / name
        if "/" in name or name in ("", ".", "..") or not file.is_file() or file.stat().st_size < int(size):
            return None
    return marker


def is_complete(path: str | Path) -> bool:
    return read_marker(path) is not None


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Checkpoint directories of a run, oldest first (complete or not)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in run_dir.iterdir() if p.is_dir() and (m := _DIR_RE.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of a run; incomplete ones are skipped."""
    for path in reversed(list_checkpoints(run_dir)):
        if is_complete(path):
            return path
    return None


def prune_checkpoints(run_dir: str | Path, keep: int) -> None:
    """Delete all but the newest `keep` complete checkpoints (and incomplete ones older than them)."""
    checkpoints = list_checkpoints(run_dir)
    complete = [p for p in checkpoints if is_complete(p)]
    if len(complete) <= keep:
        return
    oldest_kept = complete[-keep] if keep else None
    for path in checkpoints:
        if oldest_kept is not None and path.name >= oldest_kept.name:
            break
        shutil.rmtree(path, ignore_errors=True)


# ---------------------------------------------------------------------------------------
# Load


def load_checkpoint(path: str | Path, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer | None = None) -> dict[str, Any]:
    """Load `path` into this rank's model (and optimizer) shards; return the train state dict.

    A collective when distributed. Works for any world size, whatever world size saved it.
    """
    path = Path(path)
    marker = read_marker(path)
    if marker is None:
        raise CheckpointError(f"{path}: not a complete raylm checkpoint (no valid {MARKER} or a file is missing)")
    if optimizer is not None:
        model_sd, optim_sd = get_state_dict(model, optimizer)
    else:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        model_sd, optim_sd = get_model_state_dict(model), None
    saved = _read_metadata(path).state_dict_metadata
    # RNG streams this process has and the checkpoint holds (a GPU checkpoint loads on CPU).
    rng = {k: v for k, v in _rng_state().items() if f"rng.{k}" in saved}
    state: dict[str, Any] = {"model": model_sd, "rng": rng}
    if optim_sd is not None:
        state["optim"] = optim_sd
    try:
        dcp.load(state, storage_reader=SafeFileSystemReader(str(path)), planner=SafeLoadPlanner())
    except CheckpointException as e:  # DCP wraps each rank's error; ours are one-line user errors
        for failure, _traceback in e.failures.values():
            if isinstance(failure, CheckpointError):
                raise CheckpointError(str(failure)) from None
        raise
    if optimizer is not None:
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    else:
        from torch.distributed.checkpoint.state_dict import set_model_state_dict

        set_model_state_dict(model, state["model"], options=StateDictOptions(strict=True))
    if "torch_cpu" in state["rng"]:
        torch.set_rng_state(state["rng"]["torch_cpu"])
    if "torch_cuda" in state["rng"]:
        torch.cuda.set_rng_state(state["rng"]["torch_cuda"])
    return marker["train_state"]


def resolve_resume(path: str | Path) -> tuple[Path | None, Path]:
    """For `run.resume_from`: (run dir when `path` is a run directory, else None; checkpoint).

    A run directory resolves to its newest complete checkpoint; a checkpoint directory to
    itself. Raises CheckpointError with one line when there is nothing to resume from.
    """
    path = Path(path).expanduser().resolve()
    if not path.exists():
        raise CheckpointError(f"run.resume_from={path}: no such run directory or checkpoint")
    if (path / MARKER).exists() or (path / ".metadata").exists():
        if not is_complete(path):
            raise CheckpointError(f"run.resume_from={path}: the checkpoint is incomplete (cut short); "
                                  "pass its run directory to resume from the newest complete one")
        return None, path
    latest = latest_checkpoint(path)
    if latest is None:
        raise CheckpointError(f"run.resume_from={path}: no complete checkpoint in this directory")
    return path, latest
