"""The remaining pieces of fine-tuning and task evaluation: `raylm eval` of a pairs run counts
trained tokens only; batched greedy generation equals one-at-a-time; the Ray Data task path
gives the local path's --json.

Real sentencepiece, real torch, real files; Ray only where the item is about Ray.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from raylm.cli import main as cli_main
from support import local_config

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")

SNIPPETS = {
    "os": ["os.path.join(a, b)", "os.getcwd()", "os.listdir('.')", "os.environ.get('HOME')"],
    "json": ["json.dumps(data)", "json.loads(text)", "json.dump(obj, f)", "json.JSONDecoder()"],
    "re": ["re.compile(pattern)", "re.sub('a', 'b', s)", "re.findall(r'\\d+', s)", "re.match(p, s)"],
    "math": ["math.sqrt(x)", "math.floor(2.5)", "math.pi * r * r", "math.log(x, 2)"],
}


@pytest.fixture(scope="module")
def pairs_run(local_run, tmp_path_factory):
    """A 2-step `format: pairs` fine-tune of the session's run (held-out evaluation at step 2
    over 20% of the records), and its config."""
    from raylm.train.local import train_local

    out = tmp_path_factory.mktemp("pairs_run")
    task = out / "train.jsonl"
    task.write_text("".join(json.dumps({"prompt": f"{code}  # {k}\nPackage:", "completion": f" {label}"}) + "\n"
                            for k in range(8) for label, codes in SNIPPETS.items() for code in codes))
    cfg = local_config(out, f"model.init_from={local_run.run_dir}", f"data.sources.0.path={task}",
                       "data.sources.0.format=pairs", "data.sources.0.max_bytes=null", "data.val_fraction=0.2",
                       "data.seq_len=64", "train.max_steps=2", "train.eval_every=2", "train.checkpoint_every=2",
                       "run.sample_tokens=0")
    return train_local(cfg, log=lambda line: None), cfg


def test_eval_of_a_pairs_run_counts_only_completion_tokens_and_gives_trainings_heldout_loss(pairs_run, tmp_path,
                                                                                            capsys):
    """`raylm eval RUN` on a pairs run's own held-out split normalises by the trained (completion)
    targets, as training's loss does: its loss equals the run's step-2 held-out loss (rel 1e-5),
    and its token count is `trained_count` of the rows, well below rows x seq_len."""
    from raylm.tokenizer import Tokenizer
    from raylm.train.step import trained_count
    from raylm.use.evaluate import local_rows

    result, cfg = pairs_run
    out = tmp_path / "eval.json"
    assert cli_main(["eval", result.run_dir, "--max-sequences", str(cfg.eval_sequences), "--json", str(out)]) == 0
    capsys.readouterr()
    numbers = json.loads(out.read_text())
    records = [json.loads(line) for line in (Path(result.run_dir) / "metrics.jsonl").read_text().splitlines()]
    val_loss = next(r["val_loss"] for r in records if r.get("step") == 2 and "val_loss" in r)
    assert numbers["loss"] == pytest.approx(val_loss, rel=1e-5)

    rows = np.concatenate(list(local_rows(cfg, Tokenizer.load(Path(result.run_dir) / "tokenizer.model"),
                                          "validation", cfg.eval_sequences)))
    trained = trained_count({"tokens": rows}, supervised=True)
    assert numbers["sequences"] == len(rows)
    assert numbers["tokens"] == trained < len(rows) * cfg.data.seq_len / 2
    assert 0 < numbers["bytes"] < numbers["tokens"] * 16


# ---------------------------------------------------------------------------------------
# Batched generation

PROMPTS = ["x", "def main(", "import os\nimport sys\n", "class Reader:\n    def __init__(self, path):\n        self.",
           "for i in range(10):\n    total +="]


@pytest.fixture(scope="module")
def model_and_tokenizer(tokenizer):
    """The debug model with large random weights (peaked logits: clear greedy choices, varied
    text) and the session's real tokenizer."""
    from hf_support import randomize

    from raylm.model import ModelConfig, Transformer

    model = Transformer(ModelConfig.preset("debug", vocab_size=512, max_seq_len=64)).eval()
    randomize(model, 5)
    return model, tokenizer


def test_batched_greedy_generation_equals_one_prompt_at_a_time_with_stop_strings_per_row(model_and_tokenizer):
    """Prompts of different lengths (1 to ~20 tokens) generated together in one batch give the
    same greedy text as each alone, as `raylm generate`'s loop makes it, cut at the first stop
    string; rows end at different steps (stop string, max_new_tokens) and the rest go on."""
    from raylm.use.generate import SamplingOptions, generate
    from raylm.use.score import Scorer

    model, tokenizer = model_and_tokenizer
    lengths = {len(tokenizer.encode_one(p)) for p in PROMPTS}
    assert len(lengths) == len(PROMPTS) and max(lengths) >= 8 * min(lengths)
    for stop in (["e"], ["s", "("]):
        batched = Scorer(model, tokenizer, batch_size=len(PROMPTS)).generate_until(PROMPTS, stop=stop,
                                                                                   max_new_tokens=20)
        for prompt, text in zip(PROMPTS, batched):
            full = generate(model, tokenizer, prompt, SamplingOptions(max_new_tokens=20, temperature=0))
            cuts = [full.find(s) for s in stop if s in full]
            assert text == (full[:min(cuts)] if cuts else full)
        assert len({len(t) for t in batched}) > 2  # the rows ended at different steps


def test_batched_rows_go_on_past_max_seq_len_as_each_alone_and_sampling_ignores_the_batching(model_and_tokenizer):
    """The lock-step loop slides its KV cache past model.max_seq_len as one prompt does (greedy
    ids equal `generate_ids` alone, cached and, while the text fits, uncached), and sampled
    generate_until gives the same texts in batches of 1 and of 5 (each prompt its own seed)."""
    from raylm.use.generate import SamplingOptions, generate_ids, generate_rows
    from raylm.use.score import Scorer

    model, tokenizer = model_and_tokenizer
    prompts = [[tokenizer.bos_id] + tokenizer.encode_one(p) for p in PROMPTS]
    greedy = SamplingOptions(max_new_tokens=model.config.max_seq_len + 10, temperature=0)
    rows: dict[int, list[int]] = {r: [] for r in range(len(prompts))}
    for r, token in generate_rows(model, prompts, greedy, vocab_limit=tokenizer.vocab_size, eos_id=None,
                                  generators=[None] * len(prompts)):
        rows[r].append(token)
    for r, prompt in enumerate(prompts):
        alone = list(generate_ids(model, prompt, greedy, vocab_limit=tokenizer.vocab_size, eos_id=None))
        assert rows[r] == alone and len(alone) == greedy.max_new_tokens
    short = SamplingOptions(max_new_tokens=8, temperature=0)
    for r, token in generate_rows(model, prompts, short, vocab_limit=tokenizer.vocab_size, eos_id=None,
                                  generators=[None] * len(prompts), use_cache=False):
        assert token == rows[r].pop(0)

    sampled = [Scorer(model, tokenizer, batch_size=size).generate_until(PROMPTS, max_new_tokens=12, temperature=1.0,
                                                                        seed=7) for size in (1, 5)]
    assert sampled[0] == sampled[1]


# ---------------------------------------------------------------------------------------
# The Ray Data path of `eval --task`


def _jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.mark.slow
def test_ray_task_path_writes_the_local_paths_json(ray_cluster, local_run, tmp_path, capsys):
    """`eval --task T --ray yes` scores the examples in a Ray Data actor pool (2 actors, each
    loading the model once) and gathers them on the driver: its --json (metrics and per-example
    predictions with their log-likelihoods, in file order) equals the local path's, bit for bit,
    for a 2-shot choice task (the few-shot draws are made once, on the driver)."""
    _jsonl(tmp_path / "test.jsonl", [{"text": code, "label": label} for label, codes in SNIPPETS.items()
                                     for code in codes])
    _jsonl(tmp_path / "shots.jsonl", [{"text": f"{label}.x{i}", "label": label} for i in range(2) for label in SNIPPETS])
    (tmp_path / "choice.yaml").write_text('kind: choice\ndata: test.jsonl\nprompt: "{text}\\nPackage:"\n'
                                          'choices: [os, json, re, math]\nfields: {label: label}\n'
                                          'fewshot: {data: shots.jsonl, num: 2, seed: 3}\n')
    results = {}
    for ray in ("no", "yes"):
        out = tmp_path / f"{ray}.json"
        assert cli_main(["eval", local_run.run_dir, "--task", str(tmp_path / "choice.yaml"), "--ray", ray,
                         "--batch-size", "3", "--json", str(out)]) == 0
        results[ray] = json.loads(out.read_text())
    capsys.readouterr()
    assert results["no"].pop("pipeline") == "local" and results["yes"].pop("pipeline") == "ray"
    assert len(results["yes"]["predictions"]) == 16 and results["yes"]["num_fewshot"] == 2
    assert results["yes"] == results["no"]


def test_a_share_of_a_sampled_generate_task_predicts_what_the_whole_does(model_and_tokenizer, tmp_path):
    """What lets the Ray path split a task: `predict` on a share of the examples, given their
    contexts and their indices in the file, gives the whole run's predictions for them, also
    when sampling (each example draws from seed + its index)."""
    from raylm.use.score import Scorer
    from raylm.use.tasks import contexts, load_task, predict, read_examples

    model, tokenizer = model_and_tokenizer
    _jsonl(tmp_path / "test.jsonl", [{"text": code, "label": label} for label, codes in SNIPPETS.items()
                                     for code in codes])
    (tmp_path / "gen.yaml").write_text('kind: generate\ndata: test.jsonl\nprompt: "{text}\\nPackage:"\n'
                                       'fields: {answer: label}\nmax_new_tokens: 5\ntemperature: 1.0\nseed: 11\n'
                                       'metrics: [exact_match, f1]\n')
    task = load_task(str(tmp_path / "gen.yaml"))
    examples = read_examples(task, task.data)
    ctxs = contexts(task, examples)
    scorer = Scorer(model, tokenizer, batch_size=4)
    whole = predict(task, scorer, examples, ctxs)
    share = predict(task, scorer, examples[5:11], ctxs[5:11], indices=list(range(5, 11)))
    assert share == whole[5:11]
    assert len({p["prediction"] for p in whole}) > 8  # sampled: varied
