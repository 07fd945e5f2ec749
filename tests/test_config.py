"""Configs: YAML + dotted overrides load into typed sections; bad input is one clear line."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from raylm.config import Config, load_config
from raylm.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def test_demo_config_loads_with_overrides_typed_as_yaml_scalars():
    cfg = load_config(ROOT / "configs/demo.yaml", ["train.max_steps=50", "optimizer.lr=3e-4", "data.add_bos=false"])
    assert cfg.train.max_steps == 50 and isinstance(cfg.train.max_steps, int)
    assert cfg.optimizer.lr == pytest.approx(3e-4) and isinstance(cfg.optimizer.lr, float)
    assert cfg.data.add_bos is False
    assert cfg.model.dim == 192  # from the tiny preset
    assert cfg.config_name == "demo"


def test_preset_then_fields_then_overrides():
    cfg = load_config(None, ["model.preset=llama2-7b", "model.n_layers=2", "data.seq_len=128",
                             "train.global_batch_tokens=1024"])
    assert (cfg.model.dim, cfg.model.n_layers, cfg.model.vocab_size) == (4096, 2, 32000)


def test_list_items_override_by_index_and_flow_yaml():
    cfg = load_config(None, ["data.sources.0.max_bytes=1000"])
    assert cfg.data.sources[0].max_bytes == 1000
    cfg = load_config(None, ['data.sources=[{path: a.jsonl, format: jsonl, weight: 2}, {path: b.txt, format: lines}]'])
    assert [s.format for s in cfg.data.sources] == ["jsonl", "lines"] and cfg.data.sources[0].weight == 2.0


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(ROOT / "configs/demo.yaml", ["train.max_steps=7"])
    cfg.save(tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert again.to_dict() == cfg.to_dict()  # config_name included: a reloaded run keeps its name
    assert again.train.max_steps == 7
    assert again.model == cfg.model and again.data == cfg.data and again.train == cfg.train


@pytest.mark.parametrize(
    "override, expected",
    [
        ("train.max_stepz=5", "train.max_stepz: unknown key; valid keys here:"),
        ("bogus.x=1", "bogus: unknown key"),
        ("train.max_steps=ten", "train.max_steps='ten': expected an integer"),
        ("optimizer.lr=-0.1", "optimizer.lr=-0.1: must be > 0"),
        ("model.n_heads=5", "model.n_heads=5"),
        ("model.n_kv_heads=4", "model.n_kv_heads=4"),
        ("data.format=csv", "data.format: unknown key"),
        ("data.sources.0.format=csv", "data.sources.0.format='csv': must be one of text, lines, jsonl, parquet"),
        ("data.on_error=ignore", "data.on_error='ignore': must be one of raise, skip"),
        ("train.global_batch_tokens=1000", "train.global_batch_tokens=1000: must be a multiple of data.seq_len=256"),
        ("scaling.num_workers=[3, 2]", "scaling.num_workers=[3, 2]: must be a positive integer or [min, max]"),
        ("scaling.num_workers=[0, 2]", "scaling.num_workers=[0, 2]: must be a positive integer or [min, max]"),
        ("scaling.num_workers=[1, 2, 3]", "scaling.num_workers=[1, 2, 3]: must be a positive integer or [min, max]"),
        ("scaling.num_workers=0", "scaling.num_workers=0: must be a positive integer"),
        ("scaling.num_workers=[1, 99]", "scaling.num_workers=[1, 99]: at most 16 worker(s): a step holds 16 sequences"),
        ("run.max_failures=-2", "run.max_failures=-2: must be >= 0, or -1 for no limit"),
        ("scaling.resize_check_s=0", "scaling.resize_check_s=0.0: must be > 0 seconds"),
        ("data.seq_len=100000", "data.seq_len=100000: must be <= model.max_seq_len"),
        ("model.preset=huge", "model.preset='huge'"),
        ("train.compile=maybe", "train.compile='maybe': expected true or false"),
        ("data.sources.3.path=x", "data.sources.3: list index '3' out of range"),
        ("train.activation_checkpointing=some", "train.activation_checkpointing='some'"),
        ("nonsense", "override 'nonsense': expected section.key=value"),
        ("data.read_tasks=0", "data.read_tasks=0: must be a positive integer"),
        ("config_name=../../../tmp/x", "config_name='../../../tmp/x': must be a plain name"),
        ("config_name=.hidden", "config_name='.hidden': must be a plain name"),
        ("run.name=a/b", "run.name='a/b': must be a plain name"),
        ("run.resume_changes=[vocab]", "run.resume_changes.0='vocab': must be one of tokenizer, seq_len, data"),
        ("train.max_nonfinite_steps=0", "train.max_nonfinite_steps=0: must be a positive integer"),
    ],
)
def test_bad_config_is_one_line_naming_key_and_value(override, expected):
    with pytest.raises(ConfigError) as info:
        load_config(ROOT / "configs/demo.yaml", [override])
    message = str(info.value)
    assert expected in message
    assert "\n" not in message


def test_bad_yaml_file_names_file_and_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  max_steps: [1,\n")
    with pytest.raises(ConfigError, match=r"bad.yaml line \d+: not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")


def test_cli_prints_one_line_and_no_traceback():
    proc = subprocess.run(
        [sys.executable, "-m", "raylm", "config", str(ROOT / "configs/demo.yaml"), "optimizer.lr=-1"],
        capture_output=True, text=True, cwd=ROOT,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == "raylm: error: optimizer.lr=-1.0: must be > 0"
    assert "Traceback" not in proc.stderr


def test_grad_accumulation_follows_world_size_and_every_size_gets_the_whole_batch():
    from raylm.data.order import step_shares, step_slots

    cfg = Config()
    cfg.data.seq_len, cfg.train.global_batch_tokens, cfg.train.micro_batch_size = 64, 64 * 32, 4
    assert [cfg.grad_accum_steps(w) for w in (1, 2, 3, 4, 8)] == [8, 4, 3, 2, 1]
    assert step_shares(32, 3, 4) == [12, 12, 8]  # uneven: the last round is a third empty
    for world in range(1, 33):
        slots = np.concatenate([s for r in range(world) for s in step_slots(32, r, world, 4)])
        assert sorted(slots.tolist()) == list(range(32)), world  # each sequence of the step once
        assert len({len(step_slots(32, r, world, 4)) for r in range(world)}) == 1  # same micro-batch count
    elastic = load_config(None, ["scaling.num_workers=[2, 4]"])
    assert (elastic.scaling.min_workers, elastic.scaling.max_workers, elastic.scaling.elastic) == (2, 4, True)


def test_local_cluster_keeps_idle_workers_unless_the_environment_says_otherwise(monkeypatch):
    from raylm.ray.connect import WORKERS_SOFT_LIMIT_VAR, configure_local_cluster, workers_soft_limit

    monkeypatch.delenv(WORKERS_SOFT_LIMIT_VAR, raising=False)
    configure_local_cluster()
    assert os.environ[WORKERS_SOFT_LIMIT_VAR] == str(workers_soft_limit()) and workers_soft_limit(2) == 16
    assert workers_soft_limit(64) == 128
    monkeypatch.setenv(WORKERS_SOFT_LIMIT_VAR, "5")
    configure_local_cluster()
    assert os.environ[WORKERS_SOFT_LIMIT_VAR] == "5"
