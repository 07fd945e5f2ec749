"""`raylm eval`: held-out loss, perplexity, next-token accuracy and bits per byte of a trained model.

The text is packed exactly as training packs it (`raylm.data.transforms`: documents framed as
[BOS] tokens [EOS], cut into rows of seq_len + 1), so on the run's own held-out split the first
`Config.eval_sequences` rows are the rows the training run's evaluations read and the loss is
the same (tested). Any other corpus (`--data`: a file, directory, glob or URI in any format raylm
reads) is read in file order with nothing held out.

Bits per byte: the summed loss in bits over the UTF-8 bytes of the text the targets spell,
    bits_per_byte = loss * tokens / (ln 2 * bytes)
where `loss` is the mean cross-entropy in nats per target token. A token's bytes are those of
its piece (`▁` is one space, a byte-fallback piece `<0xNN>` one byte); BOS, EOS and other
control tokens spell none, yet their prediction is part of the loss, as in training. Unlike
perplexity it does not depend on the vocabulary, so models with different tokenizers compare.
On a pairs or chat run's own split, the loss, the target tokens and their bytes are those of the
trained (completion) targets only, as training's held-out loss counts them.

Small corpora are tokenised in this process, one file at a time; large ones (above
`RAY_THRESHOLD_BYTES`, or `--ray yes`) through the Ray Data pipeline that training uses, whose
rows are the same row for row. The CLI hands in that Ray path (`ray_rows`): nothing here imports
Ray.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from raylm.config import Config, SourceConfig
from raylm.data.local import planned_rows
from raylm.data.plan import plan_files
from raylm.data.transforms import TOKEN_DTYPE
from raylm.errors import ConfigError, DataError, EmptySplit
from raylm.tokenizer import Tokenizer
from raylm.train.step import IGNORE_INDEX, inputs_targets, loss_and_correct

RAY_THRESHOLD_BYTES = 64 * 2**20
"""`--ray auto` tokenises through Ray Data above this much text: one process does ~1-2 MB/s."""
_FORMATS = {".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet", ".pq": "parquet"}

RowSource = Callable[[Config, Tokenizer, str, int | None], Iterator[np.ndarray]]
"""(data config, tokenizer, split, max rows) -> arrays of packed rows (n, seq_len + 1), in order."""


# ---------------------------------------------------------------------------------------
# What is evaluated


def token_bytes(tokenizer: Tokenizer) -> np.ndarray:
    """UTF-8 bytes of text each id spells: (vocab_size,) int64."""
    sp = tokenizer.sp
    out = np.zeros(tokenizer.vocab_size, dtype=np.int64)
    for i in range(tokenizer.vocab_size):
        if sp.is_control(i) or sp.is_unknown(i):
            continue
        out[i] = 1 if sp.is_byte(i) else len(sp.id_to_piece(i).replace("\u2581", " ").encode("utf-8"))
    return out


def data_config(run_cfg: Config, data: str, fmt: str | None = None, text_key: str = "text") -> Config:
    """The run's config reading `data` instead of its corpus: one source, in file order, nothing
    held out; packing (seq_len, BOS) and the bad-input policy stay the run's."""
    if fmt is None:
        fmt = _FORMATS.get(Path(data.rstrip("/")).suffix.lower(), "text")
    if fmt not in ("text", "lines", "jsonl", "parquet"):
        raise ConfigError(f"--format={fmt!r}: must be text, lines, jsonl or parquet")
    source = SourceConfig(path=data, format=fmt, field=text_key, column=text_key)
    d = dataclasses.replace(run_cfg.data, sources=[source], val_fraction=0.0, shuffle_files=False,
                            prepared_path=None)
    return dataclasses.replace(run_cfg, data=d)


def local_rows(cfg: Config, tokenizer: Tokenizer, split: str, max_rows: int | None) -> Iterator[np.ndarray]:
    """Packed rows of `split` made in this process, a file at a time (memory: one file plus a batch)."""
    return planned_rows(cfg, tokenizer, split, max_rows, mixture=False)


# ---------------------------------------------------------------------------------------
# The numbers


@dataclass
class EvalTotals:
    """Sums over every target token evaluated."""

    loss_nats: float = 0.0
    correct: int = 0
    tokens: int = 0
    bytes: int = 0
    sequences: int = 0

    def result(self) -> dict[str, float | int]:
        if self.tokens == 0:
            raise EmptySplit("no sequence to evaluate: the data holds less than one sequence of data.seq_len tokens")
        loss = self.loss_nats / self.tokens
        return {
            "loss": loss,
            "perplexity": math.exp(min(loss, 700.0)),
            "accuracy": self.correct / self.tokens,
            "bits_per_byte": self.loss_nats / (math.log(2) * self.bytes) if self.bytes else float("nan"),
            "tokens": self.tokens,
            "bytes": self.bytes,
            "sequences": self.sequences,
        }


@torch.no_grad()
def evaluate_rows(model: torch.nn.Module, row_arrays, tokenizer: Tokenizer, *, batch_size: int, precision: str,
                  on_batch: Callable[[int], None] | None = None, document_mask: bool = False,
                  supervised: bool = False) -> EvalTotals:
    """The loss, accuracy, tokens and bytes of every row of `row_arrays` ((n, seq_len + 1) each),
    over the targets training's loss counts (`raylm.train.step.inputs_targets`): all of them for
    plain text; for pairs and chat (`supervised`) the completion tokens only, with each packed
    document attending to itself when the run's data did (`document_mask`)."""
    device = next(model.parameters()).device
    spelled = torch.from_numpy(token_bytes(tokenizer))
    totals = EvalTotals()
    model.eval()
    for rows in row_arrays:
        for start in range(0, len(rows), batch_size):
            chunk = np.array(rows[start:start + batch_size], dtype=TOKEN_DTYPE)  # a writable copy
            tokens = torch.from_numpy(chunk).to(device=device, dtype=torch.long)  # (B, L + 1)
            loss_sum, correct = loss_and_correct(model, tokens, precision, document_mask, supervised)
            _, targets, _ = inputs_targets(tokens.cpu(), False, supervised)  # (B, L)
            trained = targets[targets != IGNORE_INDEX]  # (n,): the targets the loss summed over
            totals.loss_nats += float(loss_sum)
            totals.correct += int(correct)
            totals.tokens += trained.numel()
            totals.bytes += int(spelled[trained].sum())
            totals.sequences += len(chunk)
            if on_batch is not None:
                on_batch(len(chunk))
    return totals


# ---------------------------------------------------------------------------------------
# `raylm eval`


def format_table(where: str, result: dict) -> str:
    rows = [
        ("loss (nats per token)", f"{result['loss']:.4f}"),
        ("perplexity", f"{result['perplexity']:.3f}"),
        ("next-token accuracy", f"{result['accuracy']:.4f}"),
        ("bits per byte", f"{result['bits_per_byte']:.4f}"),
        ("sequences", f"{result['sequences']:,}"),
        ("target tokens", f"{result['tokens']:,}"),
        ("bytes of text", f"{result['bytes']:,}"),
    ]
    return "\n".join([f"raylm eval: {where}"] + [f"  {name:<24}{value:>14}" for name, value in rows])


def eval_command(path: str, *, data: str | None = None, fmt: str | None = None, text_key: str = "text",
                 max_sequences: int | None = None, batch_size: int | None = None, use_ray: str = "auto",
                 device: str = "auto", json_path: str | None = None, ray_rows: RowSource | None = None,
                 out=None) -> dict:
    """Evaluate the model of `path` (a run or checkpoint) on `data`, or on the run's own held-out
    split; print one table, and write the numbers as JSON to `json_path` when given."""
    from tqdm import tqdm

    from raylm.use.generate import device_from_name
    from raylm.use.load import load_model, resolve_checkpoint

    out = sys.stdout if out is None else out
    if max_sequences is not None and max_sequences < 1:
        raise ConfigError(f"--max-sequences={max_sequences}: must be at least 1")
    if batch_size is not None and batch_size < 1:
        raise ConfigError(f"--batch-size={batch_size}: must be at least 1")
    if use_ray not in ("auto", "yes", "no"):
        raise ConfigError(f"--ray={use_ray!r}: must be auto, yes or no")
    checkpoint = resolve_checkpoint(path)
    model, tokenizer, run_cfg = load_model(checkpoint, device_from_name(device), verified=True)
    if data is None:
        cfg, split, what = run_cfg, "validation", "the run's held-out split"
    else:
        cfg, split, what = data_config(run_cfg, data, fmt, text_key), "train", data
    try:
        plan = plan_files(cfg, split, mixture=False)
    except EmptySplit:
        raise DataError(f"{what}: holds no documents to evaluate"
                        + (" (data.val_fraction is 0)" if data is None else "")) from None
    except (ConfigError, DataError) as e:  # said of the config's source; here it is the --data argument
        if data is None or e.key != "data.sources.0.path":
            raise
        raise e.said_of(key="--data", value=data) from None
    ray = use_ray == "yes" or (use_ray == "auto" and plan.total_bytes > RAY_THRESHOLD_BYTES)
    if ray and ray_rows is None:
        raise ConfigError("--ray yes: the Ray path is not available to this caller")
    rows = (ray_rows if ray else local_rows)(cfg, tokenizer, split, max_sequences)
    with tqdm(total=max_sequences, unit="seq", desc="eval", disable=not sys.stderr.isatty()) as bar:
        totals = evaluate_rows(model, rows, tokenizer, batch_size=batch_size or run_cfg.train.micro_batch_size,
                               precision=run_cfg.train.precision, on_batch=bar.update,
                               document_mask=cfg.data.documents_masked, supervised=cfg.data.supervised)
    result = totals.result()
    record = {"checkpoint": str(checkpoint), "data": data, "split": split, "seq_len": cfg.data.seq_len,
              "pipeline": "ray" if ray else "local", **result}
    print(format_table(f"{checkpoint} on {what} ({result['sequences']:,} sequences of {cfg.data.seq_len} tokens, "
                       f"{record['pipeline']} tokenising)", result), file=out)
    if json_path:
        try:
            Path(json_path).write_text(json.dumps(record, indent=2) + "\n")
        except OSError as e:
            raise ConfigError(f"--json {json_path}: cannot write ({e.strerror or e})") from None
    return record
