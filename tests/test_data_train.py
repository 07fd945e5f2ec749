"""Streaming into Ray Train workers on a 2-CPU cluster: progress, and an exact anchored restart on another world size."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from raylm.config import load_config
from raylm.data.order import DataPosition
from raylm.tokenizer import Tokenizer

pytestmark = [pytest.mark.ray, pytest.mark.slow]  # every test here runs on a Ray cluster
B = 4


def consume(config: dict) -> None:
    """Minimal train_func: read `batches` micro-batches (and one held-out one); record each row's
    index, anchor and tokens."""
    import ray.train

    from raylm.ray.data import worker_sources

    cfg = load_config(None, config["overrides"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    position = DataPosition.from_state_dict(config["position"])
    train, validation = worker_sources(cfg, ["train", "validation"])
    batches = train.micro_batches(position, rank, world, B)
    seen, anchors, tokens = [], [], []
    for _ in range(config["batches"]):
        batch = next(batches)
        assert tuple(batch["tokens"].shape) == (B, cfg.data.seq_len + 1)
        seen.append(batch["index"].tolist())
        anchors.extend(np.asarray(batch["anchor"]).reshape(-1, 2).tolist())
        tokens.extend(batch["tokens"].tolist())
    val = next(validation.micro_batches(0, rank, world, B))
    Path(config["out"], f"rank{rank}.json").write_text(json.dumps(
        {"train": seen, "anchor": anchors, "tokens": tokens, "val": val["index"].tolist()}))
    ray.train.report({"batches": len(seen)})


def run(out: Path, overrides, tokenizer, batches, workers, before_fit=lambda datasets: None):
    """`consume` on `workers` workers fed by the real training stream of a run directory `out`
    (TrainStream: from the newest good checkpoint in `out`, if any); `before_fit(datasets)` runs
    once the datasets are made. Each rank's record."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from raylm.data.plan import list_corpus
    from raylm.ray.data import data_config, trainer_datasets

    cfg = load_config(None, overrides)
    out.mkdir(exist_ok=True)
    datasets, _ = trainer_datasets(cfg, tokenizer, list_corpus(cfg), run_dir=str(out))
    position, _ = datasets["train"].start()  # what the workers restore: the checkpoint's, as in the trainer
    before_fit(datasets)
    trainer = TorchTrainer(
        consume,
        train_loop_config={"overrides": overrides, "position": (position or DataPosition()).state_dict(),
                           "batches": batches, "out": str(out)},
        scaling_config=ray.train.ScalingConfig(num_workers=workers, resources_per_worker={"CPU": 0.25}),
        run_config=ray.train.RunConfig(name=out.name, storage_path=str(out.parent / "ray_results")),
        datasets=datasets,
        dataset_config=data_config(cfg),
    )
    trainer.fit()
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(workers)]


def save_position_checkpoint(run_dir: Path, cfg, step: int, records: list[dict]) -> dict:
    """A real checkpoint in `run_dir` (the debug model, untrained) whose train state is the
    data position and anchor the trainer would save after the rows of `records`: the same
    TrainState merge (`sync_position`) as at a checkpoint of the training loop."""
    import torch

    from raylm.model import Transformer
    from raylm.train import checkpoint as ckpt
    from raylm.train.trainer import TrainState

    state = TrainState(step=step)
    for r in records:
        index = np.asarray([i for batch in r["train"] for i in batch], dtype=np.int64)
        state.pending_indices.append(index)
        state.pending_anchors.append(np.column_stack([index, np.asarray(r["anchor"], dtype=np.int64)]))
    state.sync_position()
    model = Transformer(cfg.model)
    ckpt.save_checkpoint(run_dir / ckpt.checkpoint_dir_name(step), model, torch.optim.AdamW(model.parameters()),
                         state.state_dict())
    return state.state_dict()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """100 JSONL files of 3 short documents each: small files, so that a restart's anchor lies
    several files into the plan."""
    rng = np.random.default_rng(0)
    vocab = ["alpha", "beta", "gamma", "delta", "def", "return", "import", "class", "self", "value"]
    root = tmp_path_factory.mktemp("corpus")
    for f in range(100):
        (root / f"c{f:03d}.jsonl").write_text("".join(
            json.dumps({"text": " ".join(rng.choice(vocab, size=int(rng.integers(5, 60))))}) + "\n" for _ in range(3)))
    tok = Tokenizer.train(["".join(p.read_text() for p in sorted(root.iterdir()))], 300)
    return root, tok


def test_two_workers_stream_on_two_cpus_then_one_worker_restarts_exactly_from_the_checkpoint_anchor(
        ray_cluster, tmp_path, corpus):
    """2 workers (0.25 CPU each) + the data pipeline progress on 2 CPUs. A real checkpoint of
    their data position is put in a second run directory, and 1 worker starts there: the real
    TrainStream restores the checkpoint's position and anchor and reads from the anchor's file
    on (every file before it is overwritten with bytes that are not text first, so a stream
    that read them would fail). The rows it hands out are exactly the continuation: the unseen
    indices in order, from the lowest, each with the tokens of the same row of an
    uninterrupted single-process pack; with the first run's, every index 0..N-1 once."""
    from raylm.data.local import local_datasets

    root, tok = corpus
    overrides = ["model.preset=debug", "model.vocab_size=512", "data.seq_len=16", "train.global_batch_tokens=128",
                 f"train.micro_batch_size={B}", "data.tokenize_batch_docs=32", "data.val_fraction=0.05",
                 "data.stream_passes=1", "train.eval_batches=2", "scaling.num_workers=2", "scaling.cpus_per_worker=0.25",
                 "data.sources=" + json.dumps([{"path": str(root), "format": "jsonl"}])]
    cfg = load_config(None, overrides)
    reference = local_datasets(cfg, tok)[0].source.rows  # (N, seq_len + 1): row i is index i

    first = run(tmp_path / "first", overrides, tok, batches=4, workers=2)
    seen1 = [i for r in first for batch in r["train"] for i in batch]
    assert len(seen1) == 2 * 4 * B and len(set(seen1)) == len(seen1)
    assert first[0]["val"] == [0, 1, 2, 3] and first[1]["val"] == [4, 5, 6, 7]  # held-out: each rank its stride
    for r in first:
        assert r["tokens"] == reference[[i for batch in r["train"] for i in batch]].tolist()

    second_dir = tmp_path / "second"
    second_dir.mkdir()
    state = save_position_checkpoint(second_dir, cfg, 4, first)
    anchor = state["data_anchor"]
    assert anchor is not None and anchor[0] < state["data_watermark"] and anchor[1] > 0
    position = DataPosition().advance(seen1)
    assert (state["data_watermark"], state["data_extra"]) == (position.watermark, position.state_dict()["extra"])

    def damage_files_before_the_anchor(datasets):
        stream = datasets["train"]
        restored, restored_anchor = stream.start()  # the checkpoint in the run directory, as the stream finds it
        assert restored.state_dict() == position.state_dict() and restored_anchor == anchor
        files = stream.plan.files
        assert len({f.path for f in files}) == len(files)  # one pass: no file comes again after the anchor
        for f in files[:anchor[1]]:
            Path(f.path).write_bytes(b"\xff" * f.size)

    holes = max(seen1) + 1 - len(seen1)
    second = run(second_dir, [*overrides, "scaling.num_workers=1"], tok, math.ceil((holes + 2 * B) / B), 1,
                 before_fit=damage_files_before_the_anchor)
    seen2 = [i for batch in second[0]["train"] for i in batch]
    unseen = [i for i in range(len(reference)) if i not in set(seen1)]
    assert seen2 == unseen[:len(seen2)]  # the continuation, in order, from the lowest unseen index
    assert second[0]["tokens"] == reference[seen2].tolist()  # rebuilt from the anchor: the same rows
    union = sorted(seen1 + seen2)
    assert union == list(range(len(union)))
