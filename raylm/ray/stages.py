"""The functions and classes Ray Data runs in its tasks and actors (light imports: no torch, no config).

Ray starts fresh worker processes for tasks and actors; everything here imports only Ray,
numpy, sentencepiece and the pure data modules, so a worker is ready in a fraction of a second.
"""

from __future__ import annotations

import numpy as np
import ray

from raylm.data.order import DataPosition
from raylm.data.parse import BadInputTally, read_documents, sample_priority
from raylm.data.transforms import TOKEN_DTYPE, encode_documents, frame_documents, pack
from raylm.tokenizer import BOS_ID, EOS_ID


_PLANS: dict = {}


def _plan(ref) -> tuple:
    """The plan's (paths per position, {path: FileSpec}, filesystem), fetched once per worker process.

    The plan goes to the tasks as an object reference: passed by value, every read task
    would deserialise a spec for every file of the corpus (15 ms per task for 4,000 files).
    """
    key = ref.hex()
    if key not in _PLANS:
        _PLANS.clear()  # one plan at a time: a worker does not hoard old plans
        _PLANS[key] = ray.get(ref)
    return _PLANS[key]


def plan_payload(plan) -> tuple:
    """What `read_parse` needs of a FilePlan, compact: unique paths, a position -> path table, specs."""
    paths = sorted({f.path for f in plan.files})
    number = {path: i for i, path in enumerate(paths)}
    table = np.fromiter((number[f.path] for f in plan.files), dtype=np.int32, count=len(plan.files))
    return paths, table, {f.path: f.spec for f in plan.files}, plan.filesystem


def read_parse(batch, plan, first, split, val_fraction, on_error, counter, priority_seed):
    """Read task: plan positions {"data"} (relative to `first`) -> documents {"doc_id", "text", "pos",
    "ord"} of `split` (+ "priority"); "pos" is the position in the plan of the file a document came
    from, "ord" the document's number among that file's documents of `split`.

    `plan`: an object reference to `plan_payload(plan)`.
    """
    paths, table, specs, filesystem = _plan(plan)
    tally = BadInputTally()
    ids, texts, positions, ordinals = [], [], [], []
    read = (int(first) + np.asarray(batch["data"], dtype=np.int64)).tolist()
    files = ((paths[table[pos]], specs[paths[table[pos]]]) for pos in read)
    for pos, docs in zip(read, read_documents(files, filesystem, split, val_fraction, on_error, tally)):
        ids += [d for d, _ in docs]
        texts += [t for _, t in docs]
        positions += [pos] * len(docs)
        ordinals += range(len(docs))
    # before the rows move on: the driver's report is complete
    ray.get(counter.add.remote(tally.problems(), tally.documents))
    out = {"doc_id": np.array(ids, dtype=object), "text": np.array(texts, dtype=object),
           "pos": np.array(positions, dtype=np.int64), "ord": np.array(ordinals, dtype=np.int64)}
    if priority_seed is not None:
        out["priority"] = np.array([sample_priority(priority_seed, i) for i in ids], dtype=np.float64)
    return out


class TokenizeFrame:
    """Actor: encode a batch of documents and frame them into one token stream (one output row),
    with the stream's file segments (consecutive runs of tokens from one plan position) and its
    span: (pos, ord) of its first and its last document, which `PackIndex` checks."""

    def __init__(self, tokenizer, add_bos: bool):
        self.sp = tokenizer.sp  # loaded once per actor (the Tokenizer pickles as its model bytes)
        self.add_bos = add_bos

    def __call__(self, batch: dict) -> dict:
        # One sentencepiece thread: the pool is the parallelism. Supervised documents come
        # back with their loss mask in the ids (`raylm.data.transforms`).
        ids = encode_documents(list(batch["text"]), lambda texts: self.sp.encode(texts, out_type=int, num_threads=1))
        stream = frame_documents(ids, BOS_ID, EOS_ID, self.add_bos)
        framed = np.fromiter((len(t) + 1 + int(self.add_bos) for t in ids), dtype=np.int64, count=len(ids))
        pos = np.asarray(batch["pos"], dtype=np.int64)
        starts = np.flatnonzero(np.r_[True, pos[1:] != pos[:-1]]) if len(pos) else np.zeros(0, dtype=np.int64)
        seg_len = np.add.reduceat(framed, starts) if len(pos) else np.zeros(0, dtype=np.int64)
        ordinal = np.asarray(batch["ord"], dtype=np.int64)
        span = np.array([[pos[0], ordinal[0], pos[-1], ordinal[-1]]] if len(pos) else [[-1, -1, -1, -1]],
                        dtype=np.int64)
        return {"stream": stream[None, :], "documents": np.array([len(ids)], dtype=np.int64),
                "seg_pos": pos[starts][None, :], "seg_len": seg_len[None, :], "span": span}


def _restarted_actor() -> bool:
    """Whether this process is an actor Ray has restarted (False outside an actor). One GCS
    query: call it once, at the actor's start."""
    import warnings

    from ray.util.annotations import RayDeprecationWarning

    if not ray.is_initialized():  # not in a Ray worker (a test calls PackIndex directly): never start Ray
        return False
    try:
        with warnings.catch_warnings():  # Ray 2.60's own property reads its deprecated `actor_id`
            warnings.simplefilter("ignore", RayDeprecationWarning)
            return bool(ray.get_runtime_context().was_current_actor_reconstructed)
    except Exception:  # noqa: BLE001 - a Ray process that is not an actor (a task, the driver)
        return False


class PackIndex:
    """The single sequential actor: keeps the carry across batches, numbers rows, drops consumed
    ones, and tags each row with its anchor: the plan position and token offset (within that
    file's framed tokens) of the row's first token, from which a restart can rebuild it.

    A pipeline that starts at an anchor (`first_index`, `skip_tokens`: its plan starts at the
    anchor's file) drops the file's first `skip_tokens` tokens, so its first row is row
    `first_index` exactly as the full stream packed it.

    Its batches must come in stream order: Ray Data lets actor tasks run out of order unless
    only one is in flight (`raylm.ray.data.packed_dataset` allows one), and a batch out of order
    would number and pack rows wrongly without a sound. Each batch's span is therefore checked
    to continue the one before it (the next document of the same file, or the first document of
    a later file); a gap or a step back raises. So does a batch reaching an actor Ray restarted
    (its state, the stream so far, is lost).
    """

    def __init__(self, seq_len: int, skip: dict | None, first_index: int = 0, skip_tokens: int = 0):
        self.seq_len = seq_len
        self.skip = DataPosition.from_state_dict(skip) if skip else None
        self.carry = np.zeros(0, dtype=TOKEN_DTYPE)
        self.carry_pos = np.zeros(0, dtype=np.int64)
        self.carry_off = np.zeros(0, dtype=np.int64)
        self.next_index = first_index
        self.skip_tokens = skip_tokens
        self.cur_pos, self.cur_off = -1, 0  # the file being read and its tokens so far
        self.last_doc = (-1, -1)  # (pos, ord) of the last document packed
        self.restarted = _restarted_actor()  # then its state, the stream so far, is lost

    def _check_order(self, spans: np.ndarray) -> None:
        for first_pos, first_ord, last_pos, last_ord in spans.reshape(-1, 4).tolist():
            if first_pos < 0:
                continue  # a batch without documents
            pos, ord_ = self.last_doc
            if not ((first_pos == pos and first_ord == ord_ + 1) or (first_pos > pos and first_ord == 0)):
                raise RuntimeError(f"packing got documents out of stream order: document {first_ord} of plan "
                                   f"position {first_pos} after document {ord_} of position {pos}")
            self.last_doc = (last_pos, last_ord)

    def _token_anchors(self, seg_pos: np.ndarray, seg_len: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        starts = np.empty(len(seg_pos), dtype=np.int64)
        for i, (pos, n) in enumerate(zip(seg_pos.tolist(), seg_len.tolist())):
            starts[i] = self.cur_off if pos == self.cur_pos else 0
            self.cur_pos, self.cur_off = pos, starts[i] + n
        total = int(seg_len.sum())
        seg_first = np.cumsum(seg_len) - seg_len  # where each segment begins in the stream
        pos_tok = np.repeat(seg_pos, seg_len)
        off_tok = np.arange(total, dtype=np.int64) + np.repeat(starts - seg_first, seg_len)
        return pos_tok, off_tok

    def __call__(self, batch: dict) -> dict:
        def joined(name, dtype):
            parts = [np.asarray(s, dtype=dtype).ravel() for s in batch[name]]
            return np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)

        if self.restarted:
            raise RuntimeError("the packing actor was restarted and lost the stream's state; "
                               "the run restarts from its newest checkpoint")
        self._check_order(np.asarray(batch["span"], dtype=np.int64))
        stream = joined("stream", TOKEN_DTYPE)
        pos_tok, off_tok = self._token_anchors(joined("seg_pos", np.int64), joined("seg_len", np.int64))
        if self.skip_tokens:
            n = min(self.skip_tokens, stream.size)
            stream, pos_tok, off_tok = stream[n:], pos_tok[n:], off_tok[n:]
            self.skip_tokens -= n
        flat_pos = np.concatenate([self.carry_pos, pos_tok])
        flat_off = np.concatenate([self.carry_off, off_tok])
        rows, self.carry = pack(stream, self.seq_len, self.carry)
        n_rows, L = int(rows.shape[0]), self.seq_len
        starts = np.arange(n_rows, dtype=np.int64) * L
        anchor = np.stack([flat_pos[starts], flat_off[starts]], axis=1) if n_rows else np.zeros((0, 2), np.int64)
        self.carry_pos, self.carry_off = flat_pos[n_rows * L:], flat_off[n_rows * L:]
        index = np.arange(self.next_index, self.next_index + n_rows, dtype=np.int64)
        self.next_index += n_rows
        if self.skip is not None and n_rows:
            keep = ~self.skip.is_consumed(index)
            rows, index, anchor = rows[keep], index[keep], anchor[keep]
        return {"tokens": rows, "index": index, "anchor": anchor}
