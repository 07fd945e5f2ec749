"""`train.grad_sync`: under FSDP2, "every" reduce-scatters each micro-batch, so the gradient a
rank holds between micro-batches is its shard; "last" accumulates it whole. Same losses.

One real 2-process gloo group (torch.multiprocessing spawn) trains the debug model through the
Trainer in both modes, two micro-batches per rank per step, on random token rows.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist

from raylm.config import load_config
from raylm.data.order import PackedDataset
from raylm.errors import ConfigError
from raylm.train.trainer import RankEnv, Trainer
from support import ListSink, run_ranks

STEPS, SEQ_LEN, MICRO_BATCH, WORLD, ACCUM = 3, 32, 2, 2, 2


def grad_sync_config(out: Path, mode: str):
    return load_config(None, [
        "model.preset=debug", "model.vocab_size=512", f"model.max_seq_len={SEQ_LEN}", f"data.seq_len={SEQ_LEN}",
        f"train.max_steps={STEPS}", f"train.micro_batch_size={MICRO_BATCH}",
        f"train.global_batch_tokens={SEQ_LEN * MICRO_BATCH * WORLD * ACCUM}", "train.eval_every=0",
        "train.log_every=1", "optimizer.warmup_steps=1", "optimizer.lr=3e-3", f"run.output_dir={out}",
        f"train.grad_sync={mode}",
    ])


def held_gradients(model) -> dict:
    """What a rank holds as gradient right now: each parameter's sharded `.grad`, and the
    unsharded gradient FSDP2 accumulates itself while gradient sync is off."""
    from torch.distributed.tensor import DTensor, Shard

    sharded, local_grad, local_param, full_param = [], 0, 0, 0
    for p in model.parameters():
        assert isinstance(p, DTensor) and p.placements == (Shard(0),)  # a resharded FSDP2 parameter
        local_param += p.to_local().numel()
        full_param += p.numel()
        if p.grad is not None:
            sharded.append(isinstance(p.grad, DTensor) and p.grad.placements == (Shard(0),)
                           and p.grad.to_local().shape == p.to_local().shape)
            local_grad += p.grad.to_local().numel()
    unsharded = 0
    for module in model.modules():
        state = getattr(module, "_get_fsdp_state", None)
        for group in state()._fsdp_param_groups if state is not None else []:
            for fp in group.fsdp_params:
                held = fp.unsharded_accumulated_grad if fp.unsharded_accumulated_grad is not None \
                    else fp._unsharded_param.grad if hasattr(fp, "_unsharded_param") else None
                unsharded += held.numel() if held is not None else 0
    return {"grads": len(sharded), "all_sharded": all(sharded), "local_grad": local_grad,
            "local_param": local_param, "full_param": full_param, "unsharded_grad": unsharded}


def _train_both_modes(rows_path: str, rank: int, out: Path) -> dict:
    """Each mode: fit STEPS steps, looking at the held gradients when micro-batch 2 of step 1 starts."""
    result = {}
    for mode in ("every", "last"):
        cfg = grad_sync_config(out / mode, mode)
        sink = ListSink(out / mode / f"ckpt{rank}")
        trainer = Trainer(cfg, RankEnv(rank, dist.get_world_size(), torch.device("cpu")), sink,
                          PackedDataset(np.load(rows_path), seed=0), None, log=lambda line: None)
        seen = []

        def before_forward(module, args, seen=seen):
            if len(seen) < 2:  # forward 1 is micro-batch 1; forward 2 finds micro-batch 1's gradient held
                seen.append(held_gradients(module) if seen else {})

        # prepend: before FSDP2's own pre-forward hook gathers the root's parameters
        handle = trainer.model.register_forward_pre_hook(before_forward, prepend=True)
        trainer.fit()
        handle.remove()
        norms = [torch.linalg.vector_norm(p.full_tensor().double()).item() for p in trainer.model.parameters()]
        result[mode] = {"between": seen[1], "losses": sink.losses(),
                        "grad_norms": [r["grad_norm"] for r in sink.records if "grad_norm" in r],
                        "param_norms": norms}
    return result


@pytest.fixture(scope="module")
def both_modes(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("grad_sync")
    rows = np.random.default_rng(0).integers(1, 512, size=(64, SEQ_LEN + 1), dtype=np.int64)
    np.save(out / "rows.npy", rows)
    return run_ranks(functools.partial(_train_both_modes, str(out / "rows.npy")), out, "grad_sync", WORLD)


@pytest.mark.slow  # one 2-rank spawn training both modes: ~30 s on 2 busy cores
def test_every_holds_only_this_ranks_gradient_shard_between_micro_batches(both_modes):
    """grad_sync=every: after micro-batch 1 of 2, every parameter's .grad is a Shard(0) DTensor
    of the parameter's local shape, the two ranks' shards add up to the whole model once, and
    no unsharded gradient is held."""
    held = [r["every"]["between"] for r in both_modes]
    for h in held:
        assert h["grads"] > 0 and h["all_sharded"]
        assert h["local_grad"] == h["local_param"] < h["full_param"]
        assert h["unsharded_grad"] == 0
    assert sum(h["local_grad"] for h in held) == held[0]["full_param"]


@pytest.mark.slow  # one 2-rank spawn training both modes: ~30 s on 2 busy cores
def test_last_holds_the_whole_unsharded_gradient_between_micro_batches(both_modes):
    """grad_sync=last: after micro-batch 1 of 2 no parameter has a sharded .grad yet; each rank
    holds FSDP2's unsharded gradient of every parameter (the whole model's count)."""
    for r in both_modes:
        h = r["last"]["between"]
        assert h["grads"] == 0
        assert h["unsharded_grad"] == h["full_param"]


@pytest.mark.slow  # one 2-rank spawn training both modes: ~30 s on 2 busy cores
def test_losses_grad_norms_and_weights_are_the_same_in_both_modes(both_modes):
    """Where the sum over micro-batches is taken changes only float summation order."""
    for r in both_modes:
        every, last = r["every"], r["last"]
        assert len(every["losses"]) == STEPS and every["losses"].keys() == last["losses"].keys()
        for step, loss in every["losses"].items():
            assert loss == pytest.approx(last["losses"][step], rel=1e-5)
        assert every["grad_norms"] == pytest.approx(last["grad_norms"], rel=1e-4)
        assert every["param_norms"] == pytest.approx(last["param_norms"], rel=1e-5)
    assert both_modes[0]["every"]["losses"] == both_modes[1]["every"]["losses"]  # a global mean, on each rank


def test_a_grad_sync_value_other_than_every_or_last_is_one_line_naming_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"^train\.grad_sync='sometimes': must be one of every, last$"):
        grad_sync_config(tmp_path, "sometimes")
    assert load_config(None, []).train.grad_sync == "every"


def test_planner_carries_the_gradient_as_a_shard_under_every_and_whole_under_last():
    """raylm plan: between micro-batches a GPU holds 4N/W bytes of gradient under every, 4N under
    last; one GPU (no sharding) or one micro-batch per step makes the modes the same; every
    moves k-1 more fp32 reduce-scatters of N(W-1)/W per step."""
    from raylm.plan import estimate_memory

    cfg = load_config(str(Path(__file__).resolve().parents[1] / "configs" / "llama2-7b.yaml"))
    N, W = cfg.model.num_params(), 64
    every, last = (estimate_memory(cfg, W, grad_sync=mode) for mode in ("every", "last"))
    k = every.grad_accum_steps
    assert k == 8 and every.carried_grad_bytes == 4 * N // W and last.carried_grad_bytes == 4 * N
    assert every.total_bytes < last.total_bytes
    assert every.comm_bytes - last.comm_bytes == pytest.approx((k - 1) * 4 * N * (W - 1) / W, rel=1e-9)
    one_gpu = [estimate_memory(cfg, 1, grad_sync=mode) for mode in ("every", "last")]
    assert one_gpu[0].carried_grad_bytes == one_gpu[1].carried_grad_bytes == 4 * N
    no_accum = [estimate_memory(cfg, 1024 // cfg.train.micro_batch_size, grad_sync=mode) for mode in ("every", "last")]
    assert no_accum[0].grad_accum_steps == 1 and no_accum[0].total_bytes == no_accum[1].total_bytes
