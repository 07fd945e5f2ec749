"""Hostile input to the corpus listing and the config: symlink loops, absurd numbers, a corpus
edited in place. Each is one line (or one warning) and loses or duplicates nothing.

Issue 18, items 6 (a symlink loop is walked once), 7 (every numeric setting has a finite range)
and 12 (the corpus fingerprint sees a file edited in place at the same size, and says which).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import typing
from pathlib import Path

import pytest

from raylm.cli import main as cli_main
from raylm.config import Config, STDLIB_CORPUS, load_config
from raylm.data import plan
from raylm.data.corpus import stdlib_root
from raylm.errors import CheckpointError, ConfigError, DataError
from raylm.train import checkpoint as ckpt

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------
# Item 6: directories are walked with loops detected, each real file listed once.


def _looped_corpus(tmp_path: Path) -> Path:
    """corpus/{a.txt, b.txt, sub/c.txt, sub/back -> .., ext -> ../outside}."""
    corpus = tmp_path / "corpus"
    (corpus / "sub").mkdir(parents=True)
    (tmp_path / "outside").mkdir()
    for i, name in enumerate(["a.txt", "b.txt", "sub/c.txt"]):
        (corpus / name).write_text(f"document {i}\n" + "x = 1\n" * 170)  # ~1 KB each
    (tmp_path / "outside" / "d.txt").write_text("an outside document\n" * 50)
    (corpus / "sub" / "back").symlink_to("..")  # the loop of the issue: sub/back/sub/back/...
    (corpus / "ext").symlink_to("../outside")  # a link to data elsewhere: legitimate, read once
    return corpus


@pytest.mark.parametrize("pattern", ["{corpus}", "{corpus}/**/*.txt", "{corpus}/**"])
def test_a_symlink_loop_is_not_followed_and_every_real_file_is_listed_once(tmp_path, capsys, pattern):
    """`sub/back -> ..` once made one file appear 41 times, in both splits. Now each real file
    (by device and inode) is listed once, under its own path rather than a link's, linked data
    outside is still read, and the skipped paths are one warning line naming the loop."""
    corpus = _looped_corpus(tmp_path)
    cfg = load_config(ROOT / "configs/debug.yaml", [f"data.sources.0.path={pattern.format(corpus=corpus)}",
                                                    "data.val_fraction=0.5"])
    listing = plan.list_corpus(cfg)  # warnings go to print by default, as the CLI shows them
    lines = capsys.readouterr().out.splitlines()
    files = listing.per_source[0]
    real = sorted(os.path.realpath(f.path) for f in files)
    assert real == sorted(os.path.realpath(p) for p in
                          [corpus / "a.txt", corpus / "b.txt", corpus / "sub/c.txt", tmp_path / "outside/d.txt"])
    assert sorted(f.spec.id_base for f in files) == ["a.txt", "b.txt", "ext/d.txt", "sub/c.txt"]
    assert len(lines) == 1 and "symlink loop" in lines[0] and str(corpus / "sub" / "back") in lines[0], lines
    assert lines[0].startswith("warning: data.sources.0.path=") and "\n" not in lines[0]
    train = {os.path.realpath(f.path) for f in plan.plan_files(cfg, "train", listing=listing).files}
    held = {os.path.realpath(f.path) for f in plan.plan_files(cfg, "validation", listing=listing).files}
    assert train and held and not train & held and train | held == set(real)


def test_links_between_two_folders_end_the_walk_and_each_file_is_listed_once(tmp_path, capsys):
    """Two folders linking to each other (a/to_b -> ../b, b/to_a -> ../a) make an endless tree for
    a walker that follows links; the walk ends with each file listed once, under its real folder."""
    corpus = tmp_path / "corpus"
    for side, other in (("a", "b"), ("b", "a")):
        (corpus / side).mkdir(parents=True)
        (corpus / side / f"{side}.txt").write_text(f"{side} text\n" * 20)
    (corpus / "a" / "to_b").symlink_to("../b")
    (corpus / "b" / "to_a").symlink_to("../a")
    (corpus / "alias").symlink_to("a")  # a second path to a folder: listed under its real name
    (corpus / "a" / "same.txt").symlink_to("a.txt")  # a second path to a file
    cfg = load_config(ROOT / "configs/debug.yaml", [f"data.sources.0.path={corpus}"])
    files = plan.list_corpus(cfg).per_source[0]
    lines = capsys.readouterr().out.splitlines()
    assert sorted(f.spec.id_base for f in files) == ["a/a.txt", "b/b.txt"]
    assert len(lines) == 1 and "path(s) to a file or directory listed already skipped" in lines[0], lines
    assert "each file is read once" in lines[0]


# ---------------------------------------------------------------------------------------
# Item 7: every numeric setting has a finite range, checked before anything starts.


def _numeric_keys() -> list[tuple[str, type]]:
    """Every int/float setting of every config dataclass (walked here, not taken from the table
    under test), with one list item / mapping key for the list and mapping fields."""
    keys = []

    def walk(cls, prefix):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            key, tp = f"{prefix}{f.name}", hints[f.name]
            options = [a for a in typing.get_args(tp) if a is not type(None)] or [tp]
            if dataclasses.is_dataclass(tp):
                walk(tp, key + ".")
            elif typing.get_origin(tp) is list and dataclasses.is_dataclass(typing.get_args(tp)[0]):
                walk(typing.get_args(tp)[0], key + ".0.")
            elif typing.get_origin(tp) is dict and typing.get_args(tp)[1] in (int, float):
                keys.append((key + ".gpu_slots", typing.get_args(tp)[1]))
            elif any(o in (int, float) for o in options):
                keys.append((key, int if int in options else float))

    walk(Config, "")
    return keys


NUMERIC_KEYS = _numeric_keys()


def test_every_numeric_field_is_found_and_has_a_row_in_the_range_table():
    """A new numeric field without a documented range fails here (not silently unbounded)."""
    from raylm.config import NUMERIC_RANGES

    assert len(NUMERIC_KEYS) > 50
    rows = {key.replace(".0.", ".*.").replace(".gpu_slots", ".*") for key, _ in NUMERIC_KEYS}
    assert rows <= set(NUMERIC_RANGES), rows - set(NUMERIC_RANGES)
    for key, (lo, hi) in NUMERIC_RANGES.items():
        assert lo < hi and all(abs(v) < 1e300 for v in (lo, hi)), key


@pytest.mark.parametrize("value", [".nan", ".inf", "-.inf", "absurd"])
@pytest.mark.parametrize("key, tp", NUMERIC_KEYS, ids=[k for k, _ in NUMERIC_KEYS])
def test_nan_inf_and_absurd_values_of_every_numeric_setting_are_one_line_naming_the_key(key, tp, value):
    """Checked at load, before anything starts: nan and inf (YAML .nan/.inf) and a value far out
    of any sensible range (10**18 for an integer, 1e300 for a number) are ConfigError naming the key."""
    if value == "absurd":
        value = str(10**18) if tp is int else "1.0e+300"
    with pytest.raises(ConfigError) as info:
        load_config(ROOT / "configs/debug.yaml", [f"{key}={value}"])
    message = str(info.value)
    assert message.startswith(f"{key}=") and "\n" not in message, message


def test_values_just_past_each_end_of_a_range_are_refused_and_the_message_gives_the_range():
    from raylm.config import NUMERIC_RANGES

    for key, tp in NUMERIC_KEYS:
        row = key.replace(".0.", ".*.").replace(".gpu_slots", ".*")
        lo, hi = NUMERIC_RANGES[row]
        above = hi + 1 if tp is int else hi * 1.5
        below = lo - 1 if tp is int or lo <= 0 else lo / 2
        for value in (above, below):
            with pytest.raises(ConfigError) as info:
                load_config(ROOT / "configs/debug.yaml", [f"{key}={value!r}"])
            assert str(info.value).startswith(f"{key}=") and "\n" not in str(info.value), (value, info.value)
        with pytest.raises(ConfigError, match=rf"must be a finite number in \[.*, {hi}\]" if tp is int else "must be"):
            load_config(ROOT / "configs/debug.yaml", [f"{key}={above!r}"])


def test_issue_example_lr_inf_is_refused_at_load():
    for override, expected in [
        ("optimizer.lr=.inf", "optimizer.lr=inf: must be a finite number in [1e-12, 10]"),
        ("optimizer.lr=nan", "optimizer.lr=nan: must be a finite number"),
        ("data.sources=[{path: a}, {path: b, weight: .inf}]", "data.sources.1.weight=inf: must be a finite number"),
    ]:
        with pytest.raises(ConfigError) as info:
            load_config(ROOT / "configs/debug.yaml", [override])
        assert expected in str(info.value), info.value


def test_a_far_off_mixture_weight_is_one_line_after_listing_not_minutes_of_planning(tmp_path, capsys):
    """`data.sources.1.weight=1e6` once planned for minutes with growing memory. What grows is
    the repeats of a source small for its weight (weight over bytes, not the weights' ratio:
    weights equal to the sources' bytes are a legitimate way to read every file once), so the
    planned reads are counted as soon as the corpus is listed, before a tokenizer is trained or a
    file read, and refused in one line; the failed start leaves no run directory."""
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("x\n")
    cfg = load_config(ROOT / "configs/debug.yaml", [
        f"data.sources=[{{path: python-stdlib, max_bytes: 300000}}, {{path: {tiny}, weight: 100}}]"])
    with pytest.raises(DataError, match=r"^data.sources.1.weight=100.0: the mixture reads this source's 1 file\(s\) "
                                        r"[\d,]+ times per pass"):
        plan.list_corpus(cfg)
    runs = tmp_path / "runs"
    code = cli_main(["train", str(ROOT / "configs/debug.yaml"), "--local", f"run.output_dir={runs}",
                     f"data.sources=[{{path: python-stdlib, max_bytes: 300000}}, {{path: {tiny}, weight: 1e6}}]"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("raylm: error: data.sources.1.weight=1000000.0: the mixture reads"), err
    assert len(err.splitlines()) == 1 and not list(runs.iterdir())


def test_weights_equal_to_the_sources_bytes_are_accepted_and_read_every_file_once(tmp_path):
    """A ratio of 10**5 between weights is no cost in itself: weights proportional to bytes mean no repeats."""
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "one.txt").write_text("y\n")
    sources = [{"path": STDLIB_CORPUS, "max_bytes": 200000}, {"path": str(tmp_path / "a")}]
    cfg = load_config(ROOT / "configs/debug.yaml", [f"data.sources={json.dumps(sources)}", "data.val_fraction=0"])
    listing = plan.list_corpus(cfg)
    sizes = [sum(f.size for f in files) for files in listing.per_source]
    sources[0]["weight"], sources[1]["weight"] = sizes
    cfg = load_config(ROOT / "configs/debug.yaml", [f"data.sources={json.dumps(sources)}", "data.val_fraction=0"])
    assert sizes[0] / sizes[1] > 10**4
    assert len(plan.plan_files(cfg, "train").files) == sum(len(files) for files in listing.per_source)


def test_a_training_stream_of_millions_of_passes_is_one_line_naming_the_setting():
    """A tiny corpus for a very long run would plan passes x files reads up front (sized so that
    code without the bound plans for seconds and fails, rather than for hours)."""
    long = load_config(ROOT / "configs/debug.yaml", ["train.max_steps=2000000"])
    passes = plan.stream_passes(long, plan.plan_files(long, "train"))
    assert passes > 100_000
    with pytest.raises(DataError, match=r"^train.max_steps=2000000: the training stream would plan [\d,]+ passes "
                                        r".*set data.stream_passes to at most [\d,]+"):
        plan.plan_files(long, "train", passes=passes)
    fixed = load_config(ROOT / "configs/debug.yaml", ["data.stream_passes=1000000"])
    with pytest.raises(DataError, match=r"^data.stream_passes=1000000: the training stream would plan"):
        plan.plan_files(fixed, "train", passes=plan.stream_passes(fixed, plan.plan_files(fixed, "train")))


# ---------------------------------------------------------------------------------------
# Item 12: a corpus edited in place at the same size is a change, and the refusal names it.


def _text_corpus(directory: Path) -> Path:
    """About 150 kB of real text (standard-library modules), as a directory of text files."""
    directory.mkdir()
    for name in ["json/decoder.py", "json/encoder.py", "textwrap.py", "string.py", "shlex.py", "csv.py",
                 "fnmatch.py", "glob.py", "copy.py", "heapq.py", "bisect.py", "queue.py", "sched.py",
                 "calendar.py", "difflib.py"]:
        shutil.copy(stdlib_root() / name, directory / name.replace("/", "_"))
    return directory


def _edit_in_place(path: Path) -> None:
    """Change bytes at the same size and put the modification time back: only the content differs."""
    st = path.stat()
    data = bytearray(path.read_bytes())
    data[100:106] = b"EDITED"
    path.write_bytes(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert path.stat().st_size == st.st_size and path.stat().st_mtime_ns == st.st_mtime_ns


def _steps(run_dir: Path) -> list[int]:
    return sorted({json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()})


def test_a_corpus_file_edited_in_place_refuses_the_resume_naming_it_unless_data_changes_are_allowed(tmp_path,
                                                                                                     capsys):
    corpus = _text_corpus(tmp_path / "corpus")
    runs = tmp_path / "runs"
    base = ["--local", f"data.sources.0.path={corpus}", f"run.output_dir={runs}", "run.sample_tokens=0",
            "train.checkpoint_every=2", "train.eval_every=0", "data.val_fraction=0.1", "tokenizer.sample_bytes=100000"]
    debug = str(ROOT / "configs/debug.yaml")
    assert cli_main(["train", debug, *base, "train.max_steps=4", "run.name=first"]) == 0
    run = runs / "first"
    capsys.readouterr()

    _edit_in_place(corpus / "shlex.py")
    code = cli_main(["train", debug, *base, "train.max_steps=6", f"run.resume_from={run}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith(f"raylm: error: run.resume_from: {run}") and "1 file(s) changed: shlex.py" in err, err
    assert "run.resume_changes=[data]" in err
    assert _steps(run) == [1, 2, 3, 4]  # nothing was trained or rewritten

    assert cli_main(["train", debug, *base, "train.max_steps=6", f"run.resume_from={run}",
                     "run.resume_changes=[data]"]) == 0
    assert _steps(run) == [1, 2, 3, 4, 5, 6]
    assert ckpt.latest_checkpoint(run).name == ckpt.checkpoint_dir_name(6)


def _facts(cfg, listing=None):
    from raylm.train.runs import RunFacts

    listing = listing or plan.list_corpus(cfg, log=None)
    return RunFacts("tok", cfg.data.seq_len, plan.stream_fingerprint(cfg, listing), plan.corpus_files(cfg, listing))


def _check(then, now, allowed=()):
    from raylm.train.runs import check_resume

    check_resume("CKPT", json.loads(json.dumps(then.to_dict())), now, allowed)  # through JSON, as in the marker


def test_a_corpus_touched_or_copied_with_new_times_is_the_same_corpus_and_new_or_gone_files_are_named(tmp_path):
    """Small files are compared by content, so a copy on another host (other modification times)
    resumes; a large file is compared by size and mtime (it is never read whole to start a run)."""
    corpus = _text_corpus(tmp_path / "corpus")
    big = corpus / "big.txt"
    big.write_bytes(b"a line of a large document\n" * (plan.HASHED_FILE_BYTES // 27 + 10))
    cfg = load_config(ROOT / "configs/debug.yaml", [f"data.sources.0.path={corpus}", "data.sources.0.max_bytes=null"])
    then = _facts(cfg)
    assert then.data_files["files"]["0:big.txt"].endswith(" -")  # not hashed
    assert len(json.dumps(then.data_files)) < 200 * then.data_files["count"]  # small enough for every marker

    for path in corpus.iterdir():
        if path != big:
            os.utime(path, ns=(1, 10**18))
    _check(then, _facts(cfg))  # same content, other times: the same corpus

    os.utime(big, ns=(1, 10**18))
    with pytest.raises(CheckpointError, match=r"1 file\(s\) changed: big.txt \(data.sources.0\)"):
        _check(then, _facts(cfg))
    then = _facts(cfg)

    (corpus / "new.txt").write_text("a new document\n")
    (corpus / "csv.py").unlink()
    with pytest.raises(CheckpointError) as info:
        _check(then, _facts(cfg))
    assert "1 file(s) new: new.txt" in str(info.value) and "1 file(s) gone: csv.py" in str(info.value)
    _check(then, _facts(cfg), allowed=["data"])

    # a changed data setting is named by key
    with pytest.raises(CheckpointError, match=r"data.seed 0 -> 7"):
        _check(then, _facts(load_config(ROOT / "configs/debug.yaml", [
            f"data.sources.0.path={corpus}", "data.sources.0.max_bytes=null", "data.seed=7"])))


def test_the_default_corpus_record_is_content_hashes_and_costs_little():
    cfg = load_config(ROOT / "configs/demo.yaml")
    record = plan.corpus_files(cfg, plan.list_corpus(cfg, log=None))
    assert record["settings"]["sources"][0]["path"] == STDLIB_CORPUS
    assert all(not r.endswith(" -") for r in record["files"].values())  # every file hashed: machine-independent
    assert all(k.startswith("0:") and not k.startswith("0:/") for k in record["files"])  # ids, not absolute paths


def test_a_sweep_space_reaching_inf_or_an_absurd_value_is_refused_before_any_trial(tmp_path):
    """Both ends of a range and every choice are validated by the config's ranges."""
    from raylm.sweep import sweep_from_dict

    for space, expected in [({"optimizer.lr": {"loguniform": [1e-4, float("inf")]}}, "space.optimizer.lr=inf: must be"),
                            ({"optimizer.beta2": {"choice": [0.95, float("nan")]}}, "space.optimizer.beta2=nan: must be"),
                            ({"model.n_layers": {"randint": [1, 10**9]}}, "space.model.n_layers=1000000000: must be")]:
        with pytest.raises(ConfigError) as info:
            sweep_from_dict({"base": str(ROOT / "configs/debug.yaml"), "space": space}, tmp_path / "sweep.yaml")
        assert expected in str(info.value) and "\n" not in str(info.value), info.value
