"""`raylm eval RUN --task TASK.yaml`: a task file, its examples, and its metrics (choice, generate, loglikelihood).

A task file (YAML; docs/tasks.md) names a JSONL data file (local, or s3:// / gs://; a relative
path is relative to the task file), a kind, the fields, a prompt template and the metrics:

    kind: choice                 # choice | generate | loglikelihood
    data: test.jsonl
    prompt: "{text}\\nPackage:"   # str.format fields of each record
    choices: [json, email, ...]  # or fields.choices: a per-record list (multiple choice)
    target: " {choice}"          # how a choice follows the prompt (generate: " {answer}", for few-shot)
    fields: {label: label}       # choice: label; generate: answer; loglikelihood: text
    normalize: byte              # choice scores: log P per byte (default), per token, or none
    fewshot: {data: fewshot.jsonl, num: 3, seed: 0}
    separator: "\\n\\n"            # between few-shot examples and the question
    max_new_tokens: 32           # generate: greedy (temperature 0) or sampled, stop strings
    stop: ["\\n"]
    metrics: [accuracy, f1]      # default: all of the kind's

choice scores each choice by the log-likelihood of `target` rendered with it, divided by its
UTF-8 bytes (`normalize: byte`, lm-eval's acc_bytes: no bias to short or long labels, and the
same for any tokenizer); the prediction is the best. Metrics: accuracy; macro precision, recall
and F1 over the labels seen (gold or predicted; scikit-learn's `average="macro"`,
`zero_division=0`); a confusion matrix (rows gold, columns predicted). generate: exact match and
token F1 with SQuAD's normalisation (lower case, no punctuation, no articles, single spaces),
the best over a record's answers, and ROUGE-1/2/L F-measures (`rouge-score`, stemmed).
loglikelihood: perplexity per token and bits per byte of the texts, BOS given (raylm.use.score).

Few-shot examples come from `fewshot.data` (never the evaluated file), `num` per question, drawn
afresh for each question by a generator seeded with `fewshot.seed`.
"""

from __future__ import annotations

import json
import math
import random
import re
import string
import sys
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from raylm import storage
from raylm.data.parse import json_lines
from raylm.errors import ConfigError, DataError

KINDS = ("choice", "generate", "loglikelihood")
METRICS = {
    "choice": ["accuracy", "precision", "recall", "f1", "confusion"],
    "generate": ["exact_match", "f1", "rouge1", "rouge2", "rougeL"],
    "loglikelihood": ["perplexity", "bits_per_byte"],
}
ROLES = {"choice": ("label",), "generate": ("answer",), "loglikelihood": ("text",)}
NORMALIZE = ("byte", "token", "none")
_KEYS = {"kind", "data", "prompt", "choices", "target", "fields", "normalize", "fewshot", "separator",
         "max_new_tokens", "stop", "temperature", "seed", "metrics", "name", "description"}


@dataclass
class Task:
    """A parsed task file (see the module docstring)."""

    path: str
    kind: str
    data: str
    prompt: str = "{text}"
    choices: list[str] | None = None
    target: str = " {choice}"
    fields: dict[str, str] = field(default_factory=dict)
    normalize: str = "byte"
    fewshot_data: str | None = None
    num_fewshot: int = 0
    fewshot_seed: int = 0
    separator: str = "\n\n"
    max_new_tokens: int = 32
    stop: list[str] = field(default_factory=lambda: ["\n"])
    temperature: float = 0.0
    seed: int = 0
    metrics: list[str] = field(default_factory=list)
    name: str = ""

    def role(self, name: str) -> str:
        """The record field that plays `name` (label, answer, text, choices)."""
        return self.fields.get(name, name)


@dataclass
class Example:
    line: int
    record: dict[str, Any]
    prompt: str
    choices: list[str] = field(default_factory=list)
    label: str | None = None
    answers: list[str] = field(default_factory=list)
    text: str = ""


# ---------------------------------------------------------------------------------------
# Reading a task file


def load_task(path: str) -> Task:
    """The task of a YAML file; a ConfigError naming the file and key for anything wrong in it."""
    try:
        raw = yaml.safe_load(storage.read_bytes(path).decode("utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"--task {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"--task {path}: cannot read ({getattr(e, 'strerror', None) or e})") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"--task {path}: not YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"--task {path}: expected a mapping of task keys (kind, data, prompt, ...)")

    def bad(key: str, what: str) -> ConfigError:
        return ConfigError(f"{path}: {key}={raw.get(key)!r}: {what}")

    if unknown := sorted(set(raw) - _KEYS):
        raise ConfigError(f"{path}: unknown key {unknown[0]!r}; task keys are {', '.join(sorted(_KEYS))}")
    kind = raw.get("kind")
    if kind not in KINDS:
        raise bad("kind", f"must be one of {', '.join(KINDS)}")
    if not isinstance(raw.get("data"), str) or not raw["data"]:
        raise bad("data", "must name a JSONL file (local, s3:// or gs://)")
    task = Task(path=path, kind=kind, data=_beside(path, raw["data"]), name=raw.get("name") or Path(path).stem)
    for key in ("prompt", "target", "separator"):
        if key in raw:
            if not isinstance(raw[key], str):
                raise bad(key, "must be a string")
            setattr(task, key, raw[key])
    if kind == "loglikelihood" and "prompt" not in raw:
        task.prompt = ""
    if kind == "generate" and "target" not in raw:
        task.target = " {answer}"  # how a few-shot example's answer follows its prompt
    fields = raw.get("fields") or {}
    if not isinstance(fields, dict) or not all(isinstance(v, str) for v in fields.values()):
        raise bad("fields", "must map roles to field names, e.g. {label: label}")
    allowed_roles = set(ROLES[kind]) | ({"choices"} if kind == "choice" else set())
    if unknown := sorted(set(fields) - allowed_roles):
        raise bad("fields", f"{unknown[0]!r} is not a role of a {kind} task ({', '.join(sorted(allowed_roles))})")
    task.fields = dict(fields)
    if kind == "choice":
        choices = raw.get("choices")
        if choices is None and "choices" not in fields:
            raise bad("choices", "a choice task needs choices (a list) or fields.choices (a per-record list)")
        if choices is not None:
            if not isinstance(choices, list) or not choices or not all(isinstance(c, (str, int, float)) for c in choices):
                raise bad("choices", "must be a non-empty list of strings")
            task.choices = [str(c) for c in choices]
            if len(set(task.choices)) != len(task.choices):
                raise bad("choices", "holds a choice twice")
        normalize = raw.get("normalize", "byte")
        if normalize not in NORMALIZE:
            raise bad("normalize", f"must be one of {', '.join(NORMALIZE)}")
        task.normalize = normalize
        if "{choice}" not in task.target:
            raise bad("target", "must contain {choice}")
    fewshot = raw.get("fewshot")
    if fewshot is not None:
        if not isinstance(fewshot, dict) or not isinstance(fewshot.get("data"), str):
            raise bad("fewshot", "must be {data: FILE, num: N, seed: S}")
        task.fewshot_data = _beside(path, fewshot["data"])
        task.num_fewshot = _int(fewshot.get("num", 1), f"{path}: fewshot.num", 0)
        task.fewshot_seed = _int(fewshot.get("seed", 0), f"{path}: fewshot.seed", 0)
    if kind == "generate":
        task.max_new_tokens = _int(raw.get("max_new_tokens", 32), f"{path}: max_new_tokens", 1)
        stop = raw.get("stop", ["\n"])
        stop = [stop] if isinstance(stop, str) else stop
        if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
            raise bad("stop", "must be a string or a list of non-empty strings")
        task.stop = stop
        temperature = raw.get("temperature", 0.0)
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature >= 0:
            raise bad("temperature", "must be a number >= 0 (0 is greedy)")
        task.temperature = float(temperature)
        task.seed = _int(raw.get("seed", 0), f"{path}: seed", 0)
    metrics = raw.get("metrics", METRICS[kind])
    if isinstance(metrics, str):
        metrics = [metrics]
    if not isinstance(metrics, list) or not metrics or not all(m in METRICS[kind] for m in metrics):
        raise bad("metrics", f"a {kind} task's metrics are {', '.join(METRICS[kind])}")
    task.metrics = list(metrics)
    return task


def _int(value, key: str, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"{key}={value!r}: must be an integer >= {low}")
    return value


def _beside(task_path: str, data: str) -> str:
    if storage.is_uri(data) or Path(data).is_absolute():
        return data
    if storage.is_uri(task_path):
        return str(storage.child(storage.parent_of(task_path), data))
    return str(Path(task_path).parent / data)


def _template_fields(template: str) -> list[str]:
    try:
        return [name for _, name, _, _ in string.Formatter().parse(template) if name]
    except ValueError as e:
        raise ConfigError(f"template {template!r}: {e}") from None


def read_examples(task: Task, path: str, limit: int | None = None) -> list[Example]:
    """The examples of a JSONL file, checked: one DataError naming the file, line and field for
    a record that is not JSON, lacks a field, has no choices or a label outside them."""
    try:
        data = storage.read_bytes(path)
    except FileNotFoundError:
        raise DataError(f"{path}: no such file (named by {task.path})") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read ({getattr(e, 'strerror', None) or e})") from None
    needed = _template_fields(task.prompt)
    examples = []
    for number, record in json_lines(data.decode("utf-8", errors="replace").splitlines(), path):
        if not isinstance(record, dict):
            raise DataError(f"{path} line {number}: expected a JSON object")
        examples.append(_example(task, path, number, record, needed))
        if limit is not None and len(examples) >= limit:
            break
    if not examples:
        raise DataError(f"{path}: holds no examples")
    return examples


def _example(task: Task, path: str, number: int, record: dict, needed: list[str]) -> Example:
    where = f"{path} line {number}"

    def get(role: str):
        name = task.role(role)
        if name not in record or record[name] is None:
            raise DataError(f"{where}: field {name!r} missing")
        return record[name]

    for name in needed:
        if name not in record:
            raise DataError(f"{where}: field {name!r} missing (the prompt template uses it)")
    try:
        prompt = task.prompt.format_map(record)
    except (KeyError, IndexError, ValueError) as e:
        raise DataError(f"{where}: prompt template {task.prompt!r} does not render ({e})") from None
    example = Example(number, record, prompt)
    if task.kind == "choice":
        choices = task.choices
        if choices is None:
            choices = get("choices")
            if not isinstance(choices, list) or not choices:
                raise DataError(f"{where}: field {task.role('choices')!r}: empty choices (needs a non-empty list)")
            choices = [str(c) for c in choices]
        label = get("label")
        if isinstance(label, int) and not isinstance(label, bool) and str(label) not in choices:
            if not 0 <= label < len(choices):
                raise DataError(f"{where}: field {task.role('label')!r}: index {label} outside the "
                                f"{len(choices)} choices")
            label = choices[label]
        if str(label) not in choices:
            shown = ", ".join(choices[:8]) + (", ..." if len(choices) > 8 else "")
            raise DataError(f"{where}: field {task.role('label')!r}: label {label!r} not among the choices ({shown})")
        example.choices, example.label = choices, str(label)
    elif task.kind == "generate":
        answers = get("answer")
        answers = answers if isinstance(answers, list) else [answers]
        if not answers or not all(isinstance(a, str) for a in answers):
            raise DataError(f"{where}: field {task.role('answer')!r}: must be a string or a list of strings")
        example.answers = answers
    else:
        text = get("text")
        if not isinstance(text, str) or not text:
            raise DataError(f"{where}: field {task.role('text')!r}: must be a non-empty string")
        example.text = text
    return example


# ---------------------------------------------------------------------------------------
# Few-shot contexts


def shot_text(task: Task, example: Example) -> str:
    """A solved example: its prompt followed by its answer."""
    if task.kind == "choice":
        return example.prompt + task.target.format(choice=example.label)
    if task.kind == "generate":
        return example.prompt + task.target.replace("{choice}", "{answer}").format(answer=example.answers[0])
    return example.prompt + example.text


def contexts(task: Task, examples: list[Example]) -> list[str]:
    """Each example's context: `num_fewshot` solved examples drawn from the few-shot file, then its prompt."""
    if not task.num_fewshot:
        return [e.prompt for e in examples]
    if task.fewshot_data is None:
        raise ConfigError(f"{task.path}: fewshot.num={task.num_fewshot} needs fewshot.data")
    pool = read_examples(task, task.fewshot_data)
    if len(pool) < task.num_fewshot:
        raise ConfigError(f"{task.path}: fewshot.num={task.num_fewshot} but {task.fewshot_data} holds "
                          f"{len(pool)} examples")
    rng = random.Random(task.fewshot_seed)
    out = []
    for e in examples:
        shots = rng.sample(pool, task.num_fewshot)
        out.append(task.separator.join([shot_text(task, s) for s in shots] + [e.prompt]))
    return out


# ---------------------------------------------------------------------------------------
# Metrics (independent of the model: recomputable from the --json predictions)


def classification_metrics(gold: list[str], predicted: list[str], labels: list[str] | None = None) -> dict:
    """Accuracy; macro precision, recall and F1 over the labels that occur (gold or predicted),
    a label never predicted counting precision 0 (scikit-learn's zero_division=0); and the
    confusion matrix over `labels` (default: those that occur, sorted): rows gold, columns predicted."""
    seen = sorted(set(gold) | set(predicted))
    precision = recall = f1 = 0.0
    for label in seen:
        tp = sum(g == p == label for g, p in zip(gold, predicted))
        n_pred = sum(p == label for p in predicted)
        n_gold = sum(g == label for g in gold)
        p = tp / n_pred if n_pred else 0.0
        r = tp / n_gold if n_gold else 0.0
        precision += p
        recall += r
        f1 += 2 * p * r / (p + r) if p + r else 0.0
    n = len(seen) or 1
    labels = labels or seen
    index = {label: i for i, label in enumerate(labels)}
    matrix = [[0] * len(labels) for _ in labels]
    for g, p in zip(gold, predicted):
        if g in index and p in index:
            matrix[index[g]][index[p]] += 1
    return {"accuracy": sum(g == p for g, p in zip(gold, predicted)) / max(len(gold), 1),
            "precision": precision / n, "recall": recall / n, "f1": f1 / n,
            "confusion": {"labels": labels, "matrix": matrix}}


def normalize_answer(text: str) -> str:
    """SQuAD's: lower case, punctuation and articles (a, an, the) removed, whitespace collapsed."""
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def token_f1(prediction: str, answer: str) -> float:
    """SQuAD's token F1 between normalised texts."""
    pred, gold = normalize_answer(prediction).split(), normalize_answer(answer).split()
    if not pred or not gold:
        return float(pred == gold)
    common = sum((Counter(pred) & Counter(gold)).values())
    if common == 0:
        return 0.0
    p, r = common / len(pred), common / len(gold)
    return 2 * p * r / (p + r)


def rouge_scorer():
    try:
        from rouge_score import rouge_scorer as rs
    except ImportError:
        raise ConfigError("ROUGE needs the rouge-score package: pip install 'raylm[eval]' "
                          "(or leave rouge1/rouge2/rougeL out of the task's metrics)") from None
    return rs.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)


def generation_scores(prediction: str, answers: list[str], rouge) -> dict[str, float]:
    """Per example: the best over the answers of each score."""
    out = {"exact_match": max(float(normalize_answer(prediction) == normalize_answer(a)) for a in answers),
           "f1": max(token_f1(prediction, a) for a in answers)}
    if rouge is not None:
        for key in ("rouge1", "rouge2", "rougeL"):
            out[key] = max(rouge.score(a, prediction)[key].fmeasure for a in answers)
    return out


# ---------------------------------------------------------------------------------------
# Running a task


def predict(task: Task, scorer, examples: list[Example], ctxs: list[str], *, progress=None,
            indices: list[int] | None = None) -> list[dict]:
    """Each example's prediction and scores, given its context (`contexts`, drawn once for the
    whole file so that any share of it scores the same). `indices`: the examples' places in
    the whole file (default 0, 1, ...): a sampled generation draws from the seed `task.seed +`
    its index, so a share scored elsewhere (the Ray path) samples what the whole would."""
    if task.kind == "choice":
        return _predict_choice(task, scorer, examples, ctxs, progress)
    if task.kind == "generate":
        return _predict_generate(task, scorer, examples, ctxs, progress, indices)
    return _predict_loglikelihood(scorer, examples, progress)


def task_metrics(task: Task, predictions: list[dict]) -> dict:
    """The task's metrics from its predictions alone (what --json holds)."""
    n = len(predictions)
    if task.kind == "choice":
        metrics = classification_metrics([p["label"] for p in predictions], [p["prediction"] for p in predictions],
                                         task.choices)
        metrics = {k: v for k, v in metrics.items() if k in task.metrics}
    elif task.kind == "generate":
        metrics = {m: sum(p.get(m, 0.0) for p in predictions) / n for m in task.metrics}
    else:
        total = sum(p["logprob"] for p in predictions)
        tokens, nbytes = sum(p["tokens"] for p in predictions), sum(p["bytes"] for p in predictions)
        metrics = {"perplexity": math.exp(min(-total / max(tokens, 1), 700.0)),
                   "bits_per_byte": -total / (math.log(2) * max(nbytes, 1))}
        metrics = {k: v for k, v in metrics.items() if k in task.metrics}
        metrics.update(tokens=tokens, bytes=nbytes)
    metrics["examples"] = n
    return metrics


def _predict_choice(task: Task, scorer, examples: list[Example], ctxs: list[str], progress) -> list[dict]:
    requests, spans = [], []
    for ctx, e in zip(ctxs, examples):
        start = len(requests)
        requests += [(ctx, task.target.format(choice=c)) for c in e.choices]
        spans.append((start, len(requests)))
    continuation_tokens = None
    if task.normalize == "token":
        continuation_tokens = [len(scorer.encode_pair(c, x)[1]) for c, x in requests]
    scores = scorer.loglikelihood(requests, progress=progress)
    predictions = []
    for e, (start, end) in zip(examples, spans):
        logprobs = [scores[k][0] for k in range(start, end)]
        if task.normalize == "byte":
            norm = [lp / max(len(requests[k][1].encode("utf-8")), 1) for lp, k in zip(logprobs, range(start, end))]
        elif task.normalize == "token":
            norm = [lp / max(continuation_tokens[k], 1) for lp, k in zip(logprobs, range(start, end))]
        else:
            norm = logprobs
        best = max(range(len(norm)), key=lambda i: norm[i])
        predictions.append({"line": e.line, "label": e.label, "prediction": e.choices[best],
                            "correct": e.choices[best] == e.label, "choices": e.choices,
                            "logprobs": logprobs, "scores": norm})
    return predictions


def _predict_generate(task: Task, scorer, examples: list[Example], ctxs: list[str], progress,
                      indices: list[int] | None) -> list[dict]:
    rouge = rouge_scorer() if any(m.startswith("rouge") for m in task.metrics) else None
    outputs = scorer.generate_until(ctxs, stop=task.stop, max_new_tokens=task.max_new_tokens,
                                    temperature=task.temperature, seed=task.seed, progress=progress,
                                    seed_index=indices)
    predictions = []
    for e, out in zip(examples, outputs):
        scores = generation_scores(out.strip(), e.answers, rouge)
        predictions.append({"line": e.line, "answers": e.answers, "prediction": out.strip(), **scores})
    return predictions


def _predict_loglikelihood(scorer, examples: list[Example], progress) -> list[dict]:
    logprobs = scorer.loglikelihood_rolling([e.prompt + e.text for e in examples], progress=progress)
    return [{"line": e.line, "logprob": lp, "tokens": len(scorer.encode(e.prompt + e.text)),
             "bytes": len((e.prompt + e.text).encode("utf-8"))} for e, lp in zip(examples, logprobs)]


# ---------------------------------------------------------------------------------------
# Printing


def format_result(task: Task, where: str, metrics: dict) -> str:
    lines = [f"raylm eval: {where}: task {task.name} ({task.kind}"
             + (f", {task.num_fewshot}-shot" if task.num_fewshot else ", zero-shot")
             + (f", log-likelihood per {task.normalize}" if task.kind == "choice" and task.normalize != "none" else "")
             + f", {metrics['examples']:,} examples)"]
    for key, value in metrics.items():
        if key == "confusion" or key == "examples":
            continue
        name = {"f1": "macro F1" if task.kind == "choice" else "token F1", "precision": "macro precision",
                "recall": "macro recall", "exact_match": "exact match"}.get(key, key.replace("_", " "))
        lines.append(f"  {name:<24}{value:>14.4f}" if isinstance(value, float) else f"  {name:<24}{value:>14,}")
    if "confusion" in metrics:
        lines += format_confusion(metrics["confusion"])
    return "\n".join(lines)


def format_confusion(confusion: dict) -> list[str]:
    labels, matrix = confusion["labels"], confusion["matrix"]
    width = max(4, *(len(str(v)) + 1 for row in matrix for v in row))
    names = [f"{label[:16]} ({i})" for i, label in enumerate(labels)]
    pad = max(len(n) for n in names) + 1
    lines = ["  confusion (rows: gold, columns: predicted)"]
    lines.append("  " + " " * pad + "".join(f"{f'({i})':>{width}}" for i in range(len(labels))))
    for name, row in zip(names, matrix):
        lines.append(f"  {name:<{pad}}" + "".join(f"{v:>{width}}" for v in row))
    return lines


RAY_THRESHOLD_EXAMPLES = 20_000
"""`--ray auto` scores a task in a Ray Data actor pool above this many examples."""

RayPredict = Callable[[str, Task, list[Example], list[str], int, str], list[dict]]
"""(checkpoint, task, examples, their contexts, batch size, device) -> predictions in the examples'
order: the Ray path (raylm.ray.evaluate.ray_task_predictions), handed in by the CLI."""


def task_command(path: str, task_path: str, *, json_path: str | None = None, batch_size: int = 8,
                 limit: int | None = None, device: str = "auto", num_fewshot: int | None = None,
                 use_ray: str = "no", ray_predict: RayPredict | None = None, out=None) -> dict:
    """`raylm eval RUN --task TASK.yaml`: load, evaluate, print; write --json. `use_ray` yes (or
    auto above RAY_THRESHOLD_EXAMPLES examples): `ray_predict` scores them in a Ray Data actor
    pool, each actor loading the model once; contexts and metrics are made here either way, so
    both paths give the same --json."""
    from tqdm import tqdm

    from raylm.use.generate import device_from_name
    from raylm.use.load import load_model, resolve_checkpoint
    from raylm.use.score import Scorer

    out = sys.stdout if out is None else out
    if batch_size is not None and batch_size < 1:
        raise ConfigError(f"--batch-size={batch_size}: must be at least 1")
    if limit is not None and limit < 1:
        raise ConfigError(f"--max-examples={limit}: must be at least 1")
    task = load_task(task_path)
    if num_fewshot is not None:
        task.num_fewshot = _int(num_fewshot, "--num-fewshot", 0)
    if use_ray not in ("auto", "yes", "no"):
        raise ConfigError(f"--ray={use_ray!r}: must be auto, yes or no")
    examples = read_examples(task, task.data, limit)  # bad data is said before a model is loaded
    ctxs = contexts(task, examples)
    checkpoint = resolve_checkpoint(path)
    ray = use_ray == "yes" or (use_ray == "auto" and len(examples) > RAY_THRESHOLD_EXAMPLES)
    if ray:
        if ray_predict is None:
            raise ConfigError("--ray yes: the Ray path is not available to this caller")
        predictions = ray_predict(str(checkpoint), task, examples, ctxs, batch_size or 8, device)
    else:
        model, tokenizer, cfg = load_model(checkpoint, device_from_name(device), verified=True)
        scorer = Scorer(model, tokenizer, add_bos=cfg.data.add_bos, batch_size=batch_size or 8,
                        window=cfg.data.seq_len)
        total = len(examples) * (len(examples[0].choices) if task.kind == "choice" else 1)
        with tqdm(total=total, unit="req", desc=f"eval {task.name}", disable=not sys.stderr.isatty()) as bar:
            predictions = predict(task, scorer, examples, ctxs, progress=bar.update)
    result = {"metrics": task_metrics(task, predictions), "predictions": predictions}
    print(format_result(task, str(checkpoint), result["metrics"]), file=out)
    record = {"checkpoint": str(checkpoint), "task": task_path, "kind": task.kind, "num_fewshot": task.num_fewshot,
              "normalize": task.normalize if task.kind == "choice" else None,
              "pipeline": "ray" if ray else "local", **result}
    if json_path:
        try:
            storage.write_bytes(storage.location(json_path), (json.dumps(record, indent=1) + "\n").encode())
        except OSError as e:
            raise ConfigError(f"--json {json_path}: cannot write ({getattr(e, 'strerror', None) or e})") from None
    return record
