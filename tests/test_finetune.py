"""Fine-tuning: supervised formats (pairs, chat), loss on trained tokens only, packed documents
that attend only within themselves, `model.init_from` a raylm run, and the export's chat template.

Real sentencepiece, real torch (one process, or a 2-process gloo group), real files; the Ray
path once, on the session's local cluster.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from raylm.config import load_config
from raylm.data import chat
from raylm.data.parse import BadInputTally, FileSpec, parse_file, split_documents
from raylm.data.transforms import encode_documents, frame_documents, pack, unmask
from raylm.errors import ConfigError, DataError
from raylm.model import ModelConfig, Transformer
from raylm.tokenizer import BOS_ID, EOS_ID
from raylm.train.step import IGNORE_INDEX, inputs_targets, loss_and_correct, train_step, trained_count
from support import run_ranks

PAIRS = [
    {"prompt": "import os\nos.path.join('a', 'b')\nPackage:", "completion": " os"},
    {"prompt": "import json\njson.dumps({'k': [1, 2]})\nPackage:", "completion": " json"},
    {"prompt": "import re\nre.compile(r'[a-z]+')\nPackage:", "completion": " re"},
    {"prompt": "from collections import deque\nq = deque()\nPackage:", "completion": " collections"},
]


def byte_encode(texts: list[str]) -> list[list[int]]:
    """A stand-in tokenizer (one id per byte, above the 4 special ids) for tests of framing."""
    return [[4 + b for b in t.encode()] for t in texts]


def write_pairs(path: Path, records: list[dict], keys=("prompt", "completion")) -> Path:
    path.write_text("".join(json.dumps({keys[0]: r["prompt"], keys[1]: r["completion"]}) + "\n" for r in records))
    return path


def tiny_model(seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    cfg = ModelConfig.preset("debug", vocab_size=300, max_seq_len=256)
    return Transformer(cfg).eval()


def pair_rows(records: list[dict]) -> list[list[int]]:
    docs = [("\0" + r["prompt"] + "\0" + r["completion"]) for r in records]
    return encode_documents(docs, byte_encode)


# ---------------------------------------------------------------------------------------
# Data: pairs records, bad input, the mask in the ids


def test_pairs_record_missing_a_field_is_a_counted_skip_or_one_line(tmp_path):
    """A pairs record without its completion (configurable names) is skipped and counted under
    on_error=skip, and one line naming file, line and key under on_error=raise."""
    path = tmp_path / "qa.jsonl"
    path.write_text(json.dumps({"q": "2+2=", "a": " 4"}) + "\n" + json.dumps({"q": "3+3="}) + "\n"
                    + json.dumps({"q": "1+1=", "a": " 2"}) + "\n")
    spec = FileSpec(str(path), "pairs", "qa.jsonl", prompt_field="q", completion_field="a")
    docs, problems = split_documents([(path.read_bytes(), spec)], "train", 0.0, "skip")
    assert [d for d, _ in docs] == ["qa.jsonl:1", "qa.jsonl:3"]
    tally = BadInputTally()
    tally.add(problems, len(docs))
    assert tally.report()["skipped"] == {"missing_field": 1}
    with pytest.raises(DataError) as e:
        split_documents([(path.read_bytes(), spec)], "train", 0.0, "raise")
    assert str(e.value) == f"{path}:2: record has no field 'a' (data.sources.*.completion_field)"
    assert "\n" not in str(e.value)


def test_pair_prompt_tokens_are_stored_masked_and_completion_and_eos_trained():
    """Framing a pair stores its prompt ids negated (no loss) and its completion and EOS as
    they are; plain text next to it is stored exactly as before (never negative)."""
    pair = "\0" + "Q:" + "\0" + " A"
    ids = encode_documents([pair, "plain"], byte_encode)
    assert ids[1] == byte_encode(["plain"])[0]
    stream = frame_documents(ids, BOS_ID, EOS_ID, add_bos=True)
    tokens, trained = unmask(stream)
    assert tokens.tolist() == [BOS_ID, *byte_encode(["Q: A"])[0], EOS_ID, BOS_ID, *byte_encode(["plain"])[0], EOS_ID]
    assert trained.tolist() == [True, False, False, True, True, True] + [True] * 7


def test_plain_text_inputs_targets_and_loss_are_bit_identical_to_the_unmasked_path():
    """Rows without a mask give the rows' own slices as inputs and targets, and the same loss
    bits as the plain cross-entropy the trainer computed before masks existed."""
    model = tiny_model()
    rows = torch.randint(4, 300, (2, 33))
    inputs, targets, documents = inputs_targets(rows)
    assert documents is None and torch.equal(inputs, rows[:, :-1]) and torch.equal(targets, rows[:, 1:])
    loss_sum, correct = loss_and_correct(model, rows, "fp32")
    logits = model(rows[:, :-1]).float()
    expected = F.cross_entropy(logits.reshape(-1, logits.size(-1)), rows[:, 1:].reshape(-1), reduction="sum")
    assert loss_sum.item() == expected.item()
    assert correct.item() == (logits.argmax(-1) == rows[:, 1:]).sum().item()


# ---------------------------------------------------------------------------------------
# Packing: each document attends only within itself


def per_target_loss(model, row: torch.Tensor, document_mask: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-target cross-entropy (L,), targets (L,)) of one stored row (L + 1,), supervised."""
    inputs, targets, documents = inputs_targets(row[None].long(), document_mask, supervised=True)
    with torch.no_grad():
        logits = model(inputs, documents=documents) if documents is not None else model(inputs)
    loss = F.cross_entropy(logits[0].float(), targets[0], reduction="none", ignore_index=IGNORE_INDEX)
    return loss, targets[0]


def test_a_pairs_loss_is_the_same_packed_with_others_and_alone():
    """Invariant of packing: the completion loss of a pair packed in one row with others (the
    document mask and position resets) equals its loss alone, to rel 1e-5; without the mask
    it differs (so the test can fail)."""
    model = tiny_model()
    docs = pair_rows(PAIRS)
    packed = torch.from_numpy(frame_documents(docs, BOS_ID, EOS_ID, True))
    packed_loss, packed_targets = per_target_loss(model, packed, document_mask=True)
    unmasked_loss, _ = per_target_loss(model, packed, document_mask=False)
    offset = 0
    for k, ids in enumerate(docs):
        alone = torch.from_numpy(frame_documents([ids], BOS_ID, EOS_ID, True))
        alone_loss, alone_targets = per_target_loss(model, alone, document_mask=True)
        n = alone.numel() - 1  # targets of the pair alone: its tokens after BOS, EOS included
        part = slice(offset, offset + n)
        assert torch.equal(packed_targets[part], alone_targets)
        trained = alone_targets != IGNORE_INDEX
        assert int(trained.sum()) == len(PAIRS[k]["completion"].encode()) + 1  # completion bytes + EOS
        mine, theirs = packed_loss[part][trained].sum(), alone_loss[trained].sum()
        assert torch.allclose(mine, theirs, rtol=1e-5, atol=0), (k, mine.item(), theirs.item())
        if k > 0:
            assert not torch.allclose(unmasked_loss[part][trained].sum(), theirs, rtol=1e-3)
        offset += alone.numel()  # the next pair's BOS is the target after this pair's EOS


def test_a_pair_cut_by_a_row_boundary_trains_nothing_without_its_prompt():
    """A row that starts inside a pair (its prompt in the row before) trains none of that
    pair's tokens: they would be learnt without their prompt."""
    stream = frame_documents(pair_rows(PAIRS[:2]), BOS_ID, EOS_ID, True)
    rows, _ = pack(stream, seq_len=len(pair_rows(PAIRS[:1])[0]) // 2)
    _, targets, _ = inputs_targets(torch.from_numpy(rows[1:2]).long(), True, supervised=True)
    assert (targets == IGNORE_INDEX).all()


# ---------------------------------------------------------------------------------------
# Loss normalisation: the global count of trained tokens


def _step_stats(model, micro, supervised, world_size=1, global_tokens=None):
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    stats = train_step(model, opt, micro, torch.device("cpu"), "fp32", 0.0, world_size, global_tokens,
                       document_mask=True, supervised=supervised)
    return stats


def _supervised_rows(n_rows: int, seq_len: int = 48, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    records = [{"prompt": "x" * int(rng.integers(5, 30)), "completion": " y" * int(rng.integers(1, 6))}
               for _ in range(4 * n_rows)]
    rows, _ = pack(frame_documents(pair_rows(records), BOS_ID, EOS_ID, True), seq_len)
    return rows[:n_rows]


def _reference_mean(model, rows: np.ndarray) -> tuple[float, list[torch.Tensor]]:
    """Mean cross-entropy over every trained target of `rows`, and its gradient (one forward)."""
    model.zero_grad()
    tokens = torch.from_numpy(rows).long()
    inputs, targets, documents = inputs_targets(tokens, True, True)
    logits = model(inputs, documents=documents).float()
    loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=IGNORE_INDEX)
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    return loss.item(), grads


def test_supervised_step_divides_by_the_trained_tokens_of_the_whole_batch():
    """Accumulated over micro-batches with different numbers of trained tokens, the step's loss
    and gradient are the mean over every trained target of the batch (one big forward), not a
    mean of micro-batch means and not a mean over all targets."""
    model = tiny_model().train()
    rows = _supervised_rows(4)
    counts = [trained_count({"tokens": rows[i:i + 2]}, supervised=True) for i in (0, 2)]
    assert counts[0] != counts[1] and 0 < sum(counts) < rows.size
    expected_loss, expected_grads = _reference_mean(model, rows)
    stats = _step_stats(model, [{"tokens": rows[:2]}, {"tokens": rows[2:]}], supervised=True,
                              global_tokens=rows.shape[0] * (rows.shape[1] - 1))
    assert stats.loss == pytest.approx(expected_loss, rel=1e-5)
    # the gradient: recompute with the same micro-batches, reading grads before zero_grad
    model.zero_grad()
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    before = [p.detach().clone() for p in model.parameters()]
    train_step(model, opt, [{"tokens": rows[:2]}, {"tokens": rows[2:]}], torch.device("cpu"), "fp32", 0.0,
               document_mask=True, supervised=True)
    for p, b, g in zip(model.parameters(), before, expected_grads):
        assert torch.allclose(b - p.detach(), g, rtol=1e-4, atol=1e-7)


def _two_rank_step(rank: int, out: Path) -> dict:
    rows = _supervised_rows(4)
    model = tiny_model().train()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    mine = rows[:1] if rank == 0 else rows[1:]  # uneven: 1 row on rank 0, 3 on rank 1
    stats = train_step(model, opt, [{"tokens": mine}], torch.device("cpu"), "fp32", 0.0, world_size=2,
                       global_tokens=rows.shape[0] * (rows.shape[1] - 1), document_mask=True, supervised=True)
    return {"loss": stats.loss}


@pytest.mark.slow
def test_supervised_loss_over_two_ranks_is_the_global_trained_token_mean(tmp_path):
    """Over 2 gloo ranks holding different numbers of trained tokens, both ranks report the
    mean over the global count of trained tokens (an all-reduce of the counts)."""
    results = run_ranks(_two_rank_step, tmp_path)
    expected, _ = _reference_mean(tiny_model().train(), _supervised_rows(4))
    assert [r["loss"] for r in results] == pytest.approx([expected, expected], rel=1e-5)


# ---------------------------------------------------------------------------------------
# Chat


CONVERSATION = [
    {"role": "system", "content": "You name Python packages."},
    {"role": "user", "content": "import os"},
    {"role": "assistant", "content": "os"},
    {"role": "user", "content": "import json\njson.dumps(1)"},
    {"role": "assistant", "content": "json"},
]


@pytest.mark.parametrize("template", sorted(chat.TEMPLATES))
def test_chat_trains_assistant_turns_only_and_renders_the_whole_conversation(template):
    """A chat record's segments join to the template's rendering; the trained (odd) segments
    hold exactly the assistant turns' contents (and chatml's closing tag)."""
    segments, problem = chat.render_segments(CONVERSATION, template)
    assert problem is None
    assert "".join(segments) == chat.render(CONVERSATION, template)
    trained = segments[1::2]
    end = "<|im_end|>" if template == "chatml" else ""
    assert trained == ["os" + end, "json" + end]


def test_bad_chat_record_is_one_line_naming_file_line_and_field(tmp_path):
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"messages": CONVERSATION}) + "\n"
                    + json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    spec = FileSpec(str(path), "chat", "chat.jsonl")
    docs, problems = parse_file(path.read_bytes(), spec)
    assert len(docs) == 1 and docs[0][1].startswith("\0")
    assert problems == [("missing_field",
                         f"{path}:2: field 'messages': no assistant message (nothing to train on)")]


def test_config_refuses_supervised_sources_without_bos_or_with_prepared_shards():
    with pytest.raises(ConfigError, match=r"^data.add_bos=False: must be true with pairs or chat"):
        load_config(None, ["data.sources.0.format=pairs", "data.sources.0.path=x.jsonl", "data.add_bos=false"])
    with pytest.raises(ConfigError, match=r"^data.prepared_path='p': prepared shards do not carry pairs"):
        load_config(None, ["data.sources.0.format=chat", "data.sources.0.path=x.jsonl", "data.prepared_path=p"])
    cfg = load_config(None, ["data.sources.0.format=pairs", "data.sources.0.path=x.jsonl"])
    assert cfg.data.supervised and cfg.data.documents_masked
    assert not load_config(None, []).data.documents_masked


# ---------------------------------------------------------------------------------------
# End to end: fine-tune a raylm run on pairs (`--local`), resume, and the Ray path


SNIPPETS = {
    "os": ["os.path.join(a, b)", "os.getcwd()", "os.listdir('.')", "os.environ.get('HOME')"],
    "json": ["json.dumps(data)", "json.loads(text)", "json.dump(obj, f)", "json.JSONDecoder()"],
    "re": ["re.compile(pattern)", "re.sub('a', 'b', s)", "re.findall(r'\\d+', s)", "re.match(p, s)"],
    "math": ["math.sqrt(x)", "math.floor(2.5)", "math.pi * r * r", "math.log(x, 2)"],
}


def write_task(path: Path, copies: int = 5) -> Path:
    """Pairs in the stdlib task's shape (prompt "<snippet>\\nPackage:", completion " <label>"),
    and one record without its completion."""
    lines = [json.dumps({"prompt": f"{code}  # {k}\nPackage:", "completion": f" {label}"})
             for k in range(copies) for label, codes in SNIPPETS.items() for code in codes]
    lines.insert(7, json.dumps({"prompt": "import sys\nPackage:"}))
    path.write_text("\n".join(lines) + "\n")
    return path


def base_overrides(out: Path) -> list[str]:
    return ["model.preset=debug", "model.vocab_size=512", "model.max_seq_len=64", "data.seq_len=64",
            "data.sources.0.max_bytes=200000", "tokenizer.sample_bytes=100000", "train.max_steps=3",
            "train.global_batch_tokens=256", "train.micro_batch_size=2", "train.eval_every=0",
            "train.checkpoint_every=3", "train.log_every=1", "optimizer.warmup_steps=1", "optimizer.lr=3e-3",
            f"run.output_dir={out}", "run.sample_tokens=0"]


def finetune_overrides(out: Path, base: str, task: Path, steps: int, *extra: str) -> list[str]:
    return base_overrides(out) + [
        f"model.init_from={base}", "data.sources.0.path=" + str(task), "data.sources.0.format=pairs",
        "data.sources.0.max_bytes=null", "data.val_fraction=0.2", "data.on_error=skip",
        f"train.max_steps={steps}", "train.checkpoint_every=2", "train.eval_every=2", "train.eval_batches=1",
        "optimizer.lr=1e-3", *extra]


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    from raylm.train.local import train_local

    out = tmp_path_factory.mktemp("ft_base")
    return train_local(load_config(None, base_overrides(out)), log=lambda line: None)


def test_finetune_from_a_raylm_run_loads_its_weights_keeps_its_tokenizer_counts_bad_records_and_resumes(
        base_run, tmp_path):
    """`model.init_from=RUN` starts from the run's newest checkpoint's weights (step-0 held-out
    loss equals the base model's on the same rows) at step 0 with a fresh optimizer, with the
    run's tokenizer (same bytes); the record without a completion is a counted skip; resuming
    the fine-tune in place continues its own checkpoints, not the import."""
    from raylm.data.local import local_datasets
    from raylm.data.order import DataPosition, rounds_per_step
    from raylm.tokenizer import Tokenizer
    from raylm.train.local import train_local
    from raylm.train.step import evaluate
    from raylm.use.load import load_model

    task = write_task(tmp_path / "train.jsonl")
    lines: list[str] = []
    cfg = load_config(None, finetune_overrides(tmp_path / "ft", base_run.run_dir, task, 2))
    result = train_local(cfg, log=lines.append)
    run = Path(result.run_dir)
    assert (run / "tokenizer.model").read_bytes() == (Path(base_run.run_dir) / "tokenizer.model").read_bytes()
    assert f"initial weights from {base_run.checkpoint}" in lines
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2]
    assert records[-1]["bad_input_skipped"] == 1

    base_model, tokenizer, _ = load_model(base_run.checkpoint)
    _, val = local_datasets(cfg, Tokenizer.load(run / "tokenizer.model"))
    B, E = cfg.train.micro_batch_size, cfg.eval_sequences
    it = val.micro_batches(DataPosition(), 0, 1, B, E)
    expected = evaluate(base_model, (next(it) for _ in range(rounds_per_step(E, 1, B))), torch.device("cpu"),
                        "fp32", document_mask=True, supervised=True)
    step0 = next(r for r in records if r["step"] == 0)
    assert step0["val_loss"] == pytest.approx(expected["val_loss"], rel=1e-5)

    resumed = train_local(load_config(None, finetune_overrides(tmp_path / "ft", base_run.run_dir, task, 4,
                                                               f"run.resume_from={run}")), log=lines.append)
    assert resumed.run_dir == str(run)
    steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(x)]
    assert steps == [1, 2, 3, 4]


def test_init_from_a_run_of_another_shape_is_one_line(base_run, tmp_path):
    from raylm.train.runs import resolve_run

    task = write_task(tmp_path / "train.jsonl")
    cfg = load_config(None, finetune_overrides(tmp_path, base_run.run_dir, task, 2, "model.vocab_size=600"))
    with pytest.raises(ConfigError) as e:
        resolve_run(cfg)
    assert str(e.value) == (f"model.vocab_size=600: model.init_from={base_run.run_dir} was trained with "
                            "model.vocab_size=512; use its model settings (model.preset and the keys it overrides) "
                            "to start from its weights")


@pytest.mark.ray
@pytest.mark.slow
def test_ray_data_packs_pairs_with_their_masks_as_the_single_process_path(ray_cluster, base_run, tmp_path):
    """The Ray Data pipeline (read tasks, tokenizer actor pool, packing actor) makes the same
    rows from a pairs source, loss masks included, as `--local`'s path: the stream that
    `raylm train` hands its workers carries the mask, and its bad-input counter counts the
    record without a completion. The workers then run the trainer the `--local` test runs."""
    from raylm.data.local import local_documents
    from support import pack_documents
    from raylm.data.plan import plan_files
    from raylm.ray.data import iter_rows, packed_dataset
    from raylm.tokenizer import Tokenizer

    task = write_task(tmp_path / "train.jsonl")
    cfg = load_config(None, finetune_overrides(tmp_path / "ray", base_run.run_dir, task, 2,
                                               "data.tokenize_actors=1", "data.shuffle_files=false"))
    tokenizer = Tokenizer.load(Path(base_run.run_dir) / "tokenizer.model")
    expected = pack_documents(local_documents(cfg, "train"), tokenizer, cfg.data.seq_len, cfg.data.add_bos)
    pipeline = packed_dataset(cfg, tokenizer, plan_files(cfg, "train"), "train")
    rows = np.concatenate([b["tokens"] for b in iter_rows(pipeline.dataset)])
    assert (expected < 0).any() and np.array_equal(rows, expected)
    assert pipeline.bad_input()["skipped"] == {"missing_field": 1}


def write_chat(path: Path, copies: int = 6) -> Path:
    lines = []
    for k in range(copies):
        for label, codes in SNIPPETS.items():
            lines.append(json.dumps({"messages": [
                {"role": "system", "content": "Name the package."},
                {"role": "user", "content": f"{codes[k % 4]}  # {k}"},
                {"role": "assistant", "content": label}]}))
    path.write_text("\n".join(lines) + "\n")
    return path


def test_chat_fine_tune_exports_a_template_that_hugging_face_renders_as_raylm_does(base_run, tmp_path):
    """A `format: chat` run trains (assistant turns only) and `raylm export --format hf` writes
    its template to tokenizer_config.json: `apply_chat_template` renders a conversation to the
    very string raylm trained on. The other template is checked through the same files."""
    from transformers import AutoTokenizer

    from raylm.tokenizer import Tokenizer
    from raylm.train.local import train_local
    from raylm.use.hf import export_hf, tokenizer_files

    data = write_chat(tmp_path / "chat.jsonl")
    overrides = finetune_overrides(tmp_path / "chat", base_run.run_dir, data, 1, "data.sources.0.format=chat",
                                   "data.sources.0.template=chatml", "train.eval_every=0")
    result = train_local(load_config(None, overrides), log=lambda line: None)
    export_hf(result.run_dir, tmp_path / "hf", log=lambda line: None)
    hf = AutoTokenizer.from_pretrained(tmp_path / "hf")
    for generation_prompt in (False, True):
        rendered = hf.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=generation_prompt)
        assert rendered == chat.render(CONVERSATION, "chatml") + ("<|im_start|>assistant\n" if generation_prompt
                                                                  else "")
    tokenizer = Tokenizer.load(Path(base_run.run_dir) / "tokenizer.model")
    other = tmp_path / "llama2"
    other.mkdir()
    for name, data in tokenizer_files(tokenizer, True, 64, chat.JINJA["llama2"]).items():
        (other / name).write_bytes(data)
    for conversation in (CONVERSATION, CONVERSATION[1:]):
        assert AutoTokenizer.from_pretrained(other).apply_chat_template(conversation, tokenize=False) \
            == chat.render(conversation, "llama2")


def test_finetune_demo_config_starts_from_the_demo_runs_shape_on_pairs_with_a_lower_lr():
    """configs/finetune-demo.yaml loads, starts from the demo run with the demo model's shape
    (so `model.init_from` accepts it), trains on pairs with document masks, with a lower
    learning rate and fewer steps than the demo."""
    import dataclasses

    root = Path(__file__).resolve().parents[1]
    ft, demo = load_config(root / "configs/finetune-demo.yaml", []), load_config(root / "configs/demo.yaml", [])
    assert ft.model.init_from == "runs/demo"
    assert dataclasses.replace(ft.model, init_from="") == demo.model
    assert ft.data.sources[0].format == "pairs" and ft.data.documents_masked
    assert ft.optimizer.lr < demo.optimizer.lr and ft.train.max_steps < demo.train.max_steps
