"""`raylm tune`: sweep files checked before any trial, and a real sweep of debug-model trainings on the
session's local Ray cluster, interrupted with Ctrl-C and resumed, whose winner then trains as is.

configs/sweeps/debug.yaml is the sweep under test: four learning rates on a grid, one trial at a
time, ASHA at step 10 of 20.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from raylm.cli import main as cli_main
from raylm.errors import ConfigError
from raylm.sweep import best_config, load_sweep, TrialOutcome

ROOT = Path(__file__).resolve().parents[1]
SWEEP = ROOT / "configs/sweeps/debug.yaml"


def _sweep_file(tmp_path: Path, **changes) -> Path:
    raw = yaml.safe_load(SWEEP.read_text())
    raw["base"] = str(ROOT / "configs/debug.yaml")
    raw["output_dir"] = str(tmp_path / "sweeps")
    raw.update(changes)
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.parametrize("space, expected", [
    ({"optimizer.lrr": {"loguniform": [1e-4, 1e-2]}}, "space.optimizer.lrr: unknown key"),
    ({"modle.dim": {"choice": [64]}}, "space.modle.dim: modle: unknown key"),
    ({"optimizer.lr": {"gaussian": [0, 1]}}, "space.optimizer.lr: 'gaussian': unknown distribution"),
    ({"optimizer.lr": {"loguniform": [0, 1e-2]}}, "space.optimizer.lr: loguniform: low must be above 0"),
    ({"optimizer.schedule": {"choice": ["cosine", "linear"]}}, "space.optimizer.schedule='linear': must be one of"),
    ({"model.n_heads": {"grid": [4, 3]}}, "space.model"),
    ({"data.seq_len": {"choice": [32, 64]}}, "space.data.seq_len: cannot be searched: every trial reads the one "
                                             "prepared dataset"),
    ({"scaling.num_workers": {"choice": [1, 2]}}, "space.scaling.num_workers: cannot be searched"),
])
def test_a_bad_search_space_key_or_value_fails_in_one_line_before_any_trial(tmp_path, capsys, space, expected):
    """Every value a trial could get is validated by the one config loader before Ray is started."""
    path = _sweep_file(tmp_path, space=space)
    assert cli_main(["tune", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and str(path) in err and expected in err, err
    assert not (tmp_path / "sweeps").exists()  # nothing was written


def test_sweep_settings_are_checked_and_overridable_from_the_command_line(tmp_path):
    path = _sweep_file(tmp_path)
    sweep = load_sweep(path, ["num_samples=3", "asha.grace_period=5", "train.max_steps=30", "optimizer.beta2=0.99"])
    assert (sweep.num_samples, sweep.asha.grace_period) == (3, 5)
    cfg = sweep.trial_config({"optimizer.lr": 1e-3})
    assert (cfg.train.max_steps, cfg.optimizer.beta2, cfg.optimizer.lr, cfg.scaling.num_workers) == (30, 0.99, 1e-3, 1)
    for bad, expected in [(["scheduler=hyperband"], "scheduler='hyperband': must be one of asha, none"),
                          (["metric=loss"], "metric='loss': must be one of"),
                          (["asha.grace_period=20"], "asha.grace_period=20: must be below train.max_steps=20"),
                          (["search=optuna"], "search=optuna: grid is not a distribution Optuna samples"),
                          (["train.max_step=5"], "train.max_step: unknown key")]:
        with pytest.raises(ConfigError, match=expected.replace("(", r"\(").replace("[", r"\[")):
            load_sweep(path, bad)


def test_optuna_missing_is_one_line(tmp_path):
    """search: optuna is a real optional dependency (raylm[tune]); without it, one line says how to get it."""
    path = _sweep_file(tmp_path, space={"optimizer.lr": {"loguniform": [1e-4, 1e-2]}}, search="optuna")
    code = ("import sys; sys.modules['optuna'] = None\n"  # as if not installed
            "from raylm.cli import main; sys.exit(main(['tune', sys.argv[1]]))")
    done = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr[-2000:]
    err = done.stderr.strip().splitlines()[-1]
    assert "search=optuna needs the optuna package: pip install 'raylm[tune]'" in err and str(path) in err, err
    assert not (tmp_path / "sweeps").exists()


def test_optuna_samples_the_space_it_is_given(tmp_path):
    """The sweep's space reaches Optuna's TPE sampler as Tune distributions: every suggestion is inside it."""
    pytest.importorskip("optuna")
    from raylm.ray.tune import _search_alg, _search_space

    sweep = load_sweep(_sweep_file(tmp_path, search="optuna", space={
        "optimizer.lr": {"loguniform": [1e-4, 1e-2]}, "optimizer.warmup_steps": {"randint": [2, 4]},
        "optimizer.beta2": {"uniform": [0.9, 0.99]}, "optimizer.schedule": {"choice": ["cosine", "wsd"]}}))
    searcher = _search_alg(sweep, max_concurrent=8)
    assert searcher.set_search_properties(sweep.metric, sweep.mode, {"params": _search_space(sweep)})
    for i in range(6):
        params = searcher.suggest(f"t{i}")["params"]
        assert 1e-4 <= params["optimizer.lr"] <= 1e-2 and params["optimizer.warmup_steps"] in (2, 3, 4)
        assert 0.9 <= params["optimizer.beta2"] <= 0.99 and params["optimizer.schedule"] in ("cosine", "wsd")
        sweep.trial_config(params)  # and a trial's config builds from it


def test_best_config_scaled_to_a_preset_keeps_the_hyperparameters_and_vocabulary(tmp_path):
    sweep = load_sweep(_sweep_file(tmp_path, space={"optimizer.lr": {"grid": [1e-3]},
                                                    "model.dim": {"choice": [64, 128]}}))
    best = TrialOutcome("t0", {"optimizer.lr": 1e-3, "model.dim": 64}, 5.0, 20, "completed", [], "", None)
    cfg, notes = best_config(sweep, best, "/data/prepared", to_preset="125m", to_overrides=["model.n_layers=6"])
    assert (cfg.optimizer.lr, cfg.data.prepared_path, cfg.model.vocab_size) == (1e-3, "/data/prepared", 1024)
    assert (cfg.model.dim, cfg.model.n_layers, cfg.run.name) == (768, 6, None)  # 125m's width, not the searched 64
    assert any("model.dim" in n for n in notes) and any("standard parametrisation" in n for n in notes)


# ---------------------------------------------------------------------------------------
# A real sweep


def _finished_trials(out_lines: list[str]) -> list[str]:
    return [line.split()[1].rstrip(":") for line in out_lines
            if line.startswith("trial ") and (": completed" in line or ": stopped at step" in line)]


@pytest.mark.ray
@pytest.mark.slow
def test_sweep_stops_bad_trials_early_resumes_after_ctrl_c_and_its_winner_trains(tmp_path):
    """Four trials of the debug model; Ctrl-C after two have finished; `--resume` finishes the other two
    without re-running the first two; ASHA stopped at least one early (the table says so); the
    table, the plot and best.yaml exist, and `raylm train best.yaml --local` trains to the end.

    Every command runs as a user runs it, each starting its own local cluster: the session's
    cluster is shut down meanwhile. A trial ASHA stops is killed, and Ray Train's
    PlacementGroupCleaner frees its workers' resources through the State API, which needs the
    dashboard (the session cluster has none) and one Ray instance on the machine to find."""
    import ray

    from conftest import start_local_ray

    ray.shutdown()
    try:
        _sweep_as_a_user(tmp_path)
    finally:
        start_local_ray()


def _sweep_as_a_user(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # `raylm tune` starts its own local cluster
    proc = subprocess.Popen([sys.executable, "-m", "raylm", "tune", str(SWEEP), f"output_dir={tmp_path}", "name=s"],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    try:
        for line in proc.stdout:
            lines.append(line.rstrip())
            if len(_finished_trials(lines)) == 2:
                proc.send_signal(signal.SIGINT)
                break
        rest, _ = proc.communicate(timeout=180)
    finally:
        proc.kill()
    lines += rest.splitlines()
    output = "\n".join(lines)
    assert proc.returncode == 130, output[-3000:]
    assert "continue with raylm tune --resume" in output, output[-3000:]
    sweep_dir = tmp_path / "s"
    first = _finished_trials(lines)[:2]
    before = {t: (sweep_dir / "runs" / t / "metrics.jsonl").read_text() for t in first}
    checkpoints_before = {t: sorted(p.name for p in (sweep_dir / "runs" / t).glob("checkpoint_*")) for t in first}

    resumed = subprocess.run([sys.executable, "-m", "raylm", "tune", "--resume", str(sweep_dir)], cwd=tmp_path,
                             env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, (resumed.stdout + resumed.stderr)[-3000:]
    logged = resumed.stdout.splitlines()
    for t in first:  # the finished trials were not trained again
        assert (sweep_dir / "runs" / t / "metrics.jsonl").read_text() == before[t]
        assert sorted(p.name for p in (sweep_dir / "runs" / t).glob("checkpoint_*")) == checkpoints_before[t]
        assert not any(line.startswith(f"trial {t}:") for line in logged)

    results = json.loads((sweep_dir / "results.json").read_text())["trials"]
    assert len(results) == 4 and all(r["metric"] is not None for r in results), results
    by_lr = {r["params"]["optimizer.lr"]: r for r in results}
    assert by_lr[3e-3]["status"] == "completed" and by_lr[3e-3]["steps"] == 20
    stopped = [r for r in results if r["status"].startswith("stopped early by ASHA at step 10")]
    assert stopped and all(r["steps"] == 10 for r in stopped), results
    table = "\n".join(logged)
    assert "stopped early by ASHA at step 10" in table and "completed" in table
    assert all(len(r["curve"]) >= 2 and r["curve"][0][0] == 0 for r in results)  # step 0 and every evaluation
    for name in ("results.csv", "val_loss.png", "best.yaml"):
        assert (sweep_dir / name).stat().st_size > 0
    assert (sweep_dir / "val_loss.png").read_bytes()[:4] == b"\x89PNG"

    best_lr = min((r for r in results if r["status"] == "completed"), key=lambda r: r["metric"])["params"]["optimizer.lr"]
    best = yaml.safe_load((sweep_dir / "best.yaml").read_text())
    assert best["optimizer"]["lr"] == best_lr and best["data"]["prepared_path"] == str(sweep_dir / "prepared")
    trained = subprocess.run([sys.executable, "-m", "raylm", "train", str(sweep_dir / "best.yaml"), "--local",
                              f"run.output_dir={tmp_path / 'best'}"], cwd=tmp_path, env=env, capture_output=True,
                             text=True, timeout=600)  # the same trainer, without a third cluster start
    assert trained.returncode == 0, (trained.stdout + trained.stderr)[-3000:]
    run_dir, = (tmp_path / "best").iterdir()
    assert (run_dir / f"checkpoint_{best['train']['max_steps']:08d}").is_dir(), sorted(p.name for p in run_dir.iterdir())
