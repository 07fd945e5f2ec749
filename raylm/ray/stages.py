"""The functions and classes Ray Data runs in its tasks and actors (light imports: no torch, no config).

Ray starts fresh worker processes for tasks and actors; everything here imports only Ray,
numpy, sentencepiece and the pure data modules, so a worker is ready in a fraction of a second.
"""

from __future__ import annotations

import numpy as np
import ray

from raylm.data.order import DataPosition
from raylm.data.parse import sample_priority, split_documents
from raylm.data.transforms import TOKEN_DTYPE, frame_documents, index_rows, pack
from raylm.tokenizer import BOS_ID, EOS_ID


_PLAN_SPECS: dict = {}


def _plan_specs(ref) -> dict:
    """The plan's {path: FileSpec}, fetched once per worker process.

    The plan goes to the tasks as an object reference: passed by value, every read task
    would deserialise a spec for every file of the corpus (15 ms per task for 4,000 files).
    """
    key = ref.hex()
    if key not in _PLAN_SPECS:
        _PLAN_SPECS.clear()  # one plan at a time: a worker does not hoard old plans
        _PLAN_SPECS[key] = ray.get(ref)
    return _PLAN_SPECS[key]


def parse_batch(batch, specs, split, val_fraction, on_error, counter, priority_seed):
    """Read task: files {"bytes", "path"} -> documents {"doc_id", "text"} of `split` (+ "priority").

    `specs`: an object reference to the plan's {path: FileSpec} (see `_plan_specs`).
    """
    specs = _plan_specs(specs)
    files = ((bytes(data), specs.get(path) or specs[str(path).removeprefix("file://")])
             for data, path in zip(batch["bytes"], batch["path"]))
    docs, problems = split_documents(files, split, val_fraction, on_error)
    ids, texts = [d for d, _ in docs], [t for _, t in docs]
    ray.get(counter.add.remote(problems, len(ids)))  # before the rows move on: the driver's report is complete
    out = {"doc_id": np.array(ids, dtype=object), "text": np.array(texts, dtype=object)}
    if priority_seed is not None:
        out["priority"] = np.array([sample_priority(priority_seed, i) for i in ids], dtype=np.float64)
    return out


class TokenizeFrame:
    """Actor: encode a batch of documents and frame them into one token stream (one output row)."""

    def __init__(self, tokenizer, add_bos: bool):
        self.sp = tokenizer.sp  # loaded once per actor (the Tokenizer pickles as its model bytes)
        self.add_bos = add_bos

    def __call__(self, batch: dict) -> dict:
        ids = self.sp.encode(list(batch["text"]), out_type=int, num_threads=1)  # the pool is the parallelism
        stream = frame_documents(ids, BOS_ID, EOS_ID, self.add_bos)
        return {"stream": stream[None, :], "documents": np.array([len(ids)], dtype=np.int64)}


class PackIndex:
    """The single sequential actor: keeps the carry across batches, numbers rows, drops consumed ones."""

    def __init__(self, seq_len: int, skip: dict | None):
        self.seq_len = seq_len
        self.skip = DataPosition.from_state_dict(skip) if skip else None
        self.carry = None
        self.next_index = 0

    def __call__(self, batch: dict) -> dict:
        parts = [np.asarray(s, dtype=TOKEN_DTYPE).ravel() for s in batch["stream"]]
        stream = np.concatenate(parts) if parts else np.zeros(0, dtype=TOKEN_DTYPE)
        rows, self.carry = pack(stream, self.seq_len, self.carry)
        first = self.next_index
        self.next_index += int(rows.shape[0])
        rows, index = index_rows(rows, first, self.skip)
        return {"tokens": rows, "index": index}
