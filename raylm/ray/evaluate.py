"""`raylm eval` on Ray: the packed rows of a large corpus from the Ray Data pipeline training uses
(same rows), and a large task file scored in a Ray Data actor pool (each actor loads the model once)."""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Iterator

import numpy as np
import ray

from raylm.config import Config
from raylm.data.plan import plan_files
from raylm.ray.connect import ray_session
from raylm.ray.data import iter_rows, ordered, packed_dataset
from raylm.tokenizer import Tokenizer
from raylm.use.tasks import Example, Task, predict

TASK_BATCHES_PER_ACTOR = 4
"""Batches of examples per actor: enough to even out the actors' work, few enough to batch well."""
MAX_TASK_BATCH = 256
"""Most examples one actor call scores."""


def ray_rows(cfg: Config, tokenizer: Tokenizer, split: str, max_rows: int | None) -> Iterator[np.ndarray]:
    """Rows (n, seq_len + 1) of `split` in global index order, tokenised on the CPU actor pool
    while the caller evaluates; joins RAY_ADDRESS or starts a local cluster for the duration."""
    with ray_session():
        pipeline = packed_dataset(cfg, tokenizer, plan_files(cfg, split, mixture=False), split)
        ds = pipeline.dataset if max_rows is None else ordered(pipeline.dataset.limit(max_rows))
        # Iterated to the end (the limit ends it): an abandoned iterator could leave the
        # tokenizer actors holding CPUs (see raylm.ray.data.validation_dataset).
        for batch in iter_rows(ds):
            yield batch["tokens"]


class TaskScorer:
    """One actor of the pool: the model loaded once; each call scores a batch of examples given
    their contexts (drawn by the driver) and returns their predictions as JSON."""

    def __init__(self, checkpoint: str, task: Task, batch_size: int, device: str):
        from raylm.use.generate import device_from_name
        from raylm.use.load import load_model
        from raylm.use.score import Scorer

        model, tokenizer, cfg = load_model(checkpoint, device_from_name(device), verified=True)
        self.task = task
        self.scorer = Scorer(model, tokenizer, add_bos=cfg.data.add_bos, batch_size=batch_size,
                             window=cfg.data.seq_len)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        examples = [Example(**json.loads(text)) for text in batch["example"]]
        indices = [int(i) for i in batch["index"]]
        predictions = predict(self.task, self.scorer, examples, [str(c) for c in batch["context"]], indices=indices)
        return {"index": batch["index"], "prediction": np.array([json.dumps(p) for p in predictions], dtype=object)}


def ray_task_predictions(checkpoint: str, task: Task, examples: list[Example], ctxs: list[str], batch_size: int,
                         device: str) -> list[dict]:
    """The predictions of `examples` (in their order), scored by a pool of one actor per CPU
    (one per GPU where there are GPUs and `device` is not cpu), at most one per batch of
    examples; joins RAY_ADDRESS or starts a local cluster for the duration."""
    with ray_session():
        resources = ray.cluster_resources()
        gpus = int(resources.get("GPU", 0)) if device != "cpu" else 0
        per_batch = max(1, min(MAX_TASK_BATCH, math.ceil(len(examples) / (max(gpus, int(resources.get("CPU", 1)), 1)
                                                                            * TASK_BATCHES_PER_ACTOR))))
        batches = math.ceil(len(examples) / per_batch)
        actors = max(1, min(batches, gpus or int(resources.get("CPU", 1))))
        items = [{"index": i, "example": json.dumps(dataclasses.asdict(e)), "context": c}
                 for i, (e, c) in enumerate(zip(examples, ctxs))]
        ds = ray.data.from_items(items, override_num_blocks=batches).map_batches(
            TaskScorer,
            fn_constructor_kwargs=dict(checkpoint=checkpoint, task=task, batch_size=batch_size, device=device),
            compute=ray.data.ActorPoolStrategy(size=actors),
            num_cpus=0 if gpus else 1,
            num_gpus=1 if gpus else 0,
            batch_size=per_batch,
            batch_format="numpy",
        )
        rows = ds.take_all()
    predictions: list[dict | None] = [None] * len(examples)
    for row in rows:
        predictions[int(row["index"])] = json.loads(row["prediction"])
    return predictions  # type: ignore[return-value]
