"""The Ray Data pipeline on a real 2-CPU local cluster: formats, order, mixture, prepared mode, bad input."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray

from raylm.config import load_config
from raylm.data.corpus import is_validation
from raylm.errors import DataError
from raylm.tokenizer import Tokenizer

pytestmark = [pytest.mark.ray, pytest.mark.slow]  # every test here runs on a Ray cluster

BASE = ["model.preset=debug", "model.vocab_size=512", "data.seq_len=32", "train.global_batch_tokens=256",
        "train.micro_batch_size=4", "data.tokenize_batch_docs=16", "tokenizer.sample_bytes=100000",
        "train.max_steps=20"]


def config(*overrides, sources=None):
    cfg = load_config(None, [*BASE, *overrides])
    if sources is not None:
        cfg = load_config(None, [*BASE, *overrides, "data.sources=" + json.dumps(sources)])
    return cfg


@pytest.fixture(scope="module")
def tokenizer():
    from support import stdlib_documents

    docs = stdlib_documents(max_bytes=200_000)
    return Tokenizer.train((d.text for d in docs), 512, max_bytes=100_000)


def words(rng, n):
    vocab = ["alpha", "beta", "gamma", "delta", "def", "return", "import", "class", "self", "value"]
    return " ".join(rng.choice(vocab, size=n))


def pipeline(cfg, tokenizer, split="train"):
    """The packed Ray Data pipeline of `split` (dataset + bad-input counter)."""
    from raylm.data.plan import plan_files
    from raylm.ray.data import packed_dataset

    return packed_dataset(cfg, tokenizer, plan_files(cfg, split), split)


def rows_of(ds):
    from raylm.ray.data import iter_rows

    ds = getattr(ds, "dataset", ds)
    tokens, index = [], []
    for batch in iter_rows(ds):
        tokens.append(batch["tokens"])
        index.append(batch["index"])
    return np.concatenate(tokens), np.concatenate(index)


def docs_of(cfg, split="train", mixture=True):
    from raylm.data.plan import plan_files
    from raylm.ray.data import bad_input_counter, documents_dataset
    from raylm.ray.errors import user_errors

    ds = documents_dataset(cfg, plan_files(cfg, split, mixture=mixture), split, bad_input_counter())
    ds.context.execution_options.preserve_order = True
    with user_errors():
        return [(r["doc_id"], r["text"]) for r in ds.iter_rows()]


def test_default_corpus_rows_equal_the_single_process_pack(ray_cluster, tokenizer):
    """Ray Data rows (read, actor-pool tokenise, sequential pack) == local rows, indices 0..N-1."""
    from raylm.data.local import local_datasets

    cfg = config("data.sources.0.max_bytes=300000")
    tokens, index = rows_of(pipeline(cfg, tokenizer))
    local_train, _ = local_datasets(cfg, tokenizer)
    assert np.array_equal(index, np.arange(len(index)))
    assert np.array_equal(tokens, local_train.source.rows)


def test_every_source_format_reads_documents_in_file_order(ray_cluster, tmp_path):
    rng = np.random.default_rng(0)
    texts = [words(rng, 20) for _ in range(6)]
    (tmp_path / "txt" / "sub").mkdir(parents=True)
    for i, t in enumerate(texts[:3]):
        (tmp_path / "txt" / ("sub" if i == 2 else "") / f"{i}.txt").write_text(t)
    (tmp_path / "l.txt").write_text("\n".join(texts) + "\n")
    (tmp_path / "r.jsonl").write_text("".join(json.dumps({"body": t, "n": i}) + "\n" for i, t in enumerate(texts)))
    pq.write_table(pa.table({"content": texts}), tmp_path / "p.parquet")
    cases = [
        ({"path": str(tmp_path / "txt"), "format": "text"}, [("0.txt", texts[0]), ("1.txt", texts[1]),
                                                            ("sub/2.txt", texts[2])]),
        ({"path": str(tmp_path / "txt" / "*.txt"), "format": "text"}, [("0.txt", texts[0]), ("1.txt", texts[1])]),
        ({"path": str(tmp_path / "l.txt"), "format": "lines"}, [(f"l.txt:{i + 1}", t) for i, t in enumerate(texts)]),
        ({"path": "file://" + str(tmp_path / "r.jsonl"), "format": "jsonl", "field": "body"},
         [(f"r.jsonl:{i + 1}", t) for i, t in enumerate(texts)]),
        ({"path": str(tmp_path / "p.parquet"), "format": "parquet", "column": "content"},
         [(f"p.parquet:{i}", t) for i, t in enumerate(texts)]),
    ]
    for source, expected in cases:
        assert docs_of(config("data.val_fraction=0", "data.shuffle_files=false", sources=[source])) == expected, source


def test_mixture_token_share_follows_weights(ray_cluster, tmp_path, tokenizer):
    """Two sources weighted 3:1 (the small one upsampled): training tokens split 75/25 within 3 points."""
    rng = np.random.default_rng(1)
    for name, n_files in (("a", 30), ("b", 6)):
        (tmp_path / name).mkdir()
        for i in range(n_files):
            (tmp_path / name / f"{name}{i:02d}.txt").write_text(words(rng, int(rng.integers(100, 300))))
    cfg = config("data.val_fraction=0", sources=[
        {"path": str(tmp_path / "a"), "weight": 3.0}, {"path": str(tmp_path / "b"), "weight": 1.0}])
    docs = docs_of(cfg)
    counts = {"a": 0, "b": 0}
    for doc_id, text in docs:
        counts[doc_id[0]] += len(tokenizer.encode_one(text)) + 2
    share = counts["a"] / (counts["a"] + counts["b"])
    assert abs(share - 0.75) < 0.03, counts
    assert {d for d, _ in docs if d[0] == "b"} == {f"b{i:02d}.txt" for i in range(6)}


def test_validation_is_held_out_by_document_hash(ray_cluster, tmp_path):
    rng = np.random.default_rng(2)
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"text": words(rng, 5)}) + "\n" for _ in range(300)))
    cfg = config("data.val_fraction=0.2", sources=[{"path": str(tmp_path / "c.jsonl"), "format": "jsonl"}])
    train, val = docs_of(cfg, "train"), docs_of(cfg, "validation")
    assert len(train) + len(val) == 300 and 30 < len(val) < 90
    assert all(is_validation(d, 0.2) for d, _ in val) and not any(is_validation(d, 0.2) for d, _ in train)


def test_ray_trained_tokenizer_equals_the_local_one(ray_cluster, tmp_path):
    """The tokenizer sample streamed through Ray Data is the local path's sample: same model bytes."""
    from support import train_tokenizer_local
    from raylm.data.plan import list_corpus
    from raylm.ray.data import sample_documents
    from raylm.tokenizer import load_or_train

    cfg = config("data.sources.0.max_bytes=200000", "tokenizer.sample_docs=8")
    ray_tok = load_or_train(cfg, lambda: sample_documents(cfg, list_corpus(cfg)))
    assert ray_tok.sha256 == train_tokenizer_local(cfg).sha256


def test_prepared_shards_hold_the_streaming_sequences(ray_cluster, tmp_path, tokenizer):
    """prepare writes rows equal to the streaming rows by index; it refuses other tokenizers/seq_len/dirs."""
    from raylm.data.prepared import check_prepared, read_split
    from raylm.ray.prepare import prepare

    tok_path = tokenizer.save(tmp_path / "tok.model")
    out = tmp_path / "prep"
    cfg = config("data.sources.0.max_bytes=200000", f"tokenizer.path={tok_path}", f"data.prepared_path={out}",
                 "data.val_fraction=0.1")
    lines = []
    prepare(cfg, log=lines.append)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["tokenizer_sha256"] == tokenizer.sha256 and manifest["seq_len"] == 32
    stream_tokens, _ = rows_of(pipeline(cfg, tokenizer))
    prepared = read_split(out, "train", shuffle=False)
    assert np.array_equal(prepared.take(np.arange(len(prepared)))["tokens"], stream_tokens)
    assert manifest["splits"]["validation"]["sequences"] > 0

    check_prepared(cfg, Tokenizer.load(out / "tokenizer.model").sha256)
    other = Tokenizer.train(["something else entirely " * 50], 300)
    with pytest.raises(DataError, match="tokenizer sha256"):
        check_prepared(cfg, other.sha256)
    with pytest.raises(DataError, match="data.seq_len=32"):
        check_prepared(config(f"data.prepared_path={out}", "data.seq_len=64"), tokenizer.sha256)
    prepare(cfg, log=lines.append)  # identical config: nothing to do
    assert "nothing to do" in lines[-1]
    with pytest.raises(DataError, match="already exists"):
        prepare(config(f"tokenizer.path={tok_path}", f"data.prepared_path={out}"), log=lines.append)


BAD_INPUTS = {
    "malformed_json": ("jsonl", b'{"text": "fine"}\n{"text": oops}\n', "bad.jsonl:2: malformed JSON"),
    "invalid_utf8": ("lines", b"fine\nbad \xff\xfe here\n", "bad.jsonl:2: invalid UTF-8"),
    "empty_file": ("text", b"", "bad.jsonl: empty file"),
    "empty_document": ("jsonl", b'{"text": "fine"}\n{"text": ""}\n', "bad.jsonl:2: empty document"),
    "binary_file": ("text", bytes(range(256)) * 4, "bad.jsonl: binary file"),
    "missing_field": ("jsonl", b'{"text": "fine"}\n{"body": "x"}\n', "bad.jsonl:2: record has no field 'text'"),
    "malformed_json:nested": ("jsonl", b'{"text": "fine"}\n' + b"[" * 100_000 + b"\n",
                              "bad.jsonl:2: malformed JSON (nested too deeply)"),
}


@pytest.mark.parametrize("kind", ["binary_file", "malformed_json:nested"])
def test_bad_input_raises_one_line_naming_file_and_line(ray_cluster, tmp_path, kind, tokenizer):
    """Raised in a read task, the DataError reaches the driver as itself, one line. (Every kind's
    message is checked on parse_file in test_data_core; here two kinds cross the Ray boundary: a
    whole-file problem and a RecursionError caught inside a worker.)"""
    fmt, data, message = BAD_INPUTS[kind]
    (tmp_path / "bad.jsonl").write_bytes(data)
    good = tmp_path / "good.txt"
    good.write_text(words(np.random.default_rng(3), 400))
    sources = [{"path": str(good)}, {"path": str(tmp_path / "bad.jsonl"), "format": fmt}]
    with pytest.raises(DataError) as err:
        rows_of(pipeline(config("data.val_fraction=0", sources=sources), tokenizer))
    assert type(err.value) is DataError and message in str(err.value) and "\n" not in str(err.value)


def test_bad_input_of_every_kind_is_skipped_and_counted_and_the_rest_kept(ray_cluster, tmp_path, tokenizer):
    """data.on_error=skip: one execution over a good file and one bad file of each kind."""
    good = tmp_path / "good.txt"
    good.write_text(words(np.random.default_rng(3), 400))
    # Weights equal to the sources' sizes: every file is read once (no upsampling of the small ones).
    sources = [{"path": str(good), "weight": good.stat().st_size}]
    for i, kind in enumerate(sorted(BAD_INPUTS)):
        fmt, data, _ = BAD_INPUTS[kind]
        (tmp_path / f"bad{i}").mkdir()
        (tmp_path / f"bad{i}" / "bad.jsonl").write_bytes(data)
        sources.append({"path": str(tmp_path / f"bad{i}"), "format": fmt, "weight": max(1, len(data))})
    ds = pipeline(config("data.val_fraction=0", "data.on_error=skip", sources=sources), tokenizer)
    tokens, _ = rows_of(ds)
    report = ds.bad_input()
    expected = {}
    for kind in BAD_INPUTS:
        expected[kind.split(":")[0]] = expected.get(kind.split(":")[0], 0) + 1
    assert report["skipped"] == expected and len(tokens) > 0
    assert report["documents"] >= 1 + sum(BAD_INPUTS[k][1].count(b"fine") for k in BAD_INPUTS)  # valid ones kept


def test_missing_column_and_missing_path(ray_cluster, tmp_path, tokenizer):
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "t.parquet")
    good = tmp_path / "good.txt"
    good.write_text(words(np.random.default_rng(4), 400))
    src = [{"path": str(good)}, {"path": str(tmp_path / "t.parquet"), "format": "parquet"}]
    with pytest.raises(DataError, match=r"t.parquet: no column 'text' \(columns: body\)"):
        rows_of(pipeline(config("data.val_fraction=0", sources=src), tokenizer))
    missing = [{"path": str(good)}, {"path": str(tmp_path / "nope" / "*.txt")}]
    with pytest.raises(DataError, match="data.sources.1.path=.*matches no files"):
        pipeline(config("data.val_fraction=0", sources=missing), tokenizer)
    missing[1]["path"] = str(tmp_path / "nope.txt")
    for on_error in ("raise", "skip"):  # a missing source is never dropped: it would change the mixture
        with pytest.raises(DataError, match="data.sources.1.path=.*no such file or directory"):
            pipeline(config("data.val_fraction=0", f"data.on_error={on_error}", sources=missing), tokenizer)


def test_a_50mb_line_is_refused_without_hanging(ray_cluster, tmp_path, tokenizer):
    with open(tmp_path / "huge.txt", "wb") as f:
        f.write(b"short line\n")
        f.write(b"x" * (50 * 2**20) + b"\n")
        f.write(b"another short line\n")
    src = [{"path": str(tmp_path / "huge.txt"), "format": "lines"}]
    with pytest.raises(DataError, match=r"huge.txt:2: document of 52,428,800 bytes exceeds data.max_document_bytes"):
        rows_of(pipeline(config("data.val_fraction=0", "data.seq_len=4", sources=src), tokenizer))
    ds = pipeline(config("data.val_fraction=0", "data.seq_len=4", "data.on_error=skip", sources=src), tokenizer)
    assert len(rows_of(ds)[0]) > 0 and ds.bad_input()["skipped"] == {"oversized_document": 1}


def test_cluster_too_small_fails_before_workers_start(ray_cluster):
    from raylm.errors import ConfigError
    from raylm.ray.cluster import check_cluster_fits

    with pytest.raises(ConfigError, match=r"the Ray cluster has 2 CPU but this run needs 3.45: .*scaling.num_workers=2"):
        check_cluster_fits(config("scaling.num_workers=2", "scaling.cpus_per_worker=1"))
    check_cluster_fits(config("scaling.num_workers=2", "scaling.cpus_per_worker=0.25"))
    # every read task the pipeline may run at once (data.read_tasks) holds data.read_cpus
    with pytest.raises(ConfigError, match=r"needs 2.35: .*data.read_tasks=4 x data.read_cpus=0.2"):
        check_cluster_fits(config("scaling.num_workers=2", "scaling.cpus_per_worker=0.25", "data.read_tasks=4"))


def test_no_stage_of_the_training_stream_asks_for_more_cpu_than_ray_datas_cap(ray_cluster, tmp_path, tokenizer):
    """Under Ray Train's cap on Ray Data (data_cpus), a stage whose task needs more than the cap
    runs only once every stage upstream of it is done: the first rows then wait for the whole
    planned stream (seen: Dataset.repartition's 1-CPU tasks: 72 s to the first batch of an
    11-pass plan, bench/RESULTS.md). Each stage fits, and the stream starts under the cap."""
    from raylm.data.plan import plan_files
    from raylm.ray.cluster import data_cpus
    from raylm.ray.data import TrainStream, bad_input_counter, data_config

    cfg = config("data.sources.0.max_bytes=300000", "data.stream_passes=4")
    plan = plan_files(cfg, "train", passes=4)
    counter = bad_input_counter()
    ds = TrainStream(cfg, tokenizer, plan, counter, str(tmp_path), None)()
    op, actors, tasks = ds._logical_plan.dag, 0.0, []
    while op is not None:
        if isinstance(getattr(op, "ray_remote_args", None), dict):
            cpus = op.ray_remote_args.get("num_cpus", 1)
            if isinstance(op.compute, ray.data.ActorPoolStrategy):
                actors += cpus * op.compute.min_size  # held for the whole stream
            else:
                tasks.append((op.name, cpus))
                assert op.compute.size is not None, op.name  # bounded: no worker process per tiny task
        op = op.input_dependencies[0] if op.input_dependencies else None
    assert actors > 0 and len(tasks) >= 2, tasks
    assert all(cpus <= data_cpus(cfg) - actors + 1e-9 for _, cpus in tasks), (data_cpus(cfg), actors, tasks)

    ds.context.execution_options = data_config(cfg).train_execution_options()
    batches = iter(ds.streaming_split(1, equal=False)[0].iter_batches(batch_size=8, batch_format="numpy"))
    assert next(batches)["index"].tolist() == list(range(8))
