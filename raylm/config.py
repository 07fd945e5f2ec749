"""Typed run configuration: nested dataclasses loaded from YAML plus dotted overrides.

One loader (`load_config`) and one override syntax (`section.key=value`, the value read as a
YAML scalar or flow collection) serve the CLI, Ray Train workers and Tune sweeps alike.
Every key is checked against the dataclass fields: an unknown key, a wrong type or an
impossible value raises `ConfigError` with one line naming the key, the value and what is
valid. This module imports neither torch nor Ray beyond the model's config class.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from raylm import storage
from raylm.errors import ConfigError
from raylm.model import ModelConfig

STDLIB_CORPUS = "python-stdlib"
"""Source path naming the default corpus: the running interpreter's standard library."""


@dataclass
class TokenizerConfig:
    path: str | None = None
    """An existing sentencepiece `.model` file; None trains one from the corpus."""
    model_type: Literal["bpe", "unigram"] = "bpe"
    """Sentencepiece algorithm."""
    byte_fallback: bool = True
    """Encode characters outside the vocabulary as bytes instead of <unk>."""
    character_coverage: float = 0.9995
    """Fraction of characters covered by single-character pieces."""
    sample_docs: int = 20000
    """Documents sampled (seeded) from the training split to train the tokenizer."""
    sample_bytes: int = 4_000_000
    """Upper bound on the bytes of text handed to the sentencepiece trainer."""
    max_piece_length: int = 16
    """Longest piece, in characters."""
    seed: int = 0
    """Seed of the document sample."""

    def vocab_size_ok(self, vocab_size: int) -> bool:
        # An existing tokenizer brings its own vocabulary (checked when it is loaded).
        return self.path is not None or not self.byte_fallback or vocab_size >= 262


@dataclass
class SourceConfig:
    path: str = STDLIB_CORPUS
    """A file, directory, glob or URI (s3://, gs://, file://); `python-stdlib` is the default corpus."""
    format: Literal["text", "lines", "jsonl", "parquet", "pairs", "chat"] = "text"
    """text: one document per file; lines: one per line; jsonl: `field` of each record; parquet: `column`;
    pairs: JSONL records of `prompt_field` and `completion_field`, loss on the completion only;
    chat: JSONL records whose `messages_field` lists {role, content}, rendered by `template`,
    loss on the assistant turns only (`docs/data.md`, "Supervised formats")."""
    field: str = "text"
    """JSONL key holding the document text."""
    column: str = "text"
    """Parquet column holding the document text."""
    prompt_field: str = "prompt"
    """pairs: JSONL key of the prompt (attended to, not trained on)."""
    completion_field: str = "completion"
    """pairs: JSONL key of the completion (the trained tokens)."""
    messages_field: str = "messages"
    """chat: JSONL key of the list of {"role": system|user|assistant, "content": str} messages."""
    template: Literal["chatml", "llama2"] = "chatml"
    """chat: the template rendering a conversation (`raylm.data.chat`); `raylm export` carries it."""
    weight: float = 1.0
    """Mixture weight: this source's share of training tokens is weight / sum(weights)."""
    max_bytes: int | None = None
    """Read at most this many bytes of the source (files in sorted order); None reads all."""


@dataclass
class DataConfig:
    sources: list[SourceConfig] = field(default_factory=lambda: [SourceConfig()])
    """Corpora to train on; see SourceConfig."""
    seq_len: int = 256
    """Tokens per packed training sequence (each row holds seq_len + 1 for shifted targets)."""
    add_bos: bool = True
    """Start every document with BOS; every document always ends with EOS."""
    val_fraction: float = 0.02
    """Share of documents held out for validation, chosen by a stable hash of the document id."""
    seed: int = 0
    """Seed of the sequence order (file order per pass, row permutation per epoch of prepared data)."""
    shuffle_files: bool = True
    """Read training files in a seeded random order, a new one each pass (documents within a file keep their order)."""
    on_error: Literal["raise", "skip"] = "raise"
    """Bad input (malformed record, invalid UTF-8, binary or empty file): stop, or skip and count."""
    prepared_path: str | None = None
    """Directory of tokenised, packed shards written by `raylm prepare`; None tokenises on the fly."""
    tokenize_actors: int = 2
    """Size of the Ray Data actor pool that runs the tokenizer."""
    tokenize_cpus: float = 0.5
    """CPUs reserved per tokenizer actor (fractional so small machines keep room for reading)."""
    tokenize_batch_docs: int | None = None
    """Documents per tokenizer batch; null: about 1 MiB of text per batch, estimated from the files."""
    read_cpus: float = 0.2
    """CPUs reserved per Ray Data read-and-parse task (fractional: reading is mostly I/O)."""
    read_tasks: int = 2
    """Read-and-parse tasks running at once (raise it for object stores with high latency)."""
    max_document_bytes: int = 16 * 2**20
    """Longest document (a file, line, record or cell) accepted; a longer one is bad input."""
    stream_passes: int | None = None
    """Passes over the corpus the training stream holds; None derives enough for train.max_steps.
    A run whose stream ends first checkpoints and stops with one line saying how to continue."""
    document_mask: bool | None = None
    """Each packed document attends only to itself (block-diagonal causal mask, RoPE positions
    restarting per document); None: on exactly when a source is `pairs` or `chat`."""

    @property
    def supervised(self) -> bool:
        """A source has a loss mask (pairs, chat): the loss is normalised by trained tokens."""
        return any(src.format in ("pairs", "chat") for src in self.sources)

    @property
    def documents_masked(self) -> bool:
        """Whether attention is masked per document (`document_mask`, resolved)."""
        return self.supervised if self.document_mask is None else self.document_mask


@dataclass
class TrainConfig:
    max_steps: int = 200
    """Optimizer steps."""
    global_batch_tokens: int = 8192
    """Tokens per optimizer step over all workers; gradient accumulation is derived from it."""
    micro_batch_size: int = 8
    """Sequences per worker per forward/backward."""
    eval_every: int = 50
    """Evaluate held-out loss every N steps (and at the end); 0 only at the end."""
    eval_batches: int = 8
    """Micro-batches of held-out data per worker per evaluation at the largest world size: an
    evaluation reads eval_batches x micro_batch_size x (max) workers rows, the same at every size."""
    log_every: int = 10
    """Print a progress line every N steps (metrics.jsonl gets every step)."""
    checkpoint_every: int = 0
    """Save a checkpoint every N steps; 0 saves only at the end."""
    checkpoint_async: bool | Literal["auto"] = "auto"
    """Write checkpoints in the background (torch DCP's async_save) while training goes on: the
    state is copied to host memory (counted by `raylm plan`) and written by a thread; the marker
    follows once every rank's files are durable. auto: true on GPU, false on CPU (where the copy
    and the writing take the cores training uses)."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this; 0 disables clipping."""
    seed: int = 1234
    """Seed of weight initialisation and sampling."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """auto: cuda when available (and scaling.use_gpu on Ray), else cpu."""
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    """auto: bf16 on GPU, fp32 on CPU."""
    activation_checkpointing: str = "none"
    """none, full, or selective:N (checkpoint every N-th block)."""
    grad_sync: Literal["every", "last"] = "every"
    """When FSDP2 reduce-scatters gradients in a step with gradient accumulation: every: after
    each micro-batch, so a worker holds only its 1/workers shard of the gradient (the default;
    gradient memory does not grow with accumulation); last: after the last micro-batch only,
    each worker accumulating the whole unsharded gradient (one reduction per step instead of
    one per micro-batch, for small models where communication costs more than memory). Same
    losses either way; one worker, or one micro-batch per step, is the same in both
    (docs/plan.md)."""
    compile: bool = False
    """torch.compile each transformer block."""
    peak_flops: float | None = None
    """Peak FLOP/s of one device for MFU; None uses the bf16 peak of the detected GPU kind."""
    preemption_check_every: int = 5
    """On Ray, every N steps all workers ask whether a node is being preempted (a drain with a
    deadline, as for a reclaimed spot instance); if one is, they checkpoint at once and Ray
    restarts on the remaining nodes from there. 0 disables the check."""
    max_nonfinite_steps: int = 5
    """A step whose loss or gradient is not finite is skipped (no update) and counted; this
    many in a row stop the run with one line (its checkpoints so far are kept)."""


@dataclass
class OptimizerConfig:
    lr: float = 1e-3
    """Peak learning rate. Under model.parametrization=mup, that of the base width: hidden
    matrices get lr x base fan-in / fan-in (docs/mup.md)."""
    min_lr_ratio: float = 0.1
    """The schedule decays to lr * min_lr_ratio."""
    warmup_steps: int = 20
    """Linear warmup from 0 to lr."""
    schedule: Literal["cosine", "wsd", "constant"] = "cosine"
    """After warmup: cosine decay, warmup-stable-decay (last `decay_fraction` of steps), or constant."""
    decay_fraction: float = 0.2
    """For wsd: fraction of steps spent in the final linear decay."""
    weight_decay: float = 0.1
    """AdamW decay on matrices; norms, and embeddings, are not decayed. Under µP a hidden group's
    value is divided by its lr multiplier, so the decay per step (lr x weight_decay) is the same
    at every width."""
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8


@dataclass
class ScalingConfig:
    num_workers: int | list[int] = 1
    """Ray Train workers (one per GPU on a GPU cluster), or [min, max] for an elastic run: it
    starts once min fit, grows toward max as nodes join and goes on smaller when they leave
    (each resize restarts the workers from the latest checkpoint; the global batch is exact
    at every size)."""
    resize_check_s: float = 60.0
    """Elastic runs: how often Ray Train looks for room to grow (elastic_resize_monitor_interval_s)."""
    use_gpu: bool = False
    """Give each worker one GPU (nccl); otherwise CPU workers (gloo)."""
    cpus_per_worker: float = 1.0
    """CPUs reserved per worker."""
    resources_per_worker: dict[str, float] = field(default_factory=dict)
    """Extra Ray resources per worker, e.g. {"trainer": 1}."""

    @property
    def min_workers(self) -> int:
        return self.num_workers if isinstance(self.num_workers, int) else self.num_workers[0]

    @property
    def max_workers(self) -> int:
        return self.num_workers if isinstance(self.num_workers, int) else self.num_workers[-1]

    @property
    def elastic(self) -> bool:
        return self.min_workers != self.max_workers


@dataclass
class RunConfig:
    name: str | None = None
    """Run name; None makes a unique one from the config name and the time."""
    output_dir: str = "runs"
    """Where run directories (config, metrics, checkpoints) are written; may be a shared path."""
    resume_from: str | None = None
    """A run directory (continued in place) or a checkpoint (a new run starts from it); None starts fresh."""
    resume_changes: list[Literal["tokenizer", "seq_len", "data"]] = field(default_factory=list)
    """What a resumed run may change from its checkpoint: a different tokenizer, data.seq_len or
    corpus (sources and their files) is an error unless listed here."""
    keep_checkpoints: int = 3
    """Keep the last K checkpoints."""
    max_failures: int = 3
    """Restarts of the workers from the latest checkpoint after a failure (a killed worker, a lost
    node) before the run fails; -1: no limit. Preemptions are counted apart (max_preemptions)."""
    max_preemptions: int = -1
    """Restarts after a preemption notice (a drained or reclaimed spot node); -1: no limit."""
    sample_prompts: list[str] = field(
        default_factory=lambda: ["def fibonacci(n):", "import os\n", "class Stack:\n    def push(self"]
    )
    """Prompts continued after training to show what the model learned."""
    sample_tokens: int = 64
    """Tokens generated per prompt."""
    temperature: float = 0.8
    """Sampling temperature; 0 is greedy."""
    top_k: int = 40
    """Sample from the k most likely tokens; 0 disables."""
    tracking: list[Literal["mlflow", "wandb"]] = field(default_factory=list)
    """Experiment trackers that get a copy of the metrics, the resolved config and the final files,
    beside metrics.jsonl and TensorBoard: [], [mlflow], [wandb] or [mlflow, wandb]
    (pip install 'raylm[track]'; docs/tracking.md)."""
    tracking_group: str | None = None
    """Set by raylm tune to the sweep's name: the trials' tracking runs are grouped under it."""


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    run: RunConfig = field(default_factory=RunConfig)
    config_name: str = "raylm"
    """Stem of the YAML file the config came from (run names start with it)."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_yaml())

    @property
    def sequences_per_step(self) -> int:
        return self.train.global_batch_tokens // self.data.seq_len

    @property
    def eval_sequences(self) -> int:
        """Held-out sequences one evaluation reads, split over the workers like a step."""
        return self.train.eval_batches * self.train.micro_batch_size * self.scaling.max_workers

    def grad_accum_steps(self, world_size: int) -> int:
        """Micro-batches per worker per optimizer step. The global batch is the same at every
        world size: when the workers' micro-batches do not divide it, ranks take uneven shares
        (`raylm.data.order.step_slots`)."""
        return rounds_per_step(self.sequences_per_step, world_size, self.train.micro_batch_size)


def rounds_per_step(step_sequences: int, world_size: int, micro_batch_size: int) -> int:
    """Micro-batches every rank runs per optimizer step (gradient accumulation); the split of a
    step over the ranks is `raylm.data.order.step_slots`."""
    return max(1, -(-step_sequences // (world_size * micro_batch_size)))


# ---------------------------------------------------------------------------------------
# Loading: YAML file -> raw dict -> overrides applied -> dataclasses built and checked.


def read_yaml(path: str | Path, what: str) -> Any:
    """A YAML file's content, local or on object storage (`raylm train s3://.../best.yaml`); one
    line naming the file (and line) when it is missing, unreachable or not YAML."""
    with storage.errors(path, None, ConfigError):
        if not storage.is_file(path):
            raise ConfigError(f"{path}: {what} not found")
        text = storage.read_bytes(path)
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}{where}: not valid YAML ({getattr(e, 'problem', e)})") from None


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load `path` (YAML; None = built-in defaults), apply `key.sub=value` overrides, validate."""
    raw: dict[str, Any] = {}
    name = "raylm"
    if path is not None:
        path = storage.location(path)
        loaded = read_yaml(path, "config file")
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(loaded).__name__}")
        raw = loaded or {}
        name = Path(storage.name_of(path)).stem
    raw.setdefault("config_name", name)
    for item in overrides:
        apply_override(raw, item)
    return config_from_dict(raw)


def parse_override(item: str) -> tuple[list[str], Any]:
    key, sep, value = item.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {item!r}: expected section.key=value, e.g. train.max_steps=50")
    try:
        parsed = yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError:
        parsed = value  # not YAML: take the text as it is (e.g. a prompt with a colon)
    return key.split("."), parsed


def apply_override(raw: dict[str, Any], item: str) -> None:
    """Set a dotted key (list items by index: data.sources.0.path=...) in the raw config dict."""
    parts, value = parse_override(item)
    node: Any = raw
    for i, part in enumerate(parts[:-1]):
        node = _child(node, part, ".".join(parts[: i + 1]), create=True)
    last = parts[-1]
    if isinstance(node, list):
        node[_index(node, last, ".".join(parts))] = value
    else:
        node[last] = value


def _child(node: Any, part: str, key: str, create: bool) -> Any:
    if isinstance(node, list):
        return node[_index(node, part, key)]
    if not isinstance(node, dict):
        raise ConfigError(f"{key}: cannot set a sub-key of a {type(node).__name__} value")
    if part not in node or node[part] is None:
        if key == "data.sources":  # overriding data.sources.0.x starts from the default list
            node[part] = [dataclasses.asdict(s) for s in DataConfig().sources]
        else:
            node[part] = {}
    return node[part]


def _index(node: list, part: str, key: str) -> int:
    if not part.isdigit() or int(part) >= len(node):
        raise ConfigError(f"{key}: list index {part!r} out of range (the list has {len(node)} item(s))")
    return int(part)


def config_from_dict(raw: dict[str, Any]) -> Config:
    raw = dict(raw)
    model_raw = raw.pop("model", None) or {}
    if not isinstance(model_raw, dict):
        raise ConfigError(f"model: expected a mapping, got {model_raw!r}")
    model_raw = dict(model_raw)
    preset = model_raw.pop("preset", None)
    if preset is not None:
        try:
            base = ModelConfig.preset(str(preset))
        except ValueError as e:
            raise ConfigError(str(e)) from None
        model_raw = {**dataclasses.asdict(base), **model_raw}
    cfg = _build(Config, raw, "")
    cfg.model = _build(ModelConfig, model_raw, "model")
    if cfg.model.parametrization == "mup" and cfg.model.mup_base_dim is None:
        # Pinned: a copy of this config at another width (a larger preset) keeps µP's base.
        cfg.model.mup_base_dim = cfg.model.dim
    validate(cfg)
    return cfg


def _build(cls: type, raw: Any, prefix: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping of keys, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in raw.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            raise ConfigError(f"{dotted}: unknown key; valid keys here: {', '.join(sorted(names))}")
        if cls is Config and key == "model":
            continue
        kwargs[key] = _coerce(hints[key], value, dotted)
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        errors = []
        for option in options:
            try:
                return _coerce(option, value, key)
            except ConfigError as e:
                errors.append(e)
        raise errors[0]
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}={value!r}: must be one of {', '.join(map(str, args))}")
        return value
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}={value!r}: expected a list")
        return [_coerce(args[0], v, f"{key}.{i}") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}={value!r}: expected a mapping")
        return {str(k): _coerce(args[1], v, f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}={value!r}: expected true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)  # 1e6 in YAML is a float
            raise ConfigError(f"{key}={value!r}: expected an integer")
        return value
    if tp is float:
        if isinstance(value, str):
            try:  # PyYAML reads 3e-4 (no dot) as a string
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}={value!r}: expected a number")
        return float(value)
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{key}={value!r}: expected a string")
        return str(value)
    if tp is Any:
        return value
    raise TypeError(f"config field {key} has unsupported type {tp}")  # a bug in this module


# ---------------------------------------------------------------------------------------
# Validation of values: every check names the key, the value and what is valid.


def _require(ok: bool, key: str, value: Any, valid: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r}: {valid}")


def validate(cfg: Config) -> None:
    _check_numbers(cfg, lower=False)  # nan, inf and absurd sizes first: later checks compute with them
    try:
        cfg.model.validate()
    except ValueError as e:
        raise ConfigError(str(e)) from None
    t, o, d, s, r = cfg.train, cfg.optimizer, cfg.data, cfg.scaling, cfg.run

    for key, value in [
        ("data.seq_len", d.seq_len),
        ("data.tokenize_actors", d.tokenize_actors),
        ("data.read_tasks", d.read_tasks),
        ("train.max_steps", t.max_steps),
        ("train.global_batch_tokens", t.global_batch_tokens),
        ("train.micro_batch_size", t.micro_batch_size),
        ("train.eval_batches", t.eval_batches),
        ("train.log_every", t.log_every),
        ("run.keep_checkpoints", r.keep_checkpoints),
        ("tokenizer.sample_docs", cfg.tokenizer.sample_docs),
        ("tokenizer.sample_bytes", cfg.tokenizer.sample_bytes),
        ("tokenizer.max_piece_length", cfg.tokenizer.max_piece_length),
    ]:
        _require(value > 0, key, value, "must be a positive integer")
    for key, value in [
        ("train.eval_every", t.eval_every),
        ("train.checkpoint_every", t.checkpoint_every),
        ("optimizer.warmup_steps", o.warmup_steps),
        ("train.preemption_check_every", t.preemption_check_every),
        ("run.sample_tokens", r.sample_tokens),
        ("run.top_k", r.top_k),
    ]:
        _require(value >= 0, key, value, "must be >= 0")

    _require(len(set(r.tracking)) == len(r.tracking), "run.tracking", r.tracking,
             "must name each tracker once: [], [mlflow], [wandb] or [mlflow, wandb]")
    _require(o.lr > 0, "optimizer.lr", o.lr, "must be > 0")
    _require(0 <= o.min_lr_ratio <= 1, "optimizer.min_lr_ratio", o.min_lr_ratio, "must be in [0, 1]")
    _require(0 < o.decay_fraction <= 1, "optimizer.decay_fraction", o.decay_fraction, "must be in (0, 1]")
    _require(o.weight_decay >= 0, "optimizer.weight_decay", o.weight_decay, "must be >= 0")
    _require(0 <= o.beta1 < 1, "optimizer.beta1", o.beta1, "must be in [0, 1)")
    _require(0 <= o.beta2 < 1, "optimizer.beta2", o.beta2, "must be in [0, 1)")
    _require(o.eps > 0, "optimizer.eps", o.eps, "must be > 0")
    _require(t.grad_clip >= 0, "train.grad_clip", t.grad_clip, "must be >= 0 (0 disables clipping)")
    _require(t.peak_flops is None or t.peak_flops > 0, "train.peak_flops", t.peak_flops, "must be > 0 or null")
    ac = t.activation_checkpointing
    _require(
        ac in ("none", "full") or (ac.startswith("selective:") and ac[10:].isdigit() and int(ac[10:]) > 0),
        "train.activation_checkpointing",
        ac,
        "must be none, full or selective:N with N >= 1",
    )
    _require(0.98 <= cfg.tokenizer.character_coverage <= 1, "tokenizer.character_coverage",
             cfg.tokenizer.character_coverage, "must be in [0.98, 1] (sentencepiece refuses less)")
    _require(0 <= d.val_fraction < 1, "data.val_fraction", d.val_fraction, "must be in [0, 1)")
    _require(d.tokenize_cpus > 0, "data.tokenize_cpus", d.tokenize_cpus, "must be > 0")
    _require(d.read_cpus > 0, "data.read_cpus", d.read_cpus, "must be > 0")
    _require(d.tokenize_batch_docs is None or d.tokenize_batch_docs > 0, "data.tokenize_batch_docs",
             d.tokenize_batch_docs, "must be a positive integer or null")
    _require(d.max_document_bytes > 0, "data.max_document_bytes", d.max_document_bytes, "must be a positive integer")
    _require(d.stream_passes is None or d.stream_passes > 0, "data.stream_passes", d.stream_passes,
             "must be a positive integer or null")
    _require(len(d.sources) > 0, "data.sources", d.sources, "must name at least one source")
    if d.supervised:
        _require(d.add_bos, "data.add_bos", d.add_bos, "must be true with pairs or chat sources (a row's "
                 "BOS tells a document's start from the continuation of one cut by the row before)")
        _require(d.prepared_path is None, "data.prepared_path", d.prepared_path, "prepared shards do not "
                 "carry pairs or chat sources yet; leave it unset to stream them")
    for i, src in enumerate(d.sources):
        _require(bool(src.path), f"data.sources.{i}.path", src.path, "must be a path or URI")
        _require(src.weight > 0, f"data.sources.{i}.weight", src.weight, "must be > 0")
        _require(src.max_bytes is None or src.max_bytes > 0, f"data.sources.{i}.max_bytes", src.max_bytes,
                 "must be > 0 or null")
    _require(
        d.seq_len <= cfg.model.max_seq_len,
        "data.seq_len",
        d.seq_len,
        f"must be <= model.max_seq_len={cfg.model.max_seq_len}",
    )
    _require(
        t.global_batch_tokens % d.seq_len == 0,
        "train.global_batch_tokens",
        t.global_batch_tokens,
        f"must be a multiple of data.seq_len={d.seq_len}",
    )
    _check_workers(cfg)
    _check_paths(cfg)
    _require(s.resize_check_s > 0, "scaling.resize_check_s", s.resize_check_s, "must be > 0 seconds")
    for key, value in [("run.max_failures", r.max_failures), ("run.max_preemptions", r.max_preemptions)]:
        _require(value >= -1, key, value, "must be >= 0, or -1 for no limit")
    _require(s.cpus_per_worker >= 0, "scaling.cpus_per_worker", s.cpus_per_worker, "must be >= 0")
    _require(r.temperature >= 0, "run.temperature", r.temperature, "must be >= 0 (0 is greedy)")
    _require(cfg.tokenizer.vocab_size_ok(cfg.model.vocab_size), "model.vocab_size", cfg.model.vocab_size,
             "must be >= 262 (sentencepiece needs room for 256 byte pieces, 4 special tokens, newline and tab)")
    if r.name is not None:
        _require(is_plain_name(r.name), "run.name", r.name, NAME_RULE)
    _require(is_plain_name(cfg.config_name), "config_name", cfg.config_name, NAME_RULE)
    _require(t.max_nonfinite_steps > 0, "train.max_nonfinite_steps", t.max_nonfinite_steps,
             "must be a positive integer")
    init_from = cfg.model.init_from
    _require(init_from != "hf:", "model.init_from", init_from,
             "must be empty (random init), hf:DIR (a Hugging Face Llama checkpoint directory) or a raylm run "
             "or checkpoint directory")
    _check_numbers(cfg, lower=True)


# Every numeric setting and its finite range, both ends included: `validate` refuses nan, inf and
# anything outside (one line naming the key) before anything starts. The bounds are generous
# (a 70B model, a 1T-token run and a thousand-node cluster fit), tighter rules with their own
# messages (positive, below 1, a multiple of seq_len...) are in `validate`. `*` stands for a list
# index or a mapping key. A new numeric field needs a row here (tests/test_input_limits.py checks).
NUMERIC_RANGES: dict[str, tuple[float, float]] = {
    "model.dim": (1, 2**16),
    "model.n_layers": (1, 1024),
    "model.n_heads": (1, 1024),
    "model.n_kv_heads": (1, 1024),
    "model.vocab_size": (1, 2**22),
    "model.multiple_of": (1, 2**16),
    "model.ffn_dim_multiplier": (0.01, 100),
    "model.norm_eps": (1e-12, 1),
    "model.rope_theta": (1, 1e9),
    "model.max_seq_len": (1, 2**20),
    "model.init_std": (1e-6, 1),
    "model.mup_base_dim": (1, 2**16),
    "model.mup_base_head_dim": (1, 2**16),
    "tokenizer.character_coverage": (0.98, 1),
    "tokenizer.sample_docs": (1, 10**8),
    "tokenizer.sample_bytes": (1, 2**32),
    "tokenizer.max_piece_length": (1, 512),
    "tokenizer.seed": (0, 2**32 - 1),
    "data.sources.*.weight": (1e-9, 1e15),  # relative; weights equal to bytes fit (the plan bounds the repeats)
    "data.sources.*.max_bytes": (1, 2**50),
    "data.seq_len": (1, 2**20),
    "data.val_fraction": (0, 0.99),
    "data.seed": (0, 2**32 - 1),
    "data.tokenize_actors": (1, 1024),
    "data.tokenize_cpus": (0.001, 1024),
    "data.tokenize_batch_docs": (1, 10**6),
    "data.read_cpus": (0.001, 1024),
    "data.read_tasks": (1, 1024),
    "data.max_document_bytes": (1, 2**30),
    "data.stream_passes": (1, 10**6),
    "train.max_steps": (1, 10**9),
    "train.global_batch_tokens": (1, 2**30),
    "train.micro_batch_size": (1, 2**16),
    "train.eval_every": (0, 10**9),
    "train.eval_batches": (1, 10**6),
    "train.log_every": (1, 10**9),
    "train.checkpoint_every": (0, 10**9),
    "train.grad_clip": (0, 1e6),
    "train.seed": (0, 2**32 - 1),
    "train.peak_flops": (1e6, 1e18),
    "train.preemption_check_every": (0, 10**9),
    "train.max_nonfinite_steps": (1, 10**6),
    "optimizer.lr": (1e-12, 10),
    "optimizer.min_lr_ratio": (0, 1),
    "optimizer.warmup_steps": (0, 10**9),
    "optimizer.decay_fraction": (0, 1),
    "optimizer.weight_decay": (0, 10),
    "optimizer.beta1": (0, 1),
    "optimizer.beta2": (0, 1),
    "optimizer.eps": (1e-30, 1),
    "scaling.num_workers": (1, 10**5),
    "scaling.num_workers.*": (1, 10**5),
    "scaling.resize_check_s": (0.001, 86400),
    "scaling.cpus_per_worker": (0, 1024),
    "scaling.resources_per_worker.*": (0, 1e6),
    "run.keep_checkpoints": (1, 10**6),
    "run.max_failures": (-1, 10**6),
    "run.max_preemptions": (-1, 10**6),
    "run.sample_tokens": (0, 2**20),
    "run.temperature": (0, 100),
    "run.top_k": (0, 2**22),
}


def numeric_settings(cfg: Config) -> list[tuple[str, str, Any]]:
    """(dotted key, its NUMERIC_RANGES row, value) for every number the config holds."""
    out: list[tuple[str, str, Any]] = []

    def walk(obj: Any, key: str, row: str) -> None:
        if dataclasses.is_dataclass(obj):
            for f in dataclasses.fields(obj):
                walk(getattr(obj, f.name), f"{key}.{f.name}" if key else f.name,
                     f"{row}.{f.name}" if row else f.name)
        elif isinstance(obj, list):
            for i, item in enumerate(obj):
                walk(item, f"{key}.{i}", f"{row}.*")
        elif isinstance(obj, dict):
            for k, item in obj.items():
                walk(item, f"{key}.{k}", f"{row}.*")
        elif isinstance(obj, (int, float)) and not isinstance(obj, bool):
            out.append((key, row, obj))

    walk(cfg, "", "")
    return out


def _check_numbers(cfg: Config, lower: bool) -> None:
    """Every number finite and within its NUMERIC_RANGES row: first (lower=False) the upper ends,
    before anything computes with the values, then (lower=True, after the checks with their own
    wording) the lower ones."""
    for key, row, value in numeric_settings(cfg):
        if row not in NUMERIC_RANGES:
            raise TypeError(f"config field {row} has no row in NUMERIC_RANGES")  # a bug in this module
        lo, hi = NUMERIC_RANGES[row]
        valid = f"must be a finite number in [{_number(lo)}, {_number(hi)}]"
        _require(not isinstance(value, float) or math.isfinite(value), key, value, valid)
        _require(value <= hi and (not lower or value >= lo), key, value, valid)


def _number(x: float) -> str:
    return str(x) if isinstance(x, int) else f"{x:g}"


def _check_paths(cfg: Config) -> None:
    """Every path-valued key is a local path or a URI of a scheme raylm reads (`file://` too) or
    writes (s3://, gs://); any other `scheme://` is refused, never taken for a local folder."""
    reads, writes = storage.READ_SCHEMES, storage.SCHEMES
    for i, src in enumerate(cfg.data.sources):
        storage.check_scheme(src.path, f"data.sources.{i}.path", reads)
    storage.check_scheme(cfg.tokenizer.path, "tokenizer.path", reads)
    storage.check_scheme(cfg.data.prepared_path, "data.prepared_path", writes)
    storage.check_scheme(cfg.run.output_dir, "run.output_dir", writes)
    storage.check_scheme(cfg.run.resume_from, "run.resume_from", writes)
    init_from = cfg.model.init_from
    if init_from.startswith("hf:"):
        _require(not storage.is_uri(init_from.removeprefix("hf:")), "model.init_from", init_from,
                 "hf:DIR must name a local directory (download the checkpoint first)")
    else:  # a raylm run or checkpoint, local or on object storage
        storage.check_scheme(init_from or None, "model.init_from", writes)


def _check_workers(cfg: Config) -> None:
    """One worker count or [min, max]; every size in the range must get a sequence per step."""
    n = cfg.scaling.num_workers
    if isinstance(n, list):
        _require(len(n) == 2 and 1 <= n[0] <= n[1], "scaling.num_workers", n,
                 "must be a positive integer or [min, max] with 1 <= min <= max")
    else:
        _require(n > 0, "scaling.num_workers", n, "must be a positive integer or [min, max]")
    G = cfg.sequences_per_step
    _require(cfg.scaling.max_workers <= G, "scaling.num_workers", n,
             f"at most {G} worker(s): a step holds {G} sequences (train.global_batch_tokens="
             f"{cfg.train.global_batch_tokens} / data.seq_len={cfg.data.seq_len}) and each worker needs one")


NAME_RULE = "must be a plain name (letters, digits, '.', '_', '-'; not starting with '.')"


def is_plain_name(name: str) -> bool:
    """Names that become one directory level: no separators, no '..', nothing hidden."""
    return bool(re.fullmatch(r"[A-Za-z0-9_\-][A-Za-z0-9._\-]{0,199}", name))

