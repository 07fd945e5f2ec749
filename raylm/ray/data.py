"""The Ray Data corpus pipeline: read, tokenise on a CPU actor pool, pack, index, stream to workers.

    read_binary_files + parse (tasks, data.read_cpus each)      -> {"doc_id", "text"}
    tokenise + frame   (actor pool: data.tokenize_actors x data.tokenize_cpus; one tokenizer
                        per actor, one sentencepiece thread each)  -> one token stream per batch
    pack + index       (one actor, PACK_CPUS)                      -> {"tokens": int32 (L+1,), "index": int64}

Order. `preserve_order=True` makes every stage hand on its output in input order, and the
single packing actor keeps the carry between batches, so the rows are exactly a sequential
pack of the documents in plan order (`raylm.data.plan`): the same rows as `raylm.data.local`
and as the prepared shards. Row k of the stream has global index k.

Streaming training. One execution of the training Dataset makes `data.stream_passes` passes
over the corpus (derived from train.max_steps when unset), so indices run 0, 1, 2, ... across
passes without a gap. Ray Train splits it over the workers with `streaming_split`, which hands
rows out in arrival order, not as contiguous slices: the trainer's `DataPosition` records them
exactly (watermark + extra). On resume the packing actor drops consumed indices (the driver
passes the position to `trainer_datasets`) and every worker drops them again
(`StreamingTrainSource`), so no sequence is trained twice and none is skipped. The cost: the
pipeline re-reads and re-tokenises from the start up to the resume point (prepared mode seeks
instantly). If an execution runs out, the worker starts another one whose indices are offset
by `pass_offset * 2**40`.

Validation: the held-out documents, in a seeded order that spreads over every source and file
(`raylm.data.plan`), packed the same way, cut to the rows evaluation reads (train.eval_batches
x micro_batch_size x num_workers) and materialised on the driver; every worker reads it whole
and evaluates its stride from the beginning.

Bad input skipped under `data.on_error=skip` is counted in one `BadInputTally` actor per
pipeline (`Pipeline.counter`); the training workers read its report into their metrics.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray
import ray.train
import torch
from ray.train import DataConfig

from raylm.config import Config
from raylm.data import prepared
from raylm.data.order import DataPosition, PackedDataset
from raylm.data.parse import BadInputTally
from raylm.data.plan import CorpusListing, FilePlan, plan_files, read_blocks, stream_passes, tokenize_batch_docs
from raylm.data.transforms import TOKEN_DTYPE
from raylm.errors import DataError, EmptySplit
from raylm.ray.cluster import PACK_CPUS, data_cpus
from raylm.ray.errors import user_errors
from raylm.ray.stages import PackIndex, TokenizeFrame, parse_batch
from raylm.tokenizer import Tokenizer

PASS_OFFSET = 2**40
"""Index offset of each further execution of the training Dataset on a worker."""
ACTOR_START_TIMEOUT_S = 120
"""How long an execution waits for its tokenizer and packing actors before it reads."""


def bad_input_counter():
    """One tally actor per pipeline: read tasks add to it, the driver and workers read its report."""
    return ray.remote(num_cpus=0)(BadInputTally).remote()


@dataclass
class Pipeline:
    """A packed Dataset and the counter of the bad input its executions skipped."""

    dataset: Any
    counter: Any

    def bad_input(self) -> dict:
        return ray.get(self.counter.report.remote())


def _ordered(ds):
    ds.context.execution_options.preserve_order = True
    # A DataError raised in a read task or actor reaches the driver as itself (wrapped by
    # RayTaskError), not behind Ray Data's UserCodeException, whose cause is lost in transit.
    ds.context.raise_original_map_exception = True
    return ds


def documents_dataset(cfg: Config, plan: FilePlan, split: str, counter, *, with_priority: bool = False):
    """Rows {"doc_id", "text"} (plus "priority" when sampling) of `split`, in plan order."""
    specs = {f.path: f.spec for f in plan.files}
    d = cfg.data
    ds = ray.data.read_binary_files(
        [f.path for f in plan.files], include_paths=True, filesystem=plan.filesystem, num_cpus=d.read_cpus,
        concurrency=d.read_tasks, override_num_blocks=read_blocks(plan, d.tokenize_actors),
    )
    return _ordered(ds).map_batches(
        parse_batch,
        fn_kwargs=dict(specs=ray.put(specs), split=split, val_fraction=d.val_fraction, on_error=d.on_error,
                       counter=counter, priority_seed=cfg.tokenizer.seed if with_priority else None),
        batch_size=None,
        batch_format="numpy",
        num_cpus=d.read_cpus,
        compute=ray.data.TaskPoolStrategy(size=d.read_tasks),  # as the read's: Ray Data fuses the two into one task
    )


def packed_dataset(cfg: Config, tokenizer: Tokenizer, plan: FilePlan, split: str,
                   skip: DataPosition | None = None) -> Pipeline:
    """Rows {"tokens": int32 (seq_len + 1,), "index": int64} of `plan`, in global index order."""
    d = cfg.data
    counter = bad_input_counter()
    ds = documents_dataset(cfg, plan, split, counter).map_batches(
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
    return Pipeline(ds, counter)


def iter_rows(ds, batch_rows: int = 1024):
    """Driver-side iteration of a packed dataset as numpy batches, user errors unwrapped."""
    with user_errors():
        yield from ds.iter_batches(batch_size=batch_rows, batch_format="numpy", prefetch_batches=2)


def validation_rows_needed(cfg: Config) -> int:
    return cfg.train.eval_batches * cfg.train.micro_batch_size * cfg.scaling.num_workers


def validation_dataset(cfg: Config, tokenizer: Tokenizer, listing: CorpusListing) -> Pipeline | None:
    """The held-out rows evaluation reads, materialised; None when there are none."""
    try:
        plan = plan_files(cfg, "validation", listing=listing)
    except EmptySplit:
        return None
    pipeline = packed_dataset(cfg, tokenizer, plan, "validation")
    # Iterated to the end on the driver, then handed on as plain rows: a `.materialize()` of a
    # limited pipeline can leave its tokenizer actors alive, holding CPUs a later run needs
    # (seen as a hang on 2 CPUs); an exhausted iterator shuts its executor down.
    limited = _ordered(pipeline.dataset.limit(validation_rows_needed(cfg)))
    rows = [{"tokens": t, "index": int(i)} for p in iter_rows(limited, batch_rows=None)
            for t, i in zip(p["tokens"], p["index"])]
    if not rows:
        return None
    return Pipeline(ray.data.from_items(rows), pipeline.counter)


def trainer_datasets(cfg: Config, tokenizer: Tokenizer, listing: CorpusListing,
                     position: DataPosition | None = None) -> tuple[dict, Any]:
    """(`datasets=` for TorchTrainer, the training pipeline's bad-input counter) for streaming mode."""
    train_plan = plan_files(cfg, "train", listing=listing)
    passes = stream_passes(cfg, train_plan)
    if passes > 1:
        train_plan = plan_files(cfg, "train", listing=listing, passes=passes)
    train = packed_dataset(cfg, tokenizer, train_plan, "train", skip=position)
    out = {"train": train.dataset}
    val = validation_dataset(cfg, tokenizer, listing)
    if val is not None:
        out["validation"] = val.dataset
    return out, train.counter


def data_config(cfg: Config) -> DataConfig:
    """`dataset_config=` for TorchTrainer: split only train, keep order, cap Ray Data at its share."""
    options = ray.data.ExecutionOptions(
        preserve_order=True,
        resource_limits=ray.data.ExecutionResources(cpu=data_cpus(cfg)),
    )
    return DataConfig(datasets_to_split=["train"], execution_options=options)


def sample_documents(cfg: Config, listing: CorpusListing) -> list[str]:
    """The tokenizer's training sample through Ray Data (each file once, no weights): the
    tokenizer.sample_docs training documents of lowest seeded priority (`parse.sample_priority`)."""
    plan = plan_files(cfg, "train", mixture=False, listing=listing)
    ds = _ordered(documents_dataset(cfg, plan, "train", bad_input_counter(), with_priority=True))
    k = cfg.tokenizer.sample_docs
    heap: list[tuple[float, str, str]] = []  # max-heap by priority via negation
    for batch in iter_rows(ds, batch_rows=256):
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

    def __init__(self, name: str = "train", counter=None):
        self.name, self.counter = name, counter

    def bad_input(self) -> dict:
        return ray.get(self.counter.report.remote()) if self.counter is not None else {"skipped": {}}

    def micro_batches(self, position: DataPosition, rank: int, world_size: int, micro_batch_size: int):
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
                raise EmptySplit(f"dataset {self.name!r}: the training data holds no sequence for this worker")
            execution += 1


class MaterialisedSource:
    """Rows read whole into memory, served like the single-process path (validation)."""

    def __init__(self, name: str):
        self.name = name
        self._data: PackedDataset | None = None

    def micro_batches(self, position, rank: int, world_size: int, micro_batch_size: int):
        if self._data is None:
            shard = ray.train.get_dataset_shard(self.name)
            parts = list(shard.iter_batches(batch_size=None, batch_format="numpy"))
            rows = np.concatenate([p["tokens"] for p in parts]) if parts else np.zeros((0, 1), TOKEN_DTYPE)
            if len(rows) == 0:
                raise DataError(f"dataset {self.name!r} holds no sequences")
            self._data = PackedDataset(rows, shuffle=False)
        return self._data.micro_batches(DataPosition(), rank, world_size, micro_batch_size)


def worker_sources(cfg: Config, datasets: list[str], counter=None):
    """(train, validation or None) BatchSources in a Ray Train worker: prepared shards, or the
    streaming shards of `datasets` (the names the driver passed to TorchTrainer)."""
    if cfg.data.prepared_path:
        return prepared.prepared_sources(cfg)
    val = MaterialisedSource("validation") if "validation" in datasets else None
    return StreamingTrainSource("train", counter), val
