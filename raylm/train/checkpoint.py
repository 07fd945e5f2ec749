"""Sharded checkpoints: torch.distributed.checkpoint (DCP) of model, optimizer and RNG, plus train state.

Torch core: no Ray. A checkpoint is a directory:

    .metadata, __<rank>_<i>.distcp     DCP: model and optimizer (sharded tensors, resharded on
                                       load to any world size), torch RNG state
    tokenizer.model, config.yaml, ...  optional small files the caller hands in (`extra_files`)
    raylm_checkpoint.json              the marker, written last:

    {"format": "raylm-dcp-2", "save_id": "<uuid4 hex>", "world_size": 2,
     "train_state": {"step": 200, ...}, "facts": {"seq_len": 256, ...},
     "files": {".metadata": {"bytes": 9021, "blake2b": "<hex>"},
               "__0_0.distcp": {"bytes": 1048576, "blake2b": "<hex>",
                                "items": [[0, 4711, "<hex>"], ...]}, ...}}

A checkpoint's path is a local directory or an object-storage URI (s3://, gs://; raylm.storage):
functions return Paths for the one and URI strings for the other. On object storage DCP's files
go through pyarrow (`_ArrowFileSystem`): each rank uploads its shards, rank 0 the marker last
(one upload, so it appears whole or not at all); the cheap check is one listing; a load reads
every tensor by a ranged read, so a rank fetches only its own shards' bytes.

The schedule is a pure function of the step (raylm.optim.lr_at), so the step is all it needs.
`facts` is opaque here: the trainer stores what must match on resume (tokenizer hash, seq_len,
data fingerprint) and compares it.

Integrity: every file of the checkpoint is listed in the marker with its size and BLAKE2b
checksum (`b2sum` computes the same). Each rank hashes the files it writes as it writes them
(a DCP writer whose streams hash what passes through; they refuse to seek, so the hash is that
of the file) and rank 0 gathers the lists: ranks may write to different local directories
(Ray Train merges them on upload), so no rank ever reads another's files. Rank 0 writes the
marker last, atomically (tmp + rename), once every rank's shards are on disk.

Item checksums: each DCP file's entry also lists its items, `"items": [[offset, length,
blake2b-128], ...]`, hashed as DCP writes each one (`_ItemHashWriter`). An item (a tensor shard,
a pickled entry) is what a load reads in one piece, so a rank verifies exactly the bytes it
reads, as it reads them, and a restart reads each checkpoint byte once.

Checks, cheap and full:
- `read_marker` / `is_complete`: the marker parses and every file it lists is there with its
  size (and no `DAMAGED_NOTE` of this save says a restore found it damaged). A checkpoint cut
  short by a crash, a kill or an interrupted upload fails it, so `latest_checkpoint` (the
  driver's choice) and `newest_complete` (the training stream's, on Ray Train's controller)
  never pick one. Neither reads more than markers and listings.
- `load_checkpoint` checks `.metadata` and every item against their checksums as each rank
  reads them; the ranks' verdicts are gathered (DCP raises every rank's error on every rank),
  so a shard damaged where only one rank reads it fails the load on all. `restore_newest`,
  the restore path, tries candidates newest first and falls back together. Markers written
  before item checksums are verified whole first (`verify_checkpoint`).
- `verify_checkpoint`: every whole-file checksum matches (`b2sum` computes the same). Under a
  process group the ranks share the hashing and agree on the answer; `newest_good` picks with
  it (`raylm generate`/`eval`/`export`).

Save id: rank 0 draws a fresh id per save, removes any earlier save's marker from the directory
and only then lets any rank write (the id's broadcast is the barrier). A directory reused after
a failed save or upload is therefore never vouched for by a stale marker, and a shard mixed in
from another save fails its checksum. DCP's `.metadata` records the same id.

Keep-K and abandoned futures: `prune_checkpoints` counts by the cheap check, so it is told what
it may never delete (the checkpoint just written, the newest verified one). A run that restores
step S moves its checkpoints above S aside first (`set_aside_after`, into `RUN/abandoned/`):
they are damaged, cut short or newer than one that is, and would otherwise take keep-K slots
from the good ones and be overwritten piece by piece.

Ctrl-C: DCP wraps a KeyboardInterrupt raised during a save or load in its CheckpointException;
it is raised again as KeyboardInterrupt, so a Ctrl-C mid-save stops a run like one between saves.

No checkpoint holds non-finite weights: the ranks agree (one all-reduce) before anything is
written, and all refuse together.

Safe loading: DCP in torch 2.13 reads `.metadata` with `pickle.load` and non-tensor entries
(the optimizer's param_groups) with `torch.load(weights_only=False)`, either of which would
run code from a crafted checkpoint. Here `.metadata` is read by an unpickler that admits only
DCP's own metadata classes and torch dtypes/sizes, non-tensor entries go through
`torch.load(weights_only=True)` (plain numbers, strings, lists, tuples, dicts), tensors are
already read with weights_only=True by DCP, and the marker is JSON. Checksums guard against
damage, not against an attacker, who can rewrite the marker too: safety comes from these rules.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import io
import json
import os
import pickle
import posixpath
import re
import uuid
import warnings
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.fs as pafs
import torch
import torch.distributed as dist

import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import CheckpointException, FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.state_dict_saver import AsyncCheckpointerType
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.filesystem import FileSystem, FileSystemBase, _StorageWriterTransforms
from torch.distributed.checkpoint.metadata import StorageMeta
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_state_dict,
    set_state_dict,
)

from raylm import storage
from raylm.errors import CheckpointError
from raylm.train.parallel import distributed_world

MARKER = "raylm_checkpoint.json"
FORMAT = "raylm-dcp-2"
_HASH_CHUNK_BYTES = 1 << 20
_ITEM_DIGEST_BYTES = 16
DAMAGED_NOTE = "raylm_damaged.json"
"""Written into a checkpoint by the restore that found it damaged while loading: the cheap check
then refuses it, so a chooser that reads only markers (the training stream's controller) skips it."""
_DIR_RE = re.compile(r"^checkpoint_(\d+)$")
_DCP_FILE_RE = re.compile(r"^__\d+_\d+\.distcp$")


def checkpoint_dir_name(step: int) -> str:
    return f"checkpoint_{step:08d}"


def _all_gather(value: Any) -> list[Any]:
    """`value` from every rank, in rank order; [value] without a process group."""
    _, world = distributed_world()
    if world == 1:
        return [value]
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, value)
    return gathered


def _rng_state() -> dict[str, torch.Tensor]:
    state = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["torch_cuda"] = torch.cuda.get_rng_state()
    return state


def _new_digest():
    return hashlib.blake2b()


def _file_entry(size_bytes: int, digest) -> dict[str, Any]:
    return {"bytes": size_bytes, "blake2b": digest.hexdigest()}


# ---------------------------------------------------------------------------------------
# Save


def save_checkpoint(path: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    train_state: dict[str, Any], *, facts: dict[str, Any] | None = None,
                    extra_files: dict[str, bytes] | None = None) -> str | Path:
    """Write this rank's shards to `path` (a collective: every rank calls it) and, on rank 0,
    `extra_files` and the marker that makes the checkpoint complete.

    `train_state` is TrainState.state_dict(); `facts` is a plain-JSON dict stored in the marker
    for the caller to compare on resume; `extra_files` maps plain file names to their bytes
    (only rank 0's are written). Ranks may write to different local directories (Ray Train
    merges them on upload); rank 0's directory gets `.metadata`, the extra files and the marker.
    An earlier save's marker in `path` is removed before any rank writes. Returns on every rank
    once the marker is written. Raises CheckpointError on every rank, having written nothing,
    if a weight is non-finite. `begin_save(..., background=True)` + `finish_save` is the same
    save with the writing done while training goes on.
    """
    return finish_save(begin_save(path, model, optimizer, train_state, facts=facts, extra_files=extra_files))


class Save:
    """A save begun by `begin_save`: this rank's DCP files are being written (by `future`, already
    done for a blocking save). Nothing vouches for them until `finish_save` writes the marker."""

    def __init__(self, path: str | Path, save_id: str, marker: dict[str, Any], extra_files: dict[str, bytes],
                 writer: "_HashingWriter", future: Future):
        self.path, self.save_id, self.marker, self.extra_files = path, save_id, marker, extra_files
        self.writer, self.future = writer, future

    def written_here(self) -> bool:
        """Whether this rank's part of the DCP save has ended (written, or failed)."""
        return self.future.done()


def begin_save(path: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
               train_state: dict[str, Any], *, facts: dict[str, Any] | None = None,
               extra_files: dict[str, bytes] | None = None, background: bool = False) -> Save:
    """Start a save (a collective); `finish_save` ends it. Without `background` the DCP files are
    written before this returns. With it, the state is staged (copied to host memory: model,
    optimizer and RNG shards, the copy `raylm plan` counts) and DCP's `async_save` writes the
    copy from a thread, so the caller may change the model at once. The thread's collectives
    run on a gloo group of their own (`_async_group`), never interleaved with training's.
    The caller keeps at most one save in flight: it finishes one before it begins the next."""
    path = storage.location(path)
    rank, world = distributed_world()
    # Converted first so that a value JSON cannot hold fails on every rank before any write.
    train_state, facts = _plain(train_state), _plain(facts or {})
    extra_files = dict(extra_files or {})
    for name in extra_files:
        _check_extra_name(name)
    _refuse_non_finite(path, model)
    storage.make_dirs(path)
    save_id = _begin_save(path, rank)
    marker = {"format": FORMAT, "save_id": save_id, "world_size": world, "train_state": train_state, "facts": facts}
    writer = _HashingWriter(path, save_id)
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd, "rng": _rng_state()}
    if background:
        future = _async_save(state, writer)
    else:
        future = Future()
        try:
            with single_process_dcp():
                dcp.save(state, storage_writer=writer)
        except BaseException as e:
            future.set_exception(e)
        else:
            future.set_result(None)
    return Save(path, save_id, marker, extra_files if rank == 0 else {}, writer, future)


@contextlib.contextmanager
def single_process_dcp():
    """Around a DCP save or load: in one process (the driver, a 1-worker resume, `raylm export`)
    that is intended, so DCP's warning that it assumes so says nothing a user can act on."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def _async_save(state: dict[str, Any], writer: "_HashingWriter") -> Future:
    # The stager is the writer (FileSystemWriter is a BlockingAsyncStager): a fresh host copy
    # per save, which the thread drops when it is written. A CheckpointException raised here
    # (staging failed on some rank) is as in a blocking save.
    if not (dist.is_available() and dist.is_initialized()):
        # In one process DCP warns that it assumes so from its save thread, after this call has
        # returned, where a filter around the call cannot reach: a one-process run that saves in
        # the background ignores that one message from its first background save on.
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
    try:
        return dcp.async_save(state, storage_writer=writer, process_group=_async_group(),
                              async_checkpointer_type=AsyncCheckpointerType.THREAD)
    except CheckpointException as e:
        _raise_interrupt(e)
        raise


_ASYNC_GROUPS: dict[Any, Any] = {}


def _async_group():
    """A gloo process group of every rank for background saves (None without a process group).

    A save thread's collectives on the group training uses would interleave with training's in
    an order that differs between ranks; a group of its own keeps each stream in order. Made
    once per default group, at the first background save, which every rank begins at the same
    step (new_group is a collective). Gloo also holds the CPU tensors DCP plans with under nccl."""
    if distributed_world()[1] == 1:
        return None
    default = dist.distributed_c10d._get_default_group()
    if default not in _ASYNC_GROUPS:
        _ASYNC_GROUPS[default] = dist.new_group(backend="gloo")
    return _ASYNC_GROUPS[default]


def all_written(save: Save) -> bool:
    """Whether every rank's DCP files of `save` are written (or its save failed): a collective,
    so that all ranks decide at the same step to `finish_save`."""
    done = torch.tensor([1 if save.written_here() else 0], dtype=torch.int32)
    if distributed_world()[1] > 1:
        if dist.get_backend() == "nccl":
            done = done.to(torch.device("cuda", torch.cuda.current_device()))
        dist.all_reduce(done, op=dist.ReduceOp.MIN)
    return bool(done.item())


def finish_save(save: Save) -> str | Path:
    """End `save` (a collective): wait until this rank's files are written and durable (fsynced
    locally, uploads complete on object storage), then rank 0 writes the extra files, gathers
    every rank's file list with its checksums and writes the marker last. Returns on every rank
    once the marker is written. A failed save raises on every rank (DCP's own collectives carry
    one rank's failure to all) and leaves no marker, so the previous checkpoint stays the newest."""
    rank, world = distributed_world()
    try:
        save.future.result()
    except CheckpointException as e:
        _raise_interrupt(e)
        _raise_storage_error(save.path, e)
        raise
    files = dict(save.writer.fs.written)
    files.update({name: _write_atomic(storage.child(save.path, name), data) for name, data in save.extra_files.items()})
    files = _merge_file_lists(_all_gather(files))
    if rank == 0:
        marker = {**save.marker, "files": files}
        _write_atomic(storage.child(save.path, MARKER), json.dumps(marker, indent=1).encode())
    if world > 1:
        dist.barrier()  # so that on every rank, a returned save is a complete checkpoint
    return save.path


def abandon_save(save: Save) -> None:
    """Wait for this rank's part of `save` to end, ignoring how (the run is failing anyway): its
    files are then no longer being written when the run directory is handed on. No marker is
    written, so nothing takes the directory for a checkpoint."""
    with contextlib.suppress(Exception, CheckpointException):  # CheckpointException is a BaseException
        save.future.result()


def _raise_storage_error(path: str | Path, e: CheckpointException) -> None:
    """A save that failed writing (a full disk, a refused upload) is one line naming the checkpoint
    and the error, as CheckpointError; the previous checkpoint is untouched."""
    for rank, (failure, _traceback) in sorted(e.failures.items()):
        if isinstance(failure, OSError):
            reason = str(failure).splitlines()[0] if str(failure) else repr(failure)
            raise CheckpointError(f"{path}: saving the checkpoint failed on rank {rank} ({reason}); "
                                  "the newest complete checkpoint before it is kept") from None


def _plain(value: Any) -> Any:
    """JSON-ready copy of ints, floats, strings and (nested) lists/dicts; nothing else passes."""
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    if isinstance(value, (list, tuple, np.ndarray)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    raise TypeError(f"checkpoint value {value!r} is not a plain number, string or list")


def _check_extra_name(name: str) -> None:
    """Extra files are plain names that cannot be taken for DCP's files or the marker."""
    if (not name or "/" in name or "\\" in name or name in (".", "..", MARKER, ".metadata", DAMAGED_NOTE)
            or name.startswith(MARKER) or _DCP_FILE_RE.match(name)):
        raise ValueError(f"extra checkpoint file name {name!r} is not allowed (a plain file name, "
                         f"not {MARKER}, .metadata or __<rank>_<i>.distcp)")


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def _refuse_non_finite(path: str | Path, model: torch.nn.Module) -> None:
    """Raise on every rank if any rank's shard holds a NaN or inf, before anything is written."""
    named = [(name, _local(p.detach())) for name, p in model.named_parameters()]
    # One device-side reduction and one sync, not one per parameter.
    finite = torch.stack([torch.isfinite(t).all() for _, t in named]).all() if named else torch.tensor(True)
    flag = (~finite).to(torch.int32).reshape(1)
    _, world = distributed_world()
    if world > 1:
        nccl = dist.get_backend() == "nccl"
        flag = flag.to(torch.device("cuda", torch.cuda.current_device()) if nccl else "cpu")
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    if not flag.item():
        return
    # Rare path, taken by every rank together: learn which parameter, so all ranks say the same.
    local_bad = next((name for name, t in named if not torch.isfinite(t).all()), None)
    bad = next(name for name in _all_gather(local_bad) if name is not None)
    raise CheckpointError(f"refusing to save {path}: the model holds non-finite weights (parameter {bad})")


def _begin_save(path: str | Path, rank: int) -> str:
    """This save's id. Rank 0 first removes an earlier save's marker, so that a directory being
    rewritten is never taken for complete; the other ranks receive the id only after that, so the
    broadcast is the barrier that keeps every shard write behind the removal."""
    box = [uuid.uuid4().hex if rank == 0 else None]
    if rank == 0:
        for stale in (MARKER, MARKER + ".tmp", ".metadata"):  # .metadata: DCP would warn about it
            storage.delete_file(storage.child(path, stale))
    if distributed_world()[1] > 1:
        dist.broadcast_object_list(box, src=0)
    return box[0]


def _raise_interrupt(e: CheckpointException) -> None:
    """DCP catches every BaseException of a save or load step, Ctrl-C's KeyboardInterrupt included,
    and raises a CheckpointException holding each rank's; a Ctrl-C is raised again as itself, so
    that a save or load cut by Ctrl-C stops the run like a Ctrl-C anywhere else. The directory
    it was writing has no marker, so nothing takes it for a checkpoint. The Ctrl-C may also be
    the context of the failure DCP holds: torch.save's zip writer, cut mid-file, raises its own
    RuntimeError on the way out ("unexpected pos"), with the KeyboardInterrupt behind it."""
    if any(_is_interrupt(failure) for failure, _traceback in e.failures.values()):
        raise KeyboardInterrupt from None


def _is_interrupt(failure: BaseException | None) -> bool:
    """Whether `failure` is a KeyboardInterrupt or was raised while one was handled."""
    seen: set[int] = set()
    while failure is not None and id(failure) not in seen:
        if isinstance(failure, KeyboardInterrupt):
            return True
        seen.add(id(failure))
        failure = failure.__cause__ or failure.__context__
    return False


def _write_atomic(file: str | Path, data: bytes) -> dict[str, Any]:
    storage.write_bytes(file, data)  # whole or absent: a synced rename locally, one upload on object storage
    digest = _new_digest()
    digest.update(data)
    return _file_entry(len(data), digest)


def _merge_file_lists(per_rank: list[dict[str, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    files: dict[str, dict[str, Any]] = {}
    for rank_files in per_rank:
        if clash := files.keys() & rank_files.keys():
            raise RuntimeError(f"checkpoint files written by two ranks: {sorted(clash)}")
        files.update(rank_files)
    return dict(sorted(files.items()))


class _HashingStream(io.IOBase):
    """A file opened for writing that hashes every byte written through it. It refuses to seek,
    so what it hashed is exactly the file's content."""

    def __init__(self, raw: io.BufferedWriter):
        self._raw = raw
        self.digest = _new_digest()
        self.size_bytes = 0
        self.items: list[list] = []  # [offset, length, blake2b] of each DCP item (_ItemHashWriter)

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def write(self, data) -> int:
        view = memoryview(data)
        self.digest.update(view)
        self.size_bytes += view.nbytes
        return self._raw.write(view)

    def tell(self) -> int:  # DCP records each item's offset
        return self._raw.tell()

    def flush(self) -> None:
        self._raw.flush()

    def fileno(self) -> int:
        # DCP fsyncs this descriptor: flush first so that the sync covers every byte written.
        self._raw.flush()
        return self._raw.fileno()

    def close(self) -> None:
        if not self.closed:
            super().close()  # flushes
            self._raw.close()


class _LocalFileSystem(FileSystem):
    """DCP's local file system, which can also tell a file's size."""

    def size(self, path: str | os.PathLike) -> int:
        return Path(path).stat().st_size


class _ArrowFileSystem(FileSystemBase):
    """DCP's file system interface over a pyarrow filesystem (object storage); paths are that
    filesystem's own (`bucket/key`). Reads open random-access files, so each rank fetches only
    the byte ranges of its shards (`SafeFileSystemReader._slice_file`); a rename is a copy."""

    def __init__(self, fs: pafs.FileSystem):
        self.fs = fs

    @contextmanager
    def create_stream(self, path: str | os.PathLike, mode: str):
        opened = self.fs.open_output_stream(str(path)) if mode.startswith("w") else self.fs.open_input_file(str(path))
        with opened as stream:
            yield stream

    def concat_path(self, path: str | os.PathLike, suffix: str) -> str:
        return f"{str(path).rstrip('/')}/{suffix}"

    def rename(self, path: str | os.PathLike, new_path: str | os.PathLike) -> None:
        self.fs.move(str(path), str(new_path))

    def init_path(self, path: str | os.PathLike) -> str:
        return str(path)

    def mkdir(self, path: str | os.PathLike) -> None:
        pass  # prefixes exist through their objects

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike) -> bool:
        return True

    def exists(self, path: str | os.PathLike) -> bool:
        return self.fs.get_file_info(str(path)).type != pafs.FileType.NotFound

    def rm_file(self, path: str | os.PathLike) -> None:
        self.fs.delete_file(str(path))

    def size(self, path: str | os.PathLike) -> int:
        return self.fs.get_file_info(str(path)).size


def _dcp_filesystem(path: str | Path) -> tuple[FileSystemBase, str]:
    """(DCP file system, the checkpoint's path on it) for a local directory or a URI."""
    if storage.is_uri(path):
        fs, fs_path = storage.resolve(path)
        return _ArrowFileSystem(fs), fs_path
    return _LocalFileSystem(), str(path)


class _HashingFileSystem(FileSystemBase):
    """A DCP file system (local or object storage) recording {file name: {bytes, blake2b}} of
    each file written through it."""

    def __init__(self, base: _LocalFileSystem | _ArrowFileSystem) -> None:
        super().__init__()
        self.base = base
        self.written: dict[str, dict[str, Any]] = {}

    @contextmanager
    def create_stream(self, path: str | os.PathLike, mode: str):
        if not mode.startswith("w"):  # DCP's writer only creates files; anything else passes
            with self.base.create_stream(path, mode) as stream:
                yield stream
            return
        with self.base.create_stream(path, mode) as raw:
            stream = _HashingStream(raw)
            yield stream
            stream.close()
        if (size := self.base.size(path)) != stream.size_bytes:  # written around the stream: a bug
            raise RuntimeError(f"{path}: {size} bytes stored but {stream.size_bytes} hashed")
        entry = _file_entry(stream.size_bytes, stream.digest)
        if stream.items and _items_tile(stream.items, stream.size_bytes):
            entry["items"] = stream.items
        self.written[posixpath.basename(str(path))] = entry

    def rename(self, path: str | os.PathLike, new_path: str | os.PathLike) -> None:
        self.base.rename(path, new_path)  # DCP writes .metadata.tmp, then renames it
        if (entry := self.written.pop(posixpath.basename(str(path)), None)) is not None:
            self.written[posixpath.basename(str(new_path))] = entry

    def concat_path(self, path: str | os.PathLike, suffix: str) -> str | os.PathLike:
        return self.base.concat_path(path, suffix)

    def init_path(self, path: str | os.PathLike) -> str | os.PathLike:
        return self.base.init_path(path)

    def mkdir(self, path: str | os.PathLike) -> None:
        self.base.mkdir(path)

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike) -> bool:
        return True

    def exists(self, path: str | os.PathLike) -> bool:
        return self.base.exists(path)

    def rm_file(self, path: str | os.PathLike) -> None:
        self.base.rm_file(path)


class _ItemHashWriter(io.IOBase):
    """What DCP writes one item (a tensor shard, a pickled entry) through: hashes the item's bytes
    on their way into the file's `_HashingStream` and records [offset, length, blake2b] there when
    DCP closes it. An item is the unit a load reads (`SafeFileSystemReader._slice_file`), so a
    rank can verify exactly the bytes it reads."""

    def __init__(self, raw: _HashingStream):
        self._raw = raw
        self._offset = raw.tell()  # DCP records the item's offset the same way
        self._digest = hashlib.blake2b(digest_size=_ITEM_DIGEST_BYTES)
        self._length = 0

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        view = memoryview(data)
        self._digest.update(view)
        self._length += view.nbytes
        return self._raw.write(view)

    def close(self) -> None:
        if not self.closed:
            self._raw.items.append([self._offset, self._length, self._digest.hexdigest()])
            self._raw.flush()
            super().close()  # the file stays open for the next item


class _ItemHashingTransforms(_StorageWriterTransforms):
    """DCP's per-item write hook (no transform of the bytes), used to hash each item."""

    def transform_save_stream(self, write_item, raw_stream):
        if not isinstance(raw_stream, _HashingStream):  # not through raylm's file system: a bug
            raise RuntimeError("checkpoint item written around raylm's hashing stream")
        return _ItemHashWriter(raw_stream), []


def _items_tile(items: list[list], size_bytes: int) -> bool:
    """Whether the items cover the file exactly, back to back (DCP writes nothing between them);
    otherwise a load verifies that file whole, as for a marker without item checksums."""
    end = 0
    for offset, length, _digest in sorted(items):
        if offset != end:
            return False
        end = offset + length
    return end == size_bytes


class _HashingWriter(FileSystemWriter):
    """DCP's file writer with hashing streams, recording raylm's save id in `.metadata`."""

    def __init__(self, path: str | Path, save_id: str):
        base, fs_path = _dcp_filesystem(path)
        # Object storage has no file to fsync: an upload is durable once it completes.
        super().__init__(fs_path, overwrite=True, sync_files=isinstance(base, _LocalFileSystem))
        self.fs = _HashingFileSystem(base)
        self.path = self.fs.init_path(fs_path)
        self.raylm_save_id = save_id
        self.transforms = _ItemHashingTransforms()

    def storage_meta(self) -> StorageMeta | None:
        return StorageMeta(checkpoint_id=self.checkpoint_id, save_id=self.raylm_save_id)


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


def read_dcp_metadata(path: str | Path, entry: dict[str, Any] | None = None):
    """DCP's `.metadata`, through the allow-listed unpickler. With `entry` (the marker's), its
    bytes are checked against the checksum first: DamagedCheckpoint when they differ."""
    error = DamagedCheckpoint if entry is not None else CheckpointError  # listed in a marker: damage
    try:
        with storage.errors(path, None, error):
            data = storage.read_bytes(storage.child(path, ".metadata"))
    except FileNotFoundError:
        raise error(f"{path}: no DCP .metadata file; not a checkpoint") from None
    if entry is not None and (len(data) != entry["bytes"] or _new_digest_of(data) != entry["blake2b"]):
        raise DamagedCheckpoint(f"{path}/.metadata: checksum mismatch (damaged or from another save)")
    try:
        return _MetadataUnpickler(io.BytesIO(data)).load()
    except (pickle.UnpicklingError, EOFError, AttributeError, ValueError) as e:
        raise CheckpointError(f"{path}/.metadata: refused or unreadable ({e})") from None


def _new_digest_of(data: bytes) -> str:
    digest = _new_digest()
    digest.update(data)
    return digest.hexdigest()


class DamagedCheckpoint(CheckpointError):
    """A checkpoint that is cut short, unreadable or fails a checksum: a restore falls back to an
    older one. (A checkpoint refused for what it holds, such as a disallowed pickle, is a plain
    CheckpointError: no fallback hides it.)"""


class SafeFileSystemReader(FileSystemReader):
    """DCP's reader with `.metadata` read by the allow-listed unpickler; a local directory or a URI.

    `metadata`: `.metadata` already read (and checked) by the caller, so it is not read again.
    `item_sums`: {file name: {offset: (length, blake2b)}} from the marker; each item this rank
    reads is then hashed as it is read and a mismatch raises DamagedCheckpoint naming the file.
    Every item is read whole by one ranged read (it is what `torch.load` parses), so what is
    verified is exactly what is read."""

    def __init__(self, path: str | Path, metadata=None,
                 item_sums: dict[str, dict[int, tuple[int, str]]] | None = None):
        base, fs_path = _dcp_filesystem(path)
        super().__init__(fs_path)
        self.fs, self.path, self.location = base, base.init_path(fs_path), path
        self._metadata, self._item_sums = metadata, item_sums

    def _slice_file(self, file, sinfo):
        if isinstance(self.fs, _ArrowFileSystem):  # one ranged read per item, not one request per torch.load read
            data = file.read_at(sinfo.length, sinfo.offset)
        else:
            file.seek(sinfo.offset)
            data = file.read(sinfo.length)
        name = posixpath.basename(str(sinfo.relative_path))
        if len(data) != sinfo.length:
            raise DamagedCheckpoint(f"{self.location}/{name}: cut short (item at byte {sinfo.offset})")
        if self._item_sums is not None:
            expected = self._item_sums.get(name, {}).get(sinfo.offset)
            digest = hashlib.blake2b(data, digest_size=_ITEM_DIGEST_BYTES).hexdigest()
            if expected is None or expected != (sinfo.length, digest):
                raise DamagedCheckpoint(f"{self.location}/{name}: checksum mismatch (damaged or from another save)")
        return io.BytesIO(data)

    def read_data(self, plan, planner):
        try:
            return super().read_data(plan, planner)
        except OSError as e:
            name = posixpath.basename(str(getattr(e, "filename", "") or "")) or "a shard"
            raise DamagedCheckpoint(f"{self.location}/{name}: unreadable ({e.strerror or e})") from None

    def read_metadata(self, *args: Any, **kwargs: Any):
        if kwargs.get("rank") is not None:
            raise CheckpointError(f"{self.location}: per-rank metadata files are not supported")
        metadata = self._metadata if self._metadata is not None else read_dcp_metadata(self.location)
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


# ---------------------------------------------------------------------------------------
# Checks


def read_marker(path: str | Path) -> dict[str, Any] | None:
    """The cheap check: the parsed marker when it is valid and every file it lists is there with
    its size, else None. Reads no file contents."""
    return _check_marker(storage.location(path))[0]


def _check_marker(path: str | Path, notes: bool = True) -> tuple[dict[str, Any] | None, str | None]:
    """(marker, None) when the cheap check passes, else (None, a one-line reason). With `notes`,
    a checkpoint that an earlier restore found damaged (`DAMAGED_NOTE`, same save id) fails it."""
    try:
        marker = json.loads(storage.read_bytes(storage.child(path, MARKER)))
    except FileNotFoundError:
        return None, f"{path}: no {MARKER} (not a checkpoint, or one cut short)"
    except (OSError, ValueError) as e:
        return None, f"{path}/{MARKER}: unreadable ({str(e).splitlines()[0] if str(e) else e!r})"
    if not isinstance(marker, dict):
        return None, f"{path}/{MARKER}: not a JSON object"
    if marker.get("format") != FORMAT:
        return None, f"{path}/{MARKER}: format {marker.get('format')!r}, expected {FORMAT!r}"
    if not isinstance(marker.get("files"), dict) or not isinstance(marker.get("train_state"), dict):
        return None, f"{path}/{MARKER}: no 'files' or 'train_state' object"
    try:
        sizes = storage.file_sizes(path)  # one listing (one request on object storage)
    except OSError as e:
        return None, f"{path}: cannot be listed ({str(e).splitlines()[0]})"
    for name, entry in marker["files"].items():
        if reason := _listed_file_problem(path, name, entry, sizes):
            return None, reason
    if notes and DAMAGED_NOTE in sizes and (reason := _damage_noted(path, marker)):
        return None, reason
    return marker, None


def _damage_noted(path: str | Path, marker: dict[str, Any]) -> str | None:
    try:
        note = json.loads(storage.read_bytes(storage.child(path, DAMAGED_NOTE)))
    except (OSError, ValueError):
        return None
    if isinstance(note, dict) and note.get("save_id") == marker.get("save_id"):
        return f"{path}: found damaged by an earlier restore ({note.get('reason')})"
    return None  # a note left from an earlier save into the same directory


def mark_damaged(path: str | Path, reason: str) -> None:
    """Record in checkpoint `path` (one process calls it) that a restore found it damaged, so that
    the cheap check refuses it from now on. Adds one small file; nothing of the checkpoint is
    changed or removed (delete the note to try it again)."""
    marker, problem = _check_marker(storage.location(path), notes=False)
    if problem is None:
        note = {"save_id": marker.get("save_id"), "reason": reason, "time": _utc_stamp()}
        storage.write_bytes(storage.child(path, DAMAGED_NOTE), json.dumps(note).encode())


def _listed_file_problem(path: str | Path, name: str, entry: Any, sizes: dict[str, int]) -> str | None:
    if "/" in name or "\\" in name or name in ("", ".", ".."):
        return f"{path}/{MARKER}: file name {name!r} is not a plain name"
    if (not isinstance(entry, dict) or not isinstance(entry.get("bytes"), int)
            or not isinstance(entry.get("blake2b"), str)):
        return f"{path}/{MARKER}: entry of {name} is not {{\"bytes\": int, \"blake2b\": hex}}"
    file = storage.child(path, name)
    if name not in sizes:
        return f"{file}: missing"
    if (size := sizes[name]) != entry["bytes"]:
        return f"{file}: {size} bytes, the marker says {entry['bytes']} (cut short or from another save)"
    return None


def is_complete(path: str | Path) -> bool:
    return read_marker(path) is not None


def verify_checkpoint(path: str | Path) -> str | None:
    """The full check: None when the cheap check passes and every listed file's checksum matches,
    else a one-line reason naming the file.

    A collective when a process group with more than one rank is initialised (every rank calls
    it): rank r hashes files[r::world] of its own copy, and all ranks return the same answer.
    """
    path = storage.location(path)
    marker, reason = _check_marker(path)
    if reason is None:
        rank, world = distributed_world()
        names = sorted(marker["files"])[rank::world]
        reason = next((r for name in names if (r := _checksum_problem(path, name, marker["files"][name]))), None)
    return next((r for r in _all_gather(reason) if r is not None), None)


def _checksum_problem(path: str | Path, name: str, entry: dict[str, Any]) -> str | None:
    digest = _new_digest()
    try:
        with storage.open_input(storage.child(path, name)) as f:
            while chunk := f.read(_HASH_CHUNK_BYTES):
                digest.update(chunk)
    except OSError as e:
        return f"{path}/{name}: unreadable ({e.strerror or e})"
    if digest.hexdigest() != entry["blake2b"]:
        return f"{path}/{name}: checksum mismatch (damaged or from another save)"
    return None


# ---------------------------------------------------------------------------------------
# Choosing a checkpoint


def list_checkpoints(run_dir: str | Path) -> list[str | Path]:
    """Checkpoint directories of a run, oldest first (complete or not): Paths for a local run
    directory, URIs for one on object storage."""
    run_dir = storage.location(run_dir)
    with storage.errors(run_dir, None, CheckpointError):
        entries = storage.list_dir(run_dir)
    found = [(int(m.group(1)), storage.child(run_dir, name)) for e in entries
             if e.type == pafs.FileType.Directory and (m := _DIR_RE.match(name := posixpath.basename(e.path)))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: str | Path) -> str | Path | None:
    """The newest complete checkpoint of a run by the cheap check (`read_marker`); incomplete ones
    are skipped. For the driver, which must not read every shard: the restore path on the
    workers picks its checkpoint with `newest_good`, which verifies checksums."""
    for path in reversed(list_checkpoints(run_dir)):
        if is_complete(path):
            return path
    return None


def newest_good(candidates: Iterable[str | Path],
                log: Callable[[str], None] = print) -> tuple[str | Path, dict[str, Any]] | None:
    """(path, marker) of the newest candidate that passes `verify_checkpoint`, or None.

    Candidates are checkpoint directories in any order (duplicates and directories without a
    marker are fine); newest means the highest marker train_state step, ties in the given order.
    Each skipped candidate that has a marker is logged. A collective under a process group: the
    ranks try the candidates in rank 0's order and agree on each verdict, so all return the same.
    """
    order = _by_step(candidates) if distributed_world()[0] == 0 else None
    if distributed_world()[1] > 1:
        box = [order]
        dist.broadcast_object_list(box, src=0)
        order = box[0]
    for path in order:
        reason = verify_checkpoint(path)
        if reason is None:
            return path, read_marker(path)
        log(f"warning: checkpoint {path} is not usable ({reason}); trying an older one")
    return None


def _by_step(candidates: Iterable[str | Path]) -> list[str | Path]:
    """The distinct candidates that have a marker, highest step first (stable for ties)."""
    seen: dict[str | Path, str | Path] = {}
    for candidate in candidates:
        path = storage.location(candidate)
        seen.setdefault(path if storage.is_uri(path) else path.resolve(), path)
    stepped = []
    for path in seen.values():
        try:
            marker = json.loads(storage.read_bytes(storage.child(path, MARKER)))
        except (OSError, ValueError):
            continue  # no marker: not a checkpoint, nothing to warn about
        train_state = marker.get("train_state") if isinstance(marker, dict) else None
        step = train_state.get("step") if isinstance(train_state, dict) else None
        # A marker without a usable step still gets tried (and its problem logged), last.
        stepped.append((step if isinstance(step, int) else -1, path))
    return [path for _, path in sorted(stepped, key=lambda item: -item[0])]


def _step_of(path: str | Path) -> int:
    return int(_DIR_RE.match(storage.name_of(path)).group(1))


def _same(a: str | Path, b: str | Path) -> bool:
    if storage.is_uri(a) or storage.is_uri(b):
        return str(storage.location(a)) == str(storage.location(b))
    return Path(a).resolve() == Path(b).resolve()


def prune_checkpoints(run_dir: str | Path, keep: int, protect: Iterable[str | Path] = ()) -> None:
    """Delete all but the newest `keep` complete checkpoints (and incomplete ones older than them),
    never one in `protect`.

    Complete is the cheap check, so a damaged checkpoint of the right size counts as kept: the
    trainer protects the checkpoint it just wrote (verified, since this process wrote it) and
    the newest verified one, and sets aside every checkpoint above the step it restored before
    its first save (`set_aside_after`), so that damaged checkpoints of an abandoned future never
    take the slots of good ones.
    """
    checkpoints = list_checkpoints(run_dir)
    complete = [p for p in checkpoints if is_complete(p)]
    if len(complete) <= keep:
        return
    protect = list(protect)
    oldest_kept = _step_of(complete[-keep]) if keep else None
    for path in checkpoints:
        if oldest_kept is not None and _step_of(path) >= oldest_kept:
            break
        if any(_same(path, kept) for kept in protect):
            continue
        with contextlib.suppress(OSError):
            storage.delete_dir(path)


ABANDONED = "abandoned"


def set_aside_after(run_dir: str | Path, step: int, log: Callable[[str], None] = print,
                    leave: Iterable[str | Path] = ()) -> list[str | Path]:
    """Move every checkpoint of `run_dir` above `step` (the step a run restored, 0 for a fresh
    start) out of the run's checkpoints, into `run_dir/abandoned/<name>.<UTC time>`; return
    where they went. Call it on one rank, after the restore and before the first save.

    Such a checkpoint belongs to a future the run has abandoned: it failed verification, was cut
    short, or follows one that did. Left in place it would fill keep-K slots (the prune counts by
    the cheap check) and be overwritten step by step. Moved aside, nothing lists, restores or
    prunes it, and it stays for the user to inspect or delete: a checkpoint that failed on a
    transient read error is not lost. Locally a move is a rename. On object storage, where a
    move is a copy of every byte, one with a complete marker is copied then deleted; one cut
    short (no complete marker: nothing can vouch for its files) is deleted. `leave`: paths
    not to touch (Ray Train's own list, `raylm.ray.train.RaySink`). One warning line says
    what was done.
    """
    run_dir = storage.location(run_dir)
    above = [p for p in list_checkpoints(run_dir) if _step_of(p) > step]
    left = [p for p in above if any(_same(p, other) for other in leave)]
    above = [p for p in above if p not in left]
    moved: list[str | Path] = []
    deleted: list[str] = []
    stamp = _utc_stamp()
    for path in above:
        name = storage.name_of(path)
        if storage.is_uri(run_dir) and _check_marker(path, notes=False)[1] is not None:
            with storage.errors(path, None, CheckpointError):
                storage.delete_dir(path)
            deleted.append(name)
            continue
        target = storage.child(run_dir, ABANDONED, f"{name}.{stamp}")
        n = 1
        while storage.exists(target):
            n += 1
            target = storage.child(run_dir, ABANDONED, f"{name}.{stamp}-{n}")
        with storage.errors(path, None, CheckpointError):
            if storage.is_uri(run_dir):
                storage.copy_dir(path, target)
                storage.delete_dir(path)
            else:
                Path(target).parent.mkdir(exist_ok=True)
                os.rename(path, target)
        moved.append(target)
    if above or left:
        parts = []
        if moved:
            parts.append(f"moved {', '.join(storage.name_of(p).split('.')[0] for p in moved)} to "
                         f"{storage.child(run_dir, ABANDONED)}/")
        if deleted:
            parts.append(f"deleted {', '.join(deleted)} (cut short)")
        if left:
            parts.append(f"left {', '.join(storage.name_of(p) for p in left)} to Ray Train's keep-K")
        log(f"warning: {run_dir}: checkpoints above step {step}, the one this run continues from, belong to an "
            f"abandoned future: {'; '.join(parts)}")
    return moved


def _utc_stamp() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y%m%d-%H%M%S")


# ---------------------------------------------------------------------------------------
# Load


def load_checkpoint(path: str | Path, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer | None = None, *, verify: bool = True) -> dict[str, Any]:
    """Load `path` into this rank's model (and optimizer) shards; return the train state dict.

    A collective when distributed. Works for any world size, whatever world size saved it.
    With `verify` (the default) each rank checks the checksums of what it reads as it reads it
    (`.metadata` whole, each tensor item by its own checksum), and a damaged checkpoint is
    refused on every rank with DamagedCheckpoint naming the file; the model and optimizer may
    then hold part of it. A marker without item checksums (written before they existed) is
    verified whole first, the ranks sharing the files. Without `verify`, only the cheap check.
    """
    path = storage.location(path)
    marker, reason = _check_marker(path)
    if (reason := _first_reason(reason)) is not None:
        raise DamagedCheckpoint(reason)
    return _load_checked(path, marker, model, optimizer, verify)


def _load_checked(path: str | Path, marker: dict[str, Any], model: torch.nn.Module,
                  optimizer: torch.optim.Optimizer | None, verify: bool) -> dict[str, Any]:
    """`load_checkpoint` once the cheap check has passed on every rank."""
    if verify and not _item_sums(marker):
        if (reason := verify_checkpoint(path)) is not None:  # an older marker: every file, shared by the ranks
            raise DamagedCheckpoint(reason)
    return _load_dcp(path, marker, model, optimizer, verify)


def _first_reason(reason: str | None) -> str | None:
    """The first rank's reason, on every rank (a collective under a process group)."""
    return next((r for r in _all_gather(reason) if r is not None), None)


def _item_sums(marker: dict[str, Any]) -> dict[str, dict[int, tuple[int, str]]] | None:
    """{file: {offset: (length, blake2b)}} when every DCP data file of the marker has item
    checksums, else None (an older marker: verify whole files)."""
    sums: dict[str, dict[int, tuple[int, str]]] = {}
    for name, entry in marker["files"].items():
        if not _DCP_FILE_RE.match(name):
            continue
        items = entry.get("items")
        if not isinstance(items, list):
            return None
        try:
            sums[name] = {int(offset): (int(length), str(digest)) for offset, length, digest in items}
        except (TypeError, ValueError):
            return None
    return sums


def _load_dcp(path: str | Path, marker: dict[str, Any], model: torch.nn.Module,
              optimizer: torch.optim.Optimizer | None, verify: bool) -> dict[str, Any]:
    entry = marker["files"].get(".metadata") if verify else None
    try:
        metadata, reason = read_dcp_metadata(path, entry), None
    except DamagedCheckpoint as e:
        metadata, reason = None, str(e)
    if (reason := _first_reason(reason)) is not None:  # every rank read it: all agree before DCP starts
        raise DamagedCheckpoint(reason)
    if optimizer is not None:
        model_sd, optim_sd = get_state_dict(model, optimizer)
    else:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        model_sd, optim_sd = get_model_state_dict(model), None
    saved = metadata.state_dict_metadata
    # RNG streams this process has and the checkpoint holds (a GPU checkpoint loads on CPU).
    rng = {k: v for k, v in _rng_state().items() if f"rng.{k}" in saved}
    state: dict[str, Any] = {"model": model_sd, "rng": rng}
    if optim_sd is not None:
        state["optim"] = optim_sd
    reader = SafeFileSystemReader(path, metadata, _item_sums(marker) if verify else None)
    try:
        with single_process_dcp():
            dcp.load(state, storage_reader=reader, planner=SafeLoadPlanner())
    except CheckpointException as e:  # DCP gathers every rank's error: all ranks raise the same one
        _raise_interrupt(e)
        for failure, _traceback in e.failures.values():
            if isinstance(failure, CheckpointError):
                raise type(failure)(str(failure)) from None
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


def restore_newest(candidates: Iterable[str | Path], model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                   log: Callable[[str], None] = print,
                   check: Callable[[str | Path, dict[str, Any]], None] | None = None,
                   ) -> tuple[tuple[str | Path, dict[str, Any]] | None, list[tuple[str | Path, str]]]:
    """Load the newest candidate that loads whole and verified: ((path, marker) or None, [(path,
    reason) of each candidate that passed the cheap check but was found damaged while loading]).

    The restore path of a run, reading each checkpoint byte once: candidates are tried newest
    first (rank 0's order); each is checked cheaply (marker, listing), then `check(path, marker)`
    (the caller's resume checks; its error propagates), then loaded by `load_checkpoint`, where
    each rank verifies what it reads. Every verdict is collective, so all ranks fall back
    together, log the same warning and return the same answer. After a damaged candidate the
    model and optimizer may hold part of it: a caller that ends with None must reset them.
    """
    order = _by_step(candidates) if distributed_world()[0] == 0 else None
    if distributed_world()[1] > 1:
        box = [order]
        dist.broadcast_object_list(box, src=0)
        order = box[0]
    damaged: list[tuple[str | Path, str]] = []
    for path in order:
        marker, reason = _check_marker(path)
        if (reason := _first_reason(reason)) is None:
            if check is not None:
                check(path, marker)
            try:
                _load_checked(path, marker, model, optimizer, verify=True)
                return (path, marker), damaged
            except DamagedCheckpoint as e:
                reason = str(e)
                damaged.append((path, reason))
        log(f"warning: checkpoint {path} is not usable ({reason}); trying an older one")
    return None, damaged


def newest_complete(candidates: Iterable[str | Path]) -> tuple[str | Path, dict[str, Any]] | None:
    """(path, marker) of the newest candidate that passes the cheap check, or None: the checkpoint
    `restore_newest` tries first, found by reading markers and listings only (the training
    stream's controller). Candidates found damaged by an earlier restore carry a note and fail it."""
    for path in _by_step(candidates):
        marker, reason = _check_marker(path)
        if reason is None:
            return path, marker
    return None


def resolve_resume(path: str | Path) -> tuple[str | Path | None, str | Path]:
    """For `run.resume_from`: (run dir when `path` is a run directory, else None; checkpoint).

    A run directory resolves to its newest complete checkpoint; a checkpoint directory to
    itself. Raises CheckpointError with one line when there is nothing to resume from.
    Runs on the driver, so only the cheap check: the workers verify checksums when they load.
    """
    path = storage.location(path) if storage.is_uri(path) else Path(path).expanduser().resolve()
    with storage.errors(path, "run.resume_from", CheckpointError):
        if not storage.exists(path):
            raise CheckpointError("no such run directory or checkpoint", key="run.resume_from", value=path)
        is_checkpoint = storage.exists(storage.child(path, MARKER)) or storage.exists(storage.child(path, ".metadata"))
    if is_checkpoint:
        if (reason := _check_marker(path)[1]) is not None:
            raise CheckpointError(f"the checkpoint is not usable ({reason}); pass its run directory to resume "
                                  "from the newest complete one", key="run.resume_from", value=path)
        return None, path
    latest = latest_checkpoint(path)
    if latest is None:
        raise CheckpointError("no complete checkpoint in this directory", key="run.resume_from", value=path)
    return path, latest
