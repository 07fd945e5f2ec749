"""One document reader for every path that reads planned files, and errors that carry what they
are said of as fields (the line built in one place, re-said by field, never by rewriting text)."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm

from raylm.cli import main as cli_main
from raylm.config import load_config
from raylm.data.local import first_rows, local_datasets, local_documents, planned_rows
from raylm.data.parse import BadInputTally, read_documents
from raylm.data.plan import plan_files
from raylm.errors import CheckpointError, DataError, RaylmError, SourceNotFound
from raylm.sweep import UNFINISHED, trial_state, trial_status
from raylm.tokenizer import sentencepiece_failure
from raylm.train import checkpoint as ckpt
from raylm.train.runs import init_checkpoint
from raylm.use.evaluate import data_config, local_rows
from raylm.use.load import resolve_checkpoint
from support import pack_documents

WORDS = "the quick brown fox jumps over a lazy dog while seven wizards quietly hex bold jugglers".split()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """Three JSONL files of 24 documents each; the second has one malformed line."""
    root = tmp_path_factory.mktemp("reader_corpus")
    for f in range(3):
        lines = [json.dumps({"text": " ".join(WORDS[(f + d + k) % len(WORDS)] for k in range(12 + d % 5))})
                 for d in range(24)]
        if f == 1:
            lines.insert(5, "{not json")
        (root / f"part{f}.jsonl").write_text("\n".join(lines) + "\n")
    return root


def _config(corpus: Path, *overrides: str):
    return load_config(None, ["model.preset=debug", "model.vocab_size=512", "data.seq_len=16",
                              f"data.sources.0.path={corpus}", "data.sources.0.format=jsonl",
                              "data.val_fraction=0.25", "data.on_error=skip", *overrides])


def _stack(parts) -> np.ndarray:
    return np.concatenate(list(parts))


def test_every_single_process_path_packs_the_same_rows_and_tallies_bad_input_once(corpus, tokenizer):
    """Training's in-memory datasets, training's evaluation rows (`first_rows`) and `raylm eval`
    (`local_rows`) all read through the one reader: their rows equal one sequential pack of the
    documents in plan order, and the malformed line is counted once, with every document read."""
    cfg = _config(corpus)
    expected = {split: pack_documents(local_documents(cfg, split), tokenizer, 16, cfg.data.add_bos)
                for split in ("train", "validation")}
    assert len(expected["train"]) > 10 and len(expected["validation"]) > 2

    train, validation = local_datasets(cfg, tokenizer)
    np.testing.assert_array_equal(train.source.rows, expected["train"])
    np.testing.assert_array_equal(validation.rows, expected["validation"])
    report = train.bad_input()
    assert report["skipped"] == {"malformed_json": 1} and "part1.jsonl:6" in report["examples"]["malformed_json"]
    assert report["documents"] == 72

    np.testing.assert_array_equal(first_rows(cfg, tokenizer, "validation", 2), expected["validation"][:2])
    np.testing.assert_array_equal(_stack(local_rows(cfg, tokenizer, "validation", None)), expected["validation"])
    whole = data_config(cfg, str(corpus))  # `raylm eval --data DIR`: one source, in file order, nothing held out
    in_order = pack_documents(local_documents(whole, "train", mixture=False), tokenizer, 16, cfg.data.add_bos)
    np.testing.assert_array_equal(_stack(local_rows(whole, tokenizer, "train", None)), in_order)


def test_the_reader_reads_no_file_past_the_rows_asked_for(corpus, tokenizer):
    """`max_rows` rows that the first planned file fills read that file alone (the tally sees
    only its documents); no rows asked for reads nothing, not even the plan."""
    cfg = _config(corpus, "data.val_fraction=0.0")
    plan = plan_files(cfg, "train")
    first = plan.files[0]
    one_file = BadInputTally()
    docs = next(read_documents([(first.path, first.spec)], plan.filesystem, "train", 0.0, "skip", one_file))
    assert len(docs) == one_file.documents > 0

    tally = BadInputTally()
    rows = _stack(planned_rows(cfg, tokenizer, "train", 3, tally=tally))
    assert len(rows) == 3 and tally.documents == one_file.documents
    gone = _config(Path("/no/such/corpus"))
    assert len(first_rows(gone, tokenizer, "train", 0)) == 0  # a plan would raise SourceNotFound


def test_a_malformed_line_raises_naming_file_and_line_under_on_error_raise(corpus, tokenizer):
    cfg = _config(corpus, "data.on_error=raise")
    with pytest.raises(DataError, match=r"part1\.jsonl:6: malformed JSON"):
        _stack(planned_rows(cfg, tokenizer, "train"))


def test_an_error_is_said_of_its_fields_and_re_said_of_another_name_by_field(tmp_path):
    """A missing run.resume_from carries key and value; `raylm eval`/`generate` say it of the path
    alone and model.init_from of its own key, from the fields (the detail is untouched), and the
    fields survive pickling (Ray carries errors across processes)."""
    missing = tmp_path / "no-run"
    with pytest.raises(CheckpointError) as raised:
        ckpt.resolve_resume(missing)
    e = raised.value
    assert (e.key, Path(e.value), e.detail) == ("run.resume_from", missing, "no such run directory or checkpoint")
    assert str(e) == f"run.resume_from={missing}: no such run directory or checkpoint"
    back = pickle.loads(pickle.dumps(e))
    assert type(back) is CheckpointError and str(back) == str(e) and back.key == e.key

    with pytest.raises(CheckpointError) as raised:
        resolve_checkpoint(missing)
    assert str(raised.value) == f"{missing}: no such run directory or checkpoint" and raised.value.key is None
    with pytest.raises(CheckpointError) as raised:
        init_checkpoint(str(missing))
    assert str(raised.value) == f"model.init_from={missing}: no such run directory or checkpoint"

    with pytest.raises(SourceNotFound) as raised:
        plan_files(_config(tmp_path / "nothing"), "train")
    e = raised.value
    assert (e.key, e.value) == ("data.sources.0.path", str(tmp_path / "nothing"))
    assert str(e.said_of(key="--data", value="x")) == "--data=x: no such file or directory"
    assert str(RaylmError("a whole line as it is")) == "a whole line as it is"
    assert str(DataError("malformed JSON", path="a.jsonl", line=3)) == "a.jsonl:3: malformed JSON"


def test_the_cli_prints_the_fields_line_once_and_exits_2(tmp_path, capsys):
    missing = tmp_path / "no-run"
    assert cli_main(["eval", str(missing)]) == 2
    assert capsys.readouterr().err == f"raylm: error: {missing}: no such run directory or checkpoint\n"


def test_sentencepiece_still_words_a_too_small_vocabulary_as_raylm_parses_it():
    """raylm reads one sentencepiece message (it has no error fields): if a sentencepiece upgrade
    words it otherwise, this fails here rather than the user's error losing the size that fits."""
    texts = ["".join(chr(0x4E00 + (7 * i + j) % 400) for j in range(40)) for i in range(200)]
    with pytest.raises(RuntimeError) as raised:
        spm.SentencePieceTrainer.train(sentence_iterator=iter(texts), model_writer=__import__("io").BytesIO(),
                                       vocab_size=100, hard_vocab_limit=False, minloglevel=2)
    detail, needed = sentencepiece_failure(str(raised.value))
    assert needed is not None and needed > 100, str(raised.value)
    assert "\n" not in detail and "trainer_interface" not in detail and "Increase vocab_size" not in detail


def test_warning_filters_are_scoped_to_their_calls(tmp_path):
    """Importing raylm leaves Python's warning filters as they were, and DCP's single-process
    warning is hidden inside `single_process_dcp` only (which also fails if torch rewords it)."""
    import torch
    import torch.distributed.checkpoint as dcp

    probe = ("import warnings, raylm.train.checkpoint, raylm.train.parallel; "
             "ours = [f for f in warnings.filters if f[1] and ('torch.distributed' in f[1].pattern "
             "or 'DTensor' in f[1].pattern)]; assert not ours, ours")
    subprocess.run([sys.executable, "-c", probe], check=True, cwd=Path(__file__).parents[1])

    def saved(where: str, quiet: bool) -> list[str]:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if quiet:
                with ckpt.single_process_dcp():
                    dcp.save({"x": torch.zeros(2)}, checkpoint_id=str(tmp_path / where))
            else:
                dcp.save({"x": torch.zeros(2)}, checkpoint_id=str(tmp_path / where))
        return [str(w.message) for w in caught if "torch.distributed is disabled" in str(w.message)]

    assert saved("loud", quiet=False), "torch no longer warns so: drop single_process_dcp's filter"
    assert saved("quiet", quiet=True) == []


def test_a_trials_state_is_a_field_its_status_line_spells():
    assert trial_state(10, 10, None) == "completed" == trial_status(10, 10, None)
    assert trial_state(4, 10, None) == UNFINISHED and trial_status(4, 10, None) == f"{UNFINISHED} at step 4"
    assert trial_state(4, 10, None, stopped_at=4) == "stopped"
    assert trial_state(4, 10, "Traceback\nValueError: boom") == "error"
    assert trial_status(4, 10, "Traceback\nValueError: boom") == "error: ValueError: boom"


def test_prompt_files_skip_blank_lines_and_name_the_line_that_is_not_json(tmp_path):
    """`raylm generate --prompts` and `raylm eval --task` read JSONL through one loop (`json_lines`)."""
    from raylm.use.generate import read_prompts

    prompts = tmp_path / "p.jsonl"
    prompts.write_text('"a"\n\n{"prompt": "b"}\n')
    assert read_prompts(None, str(prompts), None) == ["a", "b"]
    prompts.write_text('"a"\n\n{nope\n')
    with pytest.raises(DataError, match=rf"^--prompts {prompts} line 3: not JSON$"):
        read_prompts(None, str(prompts), None)
