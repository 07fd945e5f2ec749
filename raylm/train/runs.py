"""A run's identity and inputs: its directory, the checkpoint it starts from, its tokenizer, and
what a resumed run must match.

Torch core, no Ray. Every driver (`raylm train --local`, torchrun, Ray Train, a Tune trial)
goes through the same two calls:

1. `resolve_run(cfg) -> RunSpec`: a pure value (the config is not touched). A new run gets a
   fresh name; `run.resume_from=<run dir>` continues that run in place; `run.resume_from=
   <checkpoint>` starts a new run from it. Naming an existing run without resuming it is an
   error, since it would mix two runs' checkpoints.
2. `start_run(spec, sample) -> RunStart`: the run directory opened and held, the corpus listed
   once, the tokenizer, the run's facts, and the checks against the checkpoint it starts from.
   - `open_run_dir`: the run directory, held by this process for the run's life (`raylm.lock`:
     one writer per run directory; a second gets one line naming the holder). A new run's
     directory is made with an exclusive `mkdir` (two runs started in the same second get `name`
     and `name-2`) and locked before config.yaml is written; the spec comes back with its final
     name. On object storage (`run.output_dir=s3://...`) a name is taken when no object lies
     under it and its lease is created first (a conditional write on S3). A run resumed in place
     is locked before anything in it is read or written, and its resume point is read again
     under the lock. A resumed run's directory, config.yaml and tokenizer.model are never
     rewritten. `discard_run_dir(spec, lock)` (`RunStart.discard`) undoes a failed start,
     removing only the files this start wrote, and releases the lock.
   - `obtain_tokenizer(...)`: the one load-or-train. Resuming never retrains: the run's (or the
     checkpoint's) tokenizer is loaded.

Resume checks: every checkpoint records `RunFacts` (tokenizer hash, `seq_len`, a fingerprint
of the data); `check_resume` compares them with the resumed run's and names the first
difference in one line, unless `run.resume_changes` lists it.
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import os
import shlex
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import yaml

from raylm import lock, storage
from raylm.config import Config, config_from_dict
from raylm.data import prepared
from raylm.data.plan import CorpusListing, corpus_changes, corpus_files, list_corpus, stream_fingerprint
from raylm.errors import CheckpointError, ConfigError, DataError, RaylmError
from raylm.lock import DirLock
from raylm.storage import is_uri
from raylm.tokenizer import HF_PREFIX, Tokenizer, load_or_train
from raylm.train import checkpoint as ckpt
from raylm.train.hf_import import check_init_from
from raylm.train.tracking import check_available

CONFIG_FILE = "config.yaml"
TOKENIZER_FILE = "tokenizer.model"


@dataclass(frozen=True)
class RunSpec:
    """Where a run lives and where it starts: everything a driver needs besides the config."""

    cfg: Config
    output_dir: str
    """Absolute local path, or a URI (s3://, gs://) kept as written."""
    name: str
    initial_checkpoint: str | None = None
    """The checkpoint to start from (resume_from); None starts fresh (or from Ray's own restore)."""
    in_place: bool = False
    """Continuing an existing run directory: its config.yaml and tokenizer.model are kept."""
    created: bool = False
    """True once `create_run_dir` made a new directory (what `discard_run_dir` may undo)."""

    @property
    def run_dir(self) -> str:
        return str(storage.child(self.output_dir, self.name))


def new_run_name(cfg: Config, now: dt.datetime | None = None) -> str:
    return f"{cfg.config_name}-{(now or dt.datetime.now()).strftime('%Y%m%d-%H%M%S')}"


def resolve_run(cfg: Config, now: dt.datetime | None = None) -> RunSpec:
    """The run `cfg` asks for, as a new value; one-line errors for an impossible resume or name."""
    init_from = cfg.model.init_from
    if init_from and not init_from.startswith(HF_PREFIX) and not is_uri(init_from):
        # Absolute: Ray Train's workers, which load it, do not run in this directory.
        model = dataclasses.replace(cfg.model, init_from=str(Path(init_from).expanduser().resolve()))
        cfg = dataclasses.replace(cfg, model=model)
    output_dir = cfg.run.output_dir
    if not is_uri(output_dir):
        output_dir = str(Path(output_dir).expanduser().resolve())
    if cfg.run.resume_from:
        run_dir, initial = ckpt.resolve_resume(cfg.run.resume_from)
        if run_dir is not None:  # continue that run in place
            if cfg.run.name not in (None, storage.name_of(run_dir)):
                raise ConfigError(f"run.name={cfg.run.name}: resuming {run_dir} continues that run; "
                                  "drop run.name or pass a checkpoint directory to start a new run from it")
            return RunSpec(cfg, str(storage.parent_of(run_dir)), storage.name_of(run_dir), str(initial),
                           in_place=True)
        initial_checkpoint = str(initial)
    else:
        initial_checkpoint = None
        if cfg.model.init_from.startswith(HF_PREFIX):  # a mismatch is said before anything is written
            check_init_from(cfg.model)
        elif cfg.model.init_from:
            check_init_run(cfg)
    name = cfg.run.name or new_run_name(cfg, now)
    if cfg.run.name is not None and not is_uri(output_dir) and (Path(output_dir) / name).exists():
        existing = Path(output_dir) / name
        raise ConfigError(f"run.name={name}: {existing} already exists; continue it with "
                          f"run.resume_from={existing}, or choose another run.name")
    return RunSpec(cfg, output_dir, name, initial_checkpoint)


def check_storage(cfg: Config, reads_sources: bool | None = None) -> None:
    """Before anything starts: every object-storage URI the config names has an endpoint that
    answers and a bucket that exists, else one line naming the key and the URI (one request
    per URI; local paths are checked where they are used). The sources are checked when the
    run reads them (`reads_sources`; by default when there is no data.prepared_path)."""
    check_available(cfg.run.tracking)  # and the trackers' packages (`raylm.train.tracking`)
    storage.check_reachable(cfg.run.output_dir, "run.output_dir", ConfigError)
    storage.check_writable_dir(cfg.run.output_dir, "run.output_dir")  # a file, /proc, under a file: one line
    storage.check_reachable(cfg.run.resume_from, "run.resume_from", CheckpointError)
    storage.check_reachable(cfg.data.prepared_path, "data.prepared_path", DataError)
    storage.check_reachable(cfg.tokenizer.path, "tokenizer.path", DataError)
    if reads_sources or (reads_sources is None and not cfg.data.prepared_path):
        for i, source in enumerate(cfg.data.sources):
            storage.check_reachable(source.path, f"data.sources.{i}.path", DataError)


def open_run_dir(spec: RunSpec) -> tuple[RunSpec, DirLock]:
    """The run directory, held by this process until the returned lock is released: a new one
    made (atomically, never an existing one) with config.yaml written, or the run resumed in
    place locked and its resume point read again. LockHeld (one line naming the holder) when
    another live process writes to it."""
    if spec.in_place:
        held = lock.acquire(spec.run_dir, "run directory")
        try:  # the holder that just left may have saved a newer checkpoint
            return resolve_run(spec.cfg), held
        except BaseException:
            held.release()
            raise
    if is_uri(spec.output_dir):
        with storage.errors(spec.output_dir, "run.output_dir", ConfigError):
            return _create_object_run_dir(spec)
    root = Path(spec.run_dir).parent
    root.mkdir(parents=True, exist_ok=True)
    name, n = spec.name, 1
    while True:
        try:
            held = lock.create(root / name, "run directory")  # exclusive mkdir: one start gets each name
            break
        except FileExistsError:
            if spec.cfg.run.name is not None:  # an explicit name is never changed behind the user's back
                raise ConfigError(f"run.name={spec.name}: {root / name} already exists; choose another run.name")
            n += 1
            name = f"{spec.name}-{n}"
    spec = dataclasses.replace(spec, name=name, created=True)
    try:
        final_cfg = dataclasses.replace(spec.cfg, run=dataclasses.replace(spec.cfg.run, name=name))
        final_cfg.save(root / name / CONFIG_FILE)
    except BaseException:
        discard_run_dir(spec, held)
        raise
    return dataclasses.replace(spec, cfg=final_cfg), held


def create_run_dir(spec: RunSpec) -> RunSpec:
    """`open_run_dir` for a new run, released at once: the directory and config.yaml, not held."""
    spec, held = open_run_dir(spec)
    held.release()
    return spec


def _create_object_run_dir(spec: RunSpec) -> tuple[RunSpec, DirLock]:
    """open_run_dir on object storage: the first free name (no object under it, and its lease
    created by this start), then config.yaml."""
    name, n = spec.name, 1
    while True:
        try:
            held = lock.create(storage.child(spec.output_dir, name), "run directory")
            break
        except FileExistsError:
            if spec.cfg.run.name is not None:
                raise ConfigError(f"run.name={spec.name}: {storage.child(spec.output_dir, name)} already exists; "
                                  "choose another run.name") from None
            n += 1
            name = f"{spec.name}-{n}"
    spec = dataclasses.replace(spec, name=name, created=True)
    try:
        final_cfg = dataclasses.replace(spec.cfg, run=dataclasses.replace(spec.cfg.run, name=name))
        storage.write_bytes(storage.child(spec.output_dir, name, CONFIG_FILE), final_cfg.to_yaml().encode())
    except BaseException:
        discard_run_dir(spec, held)
        raise
    return dataclasses.replace(spec, cfg=final_cfg), held


def discard_run_dir(spec: RunSpec, held: DirLock | None = None) -> None:
    """Undo a failed start: remove the files this start wrote, release its lock, and remove the
    directory if then empty. Anything else in it (another process's files) is left alone."""
    try:
        if not spec.created:
            return
        if is_uri(spec.run_dir):  # an object-storage "directory" is gone with its last object
            try:
                for name in (CONFIG_FILE, TOKENIZER_FILE):
                    storage.delete_file(storage.child(spec.run_dir, name))
            except OSError:
                pass  # storage gone away: the failure being reported says so already
            return
        run_dir = Path(spec.run_dir)
        for name in (CONFIG_FILE, TOKENIZER_FILE):
            (run_dir / name).unlink(missing_ok=True)
    finally:
        if held is not None:
            held.release()
    try:
        Path(spec.run_dir).rmdir()
    except OSError:
        pass


# ---------------------------------------------------------------------------------------
# Starting a run: the same sequence for every driver.


@dataclass(frozen=True)
class RunStart:
    """A run whose directory is held and whose inputs are gathered and checked (`start_run`)."""

    spec: RunSpec
    """With its final name (a second run in the same second gets `-2`)."""
    tokenizer: Tokenizer
    facts: RunFacts
    listing: CorpusListing | None
    """The corpus listed once, for the driver's datasets (None with prepared data)."""
    held: DirLock | None
    """The run directory's lock: this process holds it (rank 0 of a torchrun group), else None."""

    def checkpoint_files(self) -> dict[str, bytes]:
        return checkpoint_files(self.spec, self.tokenizer)

    def discard(self) -> None:
        """Undo the start (`discard_run_dir`): a driver whose own set-up fails after `start_run`."""
        if self.held is not None:
            discard_run_dir(self.spec, self.held)

    def release(self) -> None:
        if self.held is not None:
            self.held.release()


def start_run(spec: RunSpec, sample: Callable[[Config, CorpusListing | None], Iterable[str]],
              log: Callable[[str], None] = print, *, rank: int = 0,
              share: Callable[[object], object] = lambda value: value) -> RunStart:
    """Start `spec` the same way for every driver: open (and hold) the run directory, list the
    corpus once, obtain the tokenizer (trained on `sample(cfg, listing)` when there is none),
    record the run's facts, and check them against the checkpoint it starts from and prepared
    data against the tokenizer. A failure undoes the start and is raised.

    In a torchrun group rank 0 alone opens the directory and obtains the tokenizer, and
    `share` hands rank 0's value (or its one-line error) to every rank; the lock is rank 0's.
    The caller releases it (`RunStart.release`) when the run ends."""
    held, opened = None, spec
    if rank == 0:
        try:
            opened, held = open_run_dir(spec)
        except RaylmError as e:
            opened = e
    opened = share(opened)
    if isinstance(opened, RaylmError):
        raise opened
    spec, cfg = opened, opened.cfg
    try:
        listing = None if cfg.data.prepared_path else list_corpus(cfg)
        tokenizer = None
        if rank == 0:
            log(f"run directory: {spec.run_dir}" + (f" (from {spec.initial_checkpoint})" if spec.initial_checkpoint
                                                    else ""))
            tokenizer = obtain_tokenizer(spec, lambda: sample(cfg, listing), log, cfg.data.prepared_path)
            log(f"tokenizer: {tokenizer.vocab_size} pieces, sha256 {tokenizer.sha256[:12]}")
        tokenizer = share(tokenizer)
        facts = run_facts(cfg, tokenizer, listing)
        check_initial(spec, facts)
        if cfg.data.prepared_path:
            prepared.check_prepared(cfg, tokenizer.sha256)
    except BaseException:
        if rank == 0:
            discard_run_dir(spec, held)
        raise
    return RunStart(spec, tokenizer, facts, listing, held)


def run_facts(cfg: Config, tokenizer: Tokenizer, listing: CorpusListing | None = None) -> RunFacts:
    """This run's facts; `listing` is the corpus listed once (streaming), unused with prepared data."""
    if cfg.data.prepared_path:
        fingerprint = prepared.prepared_fingerprint(prepared.read_manifest(cfg.data.prepared_path), cfg)
        return RunFacts(tokenizer.sha256, cfg.data.seq_len, fingerprint)
    listing = listing or list_corpus(cfg)
    return RunFacts(tokenizer.sha256, cfg.data.seq_len, stream_fingerprint(cfg, listing), corpus_files(cfg, listing))


def check_initial(spec: RunSpec, facts: RunFacts) -> None:
    """Fail before training starts when the checkpoint a run starts from does not match it."""
    if spec.initial_checkpoint is not None:
        marker = ckpt.read_marker(spec.initial_checkpoint) or {}
        check_resume(spec.initial_checkpoint, marker.get("facts"), facts, spec.cfg.run.resume_changes)


def checkpoint_files(spec: RunSpec, tokenizer: Tokenizer) -> dict[str, bytes]:
    """Files every checkpoint carries, so that it loads on its own (generate, eval, export)."""
    return {TOKENIZER_FILE: tokenizer.to_bytes(), CONFIG_FILE: spec.cfg.to_yaml().encode()}


# ---------------------------------------------------------------------------------------
# What a run leaves, and what to do with it.


@dataclass(frozen=True)
class TrainResult:
    """What a finished (or stopped) training leaves: its last metrics, newest checkpoint and run directory."""

    metrics: dict
    checkpoint: str | None
    run_dir: str


def log_bad_input(report: dict, log: Callable[[str], None]) -> None:
    """The end-of-run summary of bad input skipped under data.on_error=skip (BadInputTally.report())."""
    for kind, n in report.get("skipped", {}).items():
        log(f"skipped {n} {kind} (data.on_error=skip): e.g. {report['examples'][kind]}")


def next_steps(run_dir: str) -> str:
    """What to do with the run just made: the commands that use it, as they can be pasted."""
    relative = os.path.relpath(run_dir)
    path = run_dir if relative.startswith("..") else relative
    run = shlex.quote(path)
    return "\n".join([
        "next, with this run:",
        f"  raylm generate {run} --prompt 'def fibonacci(n):'    # continue a prompt (streams)",
        f"  raylm eval {run}                                     # held-out loss, perplexity, bits per byte",
        f"  raylm export {run} --format hf --out {shlex.quote(path.rstrip('/') + '-hf')}   # Hugging Face transformers",
        f"  raylm plot {run}                                     # PNGs of the curves",
        f"  tensorboard --logdir {run}",
    ])


# ---------------------------------------------------------------------------------------
# The tokenizer: one load-or-train for every driver.


def resume_tokenizer_path(spec: RunSpec) -> str | Path | None:
    """The tokenizer a resumed run must keep: the checkpoint's own copy, else its run's."""
    if spec.initial_checkpoint is None:
        return None
    checkpoint = storage.location(spec.initial_checkpoint)
    for candidate in (storage.child(checkpoint, TOKENIZER_FILE),
                      storage.child(storage.parent_of(checkpoint), TOKENIZER_FILE)):
        if storage.is_file(candidate):
            return candidate
    return None


def obtain_tokenizer(spec: RunSpec, sample: Callable[[], Iterable[str]], log: Callable[[str], None] = print,
                     prepared: str | Path | None = None) -> Tokenizer:
    """`tokenizer.load_or_train` for a run: a resumed run keeps its checkpoint's tokenizer. Saved
    to a new run's directory; a resumed run's copy is never rewritten."""
    tokenizer = load_or_train(spec.cfg, sample, log, resume_tokenizer_path(spec),
                              storage.child(prepared, TOKENIZER_FILE) if prepared else None)
    saved = storage.child(spec.run_dir, TOKENIZER_FILE)
    if not (spec.in_place and storage.is_file(saved)):
        tokenizer.save(saved)
    return tokenizer


# ---------------------------------------------------------------------------------------
# `model.init_from: RUN_OR_CHECKPOINT`: fine-tuning starts from a raylm run's weights.

SHAPE_EXEMPT = ("init_from", "max_seq_len", "init_std")
"""ModelConfig fields a run may change from the run it starts from: the rest are the weights'
shape and the function they compute."""


def init_checkpoint(init_from: str, verify: bool = True) -> str:
    """The checkpoint `model.init_from` names: itself, or a run directory's newest checkpoint
    that passes its checksums (`checkpoint.newest_good`); CheckpointError of one line if none.
    `verify=False` (the driver's early check) only resolves, as `run.resume_from` does."""
    try:
        run_dir, checkpoint = ckpt.resolve_resume(init_from)
    except CheckpointError as e:
        raise e.said_of(key="model.init_from", value=init_from) from None  # said of run.resume_from there
    if run_dir is not None and verify:
        found = ckpt.newest_good(ckpt.list_checkpoints(run_dir), log=lambda line: None)
        if found is None:
            raise CheckpointError(f"model.init_from={init_from}: no checkpoint passes its checksums")
        checkpoint = found[0]
    elif verify and (reason := ckpt.verify_checkpoint(checkpoint)) is not None:
        raise CheckpointError(f"model.init_from={init_from}: {reason}")
    return str(checkpoint)


def init_run_config(checkpoint: str) -> Config:
    """The config a checkpoint was trained with (its own config.yaml, else its run's)."""
    for path in (storage.child(checkpoint, CONFIG_FILE), storage.child(storage.parent_of(checkpoint), CONFIG_FILE)):
        if storage.is_file(path):
            try:
                return config_from_dict(yaml.safe_load(storage.read_bytes(path).decode()) or {})
            except (yaml.YAMLError, ConfigError) as e:
                raise ConfigError(f"model.init_from: {path} is not a raylm config ({str(e).splitlines()[0]})") from None
    raise ConfigError(f"model.init_from: no {CONFIG_FILE} in {checkpoint} or its run directory")


def check_init_run(cfg: Config) -> str:
    """Before anything is written: `model.init_from` names a usable raylm checkpoint whose model
    has this config's shape (else one line naming the first differing key and both values).
    Returns the checkpoint."""
    checkpoint = init_checkpoint(cfg.model.init_from, verify=False)
    source = init_run_config(checkpoint).model
    for f in dataclasses.fields(source):
        if f.name in SHAPE_EXEMPT:
            continue
        mine, theirs = getattr(cfg.model, f.name), getattr(source, f.name)
        if mine != theirs:
            raise ConfigError(f"model.{f.name}={mine!r}: model.init_from={cfg.model.init_from} was trained with "
                              f"model.{f.name}={theirs!r}; use its model settings (model.preset and the keys it "
                              "overrides) to start from its weights")
    return checkpoint


# ---------------------------------------------------------------------------------------
# What a resume must match.


@dataclass(frozen=True)
class RunFacts:
    """Recorded in every checkpoint; a resumed run compares its own with them."""

    tokenizer_sha256: str
    seq_len: int
    data_fingerprint: str
    """A hash of the corpus files (path, size) and the settings that decide the sequences."""
    data_files: dict | None = None
    """The corpus file by file (`raylm.data.plan.corpus_files`: size, mtime, a content hash of
    small local files) and the data settings, so that a resume says which files changed; None
    for prepared data (its manifest's fingerprint is the data_fingerprint)."""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


_FACT_NAMES = {"tokenizer_sha256": ("tokenizer", "tokenizer sha256"), "seq_len": ("seq_len", "data.seq_len"),
               "data_fingerprint": ("data", "corpus fingerprint")}


def check_resume(checkpoint: str | Path, saved: dict | None, facts: RunFacts, allowed: Iterable[str]) -> None:
    """One line naming the first fact that differs from the checkpoint's, unless allowed. The
    corpus is compared file by file where both sides recorded it (a file edited in place at the
    same size is a change; the same small files with other modification times, or the default
    corpus under another install prefix, are not), else by the fingerprint alone (checkpoints
    from before files were recorded, prepared data)."""
    if not saved:
        return  # a checkpoint from before facts were recorded: nothing to compare
    allowed = set(allowed)
    for key, (option, label) in _FACT_NAMES.items():
        then, now = saved.get(key), getattr(facts, key)
        if option in allowed or then is None:
            continue
        if key == "data_fingerprint" and saved.get("data_files") and facts.data_files:
            change = corpus_changes(saved["data_files"], facts.data_files)
            if change:
                raise CheckpointError(
                    f"run.resume_from: {checkpoint} was trained on other data (corpus fingerprint differs: {change}); "
                    f"resume with the same data, or allow it with run.resume_changes=[data]")
            continue
        if then == now:
            continue
        show = (lambda v: str(v)[:12]) if key != "seq_len" else str
        raise CheckpointError(
            f"run.resume_from: {checkpoint} was trained with {label} {show(then)}, this run has {show(now)}; "
            f"resume with the same {option}, or allow it with run.resume_changes=[{option}]")
