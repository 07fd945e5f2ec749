"""The torch-core loop: overfits a fixed batch, resumes exactly, schedules as documented."""

import math

import numpy as np
import pytest
import torch

from raylm.config import load_config
from raylm.data.order import PackedDataset
from raylm.model import Transformer
from raylm.optim import build_optimizer, lr_at, param_groups
from raylm.train.trainer import RankEnv, Trainer
from support import ListSink

DEBUG = ["model.preset=debug", "data.seq_len=32", "train.global_batch_tokens=128", "train.micro_batch_size=2",
         "train.eval_every=0", "train.log_every=1000"]


def _model(cfg):
    torch.manual_seed(cfg.train.seed)
    model = Transformer(cfg.model)
    model.init_weights()
    return model


def _train(cfg, data, val=None, model=None, sink=None, **kw):
    model = model or _model(cfg)
    trainer = Trainer(cfg, RankEnv(), sink or ListSink(), data, val, model=model,
                      optimizer=build_optimizer(model, cfg.optimizer), log=lambda s: None, **kw)
    return trainer.fit(), trainer


def test_loop_overfits_one_fixed_batch_to_near_zero_loss():
    cfg = load_config(None, DEBUG + ["train.max_steps=120", "optimizer.lr=3e-3", "optimizer.warmup_steps=5",
                                     "optimizer.weight_decay=0", "optimizer.schedule=constant"])
    row = np.random.default_rng(0).integers(4, 2048, size=(1, 33)).astype(np.int32)
    data = PackedDataset(np.repeat(row, 4, axis=0), shuffle=False)  # every sequence is the same
    out, _ = _train(cfg, data)
    assert out["loss"] < 0.05
    assert out["accuracy"] > 0.99


def test_gradient_accumulation_equals_one_big_batch():
    """4 micro-batches of 2 give the same update as 1 micro-batch of 8: the global batch is what counts."""
    rows = np.random.default_rng(1).integers(4, 2048, size=(64, 33)).astype(np.int32)
    results = []
    for micro in ("2", "8"):
        cfg = load_config(None, DEBUG[:-2] + [f"train.micro_batch_size={micro}", "train.global_batch_tokens=256",
                                              "train.max_steps=3", "train.eval_every=0"])
        out, trainer = _train(cfg, PackedDataset(rows))
        results.append((out["loss"], [p.detach().clone() for p in trainer.model.parameters()]))
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-5)
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_data_position_after_k_steps_is_the_first_k_global_batches():
    cfg = load_config(None, DEBUG + ["train.max_steps=3"])
    rows = np.random.default_rng(2).integers(4, 2048, size=(40, 33)).astype(np.int32)
    seen = []
    _, trainer = _train(cfg, PackedDataset(rows), on_indices=lambda step, ix: seen.append(ix))
    assert np.array_equal(np.concatenate(seen), np.arange(12))
    position = trainer.state.data_position
    assert position.watermark == 12 and position.extra.size == 0


def test_metrics_have_what_an_engineer_watches():
    cfg = load_config(None, DEBUG + ["train.max_steps=2", "train.eval_every=1", "train.eval_batches=2"])
    rows = np.random.default_rng(3).integers(4, 2048, size=(40, 33)).astype(np.int32)
    sink = ListSink()
    _train(cfg, PackedDataset(rows), PackedDataset(rows[:8]), sink=sink)
    records = sink.records
    step_records = [r for r in records if "loss" in r]
    assert {"loss", "lr", "grad_norm", "tokens_per_second", "tokens_per_second_per_worker", "accuracy",
            "val_loss", "val_perplexity", "peak_memory_bytes"} <= set(step_records[-1])
    first = step_records[0]
    assert math.isclose(first["val_perplexity"], math.exp(first["val_loss"]), rel_tol=1e-6)
    assert abs(records[0]["val_loss"] - math.log(cfg.model.vocab_size)) < 1.0  # untrained: about ln(vocab)


def test_schedule_warms_up_then_decays_to_the_floor():
    cfg = load_config(None, ["optimizer.lr=1e-3", "optimizer.warmup_steps=10", "optimizer.min_lr_ratio=0.1"]).optimizer
    lrs = [lr_at(s, 100, cfg) for s in range(100)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))
    assert lrs[-1] == pytest.approx(1e-4, rel=0.01)
    cfg.schedule = "wsd"
    wsd = [lr_at(s, 100, cfg) for s in range(100)]
    assert wsd[50] == pytest.approx(1e-3) and wsd[-1] == pytest.approx(1e-4)


def test_no_weight_decay_on_norms_and_embeddings():
    cfg = load_config(None, ["model.preset=debug"])
    model = Transformer(cfg.model)
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    assert all("norm" not in names[id(p)] and "embeddings" not in names[id(p)] for p in decay["params"])
    assert any("tok_embeddings" in names[id(p)] for p in no_decay["params"])
