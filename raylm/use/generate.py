"""Text generation with the KV cache: sampling options, the token loop, streaming text, `raylm generate`.

The prompt is run once (prefill) and every new token then costs one position's work: the model's
`forward(tokens, cache, start_pos)` keeps the keys and values of earlier positions. When the
context reaches `model.max_seq_len`, the last half of it is run again from position 0 and
generation goes on (a sliding window in jumps; without the cache, the window slides by one).
Greedy output with the cache equals greedy output without it while the text fits the context
(tested token for token). Several prompts generate together in one batch (`generate_rows`, for
task evaluation), each row as it would alone; `raylm generate` runs one prompt at a time.

Only ids below the tokenizer's vocabulary are ever sampled: the model's embedding may have more
rows than the tokenizer has pieces (a small corpus yields fewer pieces than model.vocab_size),
and those rows were never trained as targets.

Text streams as it is made: sentencepiece may spell one character with several byte pieces, so
`TextStream` holds text back until the bytes form whole characters.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import torch

from raylm.config import RunConfig
from raylm.data.parse import json_lines
from raylm.errors import ConfigError, DataError
from raylm.model import KVCache, Transformer
from raylm.tokenizer import Tokenizer


@dataclass
class SamplingOptions:
    """How the next token is chosen. Defaults suit a quick look at a model; temperature 0 is greedy."""

    max_new_tokens: int = 128
    """Tokens generated per prompt at most (fewer when EOS comes first)."""
    temperature: float = RunConfig.temperature  # one owner: the run's end-of-run samples
    """Divides the logits before sampling: below 1 sharpens, above 1 flattens; 0 is greedy."""
    top_k: int = RunConfig.top_k
    """Sample among the k most likely tokens only; 0 disables."""
    top_p: float = 1.0
    """Nucleus sampling: the smallest set of most likely tokens whose probability reaches p; 1 disables."""
    seed: int | None = None
    """Seed of the sampling generator; None draws a fresh one."""
    stop_at_eos: bool = True
    """End a continuation at the end-of-sequence token (not printed)."""

    def validate(self) -> None:
        """Raise ConfigError with one line naming the option and what is valid."""
        def bad(name: str, what: str) -> ConfigError:
            return ConfigError(f"--{name.replace('_', '-')}={getattr(self, name)!r}: {what}")

        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 0:
            raise bad("max_new_tokens", "must be an integer >= 0")
        if not self.temperature >= 0:
            raise bad("temperature", "must be >= 0 (0 is greedy)")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise bad("top_k", "must be an integer >= 0 (0 disables)")
        if not 0 < self.top_p <= 1:
            raise bad("top_p", "must be in (0, 1] (1 disables)")

    def generator(self) -> torch.Generator:
        generator = torch.Generator()
        if self.seed is None:
            generator.seed()
        else:
            generator.manual_seed(self.seed)
        return generator


# ---------------------------------------------------------------------------------------
# Choosing one token


def next_token(logits: torch.Tensor, options: SamplingOptions, generator: torch.Generator | None) -> int:
    """The next id from logits (V,) of the allowed ids. Sampling draws on the CPU, so a seed
    gives the same tokens on any device for the same probabilities."""
    if options.temperature == 0:
        return int(logits.argmax())  # the first of equal maxima, as transformers' greedy search
    logits = logits.float() / options.temperature  # (V,)
    if options.top_k and options.top_k < logits.numel():
        kth = torch.topk(logits, options.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if options.top_p < 1:
        sorted_logits, order = torch.sort(logits, descending=True)  # (V,)
        probs = torch.softmax(sorted_logits, dim=-1)  # (V,)
        # Drop a token when the ones before it already reach top_p; the most likely always stays.
        outside = (torch.cumsum(probs, dim=-1) - probs) >= options.top_p  # (V,)
        logits = logits.index_fill(0, order[outside], float("-inf"))
    probs = torch.softmax(logits, dim=-1).cpu()  # (V,)
    return int(torch.multinomial(probs, 1, generator=generator))


# ---------------------------------------------------------------------------------------
# The token loop


def generate_ids(model: Transformer, prompt_ids: list[int], options: SamplingOptions, *, vocab_limit: int,
                 eos_id: int | None, generator: torch.Generator | None = None,
                 use_cache: bool = True) -> Iterator[int]:
    """Yield new token ids one at a time as they are made (EOS ends the stream and is not yielded).

    `vocab_limit`: only ids below it are sampled (the tokenizer's vocabulary size). Without
    the cache every step re-runs the model over the last max_seq_len tokens: the reference the
    cached path is tested against, and no faster. One prompt: `generate_rows` with one row.
    """
    for _, token in generate_rows(model, [prompt_ids], options, vocab_limit=vocab_limit, eos_id=eos_id,
                                  generators=[generator], use_cache=use_cache):
        yield token


@torch.no_grad()
def generate_rows(model: Transformer, prompts: list[list[int]], options: SamplingOptions, *, vocab_limit: int,
                  eos_id: int | None, generators: list[torch.Generator | None], use_cache: bool = True,
                  stop: Callable[[int, int], bool] | None = None) -> Iterator[tuple[int, int]]:
    """Generate after several prompts at once; yield (row, token) as tokens are made.

    The rows move in lock-step by position, so no row is padded and each token sits at the
    position, and sees the keys, it would have alone (the same RoPE angles, no padding mask):
    the tokens that every prompt has are run at once, then one position per step for all rows,
    a row still inside its (longer) prompt taking its next prompt token instead of a new one.
    Batch prompts of similar length (`raylm.use.score` sorts them) so that tail stays short.
    A row ends at EOS (not yielded), after `options.max_new_tokens` tokens, or when
    `stop(row, token)` says so (a stop string); ended rows leave the batch and its KV cache.
    Row `r` draws from `generators[r]` (None: greedy only or an unseeded generator).
    """
    if any(not p for p in prompts):
        raise ValueError("generation needs at least one prompt token (a BOS, or some text)")
    if options.max_new_tokens == 0:
        return
    max_len = model.config.max_seq_len
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        ids = [list(p)[-max_len:] for p in prompts]  # each row's tokens so far: prompt, then new ones
        made = [0] * len(ids)
        rows = list(range(len(ids)))  # rows still generating, in the order of the batch
        n = min(len(x) for x in ids)  # tokens of each row that the next forward reads up to
        cache = KVCache(model.config) if use_cache else None
        start, filled = 0, 0  # ids[r][start] sits at cache position 0; positions filled
        while rows:
            if cache is None:
                logits = eager_forward(model, _batch([ids[r][:n][-max_len:] for r in rows], device))[:, -1]  # (B, V)
            else:
                if n - start > cache.max_len:
                    # Full: run the last half of the context again from position 0.
                    start, filled = n - max_len // 2, 0
                pending = _batch([ids[r][start + filled:n] for r in rows], device)  # (B, T)
                logits = eager_forward(model, pending, cache, filled)[:, -1]  # (B, V)
                filled = n - start
            ended = []
            for b, r in enumerate(rows):
                if len(ids[r]) > n:  # still inside its prompt
                    continue
                token = next_token(logits[b, :vocab_limit], options, generators[r])
                if options.stop_at_eos and token == eos_id:
                    ended.append(b)
                    continue
                ids[r].append(token)
                made[r] += 1
                yield r, token
                if made[r] >= options.max_new_tokens or (stop is not None and stop(r, token)):
                    ended.append(b)
            n += 1
            if ended:
                keep = [b for b in range(len(rows)) if b not in ended]
                rows = [rows[b] for b in keep]
                if cache is not None and rows:
                    index = torch.tensor(keep, device=device)
                    for layer in cache.layers:
                        layer.k, layer.v = layer.k[index], layer.v[index]  # (B', KV, max_len, D) each
    finally:
        model.train(was_training)


def eager_forward(model: Transformer, tokens: torch.Tensor, *cache_args) -> torch.Tensor:
    """The model's forward, eager even where training compiled the blocks (train.compile): every
    new length and position would otherwise trigger a recompilation."""
    with torch.compiler.set_stance("force_eager"):
        return model(tokens, *cache_args)


def _batch(rows: list[list[int]], device: torch.device) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.long, device=device)  # (B, T): rows of one length


# ---------------------------------------------------------------------------------------
# Text


class TextStream:
    """Turns ids into text as they come. Text is released once it decodes to whole characters
    (a multi-byte character may arrive as several byte pieces); the ids since the last newline
    are decoded together, so each step's cost stays bounded by a line."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.line: list[int] = []  # ids since the last released newline
        self.released = 0  # characters of decode(line) already released

    def push(self, token: int) -> str:
        self.line.append(token)
        text = self.tokenizer.decode(self.line)
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence so far: wait for its other bytes
            return ""
        return self._release(text)

    def flush(self) -> str:
        """Whatever is held back (a byte sequence that never completed prints as U+FFFD)."""
        return self._release(self.tokenizer.decode(self.line)) if self.line else ""

    def _release(self, text: str) -> str:
        new = text[self.released:]
        if text.endswith("\n"):
            self.line, self.released = [], 0
        else:
            self.released = len(text)
        return new


def generate(model: Transformer, tokenizer: Tokenizer, prompt: str, options: SamplingOptions, *,
             add_bos: bool = True, on_text: Callable[[str], None] | None = None,
             generator: torch.Generator | None = None, use_cache: bool = True) -> str:
    """The continuation of `prompt` (without the prompt); `on_text` receives it piece by piece
    as it is made. `generator` defaults to one seeded by `options.seed`."""
    options.validate()
    prompt_ids = ([tokenizer.bos_id] if add_bos else []) + tokenizer.encode_one(prompt)
    generator = options.generator() if generator is None else generator
    stream = TextStream(tokenizer)
    new: list[int] = []
    for token in generate_ids(model, prompt_ids, options, vocab_limit=tokenizer.vocab_size, eos_id=tokenizer.eos_id,
                              generator=generator, use_cache=use_cache):
        new.append(token)
        if on_text is not None and (piece := stream.push(token)):
            on_text(piece)
    if on_text is not None and (rest := stream.flush()):
        on_text(rest)
    return tokenizer.decode(new)


# ---------------------------------------------------------------------------------------
# `raylm generate`


def read_prompts(prompt: str | None, prompts_file: str | None, stdin: TextIO) -> list[str]:
    """The prompts of `raylm generate`: --prompt, else --prompts FILE (one prompt per line; a
    `.jsonl` file holds one JSON string or {"prompt": ...} per line, for prompts with newlines),
    else all of stdin as one prompt."""
    if prompt is not None:
        return [prompt]
    if prompts_file is None:
        return [stdin.read()]
    path = Path(prompts_file)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"--prompts {path}: cannot read ({getattr(e, 'strerror', None) or e})") from None
    if path.suffix != ".jsonl":
        prompts = [line for line in lines if line.strip()]
    else:
        prompts = []
        for number, record in json_lines(lines, f"--prompts {path}"):
            if isinstance(record, dict):
                record = record.get("prompt")
            if not isinstance(record, str):
                raise DataError(f'--prompts {path} line {number}: expected a JSON string or {{"prompt": "..."}}')
            prompts.append(record)
    if not prompts:
        raise DataError(f"--prompts {path}: holds no prompt")
    return prompts


def device_from_name(name: str) -> torch.device:
    """`auto`: the GPU when there is one, else the CPU; otherwise any torch device name."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"--device={name!r}: not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device={name}: no CUDA GPU is available here; use --device cpu")
    return device


def load_for_generation(path: str | Path, device: torch.device) -> tuple[Transformer, Tokenizer, object]:
    """`load_model` on `device`, cast to bf16 on a GPU (half the memory traffic per token; the
    norms and rope still compute in fp32 inside the model)."""
    from raylm.use.load import load_model

    model, tokenizer, cfg = load_model(path, device)
    if device.type == "cuda":
        model.to(torch.bfloat16)
    return model, tokenizer, cfg


def generate_command(path: str, prompts: list[str], options: SamplingOptions, device: str = "auto",
                     out: TextIO | None = None) -> list[str]:
    """`raylm generate`: each prompt followed by its continuation, streamed to `out` (stdout) as it is made."""
    options.validate()
    out = sys.stdout if out is None else out
    model, tokenizer, cfg = load_for_generation(path, device_from_name(device))
    generator = options.generator()  # one stream over all prompts: a seed reproduces the whole output

    def write(text: str) -> None:
        out.write(text)
        out.flush()

    outputs = []
    for i, prompt in enumerate(prompts):
        if len(prompts) > 1:
            write(f"=== prompt {i + 1}/{len(prompts)} ===\n")
        write(prompt)
        outputs.append(generate(model, tokenizer, prompt, options, add_bos=cfg.data.add_bos, on_text=write,
                                generator=generator))
        write("\n")
    return outputs
