"""The Ray Data corpus pipeline: read, tokenise on a CPU actor pool, pack, index, stream to workers.

    plan positions -> read + parse (tasks, data.read_cpus each)   -> {"doc_id", "text", "pos", "ord"}
    tokenise + frame   (actor pool: data.tokenize_actors x data.tokenize_cpus; one tokenizer
                        per actor, one sentencepiece thread each)  -> one token stream per batch
    pack + index       (one actor, PACK_CPUS)                      -> {"tokens": int32 (L+1,),
                                                                       "index": int64, "anchor": (2,)}

Order. `preserve_order=True` makes every stage hand on its output in input order, and the
single packing actor keeps the carry between batches and runs its batches in that order
(one batch in flight at a time: Ray Data's default lets an actor's tasks overtake each other,
which once packed a stream rotated by one batch; `PackIndex` checks), so the rows are
exactly a sequential pack of the documents in plan order (`raylm.data.plan`): the same rows as
`raylm.data.local` and as the prepared shards. Row k of the stream has global index k. Each row also carries its
anchor: the plan position of the file its first token comes from and that token's offset in
the file's framed tokens.

Streaming training (docs/elastic.md says how and why): one execution of `data.stream_passes`
passes, split by `streaming_split(equal=False)`; the workers trade rows so that every step
trains the next G unseen global indices at any world size (`StreamingTrainSource`), and a
finite stream's end is agreed by every rank at one step. Restarts: `TrainStream`, which Ray
Train calls at every worker-group start, starts the plan at the anchor of the newest complete
checkpoint (`newest_complete`: markers and listings only), so a restart re-reads at most one
checkpoint interval of data.

Validation: the held-out documents, in a seeded order that spreads over every source and file
(`raylm.data.plan`), packed the same way, cut to the rows evaluation reads (`Config.eval_sequences`),
made on the driver from the few files they need (`validation_dataset`); every worker reads
them whole and evaluates its share.

Bad input skipped under `data.on_error=skip` is counted in one `BadInputTally` actor per
pipeline (`Pipeline.counter`); the training workers read its report into their metrics.
"""

from __future__ import annotations

import copy
import heapq
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray
import ray.train
import torch
from ray.train import DataConfig

from raylm import storage
from raylm.config import Config
from raylm.data import prepared
from raylm.data.order import DataPosition, PackedDataset, step_shares, step_slots, unseen_micro_batches
from raylm.data.parse import BadInputTally
from raylm.data.plan import CorpusListing, FilePlan, plan_files, read_blocks, stream_passes, tokenize_batch_docs
from raylm.data.transforms import TOKEN_DTYPE
from raylm.errors import DataError
from raylm.ray.cluster import PACK_CPUS, data_cpus
from raylm.ray.compat import set_last_operator_resources
from raylm.ray.errors import user_errors
from raylm.ray.stages import PackIndex, TokenizeFrame, plan_payload, read_parse
from raylm.tokenizer import Tokenizer
from raylm.train import checkpoint as ckpt

ACTOR_START_TIMEOUT_S = 120
"""How long an execution waits for its tokenizer and packing actors before it reads."""


def bad_input_counter():
    """One tally actor per pipeline: read tasks add to it, the driver and workers read its report.
    It lives on the driver's node: a 0-CPU actor may land on any node, and one on a node that
    leaves (a shrink, a preemption) fails every restart of the run after it."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    return ray.remote(num_cpus=0)(BadInputTally).options(scheduling_strategy=here).remote()


@dataclass
class Pipeline:
    """A packed Dataset and the counter of the bad input its executions skipped."""

    dataset: Any
    counter: Any

    def bad_input(self) -> dict:
        return ray.get(self.counter.report.remote())


def ordered(ds):
    """`ds`, set to keep its rows in plan order and to raise raylm's own errors from its tasks."""
    ds.context.execution_options.preserve_order = True
    # A DataError raised in a read task or actor reaches the driver as itself (wrapped by
    # RayTaskError), not behind Ray Data's UserCodeException, whose cause is lost in transit.
    ds.context.raise_original_map_exception = True
    return ds


def documents_dataset(cfg: Config, plan: FilePlan, split: str, counter, *, with_priority: bool = False,
                      first: int = 0):
    """Rows {"doc_id", "text", "pos", "ord"} (plus "priority" when sampling) of `split`, in plan order,
    from plan position `first` on."""
    d = cfg.data
    rest = FilePlan(plan.filesystem, plan.files[first:])
    # The plan positions as in-memory blocks built here (from_items puts them in the object
    # store directly; from_numpy would run a 1-CPU conversion task per block, which on an
    # autoscaling cluster can ask for a node), then one read task per block (data.read_cpus).
    n_blocks = max(1, min(len(rest.files), read_blocks(rest, d.tokenize_actors)))
    ds = ray.data.from_items([{"data": i} for i in range(len(rest.files))], override_num_blocks=n_blocks)
    return ordered(ds).map_batches(
        read_parse,
        fn_kwargs=dict(plan=ray.put(plan_payload(plan)), first=first, split=split, val_fraction=d.val_fraction,
                       on_error=d.on_error, counter=counter,
                       priority_seed=cfg.tokenizer.seed if with_priority else None),
        batch_size=None,
        batch_format="numpy",
        num_cpus=d.read_cpus,
        compute=ray.data.TaskPoolStrategy(size=d.read_tasks),
    )


def packed_dataset(cfg: Config, tokenizer: Tokenizer, plan: FilePlan, split: str,
                   skip: DataPosition | None = None, anchor: list[int] | None = None,
                   counter=None) -> Pipeline:
    """Rows {"tokens": int32 (seq_len + 1,), "index": int64, "anchor": int64 (2,)} of `plan`, in
    global index order; from `anchor` ([index, plan position, token offset]) on when given."""
    d = cfg.data
    counter = counter if counter is not None else bad_input_counter()
    first_index, first_pos, skip_tokens = anchor if anchor is not None else (0, 0, 0)
    ds = documents_dataset(cfg, plan, split, counter, first=first_pos).map_batches(
        TokenizeFrame,
        fn_constructor_kwargs=dict(tokenizer=tokenizer, add_bos=d.add_bos),
        compute=ray.data.ActorPoolStrategy(size=d.tokenize_actors),
        num_cpus=d.tokenize_cpus,
        batch_size=tokenize_batch_docs(cfg, plan),
        batch_format="numpy",
    )
    ds = ds.map_batches(
        PackIndex,
        fn_constructor_kwargs=dict(seq_len=d.seq_len, skip=skip.state_dict() if skip is not None else None,
                                   first_index=first_index, skip_tokens=skip_tokens),
        # Its state is the stream so far: one batch at a time reaches it, so none can overtake
        # another (Ray Data lets an actor's queued tasks run out of order), and a restarted actor
        # refuses to go on (`PackIndex`): the execution fails instead of a fresh actor numbering
        # the rest of the rows from the start, and the run restarts from its checkpoint, which
        # rebuilds the state exactly (raylm.ray.compat: what replaced the deprecated remote args).
        compute=ray.data.ActorPoolStrategy(size=1, max_tasks_in_flight_per_actor=1),
        num_cpus=PACK_CPUS,
        batch_size=None,
        batch_format="numpy",
    )
    ds = ordered(ds)
    # Start reading only once the actors are up. Otherwise bad input in the first file fails
    # the execution while they are still pending, and Ray Data's shutdown could leave one
    # alive holding its CPUs (seen on 2 CPUs: the next run then waited for them in vain).
    ds.context.wait_for_min_actors_s = ACTOR_START_TIMEOUT_S
    return Pipeline(ds, counter)


def iter_rows(ds, batch_rows: int = 1024):
    """Driver-side iteration of a packed dataset as numpy batches, user errors unwrapped."""
    with user_errors():
        yield from ds.iter_batches(batch_size=batch_rows, batch_format="numpy", prefetch_batches=2)


def validation_dataset(cfg: Config, tokenizer: Tokenizer, listing: CorpusListing):
    """The held-out rows evaluation reads, as a small in-memory Dataset; None when there are none.

    They are the first `Config.eval_sequences` rows of the validation split's pack, made in
    this process (`raylm.data.local.first_rows`: the same plan, parser and packing as the
    pipeline, so the same rows): reading a few held-out files costs less than starting a
    tokenizer pool and a packer for them, which every run did before its first step."""
    from raylm.data.local import first_rows

    rows = first_rows(cfg, tokenizer, "validation", cfg.eval_sequences, listing=listing)
    if not len(rows):
        return None
    return ray.data.from_items([{"tokens": t, "index": i} for i, t in enumerate(rows)])


class TrainStream:
    """`datasets={"train": TrainStream(...)}`: Ray Train calls it at every worker-group start
    and gets the training stream from the newest good checkpoint's anchor on (module docstring)."""

    def __init__(self, cfg: Config, tokenizer: Tokenizer, plan: FilePlan, counter, run_dir: str,
                 initial_checkpoint: str | None):
        self.cfg, self.tokenizer, self.plan, self.counter = cfg, tokenizer, plan, counter
        self.run_dir, self.initial_checkpoint = run_dir, initial_checkpoint
        # Called on the Train controller, whose own DataContext shows progress bars: the
        # driver's choice (`raylm.ray.connect.quiet_console`) travels with the stream.
        self.progress_bars = ray.data.DataContext.get_current().enable_progress_bars

    def start(self) -> tuple[DataPosition | None, list[int] | None]:
        """(position, anchor) of the checkpoint the workers will restore, or (None, None).

        Read from markers and listings alone (`checkpoint.newest_complete`): this runs in one
        process before any worker starts, and the checkpoint's bytes are read once, by the ranks
        that load them. When those find it damaged they note it and restart
        (`Trainer._after_damage`; `StreamingTrainSource.starts_at_newest_complete`), and the
        next call here skips it."""
        candidates = ckpt.list_checkpoints(self.run_dir)
        if self.initial_checkpoint is not None:
            candidates.append(storage.location(self.initial_checkpoint))
        found = ckpt.newest_complete(candidates) if candidates else None
        if found is None:
            return None, None
        state = found[1]["train_state"]
        position = DataPosition.from_state_dict({"watermark": state["data_watermark"],
                                                 "extra": state.get("data_extra", [])})
        return position, state.get("data_anchor")

    def __call__(self):
        position, anchor = self.start()
        if anchor is not None:
            print(f"training stream: from sequence {anchor[0]:,} (file {anchor[1] + 1:,} of {len(self.plan.files):,} "
                  f"in the plan, token {anchor[2]:,}); {position.consumed():,} sequences trained", flush=True)
        ds = packed_dataset(self.cfg, self.tokenizer, self.plan, "train", skip=position, anchor=anchor,
                            counter=self.counter).dataset
        # Small blocks: the uneven split hands out whole blocks, so every worker gets rows
        # from the start and the stream's end leaves little behind in the others' buffers.
        ds = _small_blocks(ds, max(8, 4 * self.cfg.train.micro_batch_size))
        ds.context.enable_progress_bars = self.progress_bars
        ds.context.print_on_execution_start = False
        return ds


def _small_blocks(ds, rows: int):
    """`ds` re-cut into blocks of at most `rows` rows by tasks that hold PACK_CPUS, one at a time.

    `Dataset.repartition(target_num_rows_per_block=...)` runs tasks of 1 CPU and takes no
    resource arguments. Under Ray Train's cap on Ray Data (`data_config`: data_cpus, under 1
    CPU for a small pipeline) such a task never gets a budget while the stages upstream of it
    have work, so the first rows reached the workers only once the whole planned stream had
    been read, tokenised and packed into the object store (measured: 72 s to the first batch
    for an 11-pass plan of a 40 MB corpus, 21 s for 3 passes; 13.5 s and 11.4 s with this).
    Ray Data gives the operator no public knob for it (`raylm.ray.compat`, item 7, guarded by
    tests/test_ray_compat.py). One task at a time: tasks this small would otherwise run by the
    dozen, each in a worker process of its own (seen: 20 idle workers of 200 MB on 2 CPUs).
    """
    ds = ordered(ds.repartition(target_num_rows_per_block=rows))
    set_last_operator_resources(ds, PACK_CPUS, tasks=1)
    return ds


def trainer_datasets(cfg: Config, tokenizer: Tokenizer, listing: CorpusListing, run_dir: str,
                     initial_checkpoint: str | None = None) -> tuple[dict, Any]:
    """(`datasets=` for TorchTrainer, the training pipeline's bad-input counter) for streaming mode."""
    train_plan = plan_files(cfg, "train", listing=listing)
    passes = stream_passes(cfg, train_plan)
    if passes > 1:
        train_plan = plan_files(cfg, "train", listing=listing, passes=passes)
    counter = bad_input_counter()
    out = {"train": TrainStream(cfg, tokenizer, train_plan, counter, str(run_dir),
                                str(initial_checkpoint) if initial_checkpoint else None)}
    val = validation_dataset(cfg, tokenizer, listing)
    if val is not None:
        out["validation"] = val
    return out, counter


class _TrainDataConfig(DataConfig):
    """Ray Train's DataConfig, with the training stream split unevenly (`equal=False`): rows go
    to whichever worker asks, none is dropped, and a worker that takes more rows per step than
    the others (an uneven split of the batch) never waits for them to catch up."""

    def __init__(self, options: "ray.data.ExecutionOptions", enable_shard_locality: bool = True):
        super().__init__(datasets_to_split=["train"], execution_options=options,
                         enable_shard_locality=enable_shard_locality)
        self.train_options, self.shard_locality = options, enable_shard_locality

    def train_execution_options(self):
        """The training stream's execution options, a copy (the stream's context owns it)."""
        return copy.deepcopy(self.train_options)

    def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
        train = datasets.get("train")
        others = {k: v for k, v in datasets.items() if k != "train"}
        output = super().configure(others, world_size, worker_handles, worker_node_ids, **kwargs) if others \
            else [{} for _ in range(world_size)]
        if train is not None:
            if train.name is None:
                train.set_name("train")
            ds = train.copy(train)
            ds.context.execution_options = self.train_execution_options()
            hints = worker_node_ids if self.shard_locality else None
            for i, split in enumerate(ds.streaming_split(world_size, equal=False, locality_hints=hints)):
                output[i]["train"] = split
        return output


def data_config(cfg: Config) -> DataConfig:
    """`dataset_config=` for TorchTrainer: split only train (unevenly), keep order, cap Ray Data at its share."""
    options = ray.data.ExecutionOptions(
        preserve_order=True,
        resource_limits=ray.data.ExecutionResources(cpu=data_cpus(cfg)),
    )
    return _TrainDataConfig(options)


def sample_documents(cfg: Config, listing: CorpusListing) -> list[str]:
    """The tokenizer's training sample through Ray Data (each file once, no weights): the
    tokenizer.sample_docs training documents of lowest seeded priority (`parse.sample_priority`)."""
    plan = plan_files(cfg, "train", mixture=False, listing=listing)
    ds = ordered(documents_dataset(cfg, plan, "train", bad_input_counter(), with_priority=True))
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
    """This worker's share of the streaming training stream: step s trains the next G unseen
    global indices, the same rows at every world size (finite).

    The streaming split hands rows to whichever worker asks, so the rows a step needs are held
    by arbitrary workers (a worker holds whole blocks in turn). Each step (`_step_rows`), every
    rank reads on until the union of what the ranks hold covers the step's indices, the ranks
    gather which of them each holds (one small all-gather), and the rows a rank holds beyond
    its share go to the ranks short of theirs (one all-to-all of the misplaced rows only). Which
    rank trains which row does not change the step (the loss is normalised by the global token
    count), so each rank keeps what it can and only the imbalance moves. Before, a step trained
    whatever rows its workers happened to hold, so its rows, and its loss, depended on the
    world size (and on timing): a resize left the uninterrupted curve.
    """

    finite = True
    starts_at_newest_complete = True
    """`TrainStream` began the stream at the newest checkpoint that passes the cheap check: a
    restore that falls back from it because of damage must restart (`Trainer._after_damage`)."""

    def __init__(self, name: str = "train", counter=None):
        self.name, self.counter = name, counter

    def bad_input(self) -> dict:
        return ray.get(self.counter.report.remote()) if self.counter is not None else {"skipped": {}}

    def micro_batches(self, position: DataPosition, rank: int, world_size: int, micro_batch_size: int,
                      step_sequences: int | None = None):
        """Micro-batches of the sizes `step_slots` gives this rank; together, over the ranks, each
        step's micro-batches hold exactly its G global indices (`unseen_micro_batches`)."""
        position = position if isinstance(position, DataPosition) else DataPosition()
        W, B = world_size, micro_batch_size
        G = step_sequences or W * B
        sizes = [len(s) for s in step_slots(G, rank, W, B)]
        shares = step_shares(G, W, B)
        shard = ray.train.get_dataset_shard(self.name)
        held = _HeldRows(shard.iter_batches(batch_size=B, batch_format="numpy", prefetch_batches=4), position)
        for needed in unseen_micro_batches(position, 0, 1, G, G):  # the step's G global indices, in order
            rows = _step_rows(held, needed, rank, shares)
            if rows is None:
                return  # the stream ended: every rank learns it at this same step (a collective)
            first = 0
            for n in sizes:
                yield {key: v[first:first + n] for key, v in rows.items()}
                first += n


class _HeldRows:
    """The rows a worker has been handed and not yet trained, by global index."""

    def __init__(self, batches, position: DataPosition):
        self.batches, self.position = iter(batches), position
        self.tokens: dict[int, np.ndarray] = {}
        self.anchor: dict[int, np.ndarray] = {}
        self.last = -1  # the highest index handed to this worker (rows come in increasing order)
        self.ended = False
        self.width = 1  # tokens per row (seq_len + 1), once a row has come

    def read_more(self) -> None:
        batch = next(self.batches, None)
        if batch is None:
            self.ended = True
            return
        index = np.asarray(batch["index"], dtype=np.int64)
        self.width = int(np.shape(batch["tokens"])[-1])
        if index.size:
            self.last = max(self.last, int(index.max()))
        keep = ~self.position.is_consumed(index)
        for i, tokens, anchor in zip(index[keep].tolist(), batch["tokens"][keep], batch["anchor"][keep]):
            self.tokens[i], self.anchor[i] = tokens, anchor

    def take(self, indices) -> dict[str, np.ndarray]:
        indices = list(indices)
        if not indices:
            return {}
        return {"tokens": np.stack([self.tokens.pop(i) for i in indices]),
                "index": np.asarray(indices, dtype=np.int64),
                "anchor": np.stack([self.anchor.pop(i) for i in indices]).reshape(-1, 2)}


def _all_gather(obj, world_size: int) -> list:
    if world_size == 1:
        return [obj]
    import torch.distributed as dist

    out: list = [None] * world_size
    dist.all_gather_object(out, obj)
    return out


def _step_rows(held: _HeldRows, needed: np.ndarray, rank: int, shares: list[int]):
    """This rank's rows of the step whose global indices are `needed` ({"tokens", "index", "anchor"}:
    `shares[rank]` of them, in index order), or None when the stream ended before the step."""
    world_size = len(shares)
    want = set(needed.tolist())
    while True:
        # The split hands blocks out in stream order, so once every rank has been handed an
        # index >= the step's last (or has no more), the ranks hold every row of the step.
        while not held.ended and held.last < needed[-1]:
            held.read_more()
        mine = sorted(want.intersection(held.tokens))
        views = _all_gather((mine, held.ended, held.width), world_size)
        if sum(len(m) for m, _, _ in views) == len(want):
            break
        if all(ended for _, ended, _ in views):
            return None
        if not held.ended:  # a block out of order (never seen so far): read on and look again
            held.read_more()
    width = max(w for _, _, w in views)
    spare = [m[shares[r]:] for r, (m, _, _) in enumerate(views)]  # rows beyond their holder's share
    free = iter(sorted(i for part in spare for i in part))
    to = {next(free): r for r in range(world_size) for _ in range(shares[r] - min(shares[r], len(views[r][0])))}
    rows = [held.take(mine[:shares[rank]])]
    if to:  # every rank knows the plan, so each sends and receives exactly the moved rows
        rows.append(_move_rows(held, spare, to, rank, width))
    rows = [r for r in rows if r]
    if not rows:  # a rank without a share this step (more ranks than sequences): empty micro-batches
        return {"tokens": torch.zeros((0, width), dtype=torch.int32), "index": torch.zeros(0, dtype=torch.int64),
                "anchor": np.zeros((0, 2), np.int64)}
    joined = {key: np.concatenate([r[key] for r in rows]) for key in rows[0]}
    order = np.argsort(joined["index"], kind="stable")
    return {"tokens": torch.from_numpy(np.ascontiguousarray(joined["tokens"][order])),
            "index": torch.from_numpy(joined["index"][order]), "anchor": joined["anchor"][order]}


def _move_rows(held: _HeldRows, spare: list[list[int]], to: dict[int, int], rank: int, width: int) -> dict:
    """Send this rank's spare rows to the ranks `to` names and receive its own: one all-to-all of
    (tokens, anchor) rows, so each moved row crosses the network once."""
    import torch.distributed as dist

    world_size = len(spare)
    send = [[i for i in spare[rank] if to.get(i) == d] for d in range(world_size)]
    recv = [[i for i in spare[s] if to.get(i) == rank] for s in range(world_size)]
    out = held.take([i for part in send for i in part])
    packed = np.concatenate([out["tokens"].astype(np.int64), out["anchor"]], axis=1) if out \
        else np.zeros((0, width + 2), np.int64)
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    got = torch.empty((sum(map(len, recv)), width + 2), dtype=torch.int64, device=device)
    dist.all_to_all_single(got, torch.from_numpy(packed).to(device), output_split_sizes=[len(p) for p in recv],
                           input_split_sizes=[len(p) for p in send])
    got = got.cpu().numpy()
    if not len(got):
        return {}
    return {"tokens": got[:, :width].astype(TOKEN_DTYPE), "index": np.asarray([i for p in recv for i in p], np.int64),
            "anchor": got[:, width:]}


class MaterialisedSource:
    """Rows read whole into memory, served like the single-process path (validation)."""

    def __init__(self, name: str):
        self.name = name
        self._data: PackedDataset | None = None

    def micro_batches(self, position, rank: int, world_size: int, micro_batch_size: int,
                      step_sequences: int | None = None):
        if self._data is None:
            shard = ray.train.get_dataset_shard(self.name)
            parts = list(shard.iter_batches(batch_size=None, batch_format="numpy"))
            rows = np.concatenate([p["tokens"] for p in parts]) if parts else np.zeros((0, 1), TOKEN_DTYPE)
            if len(rows) == 0:
                raise DataError(f"dataset {self.name!r} holds no sequences")
            self._data = PackedDataset(rows, shuffle=False)
        return self._data.micro_batches(DataPosition(), rank, world_size, micro_batch_size, step_sequences)


def worker_sources(cfg: Config, datasets: list[str], counter=None):
    """(train, validation or None) BatchSources in a Ray Train worker: prepared shards, or the
    streaming shards of `datasets` (the names the driver passed to TorchTrainer)."""
    if cfg.data.prepared_path:
        return prepared.prepared_sources(cfg)
    val = MaterialisedSource("validation") if "validation" in datasets else None
    return StreamingTrainSource("train", counter), val
