"""`raylm task build stdlib --out DIR`: a classification task from the default corpus, on every machine.

Each example is a snippet of Python (a few consecutive lines of one file of the interpreter's
standard library) labelled by the package it comes from (`asyncio`, `email`, ...). Only packages
with at least `MIN_FILES` files of real code are labels, so each has files for both splits.

The split is by file: every snippet of a file is in one split, so a test snippet never shares a
file with a training one (files of one package share names and idioms; snippets of one file
share far more). The pretraining run's held-out files (`data.val_fraction` of the config's
corpus, `raylm.data.plan`) are never in the training split; they go to test, where the base
model has not read them either. Few-shot examples are drawn from training files.

Files written:

    DIR/train.jsonl    {"text", "label", "prompt", "completion", "file"}: prompt + completion is the
                       task's prompt template and target rendered (fine-tuning with format: pairs)
    DIR/test.jsonl     the same fields, other files
    DIR/fewshot.jsonl  a few training examples per label, for few-shot evaluation
    DIR/task.yaml      kind: choice over the labels, data: test.jsonl, fewshot: fewshot.jsonl
"""

from __future__ import annotations

import hashlib
import json
import random
from collections import defaultdict
from pathlib import Path

import yaml

from raylm.config import load_config
from raylm.data.corpus import stdlib_files, stdlib_root
from raylm.data.plan import plan_files
from raylm.errors import ConfigError, EmptySplit

MIN_FILES = 15
"""A package is a label when it has this many files of at least MIN_FILE_BYTES."""
MIN_FILE_BYTES = 500
TEST_FILE_FRACTION = 0.25
SNIPPET_LINES = 6
"""Lines per snippet at most; SNIPPET_CHARS bounds its length too (a few-shot prompt fits 256 tokens)."""
SNIPPET_CHARS = 240
SNIPPETS_PER_FILE = 8
MAX_TRAIN_PER_LABEL = 200
MAX_TEST_PER_LABEL = 40
FEWSHOT_PER_LABEL = 2
PROMPT = "{text}\nPackage:"
TARGET = " {choice}"
DEMO_DATA = ["data.sources.0.max_bytes=6000000", "data.val_fraction=0.05"]
"""configs/demo.yaml's corpus settings: the default run whose held-out files stay out of train."""


def _stable(text: str) -> float:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8, person=b"raylm-task").digest(), "big") / 2**64


def heldout_files(config: str | None) -> set[str]:
    """The files the pretraining config holds out (paths relative to the standard library's root)."""
    cfg = load_config(config, [] if config else DEMO_DATA)
    try:
        plan = plan_files(cfg, "validation", mixture=False)
    except EmptySplit:
        return set()
    root = stdlib_root()
    out = set()
    for f in plan.files:
        path = Path(f.path)
        if path.is_relative_to(root):
            out.add(path.relative_to(root).as_posix())
    return out


def snippets(text: str, rng: random.Random) -> list[str]:
    """Up to SNIPPETS_PER_FILE snippets of consecutive non-blank lines, from places spread over the file."""
    lines = [line.rstrip() for line in text.splitlines()]
    starts = [i for i, line in enumerate(lines) if line.strip() and not line.strip().startswith("#")]
    rng.shuffle(starts)
    out, used = [], set()
    for start in starts:
        if len(out) >= SNIPPETS_PER_FILE:
            break
        chunk = []
        for line in lines[start:start + SNIPPET_LINES]:
            if not line.strip() or len("\n".join(chunk + [line])) > SNIPPET_CHARS:
                break
            chunk.append(line)
        if len(chunk) < 2 or any(i in used for i in range(start, start + len(chunk))):
            continue
        used.update(range(start, start + len(chunk)))
        out.append("\n".join(chunk))
    return out


def record(text: str, label: str, file: str) -> dict:
    return {"text": text, "label": label, "prompt": PROMPT.format(text=text), "completion": TARGET.format(choice=label),
            "file": file}


def build_stdlib_task(out: str | Path, *, config: str | None = None, seed: int = 0) -> list[str]:
    """Write the task's files into `out` (new or empty); return lines that describe it."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"--out {out}: exists and is not an empty directory")
    root = stdlib_root()
    by_label: dict[str, list[str]] = defaultdict(list)
    for path in stdlib_files():
        parts = path.relative_to(root).parts
        if len(parts) > 1 and path.stat().st_size >= MIN_FILE_BYTES:
            by_label[parts[0]].append(path.relative_to(root).as_posix())
    labels = sorted(label for label, files in by_label.items() if len(files) >= MIN_FILES)
    held = heldout_files(config)
    rng = random.Random(seed)
    splits: dict[str, list[dict]] = {"train": [], "test": []}
    files_of: dict[str, set[str]] = {"train": set(), "test": set()}
    for label in labels:
        files = sorted(by_label[label], key=_stable)
        n_test = max(1, round(TEST_FILE_FRACTION * len(files)))
        test = [f for f in files if f in held]
        test += [f for f in files if f not in held][:max(0, n_test - len(test))]
        train = [f for f in files if f not in test]
        for split, chosen, cap in (("train", train, MAX_TRAIN_PER_LABEL), ("test", test, MAX_TEST_PER_LABEL)):
            made = []
            for file in chosen:
                text = (root / file).read_text(encoding="utf-8", errors="replace")
                made += [record(s, label, file) for s in snippets(text, rng)]
            rng.shuffle(made)
            splits[split] += made[:cap]
            files_of[split].update(r["file"] for r in made[:cap])
    assert not files_of["train"] & files_of["test"] and not files_of["train"] & held
    for split in splits.values():
        rng.shuffle(split)
    fewshot = []
    for label in labels:
        fewshot += [r for r in splits["train"] if r["label"] == label][:FEWSHOT_PER_LABEL]
    rng.shuffle(fewshot)
    out.mkdir(parents=True, exist_ok=True)
    for name, records in (("train", splits["train"]), ("test", splits["test"]), ("fewshot", fewshot)):
        (out / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    task = {"name": "stdlib", "description": "the standard-library package of a Python snippet",
            "kind": "choice", "data": "test.jsonl", "prompt": PROMPT, "choices": labels, "target": TARGET,
            "fields": {"label": "label"}, "normalize": "byte",
            "fewshot": {"data": "fewshot.jsonl", "num": 0, "seed": 0}}
    (out / "task.yaml").write_text(yaml.safe_dump(task, sort_keys=False, allow_unicode=True))
    counts = {s: len(r) for s, r in splits.items()}
    return [f"{out}/task.yaml: {len(labels)} labels ({', '.join(labels)})",
            f"{out}/train.jsonl: {counts['train']} snippets of {len(files_of['train'])} files",
            f"{out}/test.jsonl: {counts['test']} snippets of {len(files_of['test'])} other files "
            f"({len(held & files_of['test'])} of them held out by the pretraining config)",
            f"{out}/fewshot.jsonl: {len(fewshot)} training snippets"]
