"""`raylm eval`: the same rows give the same loss as the training run's evaluation, in any format,
through either pipeline; bits per byte is the loss in bits over the bytes the targets spell."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from raylm.cli import main as cli_main
from raylm.data.local import local_documents
from raylm.tokenizer import Tokenizer
from raylm.train import checkpoint as ckpt
from raylm.use.evaluate import token_bytes
from support import local_config, pack_documents

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


@pytest.fixture(scope="module")
def trained(local_run, tmp_path_factory):
    """The session's finished local run (held-out evaluation of 2 micro-batches at its last step),
    its config, and its held-out documents written as one JSONL file, in the order evaluation reads them."""
    result = local_run
    cfg = local_config(Path(result.run_dir).parent)
    heldout = tmp_path_factory.mktemp("eval_data") / "heldout.jsonl"
    docs = local_documents(cfg, "validation")
    heldout.write_text("".join(json.dumps({"text": d.text}) + "\n" for d in docs))
    return result, cfg, heldout, docs


def _eval(capsys, *args: str) -> tuple[int, str, str]:
    code = cli_main(["eval", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_eval_of_the_heldout_file_gives_the_training_runs_last_evaluation(trained, tmp_path, capsys):
    """The run's held-out documents, as a JSONL file, evaluated on the rows the run's evaluation
    read: the same loss and accuracy; bits per byte = loss x tokens / (ln 2 x bytes), where the
    bytes are those of the text the targets decode to."""
    result, cfg, heldout, docs = trained
    out = tmp_path / "eval.json"
    code, printed, _ = _eval(capsys, result.run_dir, "--data", str(heldout), "--max-sequences",
                             str(cfg.eval_sequences), "--json", str(out))
    assert code == 0
    numbers = json.loads(out.read_text())
    assert numbers["pipeline"] == "local" and numbers["sequences"] == cfg.eval_sequences
    assert numbers["loss"] == pytest.approx(result.metrics["val_loss"], rel=1e-6)
    assert numbers["accuracy"] == pytest.approx(result.metrics["val_accuracy"], rel=1e-9)
    assert numbers["tokens"] == cfg.eval_sequences * cfg.data.seq_len
    assert numbers["bits_per_byte"] == pytest.approx(
        numbers["loss"] * numbers["tokens"] / (math.log(2) * numbers["bytes"]), rel=1e-9)
    tokenizer = Tokenizer.load(Path(result.run_dir) / "tokenizer.model")
    rows = pack_documents(docs, tokenizer, cfg.data.seq_len, cfg.data.add_bos)[:cfg.eval_sequences]
    decoded = sum(len(tokenizer.decode([int(t) for t in row[1:]]).encode("utf-8")) for row in rows)
    assert abs(numbers["bytes"] - decoded) <= 0.01 * decoded  # (a row may cut a character's bytes)
    assert "bits per byte" in printed and f"{numbers['loss']:.4f}" in printed


def test_eval_without_data_reads_the_runs_own_heldout_split(trained, capsys, tmp_path):
    result, cfg, _, _ = trained
    out = tmp_path / "own.json"
    assert _eval(capsys, result.run_dir, "--max-sequences", str(cfg.eval_sequences), "--json", str(out))[0] == 0
    assert json.loads(out.read_text())["loss"] == pytest.approx(result.metrics["val_loss"], rel=1e-6)


def test_token_bytes_spell_the_text_of_every_piece(trained):
    """Control tokens spell nothing, a byte piece one byte, `▁` one space."""
    result = trained[0]
    tokenizer = Tokenizer.load(Path(result.run_dir) / "tokenizer.model")
    spelled = token_bytes(tokenizer)
    assert spelled[tokenizer.bos_id] == spelled[tokenizer.eos_id] == 0
    text = "def f(x):\n    return x  # é\n"
    ids = tokenizer.encode_one(text)
    assert int(spelled[np.array(ids)].sum()) == len(text.encode("utf-8"))


@pytest.mark.ray
@pytest.mark.slow
def test_the_ray_data_path_gives_the_same_numbers_as_the_local_one(trained, ray_cluster, tmp_path, capsys):
    result, cfg, heldout, _ = trained
    numbers = {}
    for ray in ("no", "yes"):
        out = tmp_path / f"{ray}.json"
        assert _eval(capsys, result.run_dir, "--data", str(heldout), "--ray", ray, "--json", str(out))[0] == 0
        numbers[ray] = json.loads(out.read_text())
    assert numbers["yes"]["pipeline"] == "ray"
    for key in ("loss", "accuracy", "bits_per_byte", "tokens", "bytes", "sequences"):
        assert numbers["yes"][key] == pytest.approx(numbers["no"][key], rel=1e-9), key


@pytest.mark.parametrize("args, message", [
    (["--data", "/no/such/corpus"], "--data=/no/such/corpus: no such file or directory"),
    (["--max-sequences", "0"], "--max-sequences=0: must be at least 1"),
    (["--format", "csv", "--data", "x"], None),  # argparse refuses it
])
def test_eval_errors_are_one_line(trained, capsys, args, message):
    result = trained[0]
    if message is None:
        with pytest.raises(SystemExit):
            cli_main(["eval", result.run_dir, *args])
        return
    code, _, err = _eval(capsys, result.run_dir, *args)
    assert code == 2 and err.strip() == f"raylm: error: {message}"


def test_eval_of_a_missing_run_names_it(tmp_path, capsys):
    code, _, err = _eval(capsys, str(tmp_path / "nowhere"))
    assert code == 2 and len(err.strip().splitlines()) == 1 and "nowhere" in err


def test_the_checkpoint_itself_can_be_evaluated(trained, capsys):
    result = trained[0]
    checkpoint = ckpt.latest_checkpoint(result.run_dir)
    code, printed, _ = _eval(capsys, str(checkpoint), "--max-sequences", "2")
    assert code == 0 and str(checkpoint) in printed
