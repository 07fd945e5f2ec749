"""`raylm tune`: sweep files checked before any trial; a sweep directory on object storage (a local
S3 server) holding every file a sweep keeps; and a real sweep of debug-model trainings with its
directory on that bucket, interrupted with Ctrl-C and resumed, whose winner then trains as is.

configs/sweeps/debug.yaml is the sweep under test: three learning rates on a grid, one trial at a
time, ASHA at step 10 of 20.
"""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
from pathlib import Path

import pyarrow.fs as pafs
import pytest
import yaml

from conftest import _free_port
from raylm import storage
from raylm.cli import main as cli_main
from raylm.config import load_config
from raylm.errors import ConfigError
from raylm.sweep import best_config, load_sweep, read_saved_sweep, save_sweep, sweep_dir_for, TrialOutcome

ROOT = Path(__file__).resolve().parents[1]
SWEEP = ROOT / "configs/sweeps/debug.yaml"
BUCKET = "raylm-tune-test"
AWS_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


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
# A sweep directory on object storage, without Ray


@pytest.fixture
def bucket(s3_server, monkeypatch, tmp_path) -> str:
    """A prefix of its own on the local S3 server's bucket, with the AWS variables set for this test."""
    for key, value in {**AWS_ENV, "AWS_ENDPOINT_URL": s3_server}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    fs = pafs.S3FileSystem(endpoint_override=s3_server.removeprefix("http://"), scheme="http",
                           allow_bucket_creation=True)
    if fs.get_file_info(BUCKET).type == pafs.FileType.NotFound:
        fs.create_dir(BUCKET)
    return f"s3://{BUCKET}/{tmp_path.name}"


def _ls(uri: str) -> list[str]:
    return sorted(storage.name_of(i.path) for i in storage.list_dir(uri))


def test_a_sweep_directory_on_a_bucket_is_named_by_its_uri_and_its_sweep_file_round_trips(bucket, tmp_path):
    """output_dir=s3://... stays a URI (as a local path it would become ./s3:/...); a local one is
    made absolute; sweep.yaml is written to the bucket and `--resume` reads the same sweep back."""
    path = _sweep_file(tmp_path)
    sweep = load_sweep(path, [f"output_dir={bucket}/sweeps/", "name=s"])
    sweep_dir = sweep_dir_for(sweep)
    assert sweep_dir == f"{bucket}/sweeps/s"
    assert sweep_dir_for(load_sweep(path, ["output_dir=here/sweeps", "name=s"])) == Path.cwd() / "here/sweeps/s"

    save_sweep(sweep, sweep_dir)
    assert _ls(sweep_dir) == ["sweep.yaml"]
    again = read_saved_sweep(sweep_dir + "/")
    assert again.to_dict() == sweep.to_dict() and again.path == path  # the results keep the sweep file's name
    with pytest.raises(ConfigError, match=f"--resume {bucket}/nothing: not a sweep directory"):
        read_saved_sweep(f"{bucket}/nothing")


def test_asha_keeps_its_rungs_on_the_bucket_and_a_restored_sweep_decides_from_them(bucket):
    """ASHA's rule with reduction factor 2, trials in the debug sweep's order (3e-3, 1e-5, 3e-5): at
    the step-10 rung a trial stops when its held-out loss is worse than the median of those recorded
    there. The first has nothing to compare with and goes on; the second is worse and stops; the
    record is on the bucket (asha.json), and the scheduler as `Tuner.restore` unpickles it (as it
    was when the sweep started) reloads it, so the third is stopped against both, as it would have
    been without the interruption (a scheduler without the record lets it go on)."""
    from ray.tune.experiment import Trial

    from raylm.ray.tune import RecordedASHA, read_asha_state

    def scheduler(state_path: str) -> RecordedASHA:
        return RecordedASHA(state_path, time_attr="step", metric="val_loss", mode="min", max_t=20, grace_period=10,
                            reduction_factor=2, stop_last_trials=False)

    def result(asha: RecordedASHA, trial: Trial, step: int, val_loss: float) -> str:
        return asha.on_trial_result(None, trial, {"step": step, "val_loss": val_loss})

    state = f"{bucket}/sweep/asha.json"
    asha = scheduler(state)
    at_start = pickle.dumps(asha)
    fast, tiny, small = (Trial("trial", trial_id=t, stub=True) for t in ("fast", "tiny", "small"))
    asha.on_trial_add(None, fast)
    assert [result(asha, fast, step, loss) for step, loss in [(10, 6.0), (20, 5.5)]] == [asha.CONTINUE] * 2
    asha.on_trial_add(None, tiny)
    assert result(asha, tiny, 10, 6.90) == asha.STOP
    assert read_asha_state(state)["stopped"] == {"tiny": 10}

    restored = pickle.loads(at_start)
    restored.on_trial_add(None, small)
    assert result(restored, small, 10, 6.88) == restored.STOP  # above the median of 6.0 and 6.9
    assert read_asha_state(state)["stopped"] == {"tiny": 10, "small": 10}
    forgetful = scheduler(f"{bucket}/other/asha.json")
    forgetful.on_trial_add(None, small)
    assert result(forgetful, small, 10, 6.88) == forgetful.CONTINUE


def test_a_finished_sweep_on_a_bucket_writes_results_and_best_yaml_there_and_raylm_reads_best_yaml_from_it(
        bucket, tmp_path, capsys):
    """The results (csv, json with each trial's curve read from its metrics.jsonl on the bucket,
    the PNG) and best.yaml are written to the sweep directory on the bucket, and the command the
    sweep prints, `raylm train s3://.../best.yaml`, reads the config from there."""
    from ray.tune import Result

    from raylm.ray.tune import ASHA_STATE, finish

    two = {"optimizer.lr": {"grid": [3e-3, 1e-5]}}
    sweep = load_sweep(_sweep_file(tmp_path, space=two), [f"output_dir={bucket}/sweeps", "name=s"])
    sweep_dir = sweep_dir_for(sweep)
    curves = {"fast": [(0, 6.95), (10, 6.0), (20, 5.5)], "tiny": [(0, 6.95), (10, 6.9)]}
    lrs = {"fast": 3e-3, "tiny": 1e-5}
    for trial, curve in curves.items():
        records = [{"step": step, "val_loss": loss} for step, loss in curve]
        storage.write_bytes(f"{sweep_dir}/runs/{trial}/metrics.jsonl",
                            "".join(json.dumps(r) + "\n" for r in records).encode())
    storage.write_bytes(f"{sweep_dir}/{ASHA_STATE}", json.dumps({"stopped": {"tiny": 10}}).encode())
    grid = [Result(metrics={"trial_id": t, "step": curves[t][-1][0], "val_loss": curves[t][-1][1],
                            "config": {"params": {"optimizer.lr": lrs[t]}}},
                   checkpoint=None, error=None, path=f"{BUCKET}/sweeps/s/tune/{t}") for t in curves]
    lines: list[str] = []
    prepared = f"{sweep_dir}/prepared"
    assert finish(sweep, sweep_dir, grid, prepared, None, [], lines.append) == sweep_dir

    assert {"results.csv", "results.json", "val_loss.png", "best.yaml"} <= set(_ls(sweep_dir))
    trials = {t["trial_id"]: t for t in json.loads(storage.read_bytes(f"{sweep_dir}/results.json"))["trials"]}
    assert trials["fast"]["status"] == "completed" and trials["tiny"]["status"] == "stopped early by ASHA at step 10"
    assert [tuple(p) for p in trials["fast"]["curve"]] == curves["fast"]
    assert trials["tiny"]["run_dir"] == f"{sweep_dir}/runs/tiny"
    csv_lines = storage.read_bytes(f"{sweep_dir}/results.csv").decode().splitlines()
    assert csv_lines[0].startswith("trial,optimizer.lr,val_loss,steps,status") and len(csv_lines) == 3
    assert storage.read_bytes(f"{sweep_dir}/val_loss.png")[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"train the winner: raylm train {sweep_dir}/best.yaml" in lines

    best = load_config(f"{sweep_dir}/best.yaml")
    assert (best.optimizer.lr, best.data.prepared_path, best.config_name) == (3e-3, prepared, "sweep-best")
    capsys.readouterr()
    assert cli_main(["config", f"{sweep_dir}/best.yaml", "train.max_steps=7"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert (printed["optimizer"]["lr"], printed["train"]["max_steps"]) == (3e-3, 7)


def _one_line_error(args: list[str], capsys) -> str:
    capsys.readouterr()
    assert cli_main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("raylm: error: "), err
    return err


def test_a_sweep_directory_on_a_missing_bucket_an_unreachable_store_or_already_there_is_one_line(
        bucket, tmp_path, capsys, monkeypatch):
    """Before Ray starts: a missing bucket or an endpoint that does not answer names output_dir= and
    the URI; a sweep directory already on the bucket says how to continue it; --resume of a prefix
    holding no sweep, or a sweep with no Tune state, says so."""
    path = str(_sweep_file(tmp_path))
    err = _one_line_error(["tune", path, "output_dir=s3://no-such-bucket/sweeps"], capsys)
    assert f"{path}: output_dir=s3://no-such-bucket/sweeps: bucket 'no-such-bucket' does not exist" in err

    sweep_dir = f"{bucket}/sweeps/s"
    save_sweep(load_sweep(path, [f"output_dir={bucket}/sweeps", "name=s"]), sweep_dir)
    err = _one_line_error(["tune", path, f"output_dir={bucket}/sweeps", "name=s"], capsys)
    assert f"{sweep_dir}: already exists; continue it with raylm tune --resume {sweep_dir}" in err
    err = _one_line_error(["tune", "--resume", sweep_dir], capsys)
    assert f"--resume {sweep_dir}: no Tune state to resume ({sweep_dir}/tune is missing or empty)" in err
    err = _one_line_error(["tune", "--resume", f"{bucket}/sweeps/none"], capsys)
    assert f"--resume {bucket}/sweeps/none: not a sweep directory (no sweep.yaml)" in err

    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{_free_port()}")  # nobody listens there
    err = _one_line_error(["tune", path, f"output_dir={bucket}/sweeps", "name=t"], capsys)
    assert f"{path}: output_dir={bucket}/sweeps: cannot reach the object store at http://127.0.0.1:" in err
    assert not (tmp_path / "sweeps").exists()


# ---------------------------------------------------------------------------------------
# A real sweep


def _finished_trials(out_lines: list[str]) -> list[str]:
    return [line.split()[1].rstrip(":") for line in out_lines
            if line.startswith("trial ") and (": completed" in line or ": stopped at step" in line)]


def _checkpoints(run_dir: str) -> list[str]:
    return sorted(n for n in _ls(run_dir) if n.startswith("checkpoint_"))


@pytest.mark.ray
@pytest.mark.slow
def test_sweep_stops_bad_trials_early_resumes_after_ctrl_c_and_its_winner_trains(bucket, tmp_path, monkeypatch):
    """Three trials of the debug model with the sweep directory on a bucket (a local S3 server, as
    on a cluster whose nodes share no disk); Ctrl-C after two have finished; `--resume` finishes
    the third without re-running the first two; ASHA stopped both tiny learning rates at step 10,
    the second of them after the resume, from the rungs recorded before the Ctrl-C (the table
    says so); the table, the plot and best.yaml are on the bucket, and the command the sweep
    prints, `raylm train s3://.../best.yaml` (with --local), trains to the end.

    Every command runs as a user runs it, each starting its own local cluster: the session's
    cluster is shut down meanwhile. A trial ASHA stops is killed, and Ray Train's
    PlacementGroupCleaner frees its workers' resources through the State API, which needs the
    dashboard (the session cluster has none) and one Ray instance on the machine to find."""
    import ray

    from conftest import start_local_ray

    ray.shutdown()
    try:
        _sweep_as_a_user(tmp_path, f"{bucket}/sweeps")
    finally:
        monkeypatch.undo()  # the session's cluster starts again without this test's AWS variables
        start_local_ray()


def _sweep_as_a_user(tmp_path: Path, output_dir: str) -> None:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # `raylm tune` starts its own local cluster
    proc = subprocess.Popen([sys.executable, "-m", "raylm", "tune", str(SWEEP), f"output_dir={output_dir}", "name=s"],
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
    sweep_dir = f"{output_dir}/s"
    assert f"continue with raylm tune --resume {sweep_dir}" in output, output[-3000:]
    assert not (tmp_path / "s3:").exists()  # nothing landed in a local folder named after the URI
    first = _finished_trials(lines)[:2]
    before = {t: storage.read_bytes(f"{sweep_dir}/runs/{t}/metrics.jsonl") for t in first}
    checkpoints_before = {t: _checkpoints(f"{sweep_dir}/runs/{t}") for t in first}
    assert all(checkpoints_before.values()), checkpoints_before

    resumed = subprocess.run([sys.executable, "-m", "raylm", "tune", "--resume", sweep_dir], cwd=tmp_path,
                             env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, (resumed.stdout + resumed.stderr)[-3000:]
    logged = resumed.stdout.splitlines()
    for t in first:  # the finished trials were not trained again
        assert storage.read_bytes(f"{sweep_dir}/runs/{t}/metrics.jsonl") == before[t]
        assert _checkpoints(f"{sweep_dir}/runs/{t}") == checkpoints_before[t]
        assert not any(line.startswith(f"trial {t}:") for line in logged)

    results = json.loads(storage.read_bytes(f"{sweep_dir}/results.json"))["trials"]
    assert len(results) == 3 and all(r["metric"] is not None for r in results), results
    by_lr = {r["params"]["optimizer.lr"]: r for r in results}
    assert by_lr[3e-3]["status"] == "completed" and by_lr[3e-3]["steps"] == 20
    # ASHA's step-10 rung, reduction factor 2: 1e-5 is worse than 3e-3 alone; 3e-5 (run after the
    # resume) is worse than the median of the two recorded before the Ctrl-C
    for lr in (1e-5, 3e-5):
        assert (by_lr[lr]["status"], by_lr[lr]["steps"]) == ("stopped early by ASHA at step 10", 10), results
    table = "\n".join(logged)
    assert "stopped early by ASHA at step 10" in table and "completed" in table
    assert all(len(r["curve"]) >= 2 and r["curve"][0][0] == 0 for r in results)  # step 0 and every evaluation
    assert all(r["run_dir"].startswith(f"{sweep_dir}/runs/") for r in results)
    for name in ("results.csv", "val_loss.png", "best.yaml"):
        assert storage.info(f"{sweep_dir}/{name}").size > 0
    assert storage.read_bytes(f"{sweep_dir}/val_loss.png")[:4] == b"\x89PNG"

    best_lr = min((r for r in results if r["status"] == "completed"), key=lambda r: r["metric"])["params"]["optimizer.lr"]
    best = yaml.safe_load(storage.read_bytes(f"{sweep_dir}/best.yaml"))
    assert best["optimizer"]["lr"] == best_lr and best["data"]["prepared_path"] == f"{sweep_dir}/prepared"
    assert f"train the winner: raylm train {sweep_dir}/best.yaml" in logged
    trained = subprocess.run([sys.executable, "-m", "raylm", "train", f"{sweep_dir}/best.yaml", "--local",
                              f"run.output_dir={tmp_path / 'best'}"], cwd=tmp_path, env=env, capture_output=True,
                             text=True, timeout=600)  # the same trainer, without a third cluster start
    assert trained.returncode == 0, (trained.stdout + trained.stderr)[-3000:]
    run_dir, = (tmp_path / "best").iterdir()
    assert (run_dir / f"checkpoint_{best['train']['max_steps']:08d}").is_dir(), sorted(p.name for p in run_dir.iterdir())
