"""`raylm eval RUN --harness TASKS`: lm-evaluation-harness through RaylmLM gives the numbers that
lm-eval's own HFLM gives on `raylm export` of the same checkpoint, on local task definitions
(`dataset_path: json` with data_files; no hub)."""

from __future__ import annotations

import json
import os
import sys

import pytest

from raylm.cli import main as cli_main
from raylm.train.local import train_local
from raylm.use.hf import export_hf
from raylm.use.load import load_model
from raylm.use.score import Scorer
from test_train_local import local_config

pytestmark = pytest.mark.filterwarnings("ignore")

TEXTS = [("def f(x):\n    return x", "def"), ("class A:\n    pass", "class"), ("import os, sys", "import"),
         ("def main():\n    run()", "def"), ("class Point:\n    x = 0", "class"), ("from json import loads", "import")]


def _task(name: str, data: str, body: str) -> str:
    return (f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
            f"test_split: test\n{body}")


@pytest.fixture(scope="module")
def harness_run(tmp_path_factory):
    """A 6-step local run, its Hugging Face export, and a directory of three local lm-eval tasks:
    multiple choice, rolling log-likelihood and generation."""
    pytest.importorskip("lm_eval")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    out = tmp_path_factory.mktemp("harness_run")
    cfg = local_config(out, "train.max_steps=6", "train.eval_every=6", "train.checkpoint_every=6")
    result = train_local(cfg, log=lambda line: None)
    export_hf(result.run_dir, out / "hf")
    tasks = out / "tasks"
    tasks.mkdir()
    data = tasks / "snippets.jsonl"
    data.write_text("".join(json.dumps({"text": t, "label": label}) + "\n" for t, label in TEXTS))
    (tasks / "raylm_mc.yaml").write_text(_task("raylm_mc", data, (
        'output_type: multiple_choice\ndoc_to_text: "{{text}}\\nKind:"\ndoc_to_choice: ["def", "class", "import"]\n'
        'doc_to_target: "{{label}}"\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n')))
    (tasks / "raylm_roll.yaml").write_text(_task("raylm_roll", data, (
        'output_type: loglikelihood_rolling\ndoc_to_text: ""\ndoc_to_target: "{{text}}"\nmetric_list:\n'
        '  - metric: word_perplexity\n  - metric: byte_perplexity\n  - metric: bits_per_byte\n')))
    (tasks / "raylm_gen.yaml").write_text(_task("raylm_gen", data, (
        'output_type: generate_until\ndoc_to_text: "{{text}}\\n"\ndoc_to_target: "{{label}}"\n'
        'generation_kwargs:\n  until: ["\\n"]\n  max_gen_toks: 6\n  do_sample: false\n'
        'metric_list:\n  - metric: exact_match\n')))
    return result.run_dir, out / "hf", tasks, cfg


def _hflm(hf_dir, seq_len: int, **kwargs):
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=str(hf_dir), device="cpu", batch_size=4, max_length=seq_len, dtype="float32", **kwargs)


def _metrics(results: dict, task: str) -> dict:
    return {k.split(",")[0]: v for k, v in results["results"][task].items()
            if isinstance(v, (int, float)) and "stderr" not in k}


@pytest.mark.slow
def test_raylm_lm_gives_hflms_numbers_on_the_export(harness_run, tmp_path, capsys):
    """Per request and per task: RaylmLM's log-likelihoods (and greedy flags), rolling
    log-likelihoods and generations equal HFLM's over the exported directory (HFLM's defaults
    for pairs and generation, whose tokenizer adds BOS as raylm's training did;
    add_bos_token=False with prefix_token_id=BOS for rolling, so the first window predicts the
    text's tokens after BOS as raylm's does); `raylm eval --harness` prints and writes the same
    task metrics that lm-eval's simple_evaluate gives with HFLM."""
    from lm_eval import simple_evaluate
    from lm_eval.api.instance import Instance
    from lm_eval.tasks import TaskManager

    from raylm.use.harness import raylm_lm

    run_dir, hf_dir, tasks, cfg = harness_run
    model, tokenizer, run_cfg = load_model(run_dir)
    ours = raylm_lm(Scorer(model, tokenizer, add_bos=run_cfg.data.add_bos, batch_size=4, window=cfg.data.seq_len))
    hf = _hflm(hf_dir, cfg.data.seq_len)
    pairs = [Instance("loglikelihood", {}, (text + "\nKind:", f" {label}"), 0) for text, label in TEXTS]
    pairs.append(Instance("loglikelihood", {}, ("", "import os"), 0))
    for (a, ga), (b, gb) in zip(ours.loglikelihood(pairs), hf.loglikelihood(pairs)):
        assert a == pytest.approx(b, abs=2e-4) and ga == gb
    rolling = [Instance("loglikelihood_rolling", {}, (text * 6,), 0) for text, _ in TEXTS]  # several windows
    hf_rolling = _hflm(hf_dir, cfg.data.seq_len, add_bos_token=False, prefix_token_id=tokenizer.bos_id)
    assert ours.loglikelihood_rolling(rolling) == pytest.approx(hf_rolling.loglikelihood_rolling(rolling), abs=1e-3)
    gen = [Instance("generate_until", {}, (text + "\n", {"until": ["\n"], "max_gen_toks": 6, "do_sample": False}), 0)
           for text, _ in TEXTS]
    assert ours.generate_until(gen) == hf.generate_until(gen)

    out = tmp_path / "harness.json"
    assert cli_main(["eval", str(run_dir), "--harness", "raylm_mc,raylm_roll,raylm_gen", "--include-path",
                     str(tasks), "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "raylm_mc" in printed and "acc_norm" in printed
    ours_results = json.loads(out.read_text())
    manager = TaskManager(include_path=str(tasks))
    theirs = simple_evaluate(model=hf, tasks=["raylm_mc", "raylm_gen"], task_manager=manager, log_samples=False,
                             bootstrap_iters=0)
    theirs_roll = simple_evaluate(model=hf_rolling, tasks=["raylm_roll"], task_manager=manager, log_samples=False,
                                  bootstrap_iters=0)
    for task, result in (("raylm_mc", theirs), ("raylm_gen", theirs), ("raylm_roll", theirs_roll)):
        mine, reference = _metrics(ours_results, task), _metrics(result, task)
        assert mine.keys() == reference.keys() and mine
        for key in mine:
            assert mine[key] == pytest.approx(reference[key], rel=1e-4), (task, key)


def test_a_missing_lm_eval_is_one_line_naming_the_extra(harness_run, capsys, monkeypatch):
    run_dir, *_ = harness_run
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # `import lm_eval` raises ImportError, as when not installed
    assert cli_main(["eval", str(run_dir), "--harness", "raylm_mc"]) == 2
    err = capsys.readouterr().err
    assert err == "raylm: error: --harness needs lm-evaluation-harness: pip install 'raylm[eval]'\n"


def test_an_unknown_harness_task_is_one_line(harness_run, capsys):
    run_dir, _, tasks, _ = harness_run
    assert cli_main(["eval", str(run_dir), "--harness", "raylm_nosuch", "--include-path", str(tasks)]) == 2
    err = capsys.readouterr().err
    assert err == "raylm: error: --harness raylm_nosuch: lm-eval knows no such task\n"
