"""Width transfer (µP, `model.parametrization: mup`): the rules of docs/mup.md on real tiny models.

Pure torch, no Ray: the model, the optimizer builder and the schedule's `set_lr`, a checkpoint
round trip, and a coordinate check (a few Adam steps at three widths).
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch

from raylm.config import OptimizerConfig, load_config
from raylm.errors import ConfigError
from raylm.model import ModelConfig, Transformer
from raylm.optim import apply_group_settings, build_optimizer, set_lr
from raylm.train import checkpoint as ckpt

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")

BASE = dict(n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=256, multiple_of=32, max_seq_len=64)
HIDDEN = ("wq", "wk", "wv", "wo", "w1", "w3")  # fan-in = dim


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def model_config(dim: int, parametrization: str = "standard", base: int | None = None, **extra) -> ModelConfig:
    cfg = ModelConfig(dim=dim, parametrization=parametrization, mup_base_dim=base, **{**BASE, **extra})
    cfg.validate()
    return cfg


def built(cfg: ModelConfig, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(cfg)


def tokens(vocab: int = 256, batch: int = 4, length: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length + 1), generator=torch.Generator().manual_seed(seed))


def group_of(optimizer: torch.optim.Optimizer, param: torch.nn.Parameter) -> dict:
    (group,) = [g for g in optimizer.param_groups if any(p is param for p in g["params"])]
    return group


def adam_steps(model: Transformer, steps: int, lr: float, batch: torch.Tensor) -> torch.optim.Optimizer:
    optimizer = build_optimizer(model, OptimizerConfig(lr=lr, weight_decay=0.1))
    for _ in range(steps):
        set_lr(optimizer, lr)
        logits = model(batch[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return optimizer


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("base", [None, 128])
def test_mup_at_its_base_width_is_the_standard_model_bit_for_bit(tied, base):
    """Same seed -> the same weights, the same logits, the same optimizer groups and, after three
    AdamW steps with weight decay, still the same weights: µP at its base width *is* standard."""
    standard = built(model_config(128, tie_embeddings=tied))
    mup = built(model_config(128, "mup", base, tie_embeddings=tied))
    assert mup.config.output_multiplier == 1.0 and mup.config.attention_scale is None
    for name, tensor in standard.state_dict().items():
        assert torch.equal(mup.state_dict()[name], tensor), name
    batch = tokens()
    with torch.no_grad():
        assert torch.equal(mup(batch[:, :-1]), standard(batch[:, :-1]))
    opt_standard = adam_steps(standard, 3, 3e-3, batch)
    opt_mup = adam_steps(mup, 3, 3e-3, batch)
    strip = [{k: v for k, v in g.items() if k != "params"} for g in opt_standard.param_groups]
    assert strip == [{k: v for k, v in g.items() if k != "params"} for g in opt_mup.param_groups]
    assert len(opt_mup.param_groups) == 2  # decayed and not, as standard has always had
    for name, tensor in standard.state_dict().items():
        assert torch.equal(mup.state_dict()[name], tensor), name


@pytest.mark.parametrize("mult", [2, 4])
def test_mup_learning_rates_and_weight_decay_follow_the_rule_at_2x_and_4x_width(mult):
    """Hidden matrices: lr * base fan-in / fan-in (w2's fan-in is the SwiGLU hidden size), and
    weight decay / the same ratio (lr * weight_decay, AdamW's decay per step, kept). Embedding,
    output head and norm gains: the schedule's lr; the embedding and gains are not decayed."""
    base, lr, wd = 64, 1e-2, 0.1
    cfg = model_config(base * mult, "mup", base)
    model = Transformer(cfg)
    optimizer = build_optimizer(model, OptimizerConfig(lr=lr, weight_decay=wd))
    set_lr(optimizer, 0.5 * lr)  # a scheduled value: every group follows it with its own multiplier
    ffn_ratio = model_config(base).ffn_hidden_dim / cfg.ffn_hidden_dim  # the base model's SwiGLU size
    assert ffn_ratio != pytest.approx(1 / mult)  # rounding: w2's ratio is its own
    seen = set()
    for name, param in model.named_parameters():
        group, kind = group_of(optimizer, param), name.split(".")[-2]
        if kind in HIDDEN:
            ratio, decayed = 1 / mult, True
        elif kind == "w2":
            ratio, decayed = ffn_ratio, True
        elif kind == "output":
            ratio, decayed = 1.0, True
        else:  # tok_embeddings, attention_norm, ffn_norm, norm
            ratio, decayed = 1.0, False
        assert group["lr"] == pytest.approx(0.5 * lr * ratio, rel=1e-12), name
        assert group["lr_mult"] == pytest.approx(ratio, rel=1e-12), name
        assert group["weight_decay"] == (pytest.approx(wd / ratio, rel=1e-12) if decayed else 0.0), name
        seen.add(kind)
    assert seen == {*HIDDEN, "w2", "output", "tok_embeddings", "attention_norm", "ffn_norm", "norm"}


def test_mup_init_std_scales_with_fan_in_and_embeddings_and_head_do_not():
    """At 4x the base width: hidden std halves (variance ~ 1/fan-in; w2 by its own ratio, on top
    of the residual 1/sqrt(2 n_layers)); embedding and output head keep init_std."""
    base, std = 64, 0.02
    cfg = model_config(256, "mup", base, vocab_size=4096)
    model = built(cfg)
    residual = std / math.sqrt(2 * cfg.n_layers)
    ffn_ratio = model_config(base).ffn_hidden_dim / cfg.ffn_hidden_dim
    block = model.layers[0]
    expected = {
        block.attention.wq.weight: std / 2, block.feed_forward.w1.weight: std / 2,
        block.attention.wo.weight: residual / 2, block.feed_forward.w2.weight: residual * math.sqrt(ffn_ratio),
        model.tok_embeddings.weight: std, model.output.weight: std,
    }
    for weight, want in expected.items():
        assert weight.std().item() == pytest.approx(want, rel=0.03)


def test_mup_forward_is_standard_attention_and_logits_with_the_multipliers_folded_in():
    """The µP forward at 4x width equals a standard model whose wq is scaled by sqrt(base_head_dim /
    head_dim) (attention scale sqrt(base_head_dim)/head_dim instead of 1/sqrt(head_dim)) and whose
    output head is scaled by base_dim / dim (the logit multiplier): the two factors, and nothing else."""
    cfg = model_config(256, "mup", 64)
    assert cfg.output_multiplier == 0.25 and cfg.base_head_dim == 16 and cfg.head_dim == 64
    assert cfg.attention_scale == pytest.approx(4 / 64)  # = 1/16 = (1/sqrt(16)) * (16/64): ~1/head_dim
    mup = built(cfg)
    standard = Transformer(dataclasses.replace(cfg, parametrization="standard"))
    folded = dict(mup.state_dict())
    for i in range(cfg.n_layers):
        folded[f"layers.{i}.attention.wq.weight"] = folded[f"layers.{i}.attention.wq.weight"] * 0.5
    folded["output.weight"] = folded["output.weight"] * 0.25
    standard.load_state_dict(folded)
    batch = tokens()[:, :-1]
    with torch.no_grad():
        ours, theirs = mup(batch), standard(batch)
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
        plain = Transformer(dataclasses.replace(cfg, parametrization="standard"))
        plain.load_state_dict(mup.state_dict())
        assert (plain(batch) - ours).abs().max() > 1e-3  # not vacuous: the factors change the logits


def test_the_kv_cache_path_uses_the_same_attention_scale():
    """Generation (prompt, then one token at a time through the KV cache) gives the logits of one
    full forward pass under µP too."""
    from raylm.model import KVCache

    model = built(model_config(256, "mup", 64)).eval()
    batch = tokens(batch=2, length=12)[:, :-1]
    with torch.no_grad():
        full = model(batch)
        cache = KVCache(model.config)
        steps = [model(batch[:, :8], cache, 0)] + [model(batch[:, t:t + 1], cache, t) for t in range(8, 12)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)


def test_a_base_head_dim_equal_to_head_dim_keeps_the_standard_attention_scale():
    """Width grown by adding heads (head_dim fixed): mup_base_head_dim = head_dim keeps SDPA's scale."""
    cfg = model_config(256, "mup", 64, n_heads=16, n_kv_heads=4, mup_base_head_dim=16)
    assert cfg.head_dim == 16 and cfg.attention_scale is None and cfg.output_multiplier == 0.25
    assert model_config(256, "mup", 64, n_heads=16, n_kv_heads=4).attention_scale == pytest.approx(2 / 16)


def test_the_schedule_and_a_checkpoint_round_trip_keep_each_groups_multiplier(tmp_path):
    """DCP saves and loads the groups (matched by parameter name); after a load the run's config
    sets lr_mult and weight_decay again, even over a checkpoint written without them."""
    cfg = model_config(128, "mup", 32)
    model = built(cfg)
    optimizer = adam_steps(model, 1, 1e-2, tokens())
    ckpt.save_checkpoint(tmp_path / "ckpt", model, optimizer, {"step": 1})
    fresh = built(cfg, seed=1)
    fresh_opt = build_optimizer(fresh, OptimizerConfig(lr=1e-2, weight_decay=0.1))
    for group in fresh_opt.param_groups:
        group["lr_mult"], group["weight_decay"] = 1.0, 0.0  # as an old or foreign checkpoint would leave them
    ckpt.load_checkpoint(tmp_path / "ckpt", fresh, fresh_opt)
    assert [g["lr_mult"] for g in fresh_opt.param_groups] == [g["lr_mult"] for g in optimizer.param_groups]
    for group in fresh_opt.param_groups:
        group["lr_mult"], group["weight_decay"] = 1.0, 0.0
    apply_group_settings(fresh_opt, fresh, 0.1)
    for a, b in zip(fresh_opt.param_groups, optimizer.param_groups):
        assert (a["lr_mult"], a["weight_decay"]) == (b["lr_mult"], b["weight_decay"])
        assert len(a["params"]) == len(b["params"])
    set_lr(fresh_opt, 2e-3)
    assert sorted(g["lr"] for g in fresh_opt.param_groups) == pytest.approx(
        sorted(2e-3 * g["lr_mult"] for g in optimizer.param_groups))
    for name, tensor in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[name], tensor), name


def _two_rank_groups(rank: int, out: Path) -> dict:
    """On each rank of a gloo group: a sharded µP model (activation checkpointing on, so names
    carry a wrapper prefix), its groups by parameter name, one step, a DCP save and a load into
    a fresh sharded model whose groups were spoiled."""
    from torch.distributed.fsdp import FSDPModule

    from raylm.train.parallel import build_model

    torch.set_num_threads(1)
    cfg = load_config(None, ["model.preset=debug", "model.parametrization=mup", "model.mup_base_dim=32",
                             "train.activation_checkpointing=full"])

    def groups(model, optimizer) -> dict:
        names = {id(p): n for n, p in model.named_parameters()}
        return {names[id(p)]: [g["lr_mult"], g["weight_decay"]] for g in optimizer.param_groups for p in g["params"]}

    model = build_model(cfg, torch.device("cpu"))
    optimizer = adam_steps(model, 1, 1e-3, tokens(vocab=cfg.model.vocab_size, batch=2, length=16))
    ckpt.save_checkpoint(out / "ckpt", model, optimizer, {"step": 1})
    fresh = build_model(cfg, torch.device("cpu"), seed=5)
    fresh_opt = build_optimizer(fresh, cfg.optimizer)
    for group in fresh_opt.param_groups:
        group["lr_mult"] = -1.0
    ckpt.load_checkpoint(out / "ckpt", fresh, fresh_opt)
    return {"sharded": isinstance(model, FSDPModule), "groups": groups(model, optimizer),
            "loaded": groups(fresh, fresh_opt),
            "states": len(fresh_opt.state_dict()["state"])}


@pytest.mark.slow  # a spawned two-rank gloo group
def test_fsdp2_sharded_parameters_get_the_same_groups_and_a_dcp_checkpoint_restores_them(tmp_path):
    """FSDP2 keeps the parameters' names (and the optimizer is built after sharding), so every
    rank groups them as one process does, and DCP brings each group's settings back."""
    from support import run_ranks

    results = run_ranks(_two_rank_groups, tmp_path)
    single = built(load_config(None, ["model.preset=debug", "model.parametrization=mup",
                                      "model.mup_base_dim=32"]).model)
    optimizer = build_optimizer(single, OptimizerConfig())
    expected = {n: [group_of(optimizer, p)["lr_mult"], group_of(optimizer, p)["weight_decay"]]
                for n, p in single.named_parameters()}
    for result in results:
        assert result["sharded"] and result["states"] == len(expected)
        assert {n.replace("._checkpoint_wrapped_module", ""): v for n, v in result["groups"].items()} == expected
        assert result["loaded"] == result["groups"]


def test_invalid_mup_values_and_combinations_are_one_line_config_errors(tmp_path):
    cases = {
        "model.parametrization=mu": "model.parametrization='mu': must be one of standard, mup",
        "model.mup_base_dim=0": "model.mup_base_dim=0: must be a positive integer or null",
        "model.mup_base_head_dim=-8": "model.mup_base_head_dim=-8: must be a positive integer or null",
    }
    for override, message in cases.items():
        with pytest.raises(ConfigError) as e:
            load_config(None, ["model.preset=debug", "model.parametrization=mup", override])
        assert str(e.value) == message
    with pytest.raises(ConfigError) as e:
        load_config(None, ["model.preset=debug", "model.parametrization=mup", "model.mup_base_dim=64",
                           "model.tie_embeddings=true", f"model.init_from=hf:{tmp_path}"])
    assert str(e.value).startswith("model.init_from=") and "model.tie_embeddings=false" in str(e.value)
    assert "\n" not in str(e.value)
    from raylm.train.hf_import import weight_entries

    with pytest.raises(ConfigError) as e:
        weight_entries(model_config(128, "mup", 64, tie_embeddings=True))
    assert "no Llama equivalent" in str(e.value) and "\n" not in str(e.value)


def test_a_loaded_config_pins_the_base_width_so_a_wider_copy_keeps_it():
    cfg = load_config(None, ["model.preset=debug", "model.parametrization=mup"])
    assert cfg.model.mup_base_dim == cfg.model.dim == 128 and cfg.model.output_multiplier == 1.0
    assert "mup_base_dim: 128" in cfg.to_yaml()
    assert load_config(None, ["model.preset=debug"]).model.mup_base_dim is None  # standard: untouched


def _logit_std_after_adam(dim: int, parametrization: str, steps: int = 4, lr: float = 1e-2) -> float:
    """The logits' std after a few Adam steps on one fixed batch (a coordinate check)."""
    cfg = model_config(dim, parametrization, 32, n_heads=2, n_kv_heads=2, vocab_size=128)
    model = built(cfg)
    batch = tokens(vocab=128, batch=4, length=16)
    adam_steps(model, steps, lr, batch)
    with torch.no_grad():
        return model(batch[:, :-1]).std().item()


def test_coordinate_check_logits_stay_order_one_across_widths_under_mup_but_grow_under_standard():
    """Widths 32 -> 256 (8x): under standard the logits after 4 Adam steps grow with width (each
    output weight moves by ~lr, summed over dim coordinates); under µP they stay within 2x."""
    widths = [32, 64, 128, 256]
    standard = [_logit_std_after_adam(w, "standard") for w in widths]
    mup = [_logit_std_after_adam(w, "mup") for w in widths]
    assert standard[0] == pytest.approx(mup[0])  # the base width: the same model
    assert standard[-1] / standard[0] > 3, standard
    assert 0.5 < mup[-1] / mup[0] < 2, mup
