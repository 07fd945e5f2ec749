"""Task evaluation (`raylm eval RUN --task`), its scoring primitives and the stdlib task builder:
the metrics recompute from the --json predictions with other people's code (scikit-learn,
rouge-score), scores equal a plain forward pass, bad task files are one line, and the built
task never puts a file in both splits."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from raylm.cli import main as cli_main
from raylm.train.local import train_local
from raylm.use.generate import SamplingOptions, generate
from raylm.use.load import load_model
from raylm.use.score import Scorer
from raylm.use.tasks import load_task, contexts, read_examples
from test_train_local import local_config

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")

SNIPPETS = {
    "def": ["def f(x):\n    return x", "def main():\n    run()", "def add(a, b):\n    return a + b"],
    "class": ["class A:\n    pass", "class Point:\n    x = 0", "class Error(Exception):\n    pass"],
    "import": ["import os, sys", "from json import loads", "import re"],
}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A finished 6-step local run, its model and tokenizer, and a directory of small task files."""
    out = tmp_path_factory.mktemp("tasks_run")
    cfg = local_config(out, "train.max_steps=6", "train.eval_every=6", "train.checkpoint_every=6")
    result = train_local(cfg, log=lambda line: None)
    model, tokenizer, run_cfg = load_model(result.run_dir)
    tasks = out / "tasks"
    tasks.mkdir()
    records = [{"text": text, "label": label} for i in range(3) for label, texts in SNIPPETS.items()
               for text in texts[i:i + 1]]
    _jsonl(tasks / "test.jsonl", records)
    _jsonl(tasks / "shots.jsonl", [{"text": f"x{i} = {i}", "label": "import"} for i in range(4)])
    (tasks / "choice.yaml").write_text('kind: choice\ndata: test.jsonl\nprompt: "{text}\\nKind:"\n'
                                       'choices: [def, class, import]\nfields: {label: label}\n'
                                       'fewshot: {data: shots.jsonl, num: 2, seed: 3}\n')
    return result.run_dir, model, tokenizer, run_cfg, tasks


def _jsonl(path: Path, records: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def _eval(capsys, *args: str) -> tuple[int, str, str]:
    code = cli_main(["eval", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _forward_logprob(model, ids: list[int], n_targets: int) -> float:
    """log P of the last n_targets ids of `ids` given the ones before, in one plain forward."""
    with torch.no_grad():
        logits = model(torch.tensor([ids[:-1]]))[0].float()  # (T, V)
    logprobs = torch.log_softmax(logits, dim=-1)[-n_targets:]  # (n, V)
    return float(logprobs.gather(1, torch.tensor(ids[-n_targets:])[:, None]).sum())


def test_scores_equal_one_plain_forward_in_any_batch(run):
    """A pair's loglikelihood is log P(continuation | BOS + context) of one unpadded forward, whatever
    the batch it shares (padding never leaks) and when choices share their context's KV cache, the context's trailing whitespace moved to the
    continuation as lm-eval moves it; a short text's rolling loglikelihood is its tokens'
    log P after BOS; a long text's windows predict each token once, with the window's context."""
    _, model, tokenizer, cfg, _ = run
    requests = [("def f(x):\n    return", " x"), ("import", " os"), ("", "class A:"), ("x = 1\n" * 3, "y"),
                ("def f(x):\n    return", " y + 1 if z else None"), ("def f(x):\n    return", " (")]  # one context
    one = Scorer(model, tokenizer, batch_size=1, window=cfg.data.seq_len).loglikelihood(requests)
    batched = Scorer(model, tokenizer, batch_size=3, window=cfg.data.seq_len).loglikelihood(requests)
    for (context, continuation), (lp1, g1), (lp3, g3) in zip(requests, one, batched):
        context, continuation = context.rstrip(), context[len(context.rstrip()):] + continuation
        whole, ctx = tokenizer.encode_one(context + continuation), tokenizer.encode_one(context) if context else []
        expected = _forward_logprob(model, [tokenizer.bos_id] + whole, len(whole) - len(ctx))
        assert lp1 == pytest.approx(expected, abs=1e-4) and lp3 == pytest.approx(expected, abs=1e-4)
        assert g1 == g3
    overflowing = "for i in range(10):\n    total += i * i\n" * 2  # longer than a 16-token window
    small = Scorer(model, tokenizer, window=16)
    (longest, _), _ = small.loglikelihood([(overflowing, "print(total)"), (overflowing, "x")])
    context, continuation = small.encode_pair(overflowing, "print(total)")
    assert longest == pytest.approx(_forward_logprob(model, (context + continuation)[-17:], len(continuation)), abs=1e-4)
    short = "def main():\n    pass\n"
    ids = tokenizer.encode_one(short)
    scorer = Scorer(model, tokenizer, window=cfg.data.seq_len)
    assert scorer.loglikelihood_rolling([short])[0] == pytest.approx(
        _forward_logprob(model, [tokenizer.bos_id] + ids, len(ids)), abs=1e-4)
    long = "for i in range(10):\n    total += i * i\n" * 8
    ids = tokenizer.encode_one(long)
    window = 16
    assert len(ids) > 3 * window
    expected = _forward_logprob(model, [tokenizer.bos_id] + ids[:window], window)
    for done in range(window, len(ids), window):  # each later window: up to `window` new tokens after
        end = min(done + window, len(ids))          # the `window` tokens before them... as many as fit
        expected += _forward_logprob(model, ids[max(0, end - window - 1):end], end - done)
    assert Scorer(model, tokenizer, window=window).loglikelihood_rolling([long])[0] == pytest.approx(expected, abs=1e-3)


def test_generate_until_is_raylm_generate_cut_at_the_stop_string(run):
    """Greedy generate_until equals raylm.use.generate's greedy text (the same KV-cache loop), cut
    before the first stop string."""
    _, model, tokenizer, cfg, _ = run
    prompts = ["def main(", "import"]
    scorer = Scorer(model, tokenizer, window=cfg.data.seq_len)
    got = scorer.generate_until(prompts, stop=["("], max_new_tokens=12)
    for prompt, text in zip(prompts, got):
        full = generate(model, tokenizer, prompt, SamplingOptions(max_new_tokens=12, temperature=0))
        assert text == full.split("(")[0]


def test_choice_metrics_recompute_from_the_json_with_scikit_learn(run, tmp_path, capsys):
    """`eval --task` of a choice task: each prediction is the choice of highest log-likelihood per
    byte of its continuation; accuracy, macro precision/recall/F1 and the confusion matrix equal
    scikit-learn's on the --json predictions; the PNG of the matrix comes from `raylm plot`."""
    from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support

    run_dir, _, _, _, tasks = run
    out = tmp_path / "choice.json"
    code, printed, err = _eval(capsys, str(run_dir), "--task", str(tasks / "choice.yaml"), "--json", str(out))
    assert code == 0, err
    record = json.loads(out.read_text())
    preds = record["predictions"]
    assert record["num_fewshot"] == 2 and record["normalize"] == "byte" and len(preds) == 9
    gold, predicted = [p["label"] for p in preds], [p["prediction"] for p in preds]
    for p in preds:
        per_byte = [lp / len(f" {c}".encode()) for lp, c in zip(p["logprobs"], p["choices"])]
        assert p["scores"] == pytest.approx(per_byte)
        assert p["prediction"] == p["choices"][per_byte.index(max(per_byte))]
    m = record["metrics"]
    precision, recall, f1, _ = precision_recall_fscore_support(gold, predicted, average="macro", zero_division=0)
    assert (m["accuracy"], m["precision"], m["recall"], m["f1"]) == pytest.approx(
        (accuracy_score(gold, predicted), precision, recall, f1))
    labels = ["def", "class", "import"]
    assert m["confusion"] == {"labels": labels,
                              "matrix": confusion_matrix(gold, predicted, labels=labels).tolist()}
    assert "macro F1" in printed and "confusion" in printed
    assert cli_main(["plot", str(out), "--out", str(tmp_path / "plots")]) == 0
    png = (tmp_path / "plots" / "confusion.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_generate_metrics_recompute_from_the_json_with_rouge_score(run, tmp_path, capsys):
    """`eval --task` of a generate task: greedy continuations cut at the stop string; exact match
    (SQuAD normalisation: case, punctuation, articles), token F1 and ROUGE-1/2/L equal the numbers
    recomputed from the --json predictions (ROUGE by rouge-score itself)."""
    from rouge_score import rouge_scorer

    run_dir, model, tokenizer, cfg, tasks = run
    prompts = ["def main(", "import", "class A:", "x = "]
    greedy = Scorer(model, tokenizer, window=cfg.data.seq_len).generate_until(prompts, stop=["\n"], max_new_tokens=8)
    # two answers the model gives (one in other case and with a full stop), two it does not
    answers = [greedy[0].strip().upper() + ".", [greedy[1].strip(), "something else"], "the quick fox", "a b c"]
    _jsonl(tasks / "gen.jsonl", [{"question": p, "answer": a} for p, a in zip(prompts, answers)])
    (tasks / "gen.yaml").write_text('kind: generate\ndata: gen.jsonl\nprompt: "{question}"\nmax_new_tokens: 8\n'
                                    'stop: ["\\n"]\n')
    out = tmp_path / "gen.json"
    code, _, err = _eval(capsys, str(run_dir), "--task", str(tasks / "gen.yaml"), "--json", str(out))
    assert code == 0, err
    record = json.loads(out.read_text())
    preds = record["predictions"]
    assert [p["prediction"] for p in preds] == [g.strip() for g in greedy]
    if greedy[0].strip() and any(ch.isalnum() for ch in greedy[0]):
        assert preds[0]["exact_match"] == 1.0
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    for key in ("rouge1", "rouge2", "rougeL"):
        per_example = [max(scorer.score(a, p["prediction"])[key].fmeasure for a in p["answers"]) for p in preds]
        assert record["metrics"][key] == pytest.approx(sum(per_example) / len(preds))
    assert record["metrics"]["exact_match"] == pytest.approx(sum(p["exact_match"] for p in preds) / len(preds))


def test_loglikelihood_task_gives_perplexity_and_bits_per_byte_of_its_texts(run, tmp_path, capsys):
    """`eval --task` of a loglikelihood task: perplexity = exp(-sum log P / tokens) and bits per byte
    = -sum log P / (ln 2 x UTF-8 bytes), from the per-text log-probabilities in --json."""
    run_dir, model, tokenizer, cfg, tasks = run
    (tasks / "ll.yaml").write_text("kind: loglikelihood\ndata: test.jsonl\n")
    out = tmp_path / "ll.json"
    code, _, err = _eval(capsys, str(run_dir), "--task", str(tasks / "ll.yaml"), "--json", str(out))
    assert code == 0, err
    record = json.loads(out.read_text())
    preds = record["predictions"]
    texts = [json.loads(line)["text"] for line in (tasks / "test.jsonl").read_text().splitlines()]
    for p, text in zip(preds, texts):
        ids = tokenizer.encode_one(text)
        assert p["tokens"] == len(ids) and p["bytes"] == len(text.encode())
        assert p["logprob"] == pytest.approx(_forward_logprob(model, [tokenizer.bos_id] + ids, len(ids)), abs=1e-3)
    total = sum(p["logprob"] for p in preds)
    m = record["metrics"]
    assert m["perplexity"] == pytest.approx(math.exp(-total / sum(p["tokens"] for p in preds)))
    assert m["bits_per_byte"] == pytest.approx(-total / (math.log(2) * sum(p["bytes"] for p in preds)))


def test_fewshot_examples_come_from_their_own_file_with_a_seed(run):
    """Few-shot contexts hold `num` solved examples of the few-shot file, then the question; the same
    seed gives the same contexts, another seed others."""
    *_, tasks = run
    task = load_task(str(tasks / "choice.yaml"))
    examples = read_examples(task, task.data)
    first, again = contexts(task, examples), contexts(task, examples)
    assert first == again
    shots = {f"x{i} = {i}\nKind: import" for i in range(4)}
    for ctx, e in zip(first, examples):
        parts = ctx.split("\n\n")
        assert len(parts) == 3 and set(parts[:2]) <= shots and parts[2] == e.prompt
    task.fewshot_seed = 4
    assert contexts(task, examples) != first


@pytest.mark.parametrize("line,fix,message", [
    (2, {"label": None}, "line 2: field 'label' missing"),
    (3, {"label": "lambda"}, "line 3: field 'label': label 'lambda' not among the choices"),
    (1, {"choices": []}, "line 1: field 'choices': empty choices"),
    (2, {"text": None}, "line 2: field 'text' missing (the prompt template uses it)"),
])
def test_bad_task_records_are_one_line_naming_file_line_and_field(run, tmp_path, capsys, line, fix, message):
    run_dir, *_ = run
    records = [{"text": "x", "label": "a", "choices": ["a", "b"]} for _ in range(3)]
    records[line - 1].update(fix)
    records[line - 1] = {k: v for k, v in records[line - 1].items() if v is not None}
    _jsonl(tmp_path / "bad.jsonl", records)
    (tmp_path / "bad.yaml").write_text("kind: choice\ndata: bad.jsonl\nfields: {choices: choices}\n")
    code, out, err = _eval(capsys, str(run_dir), "--task", str(tmp_path / "bad.yaml"))
    assert code == 2 and out == ""
    assert err.startswith(f"raylm: error: {tmp_path / 'bad.jsonl'} {message}")
    assert err.count("\n") == 1


@pytest.mark.parametrize("text,message", [
    ("kind: rank\ndata: x.jsonl\n", "kind='rank': must be one of choice, generate, loglikelihood"),
    ("kind: choice\ndata: x.jsonl\n", "choices=None: a choice task needs choices"),
    ("kind: choice\ndata: x.jsonl\nchoices: []\n", "choices=[]: must be a non-empty list"),
    ("kind: generate\ndata: x.jsonl\nmetrics: [accuracy]\n", "a generate task's metrics are"),
])
def test_bad_task_files_are_one_line_naming_the_key(run, tmp_path, capsys, text, message):
    run_dir, *_ = run
    (tmp_path / "t.yaml").write_text(text)
    code, _, err = _eval(capsys, str(run_dir), "--task", str(tmp_path / "t.yaml"))
    assert code == 2 and message in err and str(tmp_path / "t.yaml") in err and err.count("\n") == 1


def test_the_stdlib_task_splits_by_file_and_keeps_heldout_files_out_of_train(tmp_path, capsys):
    """`raylm task build stdlib`: no file has snippets in both splits; the demo config's held-out
    files are never in train; each label has test examples; train records are the task's prompt
    template and target rendered (fine-tuning reads prompt + completion)."""
    from raylm.use.task_build import MIN_FILES, heldout_files

    out = tmp_path / "stdlib"
    assert cli_main(["task", "build", "stdlib", "--out", str(out)]) == 0
    assert "labels" in capsys.readouterr().out
    task = load_task(str(out / "task.yaml"))
    split = {name: [json.loads(line) for line in (out / f"{name}.jsonl").read_text().splitlines()]
             for name in ("train", "test", "fewshot")}
    train_files, test_files = {r["file"] for r in split["train"]}, {r["file"] for r in split["test"]}
    assert train_files and test_files and not train_files & test_files
    held = heldout_files(None)
    assert held and not held & train_files and held & test_files
    assert {r["label"] for r in split["test"]} == {r["label"] for r in split["train"]} == set(task.choices)
    assert len(task.choices) >= 5
    assert {r["file"] for r in split["fewshot"]} <= train_files
    for r in split["train"][:50]:
        assert r["prompt"] == task.prompt.format(text=r["text"]) and r["completion"] == f" {r['label']}"
        assert r["file"].split("/")[0] == r["label"]
    files_per_label = {}
    for r in split["train"] + split["test"]:
        files_per_label.setdefault(r["label"], set()).add(r["file"])
    assert all(len(files) >= MIN_FILES // 2 for files in files_per_label.values())
    assert cli_main(["task", "build", "stdlib", "--out", str(out)]) == 2  # never over an existing task
