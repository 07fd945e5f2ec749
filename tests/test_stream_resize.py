"""A streaming run resized from 2 workers to 1 trains the same rows at every step as the run
that was not resized, so its losses stay on the uninterrupted curve.

Found on namespace hosts (tests/test_hosts.py): a streaming run with `scaling.num_workers=[1,2]`
restored on 1 worker left the uninterrupted curve at its first step after the restore (4.9078
against 4.8128) although every global index was trained once. The cause: the streaming split
hands rows to whichever worker asks, so a step at 2 workers trained the rows the two workers
happened to hold (here rows 0-3 and 8-11 for step 1: whole blocks of 8 rows in turn), and a
step at 1 worker trained the next 8 in order. Now every step trains the next G unseen indices
at every world size (`raylm.ray.data.StreamingTrainSource`: the ranks exchange the misplaced
rows), as the prepared path does.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch.multiprocessing as mp

from raylm.config import load_config

ROOT = Path(__file__).resolve().parents[1]
G = 8  # sequences per step: 2 micro-batches of 2 on each of 2 workers, 4 of 2 on 1 worker
STEPS = 6


def stream_config(out: Path, *overrides: str):
    return load_config(ROOT / "configs/debug.yaml", [
        f"run.output_dir={out}", "data.seq_len=64", f"train.global_batch_tokens={64 * G}",
        "train.micro_batch_size=2", f"train.max_steps={STEPS}", "train.checkpoint_every=3", "train.eval_every=0",
        "train.log_every=1", "run.sample_tokens=0", "run.keep_checkpoints=5", "scaling.cpus_per_worker=0.25",
        *overrides,
    ])


def losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def fit_run(cfg) -> Path:
    from raylm.ray.train import fit
    from raylm.train.runs import resolve_run

    result = fit(resolve_run(cfg), log=lambda line: None)
    return Path(result.run_dir)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _blocks_in_turn(rank: int, world: int, n_rows: int, block: int, width: int, skip: set):
    """What a `streaming_split(equal=False)` shard hands a rank when ranks take whole blocks in
    turn: block k of rows [k*block, (k+1)*block) to rank k % world, consumed rows already dropped
    by the packer; batches of 2 rows."""
    for first in range(rank * block, n_rows, world * block):
        index = np.asarray([i for i in range(first, min(first + block, n_rows)) if i not in skip], dtype=np.int64)
        for k in range(0, len(index), 2):
            ix = index[k:k + 2]
            yield {"tokens": np.repeat(ix[:, None], width, axis=1).astype(np.int32), "index": ix,
                   "anchor": np.stack([ix, ix], axis=1)}


def _exchange_rank(rank: int, world: int, port: int, out: str, position: dict, block: int):
    import torch.distributed as dist

    from raylm.data.order import DataPosition, step_shares, step_slots, unseen_micro_batches
    from raylm.ray.data import _HeldRows, _step_rows

    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world)
    G, B, n_rows = 8, 2, 60
    pos = DataPosition.from_state_dict(position)
    skip = set(pos.extra.tolist()) | set(range(pos.watermark))
    held = _HeldRows(_blocks_in_turn(rank, world, n_rows, block, 5, skip), pos)
    sizes, shares = [len(s) for s in step_slots(G, rank, world, B)], step_shares(G, world, B)
    record = []
    for needed in unseen_micro_batches(pos, 0, 1, G, G):
        rows = _step_rows(held, needed, rank, shares)
        if rows is None:
            break
        assert len(rows["index"]) == sum(sizes) and (rows["tokens"][:, 0] == rows["index"]).all()
        assert (np.asarray(rows["anchor"])[:, 0] == rows["index"].numpy()).all()  # each row kept its anchor
        record.append(rows["index"].tolist())
    Path(out, f"rank{rank}.json").write_text(json.dumps(record))
    if world > 1:
        dist.destroy_process_group()


@pytest.mark.parametrize("world", [1, pytest.param(2, marks=pytest.mark.slow), pytest.param(3, marks=pytest.mark.slow)])
def test_every_step_trains_the_next_g_unseen_indices_whichever_rank_was_handed_them(tmp_path, world):
    """Ranks handed whole blocks in turn (as the streaming split does) still train, at each step,
    exactly the next G = 8 unseen global indices, each once, every rank its `step_shares` share
    (3 ranks: 4/2/2), from a position with holes above its watermark; the stream's end stops
    every rank at the same step."""
    position = {"watermark": 3, "extra": [5, 6, 13]}
    port = _free_port()
    if world > 1:  # a real gloo group of `world` processes
        mp.start_processes(_exchange_rank, args=(world, port, str(tmp_path), position, 3), nprocs=world,
                           start_method="fork")
    else:
        _exchange_rank(0, 1, port, str(tmp_path), position, 3)
    records = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(world)]
    unseen = [i for i in range(60) if i >= 3 and i not in (5, 6, 13)]
    steps = len(unseen) // 8
    assert all(len(r) == steps for r in records)  # every rank stops after the last whole step
    for s in range(steps):
        assert sorted(i for r in records for i in r[s]) == unseen[8 * s:8 * (s + 1)]


@pytest.mark.ray
@pytest.mark.slow  # two short runs on the session's Ray cluster
def test_a_streaming_run_resized_from_2_workers_to_1_trains_the_same_rows_and_losses_each_sequence_once(
        ray_cluster, tmp_path):
    """2 workers train 6 steps (checkpoints at 3 and 6). A second run starts from the step-3
    checkpoint on 1 worker: its steps 4-6 have the losses (rel 1e-4) of the uninterrupted
    2-worker run's, and each run's final data position is exactly the first 6 x G sequences
    (no hole, none twice)."""
    from support import train_tokenizer_local
    from raylm.train import checkpoint as ckpt

    tokenizer = tmp_path / "tokenizer.model"
    train_tokenizer_local(stream_config(tmp_path)).save(tokenizer)
    base = [f"tokenizer.path={tokenizer}"]

    two = fit_run(stream_config(tmp_path / "two", *base, "scaling.num_workers=2"))
    at_3 = two / ckpt.checkpoint_dir_name(3)
    one = fit_run(stream_config(tmp_path / "one", *base, "scaling.num_workers=1", f"run.resume_from={at_3}"))

    uninterrupted, resized = losses(two), losses(one)
    assert sorted(uninterrupted) == list(range(1, STEPS + 1)) and sorted(resized) == [4, 5, 6]
    for step in (4, 5, 6):
        assert resized[step] == pytest.approx(uninterrupted[step], rel=1e-4), (step, resized, uninterrupted)
    for run in (two, one):
        state = ckpt.read_marker(ckpt.list_checkpoints(run)[-1])["train_state"]
        assert (state["step"], state["data_watermark"], state["data_extra"]) == (STEPS, STEPS * G, [])
