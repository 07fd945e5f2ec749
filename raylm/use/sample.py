"""Simple autoregressive sampling (temperature, top-k), enough to show what a run learned.

No KV cache: each new token re-runs the model over the context, cut to max_seq_len. Only ids
the tokenizer knows are sampled: the model's embedding may be larger than the tokenizer's
vocabulary (a small corpus yields fewer pieces than model.vocab_size).
"""

from __future__ import annotations

import torch

from raylm.tokenizer import Tokenizer


@torch.no_grad()
def sample(
    model: torch.nn.Module,
    tokenizer: Tokenizer,
    prompt: str,
    max_new_tokens: int,
    temperature: float = 0.8,
    top_k: int = 40,
    max_seq_len: int = 2048,
    add_bos: bool = True,
    generator: torch.Generator | None = None,
) -> str:
    """Continue `prompt`; stops at EOS. temperature 0 is greedy."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    prefix = [tokenizer.bos_id] if add_bos else []
    ids = prefix + tokenizer.encode_one(prompt)
    new: list[int] = []
    for _ in range(max_new_tokens):
        context = torch.tensor([ids[-max_seq_len:]], dtype=torch.long, device=device)  # (1, T)
        logits = model(context)[0, -1].float()[: tokenizer.vocab_size]  # (V_tokenizer,)
        if temperature == 0:
            next_id = int(logits.argmax())
        else:
            logits = logits / temperature
            if top_k:
                kth = torch.topk(logits, min(top_k, logits.numel())).values[-1]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            probs = torch.softmax(logits, dim=-1)
            next_id = int(torch.multinomial(probs.cpu(), 1, generator=generator))
        if next_id == tokenizer.eos_id:
            break
        ids.append(next_id)
        new.append(next_id)
    model.train(was_training)
    return tokenizer.decode(new)


def print_samples(model: torch.nn.Module, tokenizer: Tokenizer, cfg, log=print) -> list[str]:
    """Continue each of run.sample_prompts (seeded by train.seed) and log prompt + continuation."""
    generator = torch.Generator().manual_seed(cfg.train.seed)
    outputs = []
    for prompt in cfg.run.sample_prompts:
        text = sample(model, tokenizer, prompt, cfg.run.sample_tokens, cfg.run.temperature, cfg.run.top_k,
                      cfg.model.max_seq_len, cfg.data.add_bos, generator)
        outputs.append(text)
        log(f"--- sample: {prompt!r}\n{prompt}{text}\n")
    return outputs
