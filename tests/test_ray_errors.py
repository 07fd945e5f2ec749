"""What the user sees when Ray stands between raylm and an error (issue 18, items 10 and 11).

A user error raised in a Ray Data task or a Ray Train worker is raylm's one line, with no Ray
traceback before it (the traceback stays in Ray's log files, which the line names). A cluster
that goes away under `raylm train` is one line naming the run to resume, exit status 1.

The end-to-end tests run `python -m raylm` in a subprocess that starts its own local cluster
(as a user's command does); the session's shared cluster is not touched. The classifier and
the console filter are tested on real Ray exceptions from the shared cluster.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from raylm.errors import DataError

ROOT = Path(__file__).resolve().parent.parent
BAD_LINE = 3001


def bad_jsonl(path: Path, bad: bool = True) -> Path:
    """3,000 good JSON lines, one malformed one (line 3001) unless `bad` is False, then 10 more."""
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()
    lines = [json.dumps({"text": " ".join(words[(i * 7 + k) % len(words)] for k in range(30))}) for i in range(3010)]
    if bad:
        lines[BAD_LINE - 1] = '{"text": "broken'
    path.write_text("\n".join(lines) + "\n")
    return path


def raylm_cli(*args: str, **popen) -> subprocess.Popen:
    """`python -m raylm ARGS` in its own process group (and its own local Ray cluster)."""
    env = {**os.environ, "RAY_ADDRESS": ""}  # never the session's cluster
    return subprocess.Popen([sys.executable, "-m", "raylm", *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True, **popen)


def finish(proc: subprocess.Popen, timeout_s: float = 600) -> tuple[int, str, str]:
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        kill_session(proc.pid, include_leader=True)
        out, err = proc.communicate()
        pytest.fail(f"raylm did not finish in {timeout_s} s:\n{out}\n{err}")
    return proc.returncode, out, err


def session_pids(sid: int) -> list[int]:
    """The processes of session `sid` (the subprocess and every Ray process its cluster started:
    they inherit its session, whatever their parent becomes)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[3]) == sid:
            pids.append(int(entry))
    return pids


def kill_session(sid: int, include_leader: bool = False) -> int:
    pids = [p for p in session_pids(sid) if include_leader or p != sid]
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return len(pids)


def assert_only_the_line(code: int, out: str, err: str, expected_code: int = 2) -> str:
    """No traceback anywhere in the output, exactly one `raylm: error:` line, last on stderr."""
    both = out + err
    assert "Traceback" not in both and '  File "' not in both, both
    errors = [line for line in both.splitlines() if "raylm: error:" in line]
    assert len(errors) == 1 and err.rstrip().splitlines()[-1] == errors[0] and errors[0].startswith("raylm: error: "), \
        both
    assert code == expected_code, both
    return errors[0]


def ray_logs_named(line: str) -> Path:
    match = re.search(r"\(Ray's logs: (/\S+)\)$", line)
    assert match, line
    return Path(match.group(1))


# ---------------------------------------------------------------------------------------
# Item 10: a user error in a Ray worker is raylm's line alone


@pytest.mark.slow
def test_prepare_on_a_malformed_jsonl_prints_only_raylms_line_and_names_rays_logs(tmp_path):
    """`raylm prepare` on a JSONL file with a malformed line: the whole output holds no traceback,
    only `raylm: error: FILE:3001: malformed JSON ...`, which names Ray's log directory; that
    directory holds Ray Data's full report of the error."""
    corpus = bad_jsonl(tmp_path / "x.jsonl")
    code, out, err = finish(raylm_cli("prepare", "configs/debug.yaml",
                                      f"data.sources=[{{path: {corpus}, format: jsonl}}]",
                                      f"data.prepared_path={tmp_path / 'p'}"))
    line = assert_only_the_line(code, out, err)
    assert line.startswith(f"raylm: error: {corpus}:{BAD_LINE}: malformed JSON"), out + err
    logs = ray_logs_named(line)
    data_logs = "".join(p.read_text(errors="replace") for p in (logs / "ray-data").glob("*.log"))
    assert "Traceback" in data_logs and f"{corpus}:{BAD_LINE}: malformed JSON" in data_logs, out + err
    assert not (tmp_path / "p").exists()


@pytest.mark.slow
def test_a_user_error_in_ray_train_workers_prints_only_raylms_line(tmp_path):
    """The same corpus met by the Ray Train workers' streaming split (tokenizer given, no held-out
    split, so nothing on the driver reads it; data.on_error=raise): neither the split coordinator's
    Ray Data logs nor the workers' "Error in training function" reach the console, only the line;
    Ray Train's worker logs keep the traceback. (run.max_failures=0: one attempt, not four.)"""
    from raylm.config import load_config
    from support import train_tokenizer_local

    good = bad_jsonl(tmp_path / "good.jsonl", bad=False)
    cfg = load_config(str(ROOT / "configs/debug.yaml"), [f"data.sources=[{{path: {good}, format: jsonl}}]"])
    tokenizer = train_tokenizer_local(cfg).save(tmp_path / "tok.model")
    corpus = bad_jsonl(tmp_path / "x.jsonl")
    code, out, err = finish(raylm_cli("train", "configs/debug.yaml",
                                      f"data.sources=[{{path: {corpus}, format: jsonl}}]", "data.on_error=raise",
                                      "data.val_fraction=0", f"tokenizer.path={tokenizer}",
                                      f"run.output_dir={tmp_path / 'runs'}", "train.max_steps=4", "run.max_failures=0"))
    line = assert_only_the_line(code, out, err)
    assert line.startswith(f"raylm: error: {corpus}:{BAD_LINE}: malformed JSON"), out + err
    train_logs = "".join(p.read_text(errors="replace") for p in (ray_logs_named(line) / "train").glob("*worker*.log"))
    assert "Error in training function" in train_logs and "malformed JSON" in train_logs, out + err


def _raise_data_error():
    raise DataError("/data/x.jsonl:7: malformed JSON")


def _raise_value_error():
    raise ValueError("a bug in raylm")


@pytest.mark.slow  # the session's Ray cluster
def test_ray_data_console_hides_a_user_errors_traceback_only_within_the_command(ray_cluster, tmp_path):
    """Within `user_error_tracebacks_hidden` a Ray Data record carrying a (real, Ray-wrapped)
    DataError is kept off the console but written to the log file; one carrying any other error
    is shown with its traceback; after the command the filter is gone."""
    import io

    import ray

    from raylm.ray.errors import user_error_tracebacks_hidden

    def caught(fn):
        try:
            ray.get(ray.remote(fn).options(max_retries=0).remote())
        except Exception as e:  # noqa: BLE001
            return e
        raise AssertionError("no error")

    user, bug = caught(_raise_data_error), caught(_raise_value_error)
    console, log_file = io.StringIO(), tmp_path / "ray-data.log"
    handlers = [logging.StreamHandler(console), logging.FileHandler(log_file)]
    parent = logging.getLogger("ray.data")  # where Ray Data's console and file handlers are
    logger = logging.getLogger("ray.data.exceptions")  # logs the driver's "Full stack trace"
    for h in handlers:
        parent.addHandler(h)
    try:
        with user_error_tracebacks_hidden():
            logger.error("Full stack trace:", exc_info=user)
            try:
                raise user
            except Exception:
                logger.error("Exception occurred in Ray Data or Ray Core internal code.")  # the error being handled
            hidden = console.getvalue()
            logger.error("Full stack trace:", exc_info=bug)
            shown = console.getvalue()[len(hidden):]
        logger.error("Full stack trace:", exc_info=user)
        after = console.getvalue()[len(hidden) + len(shown):]
    finally:
        for h in handlers:
            parent.removeHandler(h)
            h.close()
    assert hidden == ""
    assert "Traceback" in shown and "a bug in raylm" in shown
    assert "Traceback" in after and "malformed JSON" in after
    assert log_file.read_text().count("/data/x.jsonl:7: malformed JSON") >= 2  # the file kept all of them


# ---------------------------------------------------------------------------------------
# Item 11: a lost cluster


def _call_dead_actor(handle):
    import ray

    return ray.get(handle.ping.remote())


def _sleep(seconds: float) -> None:
    time.sleep(seconds)


class _Pinger:
    def ping(self):
        return "pong"


@pytest.mark.slow  # the session's Ray cluster
def test_lost_cluster_is_classified_by_exception_type(ray_cluster):
    """Real Ray exceptions: a dead actor the driver waits on and Ray's system errors mean the
    cluster (or its part the command needs) is gone; a task's own failure (even a task that met
    a dead actor), a timeout, and raylm's own errors do not."""
    import ray
    import ray.exceptions as rex

    from raylm.ray.errors import ClusterLost, lost_cluster_cause

    actor = ray.remote(_Pinger).options(num_cpus=0).remote()
    assert ray.get(actor.ping.remote()) == "pong"
    ray.kill(actor, no_restart=True)  # asynchronous: a call sent just after may still be answered
    dead, deadline = None, time.monotonic() + 120
    while dead is None:
        try:
            ray.get(actor.ping.remote(), timeout=60)
        except rex.RayActorError as e:
            dead = e
        assert time.monotonic() < deadline, "the killed actor still answers 120 s after ray.kill"
    with pytest.raises(rex.RayTaskError) as in_task:
        ray.get(ray.remote(_call_dead_actor).options(num_cpus=0, max_retries=0).remote(actor), timeout=60)
    with pytest.raises(rex.RayTaskError) as failed:
        ray.get(ray.remote(_raise_value_error).options(num_cpus=0, max_retries=0).remote(), timeout=60)
    sleeping = ray.remote(_sleep).options(num_cpus=0, max_retries=0).remote(30)
    with pytest.raises(rex.GetTimeoutError) as timed_out:
        ray.get(sleeping, timeout=0.1)
    ray.cancel(sleeping, force=True)

    assert lost_cluster_cause(dead) == type(dead).__name__
    unavailable = rex.ActorUnavailableError("RpcError: Socket closed", None)
    assert lost_cluster_cause(unavailable) == "ActorUnavailableError"
    try:
        try:
            raise ConnectionError("GCS unreachable")
        except ConnectionError as e:
            raise RuntimeError("while reporting") from e
    except RuntimeError as e:
        assert lost_cluster_cause(e) == "ConnectionError"
    assert lost_cluster_cause(rex.RaySystemError("raylet died")) == "RaySystemError"
    for not_lost in (in_task.value, failed.value, timed_out.value, DataError("x"), ClusterLost("X", "/r")):
        assert lost_cluster_cause(not_lost) is None, repr(not_lost)


def test_cluster_loss_becomes_one_line_with_the_resume_command_and_exit_1():
    """`cluster_loss(run_dir)` turns a lost cluster into ClusterLost naming run.resume_from, exit
    status 1 (2 stays "fix your input"); any other exception passes untouched, and a command that
    raises nothing is left alone."""
    import ray.exceptions as rex

    from raylm.ray.errors import ClusterLost, cluster_loss

    with pytest.raises(ClusterLost) as lost:
        with cluster_loss("/runs/r1"):
            raise rex.ActorUnavailableError("Socket closed", None)
    assert str(lost.value) == ("the Ray cluster went away (ActorUnavailableError); its finished checkpoints are "
                               "kept: continue with run.resume_from=/runs/r1")
    with pytest.raises(ValueError):  # anything else passes untouched
        with cluster_loss("/runs/r1"):
            raise ValueError("a bug")
    with cluster_loss("/runs/r1"):  # and no error is no error
        done = True
    assert done
    assert lost.value.exit_code == 1


@pytest.mark.slow
def test_a_lost_local_cluster_ends_train_with_one_line_naming_the_run(tmp_path):
    """Every process of the local cluster under `raylm train` killed after its first checkpoint:
    stderr ends in one line that says the cluster went away and how to resume the run, with no
    traceback, exit status 1, and the run directory keeps its checkpoint. (Its tokenizer trained
    here beforehand, `tokenizer.path`: the run skips sampling the corpus through Ray Data.)"""
    from raylm.config import load_config
    from support import train_tokenizer_local

    tokenizer = train_tokenizer_local(load_config(str(ROOT / "configs/debug.yaml"))).save(tmp_path / "tok.model")
    out_dir = tmp_path / "runs"
    proc = raylm_cli("train", "configs/debug.yaml", f"run.output_dir={out_dir}", f"tokenizer.path={tokenizer}",
                     "train.max_steps=100000",
                     "train.checkpoint_every=2", "train.log_every=1", "train.eval_every=100000", "run.sample_tokens=0")
    deadline = time.monotonic() + 600
    while not list(out_dir.glob("*/checkpoint_*/.metadata")):  # a checkpoint is written (then its metrics row)
        if proc.poll() is not None or time.monotonic() > deadline:
            kill_session(proc.pid, include_leader=True)
            out, err = proc.communicate()
            pytest.fail(f"no checkpoint appeared:\n{out}\n{err}")
        time.sleep(0.2)
    (run_dir,) = out_dir.iterdir()
    assert kill_session(proc.pid) > 3  # the GCS, raylet, workers... never the session's own cluster
    code, out, err = finish(proc)
    line = assert_only_the_line(code, out, err, expected_code=1)
    assert re.fullmatch(rf"raylm: error: the local Ray cluster went away \((ActorUnavailableError|ActorDiedError|"
                        rf"RaySystemError|RpcError)\); its finished checkpoints are kept: continue with "
                        rf"run\.resume_from={re.escape(str(run_dir))} \(Ray's logs: /\S+\)", line), line
    assert list(run_dir.glob("checkpoint_*"))
