"""The Ray Data corpus pipeline: read, tokenise on a CPU actor pool, pack, index, stream to workers.

    read_binary_files + parse (tasks, data.read_cpus each)      -> {"doc_id", "text"}
    tokenise + frame   (actor pool: data.tokenize_actors x data.tokenize_cpus; one tokenizer
                        per actor, one sentencepiece thread each)  -> one token stream per batch
    pack + index       (one actor, PACK_CPUS)                      -> {"tokens": int32 (L+1,), "index": int64}

Order. `preserve_order=True` makes every stage hand on its output in input order, and the
single packing actor keeps the carry between batches, so the rows are exactly a sequential
pack of the documents in plan order (`raylm.data.sources`): the same rows as
`raylm.data.local` and as the prepared shards. Row k of the stream has global index k.

Streaming training. One execution of the training Dataset makes `data.stream_passes`
passes over the corpus (derived from train.max_steps when unset), so indices run
0, 1, 2, ... across passes without a gap. Ray Train splits it over the workers with
`streaming_split`, which hands rows out in arrival order, not as contiguous slices: the
trainer's `DataPosition` records them exactly (watermark + extra). On resume the packing
actor drops consumed indices (when the driver passes the position to `train_dataset`) and
every worker drops them again (`worker_batch_source`), so no sequence is trained twice and
none is skipped. The cost: the pipeline re-reads and re-tokenises from the start up to the
resume point (prepared mode seeks instantly). If an execution runs out, the worker starts
another one whose indices are offset by `pass_offset * 2**40` (a second execution only
drops what the driver-side position consumed, in index space of the first).

Validation: the held-out documents (corpus.is_validation), in a seeded order that spreads
over every source and file (`sources._validation_order`), packed the same way, cut to the
rows evaluation reads (train.eval_batches x micro_batch_size x num_workers) and materialised
on the driver; every worker reads it whole and evaluates its stride from the beginning.

Sizing on a small cluster (the rule `ray_cluster_cpus_needed` checks): Ray Train workers
hold scaling.num_workers x scaling.cpus_per_worker CPUs for the whole run; Ray Data needs
data.tokenize_actors x data.tokenize_cpus for the tokenizer pool, PACK_CPUS for the packer
and data.read_tasks x data.read_cpus for the read tasks (their Ray Data concurrency). If the
sum exceeds the cluster's CPUs the run would hang silently, so it fails first with one line.
`data_config` caps Ray Data at exactly its share. On 2 CPUs: 2 workers x 0.25 + 2 actors
x 0.5 + 0.05 + 2 reads x 0.2 = 1.95 fits.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from raylm.config import Config
from raylm.data.order import DataPosition, PackedDataset, SequenceOrder, unseen_micro_batches
from raylm.data.sources import documents_dataset, plan_files, tokenize_batch_docs
from raylm.data.stages import BadInputCounter, PackIndex, TokenizeFrame
from raylm.data.transforms import TOKEN_DTYPE
from raylm.errors import DataError
from raylm.tokenizer import Tokenizer

PACK_CPUS = 0.05
"""The packing actor only concatenates arrays; it needs a sliver of a CPU."""
FREE_CPU_WAIT_S = 60.0
"""How long a run waits for the CPUs it needs to be free before it fails with one line."""
PASS_OFFSET = 2**40
"""Index offset of each further execution of the training Dataset on a worker."""


# ---------------------------------------------------------------------------------------
# Actors and counters.


def _counter():
    import ray

    return ray.remote(num_cpus=0)(BadInputCounter).remote()


# ---------------------------------------------------------------------------------------
# Datasets (driver side; ray must be initialised).


def _ordered(ds):
    ds.context.execution_options.preserve_order = True
    return ds


ACTOR_START_TIMEOUT_S = 120
"""How long an execution waits for its tokenizer and packing actors before it reads."""


def packed_dataset(cfg: Config, tokenizer: Tokenizer, split: str, *, passes: int = 1,
                   skip: DataPosition | None = None):
    """Rows {"tokens": int32 (seq_len + 1,), "index": int64} of `split`, in global index order."""
    import ray

    d = cfg.data
    counter = _counter()
    plan = plan_files(cfg, split, passes=passes)
    docs = documents_dataset(cfg, split, counter, plan=plan)
    ds = docs.map_batches(
        TokenizeFrame,
        fn_constructor_kwargs=dict(tokenizer=tokenizer, add_bos=d.add_bos),
        compute=ray.data.ActorPoolStrategy(size=d.tokenize_actors),
        num_cpus=d.tokenize_cpus,
        batch_size=tokenize_batch_docs(cfg, plan),
        batch_format="numpy",
    )
    ds = ds.map_batches(
        PackIndex,
        fn_constructor_kwargs=dict(seq_len=d.seq_len, skip=skip.state_dict() if skip is not None else None),
        compute=ray.data.ActorPoolStrategy(size=1),
        num_cpus=PACK_CPUS,
        batch_size=None,
        batch_format="numpy",
    )
    ds = _ordered(ds)
    # Start reading only once the actors are up. Otherwise bad input in the first file fails
    # the execution while they are still pending, and Ray Data's shutdown could leave one
    # alive holding its CPUs (seen on 2 CPUs: the next run then waited for them in vain).
    ds.context.wait_for_min_actors_s = ACTOR_START_TIMEOUT_S
    ds._raylm_counter = counter  # noqa: SLF001 -- read by bad_input_report
    return ds


def bad_input_report(ds) -> dict:
    """{"documents", "skipped": {kind: n}, "examples": {kind: message}} of a dataset's executions."""
    import ray

    counter = getattr(ds, "_raylm_counter", None)
    return ray.get(counter.report.remote()) if counter is not None else {"documents": 0, "skipped": {}, "examples": {}}


def stream_passes(cfg: Config) -> int:
    """Passes over the corpus one streaming execution makes: enough for train.max_steps.

    A token is at most 4 * tokenizer.max_piece_length bytes, so this many passes hold at
    least the tokens the run trains on; passes never read are never executed.
    """
    if cfg.data.stream_passes is not None:
        return cfg.data.stream_passes
    corpus_bytes = max(1, plan_files(cfg, "train").total_bytes)
    needed_tokens = cfg.train.max_steps * cfg.train.global_batch_tokens
    return max(1, math.ceil(needed_tokens * 4 * cfg.tokenizer.max_piece_length / corpus_bytes)) + 1


def validation_rows_needed(cfg: Config) -> int:
    return cfg.train.eval_batches * cfg.train.micro_batch_size * cfg.scaling.num_workers


def train_dataset(cfg: Config, tokenizer: Tokenizer, position: DataPosition | None = None):
    """The streaming training Dataset; `position` (a resumed run's) drops consumed rows early."""
    check_cluster_fits(cfg)
    return packed_dataset(cfg, tokenizer, "train", passes=stream_passes(cfg), skip=position)


def validation_dataset(cfg: Config, tokenizer: Tokenizer):
    """The held-out rows evaluation reads, materialised; None when there are none."""
    if cfg.data.val_fraction <= 0:
        return None
    try:
        ds = packed_dataset(cfg, tokenizer, "validation")
    except DataError as e:
        if "holds no files" in str(e):
            return None
        raise
    import ray

    counter = ds._raylm_counter  # noqa: SLF001
    # Iterated to the end on the driver, then handed on as plain rows: a `.materialize()` of a
    # limited pipeline can leave its tokenizer actors alive, holding CPUs a later run needs
    # (seen as a hang on 2 CPUs); an exhausted iterator shuts its executor down.
    with data_errors():
        parts = list(_ordered(ds.limit(validation_rows_needed(cfg))).iter_batches(batch_size=None,
                                                                                 batch_format="numpy"))
    rows = [{"tokens": t, "index": int(i)} for p in parts for t, i in zip(p["tokens"], p["index"])]
    if not rows:
        return None
    ds = ray.data.from_items(rows)
    ds._raylm_counter = counter  # noqa: SLF001
    return ds


def trainer_datasets(cfg: Config, tokenizer: Tokenizer, position: DataPosition | None = None) -> dict:
    """`datasets=` for TorchTrainer: {} in prepared mode (workers read shards), else train (+ validation)."""
    if cfg.data.prepared_path:
        check_prepared(cfg, tokenizer)
        check_cluster_fits(cfg)
        return {}
    out = {"train": train_dataset(cfg, tokenizer, position)}
    val = validation_dataset(cfg, tokenizer)
    if val is not None:
        out["validation"] = val
    return out


def data_cpus(cfg: Config) -> float:
    """CPUs Ray Data needs in streaming mode (see the module docstring)."""
    d = cfg.data
    return d.tokenize_actors * d.tokenize_cpus + PACK_CPUS + d.read_tasks * d.read_cpus


def ray_cluster_cpus_needed(cfg: Config) -> float:
    """CPUs the run needs at once: training workers plus, when streaming, the data pipeline."""
    workers = cfg.scaling.num_workers * cfg.scaling.cpus_per_worker
    return workers if cfg.data.prepared_path else workers + data_cpus(cfg)


def check_cluster_fits(cfg: Config) -> None:
    """Fail with one line, before any worker starts, if the cluster cannot run workers + data."""
    import ray

    have = ray.cluster_resources().get("CPU", 0.0)
    need = ray_cluster_cpus_needed(cfg)
    if need > have + 1e-9:
        d, s = cfg.data, cfg.scaling
        data = "" if d.prepared_path else (
            f" + Ray Data {data_cpus(cfg):g} (data.tokenize_actors={d.tokenize_actors} x data.tokenize_cpus="
            f"{d.tokenize_cpus:g} + packer {PACK_CPUS:g} + data.read_tasks={d.read_tasks} x data.read_cpus="
            f"{d.read_cpus:g})")
        raise DataError(
            f"the Ray cluster has {have:g} CPUs but this run needs {need:g}: scaling.num_workers={s.num_workers} x "
            f"scaling.cpus_per_worker={s.cpus_per_worker:g}{data}; lower scaling.cpus_per_worker or data.tokenize_cpus"
        )
    _wait_for_free_cpus(need, have)


def _wait_for_free_cpus(need: float, have: float, timeout_s: float = FREE_CPU_WAIT_S) -> None:
    """Wait until `need` CPUs are free: actors of a previous run in this driver (a retry, a
    sweep) release theirs shortly after it ends, and starting before would hang silently."""
    import time

    import ray

    deadline = time.monotonic() + timeout_s
    while (free := ray.available_resources().get("CPU", 0.0)) + 1e-9 < need:
        if time.monotonic() > deadline:
            raise DataError(f"this run needs {need:g} CPUs but only {free:g} of the cluster's {have:g} have been free "
                            f"for {timeout_s:g} s (other jobs or actors hold the rest); wait, or lower "
                            f"scaling.cpus_per_worker or data.tokenize_cpus")
        time.sleep(0.5)


def data_config(cfg: Config):
    """`dataset_config=` for TorchTrainer: split only train, keep order, cap Ray Data at its share."""
    import ray.data
    from ray.train import DataConfig

    options = ray.data.ExecutionOptions(
        preserve_order=True,
        resource_limits=ray.data.ExecutionResources(cpu=data_cpus(cfg)),
    )
    return DataConfig(datasets_to_split=["train"], execution_options=options)


# ---------------------------------------------------------------------------------------
# Errors raised inside Ray tasks arrive wrapped; the driver edge unwraps them.


def unwrap_data_error(exc: BaseException) -> DataError | None:
    """The DataError behind a Ray/Train exception (task error, user code error), as one line."""
    seen, todo = set(), [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, DataError):
            message = str(e.args[0]) if e.args else str(e)
            return DataError(message.splitlines()[0] if message else message)
        todo.extend([e.__cause__, e.__context__, getattr(e, "cause", None)])
        todo.extend(getattr(e, "worker_failures", {}).values() if isinstance(getattr(e, "worker_failures", None), dict) else [])
    text = str(exc)
    marker = "raylm.errors.DataError: "
    if marker in text:
        return DataError(text.split(marker, 1)[1].splitlines()[0])
    return None


class data_errors:
    """Context manager: re-raise a wrapped DataError from Ray as the plain one-line DataError."""

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc is None or isinstance(exc, DataError) and type(exc) is DataError:
            return False
        found = unwrap_data_error(exc)
        if found is not None:
            raise found from None
        return False


def iter_rows(ds, batch_rows: int = 1024):
    """Driver-side iteration of a packed dataset as numpy batches, DataErrors unwrapped."""
    with data_errors():
        yield from ds.iter_batches(batch_size=batch_rows, batch_format="numpy", prefetch_batches=2)


# ---------------------------------------------------------------------------------------
# Tokenizer.


def get_tokenizer(cfg: Config, out_dir: str | Path) -> Tokenizer:
    """Load tokenizer.path (or the prepared data's copy), else train one on a seeded Ray Data sample.

    The sample: the training documents with the lowest seeded priority
    (`parse.sample_priority`), tokenizer.sample_docs of them, cut at tokenizer.sample_bytes;
    saved to out_dir/tokenizer.model. Requires ray to be initialised (unless loading).
    """
    t = cfg.tokenizer
    prepared = Path(cfg.data.prepared_path) / "tokenizer.model" if cfg.data.prepared_path else None
    if t.path is not None:
        tokenizer = Tokenizer.load(t.path)
    elif prepared is not None and prepared.is_file():
        tokenizer = Tokenizer.load(prepared)
    else:
        texts = sample_documents(cfg)
        tokenizer = Tokenizer.train(
            texts, cfg.model.vocab_size, model_type=t.model_type, byte_fallback=t.byte_fallback,
            character_coverage=t.character_coverage, max_piece_length=t.max_piece_length,
            max_bytes=t.sample_bytes,
        )
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise DataError(f"tokenizer {tokenizer.source} has {tokenizer.vocab_size} pieces but model.vocab_size="
                        f"{cfg.model.vocab_size}; set model.vocab_size >= {tokenizer.vocab_size}")
    tokenizer.save(Path(out_dir) / "tokenizer.model")
    return tokenizer


def sample_documents(cfg: Config) -> list[str]:
    """The tokenizer's training sample, streamed through Ray Data (each file once, no weights)."""
    import heapq

    counter = _counter()
    ds = _ordered(documents_dataset(cfg, "train", counter, mixture=False, with_priority=True))
    k = cfg.tokenizer.sample_docs
    heap: list[tuple[float, str, str]] = []  # max-heap by priority via negation
    with data_errors():
        for batch in ds.iter_batches(batch_size=256, batch_format="numpy"):
            for p, doc_id, text in zip(batch["priority"], batch["doc_id"], batch["text"]):
                item = (-float(p), str(doc_id), str(text))
                if len(heap) < k:
                    heapq.heappush(heap, item)
                elif item > heap[0]:
                    heapq.heapreplace(heap, item)
    return [text for _, _, text in sorted(heap, reverse=True)]


# ---------------------------------------------------------------------------------------
# Inside a Ray Train worker.


class StreamingTrainSource:
    """This worker's share of the streaming training Dataset, consumed indices dropped."""

    def __init__(self, name: str = "train"):
        self.name = name

    def micro_batches(self, position: DataPosition, rank: int, world_size: int, micro_batch_size: int):
        import ray.train
        import torch

        position = position if isinstance(position, DataPosition) else DataPosition()
        shard = ray.train.get_dataset_shard(self.name)
        B = micro_batch_size
        tokens_buf, index_buf, held = [], [], 0
        execution = 0
        while True:
            offset = execution * PASS_OFFSET
            delivered = 0
            for batch in shard.iter_torch_batches(batch_size=B, dtypes=torch.int64, device="cpu", prefetch_batches=4):
                tokens, index = batch["tokens"], batch["index"] + offset
                delivered += len(index)
                keep = ~position.is_consumed(index.numpy())
                if not keep.all():
                    mask = torch.from_numpy(keep)
                    tokens, index = tokens[mask], index[mask]
                if held == 0 and len(index) == B:
                    yield {"tokens": tokens, "index": index}
                    continue
                tokens_buf.append(tokens)
                index_buf.append(index)
                held += len(index)
                while held >= B:
                    all_tokens, all_index = torch.cat(tokens_buf), torch.cat(index_buf)
                    yield {"tokens": all_tokens[:B], "index": all_index[:B]}
                    tokens_buf, index_buf, held = [all_tokens[B:]], [all_index[B:]], held - B
            if delivered == 0:
                raise DataError(f"dataset {self.name!r}: the training data holds no sequence for this worker")
            execution += 1


class MaterialisedSource:
    """Rows read whole into memory, served like the single-process path (validation)."""

    def __init__(self, name: str):
        self.name = name
        self._data: PackedDataset | None = None

    def micro_batches(self, position, rank: int, world_size: int, micro_batch_size: int):
        import ray.train

        if self._data is None:
            shard = ray.train.get_dataset_shard(self.name)
            parts = list(shard.iter_batches(batch_size=None, batch_format="numpy"))
            rows = np.concatenate([p["tokens"] for p in parts]) if parts else np.zeros((0, 1), TOKEN_DTYPE)
            if len(rows) == 0:
                raise DataError(f"dataset {self.name!r} holds no sequences")
            self._data = PackedDataset(rows, shuffle=False)
        return self._data.micro_batches(DataPosition(), rank, world_size, micro_batch_size)


def worker_batch_source(cfg: Config, name: str = "train"):
    """The BatchSource a Ray Train worker's loop reads (streaming shard or prepared shards).

    For "validation" it returns None when the run has no held-out data (val_fraction 0, or
    no held-out document), so the loop skips evaluation.
    """
    if cfg.data.prepared_path:
        if name != "train" and not read_manifest(cfg.data.prepared_path)["splits"].get(name, {}).get("sequences"):
            return None
        return PreparedSource(cfg.data.prepared_path, name, seed=cfg.data.seed, shuffle=name == "train")
    if name == "train":
        return StreamingTrainSource(name)
    import ray.train

    try:
        ray.train.get_dataset_shard(name)
    except (KeyError, ValueError, RuntimeError):
        return None
    return MaterialisedSource(name)


# ---------------------------------------------------------------------------------------
# Prepared shards (written by raylm.data.prepare).

MANIFEST = "manifest.json"


def read_manifest(path: str | Path) -> dict:
    path = Path(path)
    try:
        return json.loads((path / MANIFEST).read_text())
    except FileNotFoundError:
        raise DataError(f"data.prepared_path={str(path)!r}: no {MANIFEST} (not a directory written by raylm prepare)") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{path / MANIFEST}: not valid JSON ({e.msg} at line {e.lineno})") from None


def check_prepared(cfg: Config, tokenizer: Tokenizer) -> dict:
    """The manifest, if it was made with this run's tokenizer, seq_len and add_bos; else DataError."""
    path = cfg.data.prepared_path
    manifest = read_manifest(path)
    if manifest["tokenizer_sha256"] != tokenizer.sha256:
        raise DataError(f"data.prepared_path={path!r} was tokenised with tokenizer sha256 "
                        f"{manifest['tokenizer_sha256'][:12]}, this run uses {tokenizer.sha256[:12]} "
                        f"({tokenizer.source}); run raylm prepare again or drop tokenizer.path")
    for key in ("seq_len", "add_bos"):
        if manifest[key] != getattr(cfg.data, key):
            raise DataError(f"data.prepared_path={path!r} was packed with data.{key}={manifest[key]!r}, "
                            f"this run has data.{key}={getattr(cfg.data, key)!r}; run raylm prepare again")
    return manifest


class PreparedSource:
    """Prepared Parquet shards read by global index: instant seek, seeded permutation per epoch."""

    def __init__(self, path: str | Path, split: str = "train", seed: int = 0, shuffle: bool = True):
        import pyarrow.parquet as pq

        self.path = Path(path)
        manifest = read_manifest(self.path)
        info = manifest["splits"].get(split)
        if not info or info["sequences"] == 0:
            raise DataError(f"data.prepared_path={str(self.path)!r}: no {split} sequences")
        width = manifest["seq_len"] + 1
        shards = []
        for name in info["shards"]:
            table = pq.read_table(self.path / name, columns=["tokens"])
            flat = table.column("tokens").combine_chunks().flatten().to_numpy()
            shards.append(flat.reshape(-1, width))
        self.rows = np.concatenate(shards) if len(shards) > 1 else shards[0]  # (N, L + 1) int32
        self.order = SequenceOrder(len(self.rows), seed, shuffle)

    def __len__(self) -> int:
        return len(self.rows)

    def micro_batches(self, position, rank: int, world_size: int, micro_batch_size: int):
        position = position if isinstance(position, DataPosition) else DataPosition()
        for ix in unseen_micro_batches(position, rank, world_size, micro_batch_size):
            yield {"tokens": self.rows[self.order.rows(ix)], "index": ix}

