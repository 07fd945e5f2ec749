"""`raylm train` on a real local Ray cluster: 2 CPU FSDP workers (gloo), debug model, default corpus slice
plus a directory source holding a malformed record and a `.git/` of binary objects.

The reference run is trained once per module; resumed runs start from its step-k checkpoint.
"""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path

import pytest

from raylm.cli import main as cli_main
from raylm.config import load_config
from raylm.train import checkpoint as ckpt

pytestmark = [pytest.mark.ray, pytest.mark.slow]  # every test here runs on a Ray cluster

ROOT = Path(__file__).resolve().parents[1]
STEPS, RESUME_AT = 8, 4


def _extra_source() -> Path:
    """A repository-like corpus: JSONL records, one malformed, beside a `.git/` of binary objects."""
    import zlib

    root = Path(tempfile.mkdtemp(prefix="raylm-extra-source-"))
    lines = [json.dumps({"text": f"def f{i}(x):\n    return x * {i}\n"}) for i in range(200)]
    lines.insert(50, '{"text": "unterminated')
    lines.insert(90, "[" * 100_000)  # nested too deeply for the JSON parser
    lines.insert(120, '{"text": "lone \\ud800 surrogate"}')
    (root / "docs.jsonl").write_text("\n".join(lines) + "\n")
    (root / ".git" / "objects" / "4f").mkdir(parents=True)
    (root / ".git" / "objects" / "4f" / "a1b2c3").write_bytes(zlib.compress(bytes(range(256)) * 64))
    return root


EXTRA = _extra_source()


def debug_config(out: Path, *overrides: str):
    sources = [{"path": "python-stdlib", "format": "text", "max_bytes": 300000},
               {"path": str(EXTRA), "format": "jsonl", "weight": 0.2}]
    return load_config(ROOT / "configs/debug.yaml", [
        f"run.output_dir={out}", f"train.max_steps={STEPS}", f"train.checkpoint_every={RESUME_AT}",
        "train.eval_every=4", "train.log_every=2", "run.keep_checkpoints=3", "run.sample_tokens=8",
        "data.on_error=skip", "data.sources=" + json.dumps(sources), *overrides,
    ])


def train_on_ray(cfg) -> Path:
    from raylm.ray.train import train_command

    return Path(train_command(cfg).run_dir)


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in metrics(run_dir) if "loss" in r}


@pytest.fixture(scope="module")
def reference_run(ray_cluster, tmp_path_factory) -> Path:
    """Streaming pipeline, 2 workers, uninterrupted."""
    return train_on_ray(debug_config(tmp_path_factory.mktemp("ray_runs")))


@pytest.fixture(scope="module")
def prepared_run(ray_cluster, tmp_path_factory) -> tuple[Path, str]:
    """Prepared shards, 2 workers, uninterrupted: (run dir, the data override)."""
    from raylm.ray.prepare import prepare

    out = tmp_path_factory.mktemp("prepared_runs")
    data = f"data.prepared_path={out / 'prepared'}"
    prepare(debug_config(out, data), log=lambda line: None)
    return train_on_ray(debug_config(out, data, "run.sample_tokens=0")), data


def test_two_workers_train_loss_falls_and_metrics_and_checkpoints_land_in_the_run_dir(reference_run):
    run = reference_run
    records = metrics(run)
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, STEPS + 1))
    assert steps[-1]["loss"] < steps[0]["loss"] - 0.3
    for key in ("lr", "grad_norm", "tokens_per_second", "tokens_per_second_per_worker", "peak_memory_bytes"):
        assert all(key in r for r in steps), key
    assert steps[-1]["tokens_per_second"] == pytest.approx(2 * steps[-1]["tokens_per_second_per_worker"])
    evals = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in evals] == [0, 4, 8] and all(r["val_perplexity"] > 1 for r in evals)
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert (run / "config.yaml").is_file() and (run / "tokenizer.model").is_file()
    saved = ckpt.list_checkpoints(run)
    assert [p.name for p in saved] == [ckpt.checkpoint_dir_name(s) for s in (RESUME_AT, STEPS)]
    assert all(ckpt.is_complete(p) for p in saved)
    marker = ckpt.read_marker(saved[-1])
    assert marker["world_size"] == 2 and marker["train_state"]["step"] == STEPS
    assert {"__0_0.distcp", "__1_0.distcp", ".metadata"} <= set(marker["files"])  # both ranks' shards


@pytest.mark.parametrize("data, workers", [("streaming", 2), ("prepared", 1)])
def test_resume_from_step_k_matches_the_uninterrupted_run(reference_run, prepared_run, data, workers, tmp_path):
    """Stopped after step k and resumed, step k+1 has the uninterrupted loss: on 2 workers from the
    streaming pipeline, and on 1 worker (a 2-worker checkpoint resharded) from prepared shards.

    (2 -> 1 is not checked on the streaming pipeline: its streaming_split deals rows to workers
    in arrival order, so which sequences make up a step depends on the world size.)
    """
    reference, extra = (reference_run, []) if data == "streaming" else (prepared_run[0], [prepared_run[1]])
    start = reference / ckpt.checkpoint_dir_name(RESUME_AT)
    resumed = train_on_ray(debug_config(tmp_path, f"scaling.num_workers={workers}", f"run.resume_from={start}",
                                        "run.sample_tokens=0", *extra))
    assert resumed != reference
    uninterrupted, after = losses(reference), losses(resumed)
    assert sorted(after) == list(range(RESUME_AT + 1, STEPS + 1))
    assert after[RESUME_AT + 1] == pytest.approx(uninterrupted[RESUME_AT + 1], rel=1e-4, abs=1e-4)
    assert ckpt.read_marker(resumed / ckpt.checkpoint_dir_name(STEPS))["world_size"] == workers


def training_workers_ever_made() -> set[str]:
    """Ids of every Ray Train worker actor the cluster has made, dead ones included (the GCS keeps them)."""
    import ray

    return {actor_id for actor_id, a in ray._private.state.actors().items() if a["ActorClassName"] == "RayTrainWorker"}


def one_line_error(args: list[str], capsys) -> str:
    """`raylm train` fails with exit 2 and one line, before any training worker is made (the event
    itself, read from the cluster's actor table, not a guess from how long it took)."""
    before = training_workers_ever_made()
    assert cli_main(["train", str(ROOT / "configs/debug.yaml"), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("raylm: error: "), err
    assert training_workers_ever_made() == before  # failed before any worker started
    return err


def test_configs_that_cannot_work_fail_before_workers_start_with_one_line(ray_cluster, tmp_path, capsys):
    out = f"run.output_dir={tmp_path}"
    assert "scaling.num_workers=9: at most 8 worker(s)" in one_line_error([out, "scaling.num_workers=9"], capsys)
    err = one_line_error([out, "scaling.num_workers=4", "scaling.cpus_per_worker=1"], capsys)
    assert "scaling.num_workers=4" in err and "the Ray cluster has 2 CPU but this run needs 4.95" in err
    err = one_line_error([out, "data.sources.0.path=/no/such/corpus", "data.sources.0.format=text"], capsys)
    assert "/no/such/corpus" in err
    assert not any(tmp_path.iterdir())  # no half-made run directory is left behind


def test_reusing_a_run_name_without_resume_is_an_error_that_says_how_to_resume(reference_run, capsys):
    err = one_line_error([f"run.output_dir={reference_run.parent}", f"run.name={reference_run.name}"], capsys)
    assert f"run.resume_from={reference_run}" in err


def test_resume_in_place_skips_a_damaged_latest_checkpoint_that_ray_reports(prepared_run):
    """run.resume_from=<run dir> continues the same run (same directory, Ray's own run state). Its
    newest checkpoint, the one Ray Train reports as latest, has a zero-filled shard of the right
    size: the workers fall back to the newest good one (step k) with a warning and retrain from
    there, here on one worker and with two more steps; config.yaml and tokenizer.model are kept."""
    run, data = prepared_run
    before = losses(run)
    kept = {name: (run / name).read_bytes() for name in ("config.yaml", "tokenizer.model")}
    shard = run / ckpt.checkpoint_dir_name(STEPS) / "__1_0.distcp"
    shard.write_bytes(bytes(shard.stat().st_size))
    assert ckpt.latest_checkpoint(run) == run / ckpt.checkpoint_dir_name(STEPS)  # the size check passes it
    continued = train_on_ray(debug_config(run.parent, data, f"run.resume_from={run}", "scaling.num_workers=1",
                                          f"train.max_steps={STEPS + 2}", "run.sample_tokens=0"))
    assert continued == run
    records = [r for r in metrics(run) if "loss" in r]
    assert [r["step"] for r in records] == list(range(1, STEPS + 3))  # steps after k: replaced, not repeated
    restored = [r for r in metrics(run) if r.get("event") == "restored"]
    assert [(r["step"], r["dropped_records"]) for r in restored] == [(RESUME_AT, STEPS - RESUME_AT)]
    assert records[RESUME_AT]["loss"] == pytest.approx(before[RESUME_AT + 1], rel=1e-4)  # from step k
    assert ckpt.latest_checkpoint(run) == run / ckpt.checkpoint_dir_name(STEPS + 2)
    assert ckpt.verify_checkpoint(run / ckpt.checkpoint_dir_name(STEPS)) is None  # rewritten whole
    assert {name: (run / name).read_bytes() for name in kept} == kept


def test_skipped_bad_input_is_counted_in_the_metrics_and_hidden_directories_are_not_read(reference_run):
    """data.on_error=skip: the malformed record, the deeply nested one and the lone surrogate are
    counted in the metrics; the `.git/` objects beside them are never read (they would count as
    binary files)."""
    counted = [r for r in metrics(reference_run) if "bad_input_skipped" in r]
    assert counted and counted[-1]["bad_input_skipped"] == 3
    assert counted[-1]["bad_input_skipped_malformed_json"] == 2
    assert counted[-1]["bad_input_skipped_invalid_utf8"] == 1
    assert not any(k.startswith("bad_input_skipped_binary") for r in counted for k in r)


def test_resuming_with_another_seq_len_is_one_line_naming_it(reference_run, tmp_path, capsys):
    start = reference_run / ckpt.checkpoint_dir_name(RESUME_AT)
    err = one_line_error([f"run.output_dir={tmp_path}", f"run.resume_from={start}", "data.seq_len=32",
                          "data.on_error=skip"], capsys)
    assert "data.seq_len 64, this run has 32" in err and "run.resume_changes=[seq_len]" in err
    assert not any(tmp_path.iterdir())


def test_a_stream_that_runs_out_after_a_restart_stops_every_worker_at_the_same_step(reference_run, tmp_path):
    """data.stream_passes=1 on a run started from step k's checkpoint (the consumed rows are
    dropped, so the two workers' rows are uneven): the stream ends mid-run. Every worker stops
    at the same step (none is left in a collective or in Ray Data's next-epoch barrier), the run
    checkpoints there, and the driver says in one line how to go on."""
    from raylm.errors import DataError

    start = reference_run / ckpt.checkpoint_dir_name(RESUME_AT)
    # 32 sequences a step from here on (8 before): the rest of the pass in a quarter of the steps.
    cfg = debug_config(tmp_path, f"run.resume_from={start}", "data.stream_passes=1", "train.max_steps=5000",
                       "train.global_batch_tokens=2048", "train.micro_batch_size=8",
                       "train.eval_every=0", "train.log_every=100", "train.checkpoint_every=0", "run.sample_tokens=0")
    with pytest.raises(DataError, match=r"data.stream_passes=1: the training stream ended after step (\d+) of 5000"
                       ) as info:
        train_on_ray(cfg)
    ended = int(re.search(r"after step (\d+)", str(info.value)).group(1))
    run = next(p for p in tmp_path.iterdir() if p.is_dir())
    assert ended > RESUME_AT + 5
    assert [r["step"] for r in metrics(run) if "loss" in r] == list(range(RESUME_AT + 1, ended + 1))
    state = ckpt.read_marker(ckpt.latest_checkpoint(run))["train_state"]
    assert state["step"] == ended
    assert state["data_watermark"] + len(state["data_extra"]) == RESUME_AT * 8 + (ended - RESUME_AT) * 32
    assert f"run.resume_from={run}" in str(info.value)
