"""Pure data functions (parse, frame, pack, index, interleave, local path) with Ray unimportable."""

from __future__ import annotations

import io
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from raylm.data.parse import BadInputTally, FileSpec, parse_file
from raylm.data.transforms import frame_documents, pack

ROOT = Path(__file__).resolve().parents[1]


def test_data_core_runs_with_ray_unimportable():
    """parse, plan, tokenise and pack (the local path end to end) need no Ray."""
    code = textwrap.dedent(
        """
        import sys
        sys.modules["ray"] = None
        from raylm.config import load_config
        import numpy as np
        from raylm.data.local import planned_rows, tokenizer_sample
        from raylm.tokenizer import load_or_train
        cfg = load_config(None, ["data.sources.0.max_bytes=150000", "model.vocab_size=512",
                                 "tokenizer.sample_bytes=100000", "data.seq_len=64"])
        tok = load_or_train(cfg, lambda: tokenizer_sample(cfg), lambda line: None)
        rows = np.concatenate(list(planned_rows(cfg, tok, "train")))
        assert rows.shape[1] == 65 and len(rows) > 100, rows.shape
        print("ok")
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().endswith("ok")


def spec(fmt, **kw):
    return FileSpec(path="c/f", format=fmt, id_base="f", **kw)


def test_pack_is_independent_of_batch_boundaries():
    """Packing a stream in any number of pieces (with the carry) gives the same rows as in one piece."""
    stream = np.arange(1000, dtype=np.int32)
    whole, _ = pack(stream, 16)
    rows, carry = [], None
    for piece in np.array_split(stream, [3, 50, 51, 400, 999]):
        r, carry = pack(piece, 16, carry)
        rows.append(r)
    assert np.array_equal(np.concatenate(rows), whole)
    assert np.array_equal(whole[1, 0], whole[0, -1])  # rows overlap by one token: every token is a target once


def test_frame_puts_bos_and_eos_around_every_document_including_empty():
    assert frame_documents([[5, 6], [], [7]], 1, 2, True).tolist() == [1, 5, 6, 2, 1, 2, 1, 7, 2]
    assert frame_documents([[5, 6], [7]], 1, 2, False).tolist() == [5, 6, 2, 7, 2]


@pytest.mark.parametrize(
    "fmt,data,kind,where",
    [
        ("jsonl", b'{"text": "a"}\n{"text": \n', "malformed_json", "c/f:2:"),
        ("lines", b"ok\n\xff\xfe bad\n", "invalid_utf8", "c/f:2:"),
        ("text", b"line\n\xc3\x28\n", "invalid_utf8", "c/f:2:"),
        ("text", b"", "empty_file", "c/f:"),
        ("jsonl", b'{"text": "  "}\n', "empty_document", "c/f:1:"),
        ("text", b"\x00\x01\x02binary", "binary_file", "c/f:"),
        ("jsonl", b'{"body": "x"}\n', "missing_field", "c/f:1:"),
        ("lines", b"x" * (2**20 + 1) + b"\n", "oversized_document", "c/f:1:"),
        ("jsonl", b'{"text": "a"}\n' + b"[" * 100_000 + b"\n", "malformed_json", "c/f:2:"),
        ("jsonl", b'{"text": ' + b"[" * 100_000 + b"]" * 100_000 + b"}\n", "malformed_json", "c/f:1:"),
        ("jsonl", b'{"text": "a", "n": ' + b"7" * 5000 + b"}\n", "malformed_json", "c/f:1:"),
        ("jsonl", b'{"text": "a"}\n\n{"text": "a\\ud800b"}\n', "invalid_utf8", "c/f:3:"),
        ("jsonl", b'{"text": "\\udc00"}\n', "invalid_utf8", "c/f:1:"),
    ],
)
def test_each_bad_input_is_one_problem_naming_file_and_line(fmt, data, kind, where):
    docs, problems = parse_file(data, spec(fmt, max_document_bytes=2**20))
    assert [k for k, _ in problems] == [kind]
    message = problems[0][1]
    assert message.startswith(where) and "\n" not in message


def test_valid_records_around_bad_ones_are_kept():
    data = b'{"text": "one"}\nnot json\n\n{"text": "three"}\n'
    docs, problems = parse_file(data, spec("jsonl"))
    assert docs == [("f:1", "one"), ("f:4", "three")] and len(problems) == 1


def test_deep_nesting_and_lone_surrogates_cost_only_their_own_records():
    """100,000-deep JSON and half surrogate pairs are problems of their lines; the records around
    them, deep-but-legal nesting and real pairs included, are kept, and the interpreter recurses
    as before afterwards (its recursion limit unchanged, a deep call still possible). No
    wall-clock limit: how fast the decoder gives up depends on the machine."""
    deep = b"[" * 100_000
    legal = b'{"meta": ' + b"[" * 50 + b"]" * 50 + b', "text": "nested meta"}'
    data = b"\n".join([b'{"text": "one"}', deep, b'{"text": "a\\ud800b"}', legal, b'{"text": "\\ud83d\\ude00"}']
                      + [deep] * 20 + [b'{"text": "last"}'])
    limit = sys.getrecursionlimit()
    docs, problems = parse_file(data, spec("jsonl"))
    assert sys.getrecursionlimit() == limit
    assert docs == [("f:1", "one"), ("f:4", "nested meta"), ("f:5", "\U0001f600"), ("f:26", "last")]
    assert problems[:2] == [
        ("malformed_json", "c/f:2: malformed JSON (nested too deeply)"),
        ("invalid_utf8", "c/f:3: invalid text (lone surrogate \\ud800 at character 1)"),
    ]
    assert [k for k, _ in problems[2:]] == ["malformed_json"] * 20
    assert parse_file(data, spec("jsonl")) == (docs, problems)  # the recursion depth was given back

    def depth(n):
        return 0 if n == 0 else 1 + depth(n - 1)

    assert depth(sys.getrecursionlimit() // 2) == sys.getrecursionlimit() // 2


def test_bad_input_tally_counts_distinct_messages_per_kind_in_kind_order_and_merges():
    """A message met twice (a file read on two passes) counts once; kinds list in BAD_INPUT_KINDS
    order with their first message; merging another tally's report adds its counts."""
    tally = BadInputTally()
    tally.add([("malformed_json", "a:1: x"), ("empty_file", "b: empty file")], documents=5)
    tally.add([("malformed_json", "a:1: x"), ("malformed_json", "a:7: y")], documents=2)
    assert tally.report() == {
        "documents": 7,
        "skipped": {"empty_file": 1, "malformed_json": 2},
        "examples": {"empty_file": "b: empty file", "malformed_json": "a:1: x"},
    }
    assert list(tally.report()["skipped"]) == ["empty_file", "malformed_json"]
    other = BadInputTally()
    other.add([("binary_file", "m: binary file"), ("malformed_json", "c:2: z")], documents=3)
    tally.merge(other.report())
    assert tally.report() == {
        "documents": 10,
        "skipped": {"empty_file": 1, "binary_file": 1, "malformed_json": 3},
        "examples": {"empty_file": "b: empty file", "binary_file": "m: binary file", "malformed_json": "a:1: x"},
    }
    assert list(tally.report()["skipped"]) == ["empty_file", "binary_file", "malformed_json"]
    assert BadInputTally().report() == {"documents": 0, "skipped": {}, "examples": {}}


def test_parquet_rows_and_missing_column():
    import pyarrow as pa
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(pa.table({"content": ["a doc", None, "another"]}), buf)
    docs, problems = parse_file(buf.getvalue(), spec("parquet", column="content"))
    assert docs == [("f:0", "a doc"), ("f:2", "another")] and [k for k, _ in problems] == ["empty_document"]
    docs, problems = parse_file(buf.getvalue(), spec("parquet", column="text"))
    assert docs == [] and problems[0][0] == "missing_column" and "content" in problems[0][1]


def test_interleave_matches_weights_in_bytes_and_upsamples_the_small_source():
    from raylm.data.plan import PlannedFile, interleave

    def files(src, n, size):
        return [PlannedFile(f"s{src}/{i}", size, src, spec("text")) for i in range(n)]

    out = interleave([files(0, 40, 100), files(1, 5, 100)], [3.0, 1.0])
    share = sum(f.size for f in out if f.source == 0) / sum(f.size for f in out)
    assert abs(share - 0.75) < 0.02
    assert [f.source for f in out[:8]].count(1) == 2  # mixed from the start, not source after source
    assert len({f.path for f in out if f.source == 1}) == 5  # the small source is repeated


def test_local_rows_equal_reading_stdlib_in_order(tmp_path):
    """The single-process documents of the default corpus are the stdlib files in sorted order
    (with data.shuffle_files off; on, the same files in a seeded order)."""
    from raylm.config import load_config
    from support import stdlib_documents
    from raylm.data.local import local_documents

    cfg = load_config(None, ["data.sources.0.max_bytes=200000", "data.shuffle_files=false", "data.val_fraction=0"])
    in_order = list(stdlib_documents(200000))
    assert local_documents(cfg, "train") == in_order
    cfg.data.shuffle_files = True
    shuffled = local_documents(cfg, "train")
    assert shuffled != in_order and sorted(shuffled, key=lambda d: d.doc_id) == in_order
    assert local_documents(cfg, "train") == shuffled  # seeded: the same order every time


def test_validation_plan_samples_every_source_and_file_in_a_seeded_order(tmp_path):
    """Evaluation reads the first held-out rows, so the validation plan must not start with
    the alphabetical beginning of the first source."""
    import json

    from raylm.config import load_config
    from raylm.data.plan import plan_files

    for name in ("a", "b"):
        for i in range(40):
            (tmp_path / name).mkdir(exist_ok=True)
            (tmp_path / name / f"{i:03d}.txt").write_text(f"document {name} {i}\n")
    sources = [{"path": str(tmp_path / "a"), "format": "text"}, {"path": str(tmp_path / "b"), "format": "text"}]
    cfg = load_config(None, ["data.val_fraction=0.5", "data.sources=" + json.dumps(sources)])
    plan = plan_files(cfg, "validation")
    held_out = {s: sorted(f.path for f in plan.files if f.source == s) for s in (0, 1)}
    assert len(held_out[0]) > 5 and len(held_out[1]) > 5
    assert [f.source for f in plan.files[:10]] == [0, 1] * 5  # sources in turn
    assert [f.path for f in plan.files if f.source == 0] != held_out[0]  # not alphabetical
    assert [f.path for f in plan.files] == [f.path for f in plan_files(cfg, "validation").files]  # seeded
    train = {f.path for f in plan_files(cfg, "train").files}
    assert not train & {f.path for f in plan.files}


def test_tokenizer_batches_hold_about_a_mebibyte_and_read_blocks_feed_every_actor():
    from raylm.config import Config
    from raylm.data.plan import FilePlan, PlannedFile, read_blocks, tokenize_batch_docs

    def plan(fmt, n, size):
        return FilePlan(None, [PlannedFile(f"f{i}", size, 0, spec(fmt)) for i in range(n)])

    cfg = Config()
    assert cfg.data.tokenize_batch_docs is None
    assert tokenize_batch_docs(cfg, plan("text", 100, 16 * 1024)) == 64  # 64 files of 16 KiB
    assert tokenize_batch_docs(cfg, plan("jsonl", 3, 10 * 2**20)) == 1024  # records assumed 1 KiB
    assert tokenize_batch_docs(cfg, plan("text", 3, 50 * 2**20)) == 16  # never fewer than 16
    cfg.data.tokenize_batch_docs = 7
    assert tokenize_batch_docs(cfg, plan("text", 100, 16 * 1024)) == 7  # the config wins
    assert read_blocks(plan("text", 4000, 17_000), 2) == 17  # 68 MB in ~4 MiB blocks
    assert read_blocks(plan("text", 100, 10_000), 2) == 8  # a small corpus still feeds both actors
    assert read_blocks(plan("text", 3, 10_000), 2) == 3  # at most one block per file


def test_directory_sources_skip_hidden_directories_and_pycache_at_any_depth(tmp_path):
    """A repository checkout as a source: `.git/` objects (binary, zlib) and `__pycache__/*.pyc`
    at any depth are never read, so they can neither fail the run nor enter the corpus."""
    import json
    import zlib

    from raylm.config import load_config
    from raylm.data.local import local_documents
    from raylm.data.plan import list_corpus, plan_files

    repo = tmp_path / "repo"
    (repo / "pkg" / "sub").mkdir(parents=True)
    (repo / "pkg" / "mod.py").write_text("def f():\n    return 1\n")
    (repo / "pkg" / "sub" / "deep.py").write_text("X = 2\n")
    for hidden in (repo / ".git" / "objects" / "ab", repo / "pkg" / ".cache", repo / "pkg" / "sub" / "__pycache__"):
        hidden.mkdir(parents=True)
        (hidden / "blob.bin").write_bytes(zlib.compress(bytes(range(256)) * 8))
    (repo / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    sources = [{"path": str(repo), "format": "text"}]
    cfg = load_config(None, ["data.val_fraction=0", "data.sources=" + json.dumps(sources)])
    listed = [f.spec.id_base for f in list_corpus(cfg).per_source[0]]
    assert listed == ["pkg/mod.py", "pkg/sub/deep.py"]
    assert sorted(f.spec.id_base for f in plan_files(cfg, "train").files) == listed
    assert sorted(d.doc_id for d in local_documents(cfg, "train")) == listed  # data.on_error=raise: nothing bad read


def test_a_source_that_matches_nothing_is_an_error_even_when_skipping_bad_input(tmp_path):
    """Dropping a source would silently change the mixture: it is one line naming the source."""
    import json

    from raylm.config import load_config
    from raylm.data.plan import list_corpus
    from raylm.errors import SourceNotFound

    (tmp_path / "a.txt").write_text("some text\n")
    (tmp_path / "only_hidden").mkdir()
    (tmp_path / "only_hidden" / ".secret").write_text("x\n")
    for missing in (tmp_path / "nope", tmp_path / "only_hidden", tmp_path / "*.jsonl"):
        sources = [{"path": str(tmp_path / "a.txt")}, {"path": str(missing), "format": "text"}]
        cfg = load_config(None, ["data.on_error=skip", "data.sources=" + json.dumps(sources)])
        with pytest.raises(SourceNotFound, match=r"data\.sources\.1\.path=") as err:
            list_corpus(cfg)
        assert "\n" not in str(err.value)


def test_heldout_text_files_are_val_fraction_of_the_bytes_whatever_the_order(tmp_path):
    """Validation holds val_fraction of a text source's bytes (up to half again, one file's
    granularity), chosen by a hash of the file ids: the same files in any listing order; a source
    of one file is never held out whole."""
    import random

    from raylm.config import load_config
    from raylm.data.plan import heldout_text_files, list_corpus, plan_files

    rng = random.Random(0)
    for i in range(60):  # sizes over two orders of magnitude, as in real corpora
        (tmp_path / f"{i:02d}.txt").write_text("x" * rng.choice([50, 400, 3000, 9000]) + "\n")
    cfg = load_config(None, [f"data.sources.0.path={tmp_path}", "data.val_fraction=0.1"])
    files = list_corpus(cfg).per_source[0]
    total = sum(f.size for f in files)
    held = heldout_text_files(files, 0.1)
    held_bytes = sum(f.size for f in files if f.path in held)
    assert 0.1 * total <= held_bytes <= 0.15 * total
    assert heldout_text_files(list(reversed(files)), 0.1) == held
    assert {f.path for f in plan_files(cfg, "validation").files} == held
    assert not held & {f.path for f in plan_files(cfg, "train").files}
    assert heldout_text_files(files[:1], 0.5) == set()
    assert heldout_text_files(files, 0.0) == set()
