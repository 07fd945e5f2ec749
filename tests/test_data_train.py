"""Streaming into Ray Train workers on a 2-CPU cluster: progress, and exact resume on another world size."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from raylm.config import load_config
from raylm.data.order import DataPosition
from raylm.tokenizer import Tokenizer

pytestmark = pytest.mark.ray
B = 4


def consume(config: dict) -> None:
    """Minimal train_func: read `batches` micro-batches (and one held-out one), record the indices."""
    import ray.train

    from raylm.ray.data import worker_sources

    cfg = load_config(None, config["overrides"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    position = DataPosition.from_state_dict(config["position"])
    train, validation = worker_sources(cfg, ["train", "validation"])
    batches = train.micro_batches(position, rank, world, B)
    seen = []
    for _ in range(config["batches"]):
        batch = next(batches)
        assert tuple(batch["tokens"].shape) == (B, cfg.data.seq_len + 1)
        seen.append(batch["index"].tolist())
    val = next(validation.micro_batches(0, rank, world, B))
    Path(config["out"], f"rank{rank}.json").write_text(json.dumps({"train": seen, "val": val["index"].tolist()}))
    ray.train.report({"batches": len(seen)})


def run(tmp_path, name, overrides, tokenizer, position, batches, workers):
    import ray.train
    from ray.train.torch import TorchTrainer

    from raylm.data.plan import list_corpus
    from raylm.ray.data import data_config, trainer_datasets

    cfg = load_config(None, overrides)
    out = tmp_path / name
    out.mkdir()
    datasets, _ = trainer_datasets(cfg, tokenizer, list_corpus(cfg), run_dir=str(out))
    datasets["train"].start = lambda: (position, None)  # as if restored from a checkpoint at `position`
    trainer = TorchTrainer(
        consume,
        train_loop_config={"overrides": overrides, "position": position.state_dict(), "batches": batches,
                           "out": str(out)},
        scaling_config=ray.train.ScalingConfig(num_workers=workers, resources_per_worker={"CPU": 0.25}),
        run_config=ray.train.RunConfig(name=name, storage_path=str(tmp_path / "ray_results")),
        datasets=datasets,
        dataset_config=data_config(cfg),
    )
    trainer.fit()
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(workers)]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    rng = np.random.default_rng(0)
    vocab = ["alpha", "beta", "gamma", "delta", "def", "return", "import", "class", "self", "value"]
    path = tmp_path_factory.mktemp("corpus") / "c.jsonl"
    path.write_text("".join(json.dumps({"text": " ".join(rng.choice(vocab, size=int(rng.integers(5, 60))))}) + "\n"
                            for _ in range(2000)))
    tok = Tokenizer.train([path.read_text()[:200_000]], 300)
    return path, tok


def test_two_workers_stream_on_two_cpus_then_one_worker_resumes_exactly(ray_cluster, tmp_path, corpus):
    """2 workers (0.25 CPU each) + the data pipeline progress on 2 CPUs; a 1-worker resume from the
    merged DataPosition trains every unseen index once: the union is exactly 0..N-1, no duplicates."""
    path, tok = corpus
    overrides = ["model.preset=debug", "model.vocab_size=512", "data.seq_len=16", "train.global_batch_tokens=128",
                 f"train.micro_batch_size={B}", "data.tokenize_batch_docs=32", "data.val_fraction=0.05",
                 "train.eval_batches=2", "scaling.num_workers=2", "scaling.cpus_per_worker=0.25",
                 "data.sources=" + json.dumps([{"path": str(path), "format": "jsonl"}])]
    first = run(tmp_path, "first", overrides, tok, DataPosition(), batches=3, workers=2)
    seen1 = [i for r in first for batch in r["train"] for i in batch]
    assert len(seen1) == 2 * 3 * B and len(set(seen1)) == len(seen1)
    assert first[0]["val"] == [0, 1, 2, 3] and first[1]["val"] == [4, 5, 6, 7]  # held-out: each rank its stride

    position = DataPosition().advance(seen1)
    holes = max(seen1) + 1 - len(seen1)
    second = run(tmp_path, "second", [*overrides, "scaling.num_workers=1"], tok, position,
                 batches=math.ceil((holes + 2 * B) / B), workers=1)
    seen2 = [i for batch in second[0]["train"] for i in batch]
    union = sorted(seen1 + seen2)
    assert not set(seen1) & set(seen2)
    assert union == list(range(len(union)))
