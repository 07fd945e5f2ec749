"""Experiment tracking (`run.tracking`): what reaches a real MLflow server and W&B's offline files.

One `mlflow server` (SQLite store, local artifact root) serves the module, on a free port,
waited for on its /health endpoint; each test logs into its own experiment, so counting that
experiment's runs counts what the test made. W&B runs offline (`WANDB_MODE=offline`) and its
run file is read back record by record.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import signal
import struct
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from conftest import _free_port
from support import wait_for
from raylm.cli import main as cli_main
from raylm.config import load_config
from raylm.errors import ConfigError
from raylm.train.local import train_local
from raylm.train.tracking import TRACKING_FILE, check_available

ROOT = Path(__file__).resolve().parents[1]
MLFLOW = Path(sys.executable).with_name("mlflow")


def small_config(out: Path, *overrides: str):
    """The debug model on a small slice, a step per log line and a checkpoint every 2 steps."""
    return load_config(None, [
        "model.preset=debug", "model.vocab_size=512", "model.max_seq_len=64", "data.seq_len=32",
        "data.sources.0.max_bytes=200000", "tokenizer.sample_bytes=100000", "data.val_fraction=0.1",
        "train.max_steps=4", "train.global_batch_tokens=256", "train.micro_batch_size=4",
        "train.eval_every=2", "train.eval_batches=1", "train.checkpoint_every=2", "train.log_every=1",
        "optimizer.warmup_steps=1", f"run.output_dir={out}", "run.sample_tokens=0", "run.name=r",
        *overrides,
    ])


def rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def start_mlflow(root: Path):
    """`mlflow server` on a free port with a SQLite store: its URL once /health answers, and the process."""
    port = _free_port()
    root.mkdir(parents=True, exist_ok=True)
    log = open(root / "server.log", "w")
    proc = subprocess.Popen(
        [str(MLFLOW), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{root}/mlflow.db", "--artifacts-destination", str(root / "artifacts")],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})  # no job runner: a cheaper start
    url = f"http://127.0.0.1:{port}"
    while True:  # an event, not a timer: the server answers, or its process has ended
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if r.status == 200:
                    return url, proc
        except OSError:
            pass
        try:
            proc.wait(timeout=0.5)
            pytest.fail(f"mlflow server exited: {(root / 'server.log').read_text()[-2000:]}")
        except subprocess.TimeoutExpired:
            pass


def stop(proc: subprocess.Popen) -> None:
    """Stop the server and its uvicorn worker (their own process group, started by this test)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=60)
            return
        except subprocess.TimeoutExpired:
            continue


@pytest.fixture(scope="module")
def mlflow_url(tmp_path_factory):
    url, proc = start_mlflow(tmp_path_factory.mktemp("mlflow"))
    yield url
    stop(proc)


@pytest.fixture
def experiment(mlflow_url, monkeypatch, request):
    """This test's MLflow experiment: (client, name); MLFLOW_* point the run's tracker at it."""
    from mlflow.tracking import MlflowClient

    name = request.node.name[:100]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_url)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", name)
    return MlflowClient(mlflow_url), name


def runs_of(client, name: str) -> list:
    found = client.get_experiment_by_name(name)
    return client.search_runs([found.experiment_id]) if found is not None else []


def history(client, run_id: str, key: str) -> dict[int, float]:
    return {m.step: m.value for m in client.get_metric_history(run_id, key)}


def test_a_run_is_one_mlflow_run_with_every_row_its_config_and_files_and_a_resume_continues_it(
        tmp_path, experiment):
    """Every metrics row reaches MLflow at its step (beside metrics.jsonl and TensorBoard), the
    resolved config as params, config.yaml and metrics.jsonl as artifacts; a resume in place
    continues the same MLflow run (tracking.json) and sends the plots made in between."""
    client, name = experiment
    train_local(small_config(tmp_path, "run.tracking=[mlflow]"), log=lambda line: None)
    run_dir = tmp_path / "r"
    (run,) = runs_of(client, name)
    run_id = run.info.run_id
    assert json.loads((run_dir / TRACKING_FILE).read_text())["mlflow"]["run_id"] == run_id
    assert run.info.status == "FINISHED" and run.info.run_name == "r"
    written = rows(run_dir)
    assert history(client, run_id, "loss") == pytest.approx({r["step"]: r["loss"] for r in written if "loss" in r})
    assert history(client, run_id, "val_loss") == pytest.approx(
        {r["step"]: r["val_loss"] for r in written if "val_loss" in r})
    assert sorted(history(client, run_id, "loss")) == [1, 2, 3, 4]
    assert (run.data.params["model.dim"], run.data.params["train.max_steps"]) == (str(small_config(tmp_path).model.dim), "4")
    assert run.data.params["run.tracking"] == '["mlflow"]'
    assert {"config.yaml", "metrics.jsonl"} <= {a.path for a in client.list_artifacts(run_id)}
    assert any((run_dir / "tensorboard").iterdir())

    assert cli_main(["plot", str(run_dir)]) == 0
    train_local(small_config(tmp_path, "run.tracking=[mlflow]", f"run.resume_from={run_dir}",
                             "train.max_steps=6"), log=lambda line: None)
    (again,) = runs_of(client, name)
    assert again.info.run_id == run_id and again.info.status == "FINISHED"
    assert sorted(history(client, run_id, "loss")) == [1, 2, 3, 4, 5, 6]
    assert again.data.tags["raylm.restored_at_step"] == "4"
    assert "plots/loss.png" in {a.path for a in client.list_artifacts(run_id, "plots")}


@pytest.mark.slow
def test_two_torchrun_ranks_make_exactly_one_mlflow_run(tmp_path, experiment):
    """Rank 0 alone tracks: a 2-rank torchrun run is one MLflow run holding each step once."""
    client, name = experiment
    config = tmp_path / "two.yaml"
    # run.name unset: with a fixed name, rank 1 can resolve the run after rank 0 made its directory
    config.write_text(small_config(tmp_path, "run.tracking=[mlflow]", "run.name=null").to_yaml())
    torchrun = Path(sys.executable).with_name("torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node=2", "-m", "raylm", "train", str(config)],
                          capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    (run,) = runs_of(client, name)
    assert sorted(history(client, run.info.run_id, "loss")) == [1, 2, 3, 4]
    assert history(client, run.info.run_id, "world_size") == {s: 2.0 for s in (1, 2, 3, 4)}
    assert done.stdout.count("tracking: new MLflow run") == 1


def test_a_tracking_server_that_is_down_is_one_warning_line_and_the_run_completes(tmp_path, monkeypatch, capfd):
    """Nothing listens at the tracking URI: one warning line, and training writes every row."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{_free_port()}")
    result = train_local(small_config(tmp_path, "run.tracking=[mlflow]"), log=lambda line: None)
    err = [line for line in capfd.readouterr().err.splitlines() if "raylm: warning: tracking" in line]
    assert len(err) == 1 and "mlflow at http://127.0.0.1:" in err[0] and "training goes on" in err[0], err
    assert sorted(r["step"] for r in rows(Path(result.run_dir)) if "loss" in r) == [1, 2, 3, 4]
    assert result.checkpoint is not None and not (Path(result.run_dir) / TRACKING_FILE).exists()


@pytest.mark.slow
def test_an_mlflow_server_stopped_mid_run_never_fails_or_loses_the_run(tmp_path, monkeypatch, capfd):
    """The server is stopped once step 2's row has reached it: the run trains to its end and
    keeps every row, and the failure is one warning line."""
    from mlflow.tracking import MlflowClient

    url, proc = start_mlflow(tmp_path / "doomed")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    client = MlflowClient(url)
    stopped_after: list[str] = []

    def step_2_arrived() -> bool:
        found = client.get_experiment_by_name("raylm")  # this server is the test's own
        runs = client.search_runs([found.experiment_id]) if found is not None else []
        return bool(runs) and 2 in history(client, runs[0].info.run_id, "loss")

    def log(line: str) -> None:  # called by the trainer at each step's log line
        if line.startswith("step 2/") and proc.poll() is None:
            wait_for(step_2_arrived, 600, "step 2's row in MLflow")
            stop(proc)
            stopped_after.append(line.split(" ")[1])

    try:
        result = train_local(small_config(tmp_path, "run.tracking=[mlflow]", "train.max_steps=8"), log=log)
    finally:
        stop(proc)  # no-op once the log line stopped it
    assert stopped_after == ["2/8"]
    assert sorted(r["step"] for r in rows(Path(result.run_dir)) if "loss" in r) == list(range(1, 9))
    assert Path(result.checkpoint).name.endswith("8")
    err = [line for line in capfd.readouterr().err.splitlines() if "raylm: warning: tracking" in line]
    assert len(err) == 1, err


def read_wandb_records(path: Path) -> list:
    """The records of a W&B run file (LevelDB log format: 32 KiB blocks of checksummed chunks)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, block, out, chunk = path.read_bytes(), 7, 32768, [], b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if block - pos % block < 7:
            pos += block - pos % block  # the block's tail is padding
            continue
        _, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 and n == 0:
            break
        chunk += data[pos + 7:pos + 7 + n]
        pos += 7 + n
        if kind in (1, 4):  # FULL or LAST: a record is complete
            record = pb.Record()
            record.ParseFromString(chunk)
            out.append(record)
            chunk = b""
    return out


def test_wandb_offline_run_files_hold_every_row_and_the_config_and_a_resume_continues_the_run(tmp_path, monkeypatch):
    """WANDB_MODE=offline: the run directory's wandb/ holds one offline run whose history has each
    metrics row at its step and whose config is the resolved config; a resume logs to the same id."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_DIR", raising=False)
    train_local(small_config(tmp_path, "run.tracking=[wandb]", "train.max_steps=2"), log=lambda line: None)
    run_dir = tmp_path / "r"
    run_id = json.loads((run_dir / TRACKING_FILE).read_text())["wandb"]["run_id"]
    (first,) = glob.glob(str(run_dir / "wandb" / f"offline-run-*-{run_id}" / f"run-{run_id}.wandb"))
    records = read_wandb_records(Path(first))
    (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    config = {u.key: json.loads(u.value_json) for u in run.config.update}
    assert run.run_id == run_id and config["model.dim"] == small_config(tmp_path).model.dim
    assert config["run.tracking"] == '["wandb"]'
    logged = {}
    for r in records:
        if r.WhichOneof("record_type") == "history":
            item = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
            if "loss" in item:
                logged[item["step"]] = item["loss"]
    assert logged == pytest.approx({r["step"]: r["loss"] for r in rows(run_dir) if "loss" in r})

    train_local(small_config(tmp_path, "run.tracking=[wandb]", f"run.resume_from={run_dir}", "train.max_steps=3"),
                log=lambda line: None)
    files = glob.glob(str(run_dir / "wandb" / "offline-run-*" / "run-*.wandb"))
    assert len(files) == 2 and all(f.endswith(f"run-{run_id}.wandb") for f in files)
    final = glob.glob(str(run_dir / "wandb" / "offline-run-*" / "files" / "raylm" / "metrics.jsonl"))
    assert len(final) == 2 and Path(sorted(final)[-1]).read_text() == (run_dir / "metrics.jsonl").read_text()


def test_tracking_settings_are_checked_in_one_line(tmp_path, monkeypatch, capsys):
    """A misspelt tracker, a tracker named twice, a missing package: one line naming the key or
    the extra, before a run directory is made."""
    for override, expected in [("run.tracking=[mlfow]", "run.tracking.0='mlfow': must be one of mlflow, wandb"),
                               ("run.tracking=[wandb,wandb]", "must name each tracker once"),
                               ("run.tracking=mlflow", "run.tracking='mlflow': expected a list")]:
        with pytest.raises(ConfigError, match=expected.replace("[", r"\[")):
            small_config(tmp_path, override)
    monkeypatch.setitem(sys.modules, "wandb", None)  # what an environment without the package finds
    with pytest.raises(ConfigError, match=r"run.tracking: wandb not installed; pip install 'raylm\[track\]'"):
        check_available(["wandb"])
    config = tmp_path / "c.yaml"
    config.write_text(small_config(tmp_path / "runs", "run.tracking=[wandb]").to_yaml())
    assert cli_main(["train", str(config), "--local"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "raylm: error: run.tracking: wandb not installed; pip install 'raylm[track]'"
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
@pytest.mark.ray
def test_a_sweep_logs_one_run_per_trial_under_the_sweep_in_mlflow_and_wandb(ray_cluster, tmp_path, experiment,
                                                                           monkeypatch):
    """`raylm tune` on Ray: each trial (a Ray Train run, tracked by its rank 0) is one MLflow run,
    a child of the sweep's parent run, with its own metrics, and one offline W&B run whose group
    is the sweep's name; the driver's MLFLOW_* and WANDB_* variables reach the trials' workers."""
    from raylm.ray.tune import tune_command
    from raylm.sweep import load_sweep

    client, name = experiment
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_DIR", raising=False)
    sweep_file = tmp_path / "sweep.yaml"
    sweep_file.write_text(json.dumps({
        "base": str(ROOT / "configs/debug.yaml"), "name": "s", "output_dir": str(tmp_path / "sweeps"),
        "set": {"train.max_steps": 2, "train.eval_every": 2, "train.checkpoint_every": 2, "run.sample_tokens": 0,
                "run.tracking": ["mlflow", "wandb"], "data.sources.0.max_bytes": 100000,
                "tokenizer.sample_bytes": 100000},
        "resources": {"num_workers": 1, "cpus_per_worker": 1},
        "space": {"optimizer.lr": {"grid": [3.0e-3, 1.0e-3]}},
        "scheduler": "none", "metric": "val_loss", "max_concurrent": 1}))
    tune_command(load_sweep(sweep_file), log=lambda line: None)
    runs = runs_of(client, name)
    (parent,) = [r for r in runs if r.data.tags.get("raylm.sweep_parent") == "s"]
    trials = [r for r in runs if r is not parent]
    assert parent.info.status == "FINISHED"
    assert {"results.csv", "best.yaml"} <= {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert len(trials) == 2 and {r.data.tags.get("mlflow.parentRunId") for r in trials} == {parent.info.run_id}
    assert {r.data.params["optimizer.lr"] for r in trials} == {"0.003", "0.001"}
    for r in trials:
        assert r.data.tags["raylm.sweep"] == "s" and r.info.status == "FINISHED"
        assert sorted(history(client, r.info.run_id, "loss")) == [1, 2]

    saved = [json.loads(Path(f).read_text()) for f in glob.glob(str(tmp_path / "sweeps" / "**" / TRACKING_FILE),
                                                                recursive=True)]
    assert len(saved) == 2 and {t["mlflow"]["run_id"] for t in saved} == {r.info.run_id for r in trials}
    wandb_ids = {t["wandb"]["run_id"] for t in saved}
    files = glob.glob(str(tmp_path / "sweeps" / "**" / "offline-run-*" / "run-*.wandb"), recursive=True)
    assert len(files) == 2 and len(wandb_ids) == 2
    for f in files:
        (run,) = [r.run for r in read_wandb_records(Path(f)) if r.WhichOneof("record_type") == "run"]
        assert run.run_group == "s" and run.run_id in wandb_ids


@pytest.mark.slow
@pytest.mark.ray
def test_a_run_resumed_on_the_ray_path_continues_its_mlflow_run(ray_cluster, tmp_path, experiment):
    """Ray Train (rank 0 tracks): a run stopped at step 2 and resumed in place to step 4 is one
    MLflow run (the id in tracking.json unchanged) holding steps 1-4, tagged with the step it
    was restored at."""
    from raylm.ray.train import train_command

    client, name = experiment
    ray_overrides = ("run.tracking=[mlflow]", "scaling.num_workers=1", "scaling.cpus_per_worker=0.25",
                     "data.tokenize_actors=1")  # configs/debug.yaml's CPUs: fits the 2-CPU cluster
    train_command(small_config(tmp_path, *ray_overrides, "train.max_steps=2"))
    run_dir = tmp_path / "r"
    (run,) = runs_of(client, name)
    assert json.loads((run_dir / TRACKING_FILE).read_text())["mlflow"]["run_id"] == run.info.run_id
    train_command(small_config(tmp_path, *ray_overrides, f"run.resume_from={run_dir}", "train.max_steps=4"))
    (again,) = runs_of(client, name)
    assert again.info.run_id == run.info.run_id and again.info.status == "FINISHED"
    assert json.loads((run_dir / TRACKING_FILE).read_text())["mlflow"]["run_id"] == run.info.run_id
    assert sorted(history(client, run.info.run_id, "loss")) == [1, 2, 3, 4]
    assert again.data.tags["raylm.restored_at_step"] == "2"
