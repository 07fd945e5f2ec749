"""The three things an evaluation asks of a language model, over a raylm model and tokenizer, batched.

    loglikelihood([(context, continuation)])  -> [(log P(continuation | context), is_greedy)]
    loglikelihood_rolling([text])             -> [log P(text)], in windows of the run's seq_len
    generate_until([prompt], stop, ...)       -> [continuation, cut at the first stop string]

These are lm-evaluation-harness's `LM` methods (raylm.use.harness wraps them as one) and task
evaluation's (raylm.use.tasks). Both agree with lm-eval's `HFLM` over `raylm export` (tested):

- A pair is tokenised as lm-eval does: trailing spaces of the context move to the continuation,
  the whole `context + continuation` is encoded, and the continuation's tokens are those after
  the context's own encoding (so a piece that spans the boundary is split as the text is).
- Every sequence starts with BOS when the run trained with `data.add_bos` (as its documents did).
- A sequence longer than the window keeps its last `window + 1` tokens (the context is cut
  from the left). Continuations of one context share one cut, the one the longest needs: a
  shorter one then sees up to (longest - its length) fewer of the context's first tokens than
  lm-eval's per-request cut would give it (only when the context overflows the window).
  Log-probabilities are over the model's whole output (fp32 log-softmax).
- Rolling windows: the first predicts the first `window` tokens after BOS; each next one
  predicts up to `window` new tokens with as much of the text before them as fits
  (lm-eval's `get_rolling_token_windows` with context 1, `make_disjoint_window`).

Continuations of one context (a question's choices) share one run of the context through a KV
cache; other rows go in batches sorted by length (longest first) so padding stays small; results
come back in the order asked (the numbers are a plain forward's either way; tested). Generation
runs the KV-cache loop of raylm.use.generate over a batch of prompts, each row as it would run
alone (greedy output equals one prompt at a time; tested).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from raylm.model import KVCache
from raylm.tokenizer import Tokenizer
from raylm.use.generate import SamplingOptions, eager_forward, generate_rows

Progress = Callable[[int], None]
"""Called with the number of requests just finished (a progress bar's `update`)."""


@dataclass
class Scorer:
    """A model and its tokenizer, ready to score and generate. `window`: the longest sequence
    one forward sees (default: the model's max_seq_len; the CLI passes the run's data.seq_len,
    the length it trained on)."""

    model: torch.nn.Module
    tokenizer: Tokenizer
    add_bos: bool = True
    batch_size: int = 8
    window: int | None = None

    def __post_init__(self) -> None:
        limit = self.model.config.max_seq_len
        self.window = min(self.window or limit, limit)
        self.device = next(self.model.parameters()).device

    # -- tokenising ---------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode_one(text) if text else []

    @property
    def prefix(self) -> list[int]:
        return [self.tokenizer.bos_id] if self.add_bos else []

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """(context ids with the BOS prefix, continuation ids), split as lm-eval splits them."""
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        whole = self.encode(context + continuation)
        context_ids = self.encode(context)
        return self.prefix + context_ids, whole[len(context_ids):]

    # -- the three primitives -----------------------------------------------------------

    def loglikelihood(self, requests: Sequence[tuple[str, str]],
                      progress: Progress | None = None) -> list[tuple[float, bool]]:
        """(summed log-probability of each continuation given its context, whether greedy decoding
        from the context would produce exactly the continuation's tokens)."""
        pairs = [self.encode_pair(c, x) for c, x in requests]
        for context, continuation in pairs:
            if not continuation:
                raise ValueError("loglikelihood: an empty continuation has no tokens to score")
        return self.loglikelihood_tokens(pairs, progress)

    def loglikelihood_tokens(self, pairs: Sequence[tuple[list[int], list[int]]],
                             progress: Progress | None = None) -> list[tuple[float, bool]]:
        """`loglikelihood` on ids: (context ids, continuation ids); a context may be empty only
        when the continuation's first token is predicted from nothing, which the model cannot do,
        so an empty context gets the BOS (or EOS) token as lm-eval gives it its prefix token."""
        results: list[tuple[float, bool] | None] = [None] * len(pairs)
        groups: dict[tuple[int, ...], list[int]] = {}
        rows, row_of = [], []
        shared = Counter(tuple(context) for context, _ in pairs)
        longest: dict[tuple[int, ...], int] = {}
        for context, continuation in pairs:
            longest[tuple(context)] = max(longest.get(tuple(context), 0), len(continuation))
        for i, (context, continuation) in enumerate(pairs):
            key = tuple(context)
            if not context:
                context = [self.tokenizer.bos_id if self.add_bos else self.tokenizer.eos_id]
            if shared[key] > 1 and longest[key] <= self.window:
                # the cut that the longest continuation needs, for all of them (one cache)
                keep = self.window + 1 - longest[key]
                groups.setdefault(tuple(context[-keep:]), []).append(i)
                continue
            if len(context) + len(continuation) - 1 <= self.window:
                groups.setdefault(tuple(context), []).append(i)
                continue
            full = (context + continuation)[-(self.window + 1):]
            n = min(len(continuation), len(full) - 1)
            rows.append((full[:-1], full[len(full) - n:]))
            row_of.append(i)
        for i, result in zip(row_of, self._score_rows(rows, progress) if rows else []):
            results[i] = result
        for context, members in groups.items():
            if len(members) == 1:  # nothing to share: one plain row
                i = members[0]
                full = list(context) + pairs[i][1]
                results[i] = self._score_rows([(full[:-1], pairs[i][1])], None)[0]
            else:
                for i, result in zip(members, self._score_shared(list(context), [pairs[i][1] for i in members])):
                    results[i] = result
            if progress is not None:
                progress(len(members))
        return results  # type: ignore[return-value]

    def loglikelihood_rolling(self, texts: Sequence[str], progress: Progress | None = None) -> list[float]:
        """log P(text) of each whole text (every token predicted once, BOS given), in windows."""
        rows, owner = [], []
        for i, text in enumerate(texts):
            for context, predicted in rolling_windows(self.encode(text), self.prefix or [self.tokenizer.eos_id],
                                                      self.window):
                rows.append((context, predicted))
                owner.append(i)
        scores = self.loglikelihood_tokens(rows)
        totals = [0.0] * len(texts)
        for i, (logprob, _) in zip(owner, scores):
            totals[i] += logprob
        if progress is not None:
            progress(len(texts))
        return totals

    def generate_until(self, prompts: Sequence[str], stop: Sequence[str] = (), max_new_tokens: int = 64,
                       temperature: float = 0.0, seed: int | None = 0, progress: Progress | None = None,
                       seed_index: Sequence[int] | None = None) -> list[str]:
        """The continuation of each prompt, greedy (temperature 0) or sampled, ended by EOS, by
        `max_new_tokens` or just before the first stop string (which is not returned).

        Prompts go `batch_size` at a time, sorted by length (longest first), through the batched
        KV-cache loop (`raylm.use.generate.generate_rows`: each row as it would be alone; greedy
        output equals one prompt at a time, tested). Sampling: prompt i draws from its own
        generator seeded `seed + seed_index[i]` (default `seed + i`), so the samples do not
        depend on the batching."""
        options = SamplingOptions(max_new_tokens=max_new_tokens, temperature=temperature, top_k=0, seed=seed)
        options.validate()
        stop = [s for s in stop if s]
        # room for the new tokens inside the window, so the cache loop never slides
        encoded = [(self.prefix + self.encode(p))[-max(1, self.window - max_new_tokens):] for p in prompts]
        out = [""] * len(prompts)
        order = sorted(range(len(prompts)), key=lambda i: -len(encoded[i]))
        for batch in _chunks(order, self.batch_size):
            new: list[list[int]] = [[] for _ in batch]

            def stopped(row: int, token: int) -> bool:
                return bool(stop) and _first_stop(self.tokenizer.decode(new[row]), stop) is not None

            generators = [SamplingOptions(seed=None if seed is None else seed + (i if seed_index is None
                                                                                 else seed_index[i])).generator()
                          for i in batch]
            for row, token in generate_rows(self.model, [encoded[i] for i in batch], options,
                                            vocab_limit=self.tokenizer.vocab_size, eos_id=self.tokenizer.eos_id,
                                            generators=generators, stop=stopped):
                new[row].append(token)
            for row, i in enumerate(batch):
                text = self.tokenizer.decode(new[row])
                cut = _first_stop(text, stop)
                out[i] = text if cut is None else text[:cut]
            if progress is not None:
                progress(len(batch))
        return out

    # -- internals ----------------------------------------------------------------------

    @torch.no_grad()
    def _score_shared(self, context: list[int], continuations: list[list[int]]) -> list[tuple[float, bool]]:
        """Several continuations of one context (the choices of a question): the context runs
        once into a KV cache, copied for each continuation, which then run together (a choice
        task costs one context instead of one per choice; the numbers are a plain forward's)."""
        longest = max(len(c) for c in continuations)
        cache = KVCache(self.model.config, max_len=len(context) + longest)
        was_training = self.model.training
        self.model.eval()
        try:
            tokens = torch.tensor([context], dtype=torch.long, device=self.device)  # (1, Tc)
            first = F.log_softmax(eager_forward(self.model, tokens, cache, 0)[0, -1].float(), dim=-1).cpu()  # (V,)
            B = len(continuations)
            for layer in cache.layers:
                layer.k = layer.k.expand(B, -1, -1, -1).contiguous()  # (B, KV, max_len, D)
                layer.v = layer.v.expand(B, -1, -1, -1).contiguous()  # (B, KV, max_len, D)
            rest = None
            if longest > 1:
                padded = torch.full((B, longest - 1), self.tokenizer.pad_id, dtype=torch.long)  # (B, Tx - 1)
                for b, cont in enumerate(continuations):
                    padded[b, :len(cont) - 1] = torch.tensor(cont[:-1], dtype=torch.long)
                logits = eager_forward(self.model, padded.to(self.device), cache, len(context))  # (B, Tx - 1, V)
                rest = F.log_softmax(logits.float(), dim=-1).cpu()  # (B, Tx - 1, V)
        finally:
            self.model.train(was_training)
        out = []
        for b, cont in enumerate(continuations):
            rows = first[None] if rest is None else torch.cat([first[None], rest[b, :len(cont) - 1]])  # (n, V)
            target = torch.tensor(cont, dtype=torch.long)  # (n,)
            out.append((float(rows.gather(1, target[:, None]).sum()), bool((rows.argmax(dim=-1) == target).all())))
        return out

    @torch.no_grad()
    def _score_rows(self, rows: list[tuple[list[int], list[int]]],
                    progress: Progress | None) -> list[tuple[float, bool]]:
        """rows: (input ids, target ids): the targets are the next tokens of the input's last positions."""
        results: list[tuple[float, bool] | None] = [None] * len(rows)
        order = sorted(range(len(rows)), key=lambda i: -_length(rows[i]))
        was_training = self.model.training
        self.model.eval()
        try:
            for batch in _chunks(order, self.batch_size):
                results_batch = self._score_batch([rows[i] for i in batch])
                for i, result in zip(batch, results_batch):
                    results[i] = result
                if progress is not None:
                    progress(len(batch))
        finally:
            self.model.train(was_training)
        return results  # type: ignore[return-value]

    def _score_batch(self, rows: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        inputs = [ids for ids, _ in rows]
        targets = [cont for _, cont in rows]
        longest = max(len(x) for x in inputs)
        padded = torch.full((len(inputs), longest), self.tokenizer.pad_id, dtype=torch.long)  # (B, T)
        for b, ids in enumerate(inputs):
            padded[b, :len(ids)] = torch.tensor(ids, dtype=torch.long)
        logits = eager_forward(self.model, padded.to(self.device))  # (B, T, V)
        logprobs = F.log_softmax(logits.float(), dim=-1).cpu()  # (B, T, V)
        out = []
        for b, (ids, cont) in enumerate(zip(inputs, targets)):
            n = len(cont)
            rows_b = logprobs[b, len(ids) - n:len(ids)]  # (n, V): the positions that predict cont
            target = torch.tensor(cont, dtype=torch.long)  # (n,)
            logprob = float(rows_b.gather(1, target[:, None]).sum())
            greedy = bool((rows_b.argmax(dim=-1) == target).all())
            out.append((logprob, greedy))
        return out


def _length(row) -> int:
    return len(row[0])


def _chunks(items: list[int], size: int) -> Iterator[list[int]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def _first_stop(text: str, stop: list[str]) -> int | None:
    cuts = [i for s in stop if s and (i := text.find(s)) >= 0]
    return min(cuts) if cuts else None


def rolling_windows(tokens: list[int], prefix: list[int], window: int) -> Iterator[tuple[list[int], list[int]]]:
    """(context ids, predicted ids) covering every token of `tokens` once: the first window reads
    `prefix` + the text's start, each later one the `window` tokens before its new ones."""
    if not tokens:
        return
    first = min(window, len(tokens))
    yield prefix[-1:], tokens[:first]
    done = first
    while done < len(tokens):
        n = min(len(tokens) - done, window)
        end = done + n
        context = tokens[max(0, end - window - 1):done]
        yield context, tokens[done:end]
        done = end
