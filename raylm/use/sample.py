"""Simple autoregressive sampling (temperature, top-k), enough to show what a run learned.

No KV cache: each new token re-runs the model over the context, cut to max_seq_len.
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
        logits = model(context)[0, -1].float()  # (V,)
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
