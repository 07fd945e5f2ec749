"""The file plan: which files a run reads and in which order (plain Python, pyarrow filesystems).

The Ray Data pipeline (`raylm.ray.data`) and the single-process path (`raylm.data.local`)
both read this plan, so they walk exactly the same files in the same order:

- a source's files are listed once per run and sorted by path (a file, a directory, a
  glob, or a URI such as s3://bucket/prefix/*.jsonl), capped by its `max_bytes`; hidden
  files and directories (`.git/`), `__pycache__` and `_*` names are skipped at any depth;
  `python-stdlib` is the default corpus of `raylm.data.corpus`. Local directories and globs
  are walked by `_Walk`: symlinks are followed, each real file is listed once and a symlink
  loop is not followed (one warning line);
- `text` files (one document each) are assigned to train or validation before they are read,
  so neither split reads the other's files: validation holds `data.val_fraction` of each
  source's text bytes, whole files chosen by a stable hash of their ids
  (`heldout_text_files`); records of `lines`, `jsonl` and `parquet` files go to validation
  by a stable hash of their ids (`raylm.data.corpus.is_validation`);
- a resumed run compares the corpus file by file (`corpus_files`: content hashes of small
  local files, size and mtime otherwise) and names what changed (`corpus_changes`);
- with several sources, the training plan interleaves files by a deterministic weighted
  round robin on bytes, repeating the files of a source whose share of bytes is below its
  weight (upsampling). The mixture is therefore exact in bytes and, for sources of similar
  bytes per token, within a few percent in tokens; its granularity is one file, so a
  source held in a single huge file mixes coarsely (split such files);
- training files are read in a seeded random order (`data.shuffle_files`), a new one per
  pass over the corpus, so the model does not see one package or topic at a time;
- the validation plan is every source once, without weights: each source's held-out files
  in a seeded order, the sources taken in turn file by file, so that the rows evaluation
  reads (the first ones) sample the whole held-out set.

Files are read whole by `ray.data.read_binary_files` (with their paths) and parsed in the
same fused task by `raylm.data.parse.parse_file`, data.read_tasks of them at once (each new
task process costs a second of CPU to start, so more only pays on high-latency stores);
with `preserve_order` the documents come out in plan order. Bad input either raises `DataError`
inside the task (unwrapped to one line at the driver by `raylm.ray.errors`) or is counted by
kind and skipped (`data.on_error`).
"""

from __future__ import annotations

import dataclasses
import errno
import fnmatch
import hashlib
import heapq
import json
import math
import os
import posixpath
import stat
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs

from raylm import storage
from raylm.config import STDLIB_CORPUS, Config
from raylm.data.corpus import hash_fraction, stdlib_files, stdlib_root
from raylm.data.parse import FileSpec
from raylm.errors import DataError, EmptySplit, SourceNotFound

_GLOB_CHARS = "*?["


@dataclass(frozen=True)
class PlannedFile:
    path: str
    """The path as `filesystem` knows it."""
    size: int
    source: int
    """Index in data.sources."""
    spec: FileSpec
    mtime_ns: int | None = None
    """Modification time from the listing (local stat, S3 LastModified, GCS updated)."""


@dataclass
class FilePlan:
    filesystem: pafs.FileSystem
    files: list[PlannedFile]
    """The files of one split, in read order (repeated for several passes)."""

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)


@dataclass
class CorpusListing:
    """Every source listed once (a run lists its corpus once and plans both splits from it)."""

    filesystem: pafs.FileSystem
    per_source: list[list[PlannedFile]]
    """Each source's files in sorted order, capped by its max_bytes."""
    notes: list[str] = dataclasses.field(default_factory=list)
    """Warnings of the listing (symlink loops not followed, files reached twice), one line each."""

    def fingerprint(self) -> str:
        """A hash of the listed files (path and size): a resumed run checks it reads the same corpus."""
        digest = hashlib.sha256()
        for files in self.per_source:
            for f in files:
                digest.update(f"{f.path}\0{f.size}\n".encode())
            digest.update(b"\1")
        return digest.hexdigest()


def _resolve(path: str) -> tuple[pafs.FileSystem, str]:
    if "://" not in path:
        return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(path))
    static = path
    cut = min((path.find(c) for c in _GLOB_CHARS if c in path), default=-1)
    if cut >= 0:
        static = path[:cut]
    fs, fs_path = storage.resolve(static)  # the endpoint from the AWS environment (raylm.storage)
    if cut < 0:
        return fs, fs_path
    return fs, fs_path + ("/" if static.endswith("/") else "") + path[len(static):]


_SKIPPED_DIRS = {"__pycache__", "node_modules"}


def _visible(relative: str) -> bool:
    """Files a directory or glob source reads: not hidden at any depth (`.git/`, `.venv/`), not
    in `__pycache__`, and not named `_*` (`_SUCCESS`, `_metadata`), as pyarrow datasets skip them."""
    parts = relative.split("/")
    if any(part.startswith(".") and part not in (".", "..") for part in parts):
        return False
    if any(part in _SKIPPED_DIRS for part in parts[:-1]):
        return False
    return not parts[-1].startswith("_")


def list_source(cfg: Config, i: int, notes: list[str] | None = None) -> tuple[pafs.FileSystem, list[PlannedFile]]:
    """Source i's files in sorted order, capped by max_bytes; SourceNotFound if it names nothing.
    A warning line about the walk (a symlink loop, a file reached twice) is appended to `notes`."""
    src, d = cfg.data.sources[i], cfg.data
    said = {"key": f"data.sources.{i}.path", "value": src.path}  # what its errors are said of
    if src.path == STDLIB_CORPUS:
        root = stdlib_root()
        files = []
        for p in stdlib_files(src.max_bytes):
            st = p.stat()
            files.append((str(p), st.st_size, p.relative_to(root).as_posix(), st.st_mtime_ns))
        fs, lenient = pafs.LocalFileSystem(), True
    else:
        fs, fs_path = _resolve(src.path)
        lenient = False
        walk = _Walk()
        try:
            base, found = _list(fs, fs_path, said, walk)
        except (OSError, pa.ArrowException) as e:
            raise DataError(f"cannot be listed ({str(e).splitlines()[0]})", **said) from None
        files = sorted((path, size, posixpath.relpath(path, base), mtime) for path, size, mtime in found)
        files = [f for f in files if _visible(f[2])]
        if not files:
            raise SourceNotFound("matches no files (hidden files, __pycache__ and _* names are skipped)", **said)
        if walk.note() and notes is not None:
            notes.append(f"warning: data.sources.{i}.path={src.path}: {walk.note()}")
        if src.max_bytes is not None:
            kept, total = [], 0
            for f in files:
                if total + f[1] > src.max_bytes and kept:
                    break
                kept.append(f)
                total += f[1]
            files = kept
    specs = [
        PlannedFile(path, size, i, FileSpec(path, src.format, rel, src.field, src.column, d.max_document_bytes, lenient,
                                            src.prompt_field, src.completion_field, src.messages_field, src.template),
                    mtime)
        for path, size, rel, mtime in files
    ]
    return fs, specs


Found = tuple[str, int, "int | None"]  # (path, size, mtime_ns)


def _list(fs: pafs.FileSystem, fs_path: str, said: dict, walk: "_Walk") -> tuple[str, list[Found]]:
    """(base directory that document ids are relative to, the files a path or glob names).
    Local directories are walked by `_Walk` (symlinks followed, loops not); object stores have
    no symlinks and are listed by pyarrow."""
    local = isinstance(fs, pafs.LocalFileSystem)
    if any(c in fs_path for c in _GLOB_CHARS):
        base = fs_path[: min(fs_path.find(c) for c in _GLOB_CHARS if c in fs_path)].rsplit("/", 1)[0] or "/"
        if local:
            pattern = posixpath.relpath(fs_path, base).split("/")
            return base, walk.run(base, pattern) if os.path.isdir(base) else []
        return base, [(f.path, f.size, f.mtime_ns)
                      for f in fs.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
                      if f.type == pafs.FileType.File and fnmatch.fnmatch(f.path, fs_path)]
    info = fs.get_file_info(fs_path)
    if info.type == pafs.FileType.NotFound:
        raise SourceNotFound("no such file or directory", **said)
    if info.type == pafs.FileType.Directory:
        if local:
            return fs_path, walk.run(fs_path, None)
        return fs_path, [(f.path, f.size, f.mtime_ns) for f in fs.get_file_info(pafs.FileSelector(fs_path, recursive=True))
                         if f.type == pafs.FileType.File]
    return posixpath.dirname(fs_path), [(info.path, info.size, info.mtime_ns)]


class _Walk:
    """A local directory walk that reads each real file once.

    Symlinks are followed (a corpus of links to shards on other disks is common), but each real
    directory is entered once and each real file listed once, by (st_dev, st_ino): a link back to
    a directory that encloses it (`sub/back -> ..`) is a loop and is not followed, and a second
    path to a directory or file listed already (two links to one folder) is skipped. Paths through
    fewer symlinks win (then the sorted path), so a real folder is listed under its own name, not
    under a link to it. What was skipped is one warning line (`note`): nothing is lost, every
    real file is still read exactly once. Hidden names and `__pycache__`/`node_modules` are not
    entered. With a glob `pattern` (components relative to the walk's root, `**` for any depth)
    only directories that can hold a match are entered, and only matching files are returned.
    """

    def __init__(self):
        self.loops: list[tuple[str, str]] = []  # (link, the enclosing directory it leads back to)
        self.repeats: list[tuple[str, str]] = []  # (path skipped, the path listed for the same file or directory)

    def run(self, root: str, pattern: list[str] | None) -> list[Found]:
        top = os.stat(root)
        # (symlinks on the path, components relative to root, path, identities of it and its parents)
        heap: list[tuple[int, tuple[str, ...], str, tuple[tuple[int, int], ...]]] = [
            (0, (), root, ((top.st_dev, top.st_ino),))]
        walked: dict[tuple[int, int], str] = {}
        files: list[tuple[int, tuple[str, ...], str, os.stat_result]] = []
        while heap:
            links, parts, directory, chain = heapq.heappop(heap)
            if chain[-1] in walked:
                (self.loops if chain[-1] in chain[:-1] else self.repeats).append((directory, walked[chain[-1]]))
                continue
            walked[chain[-1]] = directory
            with os.scandir(directory) as it:
                entries = list(it)
            for entry in entries:
                if entry.name.startswith("."):
                    continue
                try:
                    st = entry.stat()  # follows a symlink
                except FileNotFoundError:
                    continue  # a dangling symlink names no file
                except OSError as e:
                    if e.errno != errno.ELOOP:
                        raise
                    self.loops.append((entry.path, "itself"))  # x -> y -> x: no file at the end
                    continue
                rel, depth = (*parts, entry.name), links + entry.is_symlink()
                if stat.S_ISDIR(st.st_mode):
                    if entry.name not in _SKIPPED_DIRS and (pattern is None or _may_hold(rel, pattern)):
                        heapq.heappush(heap, (depth, rel, entry.path, (*chain, (st.st_dev, st.st_ino))))
                elif stat.S_ISREG(st.st_mode) and (pattern is None or _matches(list(rel), pattern)):
                    files.append((depth, rel, entry.path, st))
        listed: dict[tuple[int, int], str] = {}
        found: list[Found] = []
        for _, _, path, st in sorted(files, key=lambda f: f[:2]):
            ident = (st.st_dev, st.st_ino)
            if ident in listed:
                self.repeats.append((path, listed[ident]))
                continue
            listed[ident] = path
            found.append((path, st.st_size, st.st_mtime_ns))
        return found

    def note(self) -> str:
        parts = []
        if self.loops:
            link, target = self.loops[0]
            parts.append(f"{len(self.loops)} symlink loop(s) not followed (e.g. {link} leads back to {target})")
        if self.repeats:
            path, first = self.repeats[0]
            parts.append(f"{len(self.repeats)} path(s) to a file or directory listed already skipped "
                         f"(e.g. {path}, the same as {first})")
        return "; ".join(parts) + ("; each file is read once" if parts else "")


def _matches(parts: list[str], pattern: list[str]) -> bool:
    """Whether relative path components match glob components (`**`: zero or more directories)."""
    if not pattern:
        return not parts
    if pattern[0] == "**":
        return any(_matches(parts[k:], pattern[1:]) for k in range(len(parts) + 1))
    return bool(parts) and fnmatch.fnmatchcase(parts[0], pattern[0]) and _matches(parts[1:], pattern[1:])


def _may_hold(parts: tuple[str, ...], pattern: list[str]) -> bool:
    """Whether a directory at relative `parts` can hold a file matching `pattern`."""
    deep = pattern.index("**") if "**" in pattern else len(pattern) - 1
    fixed = min(len(parts), deep)
    if "**" not in pattern and len(parts) > deep:
        return False
    return all(fnmatch.fnmatchcase(p, q) for p, q in zip(parts[:fixed], pattern[:fixed]))


def list_corpus(cfg: Config, log: Callable[[str], None] | None = print) -> CorpusListing:
    """List every source once. A source that names nothing is an error whatever data.on_error
    says: dropping it would silently change the mixture the config asks for. Warnings of the
    walk (`_Walk`) go to `log`, one line per source, and stay in the listing's `notes`."""
    filesystem, per_source, notes = None, [], []
    for i in range(len(cfg.data.sources)):
        fs, files = list_source(cfg, i, notes)
        if filesystem is None:
            filesystem = fs
        elif fs.type_name != filesystem.type_name:
            raise DataError(f"data.sources.{i}.path={cfg.data.sources[i].path!r}: all sources of a run must be on "
                            f"one filesystem ({filesystem.type_name}), this one is on {fs.type_name}")
        per_source.append(files)
    for line in notes if log else ():
        log(line)
    _check_plan_size(cfg, per_source, 1, mixture=True)  # far-off weights: said now, before a tokenizer is trained
    return CorpusListing(filesystem or pafs.LocalFileSystem(), per_source, notes)


def plan_files(cfg: Config, split: str, *, mixture: bool = True, passes: int = 1,
               listing: CorpusListing | None = None) -> FilePlan:
    """The files `split` reads, in read order (see the module docstring).

    `listing`: the corpus listed already (list it once per run); EmptySplit if `split` holds no file."""
    listing = listing or list_corpus(cfg)
    vf = cfg.data.val_fraction
    per_source = []
    for files in listing.per_source:
        held = heldout_text_files(files, vf)
        per_source.append([f for f in files if f.spec.format != "text" or (f.path in held) == (split == "validation")])
    if not any(per_source) or split == "validation" and vf <= 0:
        raise EmptySplit(f"data.sources: the {split} split holds no files (data.val_fraction={vf})")
    if split != "train":
        return FilePlan(listing.filesystem, _validation_order(per_source, cfg.data.seed) * passes)
    _check_plan_size(cfg, per_source, passes, mixture)
    files = []
    for p in range(passes):
        order = [_shuffled(fs_, cfg.data.seed, i, p) if cfg.data.shuffle_files else fs_
                 for i, fs_ in enumerate(per_source)]
        files += interleave(order, [s.weight for s in cfg.data.sources]) if mixture else [f for o in order for f in o]
    return FilePlan(listing.filesystem, files)


MAX_PLANNED_READS = 2_000_000
"""File reads a training plan may hold (all passes, upsampled repeats included): planning takes
about 2 us and the plan 8 bytes per read, so this bounds both to seconds and tens of MB. A run
that needs more is a tiny corpus for a long run or a far-off mixture: said in one line."""


def _repeats(per_source: list[list[PlannedFile]], weights: list[float]) -> dict[int, float]:
    """How many times `interleave` reads each source per pass (the one largest for its weight: 1)."""
    totals = {s: sum(max(f.size, 1) for f in files) for s, files in enumerate(per_source) if files}
    if len(totals) < 2:
        return {s: 1.0 for s in totals}
    scale = max(totals[s] / weights[s] for s in totals)
    return {s: scale * weights[s] / totals[s] for s in totals}


def _check_plan_size(cfg: Config, per_source: list[list[PlannedFile]], passes: int, mixture: bool) -> None:
    """DataError before planning more than MAX_PLANNED_READS file reads, naming the setting to change."""
    repeats = _repeats(per_source, [s.weight for s in cfg.data.sources]) if mixture else \
        {s: 1.0 for s, files in enumerate(per_source) if files}
    per_pass = sum(math.ceil(r * len(per_source[s])) for s, r in repeats.items())
    if per_pass > MAX_PLANNED_READS:
        s = max(repeats, key=repeats.get)
        raise DataError(f"data.sources.{s}.weight={cfg.data.sources[s].weight!r}: the mixture reads this source's "
                        f"{len(per_source[s]):,} file(s) {repeats[s]:,.0f} times per pass to give it its share "
                        f"({per_pass:,} file reads per pass, at most {MAX_PLANNED_READS:,}); lower its weight or "
                        "give it more data")
    if per_pass * passes > MAX_PLANNED_READS:
        key = "data.stream_passes" if cfg.data.stream_passes is not None else "train.max_steps"
        value = cfg.data.stream_passes if cfg.data.stream_passes is not None else cfg.train.max_steps
        raise DataError(f"{key}={value}: the training stream would plan {passes:,} passes over {per_pass:,} file "
                        f"reads ({per_pass * passes:,}, at most {MAX_PLANNED_READS:,}); set data.stream_passes to at "
                        f"most {MAX_PLANNED_READS // per_pass:,} (the run checkpoints and stops when they are read, "
                        "saying how to continue) or train on a larger corpus")


def heldout_text_files(files: list[PlannedFile], val_fraction: float) -> set[str]:
    """The text files (one document each) of one source that validation holds: val_fraction of
    the source's text bytes, whole files taken in the order of a stable hash of their ids.

    Files are taken in hash order until the quota is reached, passing over a file that would
    overshoot it by more than half (filling the quota with whatever fits would hold out the
    smallest files, a biased sample); when every file is that large, the smallest is held out.
    Choosing by bytes, not by a per-file coin flip, makes the held-out share close to exact for
    a source of few or unequal files, where a coin flip is noisy (9 files of 390, five of them
    codec tables, was what the demo once held out). The split depends only on the source's set
    of files, never on their order, the worker count or the machine. A source of one file is
    never held out whole.
    """
    text = [f for f in files if f.spec.format == "text"]
    if val_fraction <= 0 or len(text) < 2:
        return set()
    quota = val_fraction * sum(f.size for f in text)
    held, total = set(), 0
    for f in sorted(text, key=lambda f: hash_fraction(f.spec.id_base)):
        if total >= quota:
            break
        if total + f.size <= 1.5 * quota:
            held.add(f.path)
            total += f.size
    if not held:
        held.add(min(text, key=lambda f: (f.size, hash_fraction(f.spec.id_base))).path)
    return held


def _shuffled(files: list[PlannedFile], seed: int, source: int, pass_: int, *salt: int) -> list[PlannedFile]:
    """A seeded permutation per source and pass: sorted file names are a poor curriculum
    (a model trained on them in order sees one package at a time)."""
    perm = np.random.default_rng([seed, source, pass_, *salt]).permutation(len(files))
    return [files[k] for k in perm]


def _validation_order(per_source: list[list[PlannedFile]], seed: int) -> list[PlannedFile]:
    """Held-out files: each source in its own seeded order, sources taken in turn, file by file.

    Evaluation reads the first rows of the validation split, so those must be a sample of
    the whole held-out set (every source, files from everywhere), not its alphabetical start.
    The order is fixed by data.seed, so every evaluation of a run reads the same rows.
    """
    shuffled = [_shuffled(files, seed, i, 0, 1) for i, files in enumerate(per_source)]
    longest = max((len(files) for files in shuffled), default=0)
    return [files[k] for k in range(longest) for files in shuffled if k < len(files)]


def interleave(per_source: list[list[PlannedFile]], weights: list[float]) -> list[PlannedFile]:
    """Merge per-source file lists so each source's share of bytes is weight / sum(weights).

    The source that is largest relative to its weight is read once; the others are cycled
    (upsampled) until they reach their quota. The next file always comes from the source
    furthest behind its weight (smooth weighted round robin), so the mix holds all along.
    """
    active = [s for s, files in enumerate(per_source) if files]
    if len(active) == 1:
        return list(per_source[active[0]])
    totals = {s: sum(max(f.size, 1) for f in per_source[s]) for s in active}
    scale = max(totals[s] / weights[s] for s in active)
    quota = {s: scale * weights[s] for s in active}
    emitted = {s: 0.0 for s in active}
    cursor = {s: 0 for s in active}
    out: list[PlannedFile] = []
    while True:
        best, best_key = None, None
        for s in active:
            f = per_source[s][cursor[s] % len(per_source[s])]
            half = max(f.size, 1) / 2
            if emitted[s] + half > quota[s]:
                continue
            key = (emitted[s] + half) / weights[s]
            if best_key is None or key < best_key:
                best, best_key = s, key
        if best is None:
            return out
        f = per_source[best][cursor[best] % len(per_source[best])]
        out.append(f)
        emitted[best] += max(f.size, 1)
        cursor[best] += 1


# ---------------------------------------------------------------------------------------
# Sizes of the read blocks and tokenizer batches the Ray Data pipeline cuts the plan into.


READ_BLOCK_BYTES = 4 * 2**20
"""Bytes of files per read task (Ray Data's default is 1 MiB blocks). Measured on 2 CPUs,
24M tokens: 4 MiB blocks with ~1 MiB tokenizer batches took 11.6 s against 12.2-12.6 s."""
TOKENIZE_BATCH_BYTES = 2**20
"""Text per tokenizer batch when data.tokenize_batch_docs is null: large enough that a batch
costs far more than its hand-over, small enough that the first rows come quickly."""
ASSUMED_RECORD_BYTES = 1024
"""Bytes per document assumed for lines / jsonl / parquet files before they are read."""


def read_blocks(plan: FilePlan, tokenize_actors: int) -> int:
    """Read tasks (= blocks) for a plan: ~READ_BLOCK_BYTES each, but at least 4 per tokenizer
    actor so that every actor has work from the start (a block is never split between actors),
    and at most one per file."""
    by_size = math.ceil(plan.total_bytes / READ_BLOCK_BYTES)
    return max(1, min(len(plan.files), max(by_size, 4 * tokenize_actors)))


def tokenize_batch_docs(cfg: Config, plan: FilePlan) -> int:
    """data.tokenize_batch_docs, or the documents that make about TOKENIZE_BATCH_BYTES of text."""
    if cfg.data.tokenize_batch_docs is not None:
        return cfg.data.tokenize_batch_docs
    docs = sum(1 if f.spec.format == "text" else max(1, f.size // ASSUMED_RECORD_BYTES) for f in plan.files)
    bytes_per_doc = max(1.0, plan.total_bytes / max(1, docs))
    return int(min(4096, max(16, round(TOKENIZE_BATCH_BYTES / bytes_per_doc))))


def stream_passes(cfg: Config, train_plan: FilePlan) -> int:
    """Passes over the corpus the training stream holds: enough for train.max_steps.

    A token is at most 4 * tokenizer.max_piece_length bytes, so this many passes hold at
    least the tokens the run trains on; passes never read are never executed.
    """
    if cfg.data.stream_passes is not None:
        return cfg.data.stream_passes
    corpus_bytes = max(1, train_plan.total_bytes)
    needed_tokens = cfg.train.max_steps * cfg.train.global_batch_tokens
    return max(1, math.ceil(needed_tokens * 4 * cfg.tokenizer.max_piece_length / corpus_bytes)) + 1


def _data_settings(cfg: Config) -> dict:
    d = cfg.data
    return {"sources": [dataclasses.asdict(s) for s in d.sources], "add_bos": d.add_bos,
            "val_fraction": d.val_fraction, "seed": d.seed, "shuffle_files": d.shuffle_files,
            "on_error": d.on_error, "max_document_bytes": d.max_document_bytes}


def stream_fingerprint(cfg: Config, listing: CorpusListing) -> str:
    """What decides a streaming run's sequences besides the tokenizer and seq_len: the listed
    files (path and size) and the settings that order, split and filter their documents.
    The files' contents are compared by `corpus_files` (a resume checks both)."""
    text = json.dumps(_data_settings(cfg), sort_keys=True) + listing.fingerprint()
    return hashlib.sha256(text.encode()).hexdigest()


# ---------------------------------------------------------------------------------------
# What a resumed run compares file by file, to say which corpus files changed.

HASHED_FILE_BYTES = 2**20
"""Local files up to this size are identified by a hash of their content: exact, and the same on
every machine (the default corpus is such files). Larger ones, and every object on a bucket, by
their size and modification time from the listing: reading a corpus of terabytes to start a run
is out of the question, and pyarrow's listing carries no ETag or generation."""
HASHED_CORPUS_BYTES = 256 * 2**20
"""At most this many bytes are read to hash small files (about a second), in listing order; the
small files past it are identified by size and modification time like large ones."""
RECORDED_FILES = 20_000
"""A corpus of more files is compared as a whole (one digest), not file by file: the record goes
into every checkpoint's marker."""


def corpus_files(cfg: Config, listing: CorpusListing) -> dict:
    """The corpus as a resumed run compares it: the data settings, and per file (keyed by source
    and id: `0:pkg/mod.py`, the same on any machine) "size mtime_ns content-hash" (`-` where no
    hash was taken); above RECORDED_FILES files only their count and a digest."""
    files: dict[str, str] = {}
    budget = HASHED_CORPUS_BYTES if isinstance(listing.filesystem, pafs.LocalFileSystem) else 0
    for source in listing.per_source:
        for f in source:
            content = "-"
            if f.size <= HASHED_FILE_BYTES and f.size <= budget:
                budget -= f.size
                try:
                    with open(f.path, "rb") as stream:
                        content = hashlib.blake2b(stream.read(), digest_size=12).hexdigest()
                except OSError:
                    pass  # unreadable: reading it is where that is reported (or skipped, data.on_error)
            files[f"{f.source}:{f.spec.id_base}"] = f"{f.size} {f.mtime_ns} {content}"
    digest = hashlib.sha256()
    for key, record in files.items():
        size, mtime, content = record.split(" ")
        digest.update(f"{key}\0{size}\0{content if content != '-' else mtime}\n".encode())
    return {"settings": _data_settings(cfg), "count": len(files), "digest": digest.hexdigest(),
            "files": files if len(files) <= RECORDED_FILES else None}


def _file_changed(then: str, now: str) -> bool:
    """Same size and, where both took one, the same content hash, else the same mtime."""
    s0, m0, h0 = then.split(" ")
    s1, m1, h1 = now.split(" ")
    if s0 != s1:
        return True
    return h0 != h1 if "-" not in (h0, h1) else m0 != m1


def _flat(value, key: str) -> dict:
    if isinstance(value, dict):
        return {k: v for name, item in value.items() for k, v in _flat(item, f"{key}.{name}").items()}
    if isinstance(value, list):
        return {k: v for i, item in enumerate(value) for k, v in _flat(item, f"{key}.{i}").items()}
    return {key: value}


def _some(keys: list[str], shown: int = 3) -> str:
    names = ", ".join(k.split(":", 1)[1] + f" (data.sources.{k.split(':', 1)[0]})" for k in keys[:shown])
    return names + (f" and {len(keys) - shown} more" if len(keys) > shown else "")


def corpus_changes(then: dict, now: dict) -> str | None:
    """What differs between two `corpus_files` records, in a few words (None: nothing): the data
    settings by key, then files changed in place, added and gone, the first few named."""
    said = []
    s0, s1 = _flat(then.get("settings", {}), "data"), _flat(now.get("settings", {}), "data")
    for key in sorted(set(s0) | set(s1)):
        if s0.get(key) != s1.get(key):
            said.append(f"{key} {s0.get(key, 'unset')!r} -> {s1.get(key, 'unset')!r}")
    f0, f1 = then.get("files"), now.get("files")
    if f0 is None or f1 is None:
        if then.get("digest") != now.get("digest"):
            said.append(f"its {now.get('count')} files (too many to compare one by one) differ")
        return "; ".join(said) or None
    changed = [k for k in f1 if k in f0 and _file_changed(f0[k], f1[k])]
    added = [k for k in f1 if k not in f0]
    gone = [k for k in f0 if k not in f1]
    for keys, what in ((changed, "changed"), (added, "new"), (gone, "gone")):
        if keys:
            said.append(f"{len(keys)} file(s) {what}: {_some(keys)}")
    return "; ".join(said) or None
