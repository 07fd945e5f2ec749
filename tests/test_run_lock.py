"""One writer per run directory and per sweep directory (issue 18, items 2 and 9).

Real processes on real run directories (`raylm train --local`), a real S3 endpoint (moto_server,
the session's `s3_server`), real sweep files through `raylm.cli.main`. No Ray cluster: the lock
is taken and the sweep file checked before Ray would start.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow.fs as pafs
import pytest

from raylm import lock, storage
from raylm.cli import main as cli_main
from raylm.train import checkpoint as ckpt

ROOT = Path(__file__).resolve().parents[1]
DEBUG = str(ROOT / "configs" / "debug.yaml")
# the debug preset at the session run's sizes (support.local_config), so a copy of that run resumes
SMALL = ["model.vocab_size=512", "model.max_seq_len=64", "data.seq_len=32", "data.sources.0.max_bytes=200000",
         "tokenizer.sample_bytes=100000", "train.global_batch_tokens=256", "train.micro_batch_size=4",
         "train.max_steps=4", "train.checkpoint_every=2", "train.log_every=1", "train.eval_every=0",
         "run.sample_tokens=0", "run.keep_checkpoints=5"]
WAIT_S = 300  # a bound on waiting for an event, never a duration the test expects


def _train(*overrides: str) -> int:
    return cli_main(["train", DEBUG, "--local", *SMALL, *overrides])


def _cli(*args: str, timeout: float = WAIT_S) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "raylm", *args], capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT)


def _steps(run_dir: str | Path) -> list[int]:
    """The steps of the training rows of metrics.jsonl, in file order (evaluation rows left out)."""
    text = storage.read_bytes(storage.child(run_dir, "metrics.jsonl")).decode()
    rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    return [r["step"] for r in rows if "loss" in r]


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def _lease(pid: int, *, host: str | None = None, heartbeat_age_s: float = 0.0, token: str = "feedc0de") -> bytes:
    mine = host is None
    return json.dumps({"host": host or socket.gethostname(), "pid": pid, "started": "2026-01-02T03:04:05Z",
                       "heartbeat": time.time() - heartbeat_age_s, "token": token,
                       "boot_id": lock._boot_id() if mine else "another-boot", "pid_start": ""}).encode()


def _wait_for(condition, what: str, proc: subprocess.Popen | None = None):
    deadline = time.monotonic() + WAIT_S
    while not condition():
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"the process exited ({proc.returncode}) before {what}")
        if time.monotonic() > deadline:
            pytest.fail(f"no {what} within {WAIT_S} s")
        time.sleep(0.1)


@pytest.fixture
def run_dir(local_run, tmp_path) -> Path:
    """A copy, named r, of the session's finished 6-step local run (checkpoints 2, 4 and 6)."""
    base = Path(local_run.run_dir)
    target = tmp_path / "runs" / "r"
    shutil.copytree(base, target)
    (target / "config.yaml").write_text((target / "config.yaml").read_text().replace(f"name: {base.name}", "name: r"))
    return target


# ---------------------------------------------------------------------------------------
# Item 2: two writers on one run directory


@pytest.mark.slow
def test_a_second_local_run_on_a_held_run_dir_stops_in_one_line_naming_the_holder_and_loses_nothing(run_dir):
    """Two `raylm train --local run.resume_from=RUN` together: the second exits 2 with one line naming the
    first (host, pid, start) and touches nothing; the first's metrics rows and checkpoints stay whole."""
    first_log = run_dir.parent / "first.log"
    with open(first_log, "w") as log:
        first = subprocess.Popen([sys.executable, "-m", "raylm", "train", DEBUG, "--local", *SMALL,
                                  "train.max_steps=100000", "train.checkpoint_every=100000",
                                  f"run.resume_from={run_dir}"], stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    try:  # the first holds the run once it has restored step 6 and written a row past it
        _wait_for(lambda: max(_steps(run_dir), default=0) >= 8, "metrics row past the restored step", first)
        config_before = (run_dir / "config.yaml").read_bytes()
        second = _cli("train", DEBUG, "--local", *SMALL, "train.max_steps=10", "optimizer.lr=1e-4",
                      f"run.resume_from={run_dir}")
        lines = second.stderr.strip().splitlines()
        assert second.returncode == 2, second.stderr[-2000:]
        assert len(lines) == 1 and lines[0].startswith("raylm: error: run directory"), lines
        assert f"pid {first.pid}" in lines[0] and f"host {socket.gethostname()}" in lines[0] and "started" in lines[0]
        assert (run_dir / "config.yaml").read_bytes() == config_before
        assert first.poll() is None, "the first run stopped while the second tried"
        first.send_signal(signal.SIGINT)
        assert first.wait(timeout=WAIT_S) == 130, first_log.read_text()[-2000:]
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    steps = _steps(run_dir)
    assert steps == list(range(1, len(steps) + 1)), steps  # every row of the first, none twice
    checkpoints = ckpt.list_checkpoints(run_dir)
    assert [Path(c).name for c in checkpoints] == [ckpt.checkpoint_dir_name(s) for s in (2, 4, 6)]
    assert all(ckpt.verify_checkpoint(c) is None for c in checkpoints)
    assert not (run_dir / lock.LOCK_FILE).exists(), "the lock outlived its holder's Ctrl-C"


def test_a_live_lock_of_another_host_refuses_and_a_dead_pids_lock_is_taken_over(run_dir, capsys):
    """A lease refreshed just now on another host: one line naming it, nothing written. A lease of
    this host whose pid is dead: taken over at once, the run resumes, and the lock goes at exit."""
    lock_file = run_dir / lock.LOCK_FILE
    lock_file.write_bytes(_lease(4242, host="other-host", heartbeat_age_s=1))
    before = sorted(p.name for p in run_dir.iterdir())
    assert _train("train.max_steps=8", f"run.resume_from={run_dir}") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "host other-host pid 4242 (started 2026-01-02T03:04:05Z" in err[0], err
    assert sorted(p.name for p in run_dir.iterdir()) == before and _steps(run_dir) == [1, 2, 3, 4, 5, 6]

    lock_file.write_bytes(_lease(_dead_pid()))
    assert _train("train.max_steps=8", f"run.resume_from={run_dir}") == 0
    assert _steps(run_dir) == [1, 2, 3, 4, 5, 6, 7, 8]
    assert not lock_file.exists()


def test_a_lease_of_another_host_is_stale_only_after_its_heartbeat_timeout(tmp_path):
    (tmp_path / lock.LOCK_FILE).write_bytes(_lease(4242, host="other-host", heartbeat_age_s=lock.STALE_AFTER_S - 5))
    with pytest.raises(lock.LockHeld, match="host other-host pid 4242"):
        lock.acquire(tmp_path, "run directory")
    (tmp_path / lock.LOCK_FILE).write_bytes(_lease(4242, host="other-host", heartbeat_age_s=lock.STALE_AFTER_S + 5))
    with lock.acquire(tmp_path, "run directory") as held:
        assert json.loads((tmp_path / lock.LOCK_FILE).read_bytes())["token"] == held.lease.token
    assert not (tmp_path / lock.LOCK_FILE).exists()


def _race(n: int, attempt) -> list:
    """Run `attempt()` in n threads released together; each result (a DirLock or the exception)."""
    barrier = threading.Barrier(n)
    results: list = [None] * n

    def one(i):
        barrier.wait()
        try:
            results[i] = attempt()
        except (lock.LockHeld, FileExistsError) as e:
            results[i] = e

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def _one_winner(results: list) -> lock.DirLock:
    won = [r for r in results if isinstance(r, lock.DirLock)]
    assert len(won) == 1, results
    assert all(isinstance(r, (lock.LockHeld, FileExistsError)) for r in results if r is not won[0])
    return won[0]


def test_of_takers_racing_for_one_stale_lock_exactly_one_wins(tmp_path):
    """Takeover is a compare-and-swap: eight takers of one dead process's lease, one holder
    (20 rounds: a takeover that left the name absent for a moment lost to a racing create in
    CI, two holders; looped, that code failed 147 rounds of 150)."""
    for _ in range(20):
        (tmp_path / lock.LOCK_FILE).write_bytes(_lease(_dead_pid()))
        winner = _one_winner(_race(8, lambda: lock.acquire(tmp_path)))
        assert json.loads((tmp_path / lock.LOCK_FILE).read_bytes())["token"] == winner.lease.token
        winner.release()
        assert sorted(p.name for p in tmp_path.iterdir()) == []  # no stray temporary or set-aside files


def test_of_starts_racing_to_create_one_directory_exactly_one_wins(tmp_path):
    winner = _one_winner(_race(8, lambda: lock.create(tmp_path / "sweep", "sweep directory")))
    winner.release()


def test_the_holder_refreshes_its_heartbeat_and_a_release_never_removes_anothers_lease(tmp_path, monkeypatch):
    monkeypatch.setattr(lock, "REFRESH_S", 0.1)
    held = lock.acquire(tmp_path)
    first = json.loads((tmp_path / lock.LOCK_FILE).read_bytes())["heartbeat"]
    _wait_for(lambda: json.loads((tmp_path / lock.LOCK_FILE).read_bytes())["heartbeat"] > first, "heartbeat")
    (tmp_path / lock.LOCK_FILE).write_bytes(_lease(4242, host="other-host"))  # taken over while this one hung
    _wait_for(lambda: held.lost, "the holder noticing it lost the lease")
    held.release()
    assert json.loads((tmp_path / lock.LOCK_FILE).read_bytes())["host"] == "other-host"


# ---------------------------------------------------------------------------------------
# On S3: a lease object written with conditional writes


BUCKET = "raylm-lock-test"


@pytest.fixture(scope="module")
def s3(s3_server):
    names = ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL",
             "AWS_ENDPOINT_URL_S3"]
    saved = {k: os.environ.get(k) for k in names}
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1",
                      AWS_ENDPOINT_URL=s3_server)
    os.environ.pop("AWS_ENDPOINT_URL_S3", None)
    pafs.S3FileSystem(endpoint_override=s3_server.removeprefix("http://"), scheme="http",
                      allow_bucket_creation=True).create_dir(BUCKET)
    yield f"s3://{BUCKET}"
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def test_on_s3_the_lease_is_exclusive_names_its_holder_and_a_stale_one_has_one_taker(s3):
    """S3 leases use PutObject If-None-Match (create) and If-Match on the stale lease's ETag (takeover)."""
    directory = f"{s3}/unit"
    assert type(lock._store(storage.child(directory, lock.LOCK_FILE))) is lock._S3Store  # exclusive, not best effort
    winner = _one_winner(_race(6, lambda: lock.create(directory, "run directory")))
    with pytest.raises(lock.LockHeld, match=f"pid {os.getpid()}"):
        lock.acquire(directory, "run directory")
    winner.release()
    assert not storage.exists(storage.child(directory, lock.LOCK_FILE))

    storage.write_bytes(storage.child(directory, lock.LOCK_FILE),
                        _lease(4242, host="other-host", heartbeat_age_s=lock.STALE_AFTER_S + 5))
    winner = _one_winner(_race(6, lambda: lock.acquire(directory, "run directory")))
    saved = json.loads(storage.read_bytes(storage.child(directory, lock.LOCK_FILE)))
    assert saved["token"] == winner.lease.token
    winner.release()


def test_on_s3_a_second_local_run_is_refused_in_one_line_and_a_dead_lease_taken_over(s3, capsys):
    out = f"{s3}/runs"
    assert _train(f"run.output_dir={out}", "run.name=r") == 0
    run_dir = f"{out}/r"
    assert not storage.exists(storage.child(run_dir, lock.LOCK_FILE))
    capsys.readouterr()

    storage.write_bytes(storage.child(run_dir, lock.LOCK_FILE), _lease(os.getpid()))  # a live holder: this process
    assert _train("train.max_steps=6", f"run.resume_from={run_dir}") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"run directory {run_dir} is in use by host {socket.gethostname()} pid {os.getpid()}" \
        in err[0], err
    assert _steps(run_dir) == [1, 2, 3, 4]

    storage.write_bytes(storage.child(run_dir, lock.LOCK_FILE), _lease(_dead_pid()))
    assert _train("train.max_steps=6", f"run.resume_from={run_dir}") == 0
    assert _steps(run_dir) == [1, 2, 3, 4, 5, 6]
    assert not storage.exists(storage.child(run_dir, lock.LOCK_FILE))


# ---------------------------------------------------------------------------------------
# Item 9: raylm tune


@pytest.fixture
def no_ray_start(monkeypatch):
    """A tripwire: these checks come before any Ray start, so reaching one fails the test (and a
    regression never starts a sweep inside the test)."""
    import raylm.ray.tune

    def tripwire(*args, **kwargs):
        raise AssertionError("raylm tune went on to start Ray")

    monkeypatch.setattr(raylm.ray.tune, "ray_session", tripwire)


def _sweep_file(tmp_path: Path, **keys) -> Path:
    lines = [f"base: {DEBUG}", f"output_dir: {tmp_path / 'sweeps'}", "scheduler: none",
             "set: {train.max_steps: 4, train.eval_every: 2}",
             "space: {optimizer.lr: {loguniform: [1.0e-4, 1.0e-2]}}",
             *(f"{k}: {v}" for k, v in keys.items())]
    path = tmp_path / "sweep.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize("key, value, said", [
    ("name", "5", "name=5: must be a plain name"),
    ("name", "../../x", "name='../../x': must be a plain name"),
    ("trial_cpus", "abc", "trial_cpus='abc': must be a number above 0"),
    ("trial_cpus", ".inf", "trial_cpus=inf: must be a number above 0"),
    ("max_trial_failures", "lots", "max_trial_failures='lots': must be an integer"),
    ("seed", "1.5", "seed=1.5: must be an integer"),
])
def test_a_bad_sweep_key_is_one_line_and_nothing_is_written(tmp_path, capsys, no_ray_start, key, value, said):
    path = _sweep_file(tmp_path, **{key: value})
    assert cli_main(["tune", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"raylm: error: {path}: ") and said in err[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sweep.yaml"]


def test_a_sweep_name_from_the_command_line_cannot_escape_output_dir(tmp_path, capsys, no_ray_start):
    path = _sweep_file(tmp_path)
    assert cli_main(["tune", str(path), "name=../escaped"]) == 2
    assert "name='../escaped': must be a plain name" in capsys.readouterr().err
    assert not (tmp_path / "escaped").exists() and not (tmp_path / "sweeps").exists()


def test_a_second_resume_of_a_held_sweep_stops_in_one_line_naming_the_holder(tmp_path, capsys, no_ray_start):
    """`raylm tune --resume DIR` takes the sweep directory's lock before anything else."""
    from raylm import sweep as sweeps

    sweep = sweeps.load_sweep(_sweep_file(tmp_path, name="s"))
    with lock.create(sweeps.sweep_dir_for(sweep), "sweep directory") as held:
        sweeps.save_sweep(sweep, held.directory)
        assert cli_main(["tune", "--resume", str(held.directory)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"sweep directory {held.directory} is in use by host" in err[0] \
            and f"pid {os.getpid()}" in err[0], err
        assert cli_main(["tune", str(tmp_path / "sweep.yaml")]) == 2  # a new sweep of the same name
        assert "already exists; continue it with raylm tune --resume" in capsys.readouterr().err


def test_a_trial_run_with_a_live_lock_is_never_set_aside_and_a_dead_ones_is(tmp_path):
    """A restarted trial without a checkpoint copies its run aside and removes it only under the run's
    lock: a live holder's run stays whole; a dead holder's is copied (without its lease) and removed."""
    from raylm.ray.tune import set_aside

    runs = tmp_path / "runs"
    run = runs / "t1"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text("x: 1\n")
    (run / lock.LOCK_FILE).write_bytes(_lease(os.getpid()))
    with pytest.raises(lock.LockHeld, match=f"trial run directory {run} is in use by host .* pid {os.getpid()}"):
        set_aside(runs, "t1")
    assert sorted(p.name for p in run.iterdir()) == ["config.yaml", lock.LOCK_FILE]
    assert sorted(p.name for p in runs.iterdir()) == ["t1"]

    (run / lock.LOCK_FILE).write_bytes(_lease(_dead_pid()))
    set_aside(runs, "t1")
    assert sorted(p.name for p in runs.iterdir()) == ["t1.failed-1"]
    assert sorted(p.name for p in (runs / "t1.failed-1").iterdir()) == ["config.yaml"]
