"""The end-of-training samples: a few prompts continued with `raylm.use.generate` (KV cache).

Only ids the tokenizer knows are sampled: the model's embedding may be larger than the
tokenizer's vocabulary (a small corpus yields fewer pieces than model.vocab_size).
"""

from __future__ import annotations

import torch

from raylm.tokenizer import Tokenizer
from raylm.use.generate import SamplingOptions, generate


def sample(
    model: torch.nn.Module,
    tokenizer: Tokenizer,
    prompt: str,
    max_new_tokens: int,
    temperature: float = SamplingOptions.temperature,
    top_k: int = SamplingOptions.top_k,
    add_bos: bool = True,
    generator: torch.Generator | None = None,
) -> str:
    """Continue `prompt`; stops at EOS. temperature 0 is greedy; the context window is the
    model's max_seq_len (`raylm.use.generate`)."""
    options = SamplingOptions(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, seed=0)
    return generate(model, tokenizer, prompt, options, add_bos=add_bos,
                    generator=generator if generator is not None else options.generator())


def print_samples(model: torch.nn.Module, tokenizer: Tokenizer, cfg, log=print) -> list[str]:
    """Continue each of run.sample_prompts (seeded by train.seed) and log prompt + continuation."""
    generator = torch.Generator().manual_seed(cfg.train.seed)
    outputs = []
    for prompt in cfg.run.sample_prompts:
        text = sample(model, tokenizer, prompt, cfg.run.sample_tokens, cfg.run.temperature, cfg.run.top_k,
                      cfg.data.add_bos, generator)
        outputs.append(text)
        log(f"--- sample: {prompt!r}\n{prompt}{text}\n")
    return outputs


def print_final_samples(checkpoint: str, log=print) -> None:
    """Load the final checkpoint into a plain model on this process (any world size saved it) and
    sample: the end of `raylm train` on Ray, whose model lives in its workers."""
    from raylm import storage
    from raylm.use.load import load_model, load_run_config

    cfg = load_run_config(storage.location(checkpoint))
    if cfg.model.num_params() > 2e9:
        log("samples skipped: the model is too large to sample on the driver; use raylm generate")
        return
    model, tokenizer, cfg = load_model(checkpoint)
    print_samples(model, tokenizer, cfg, log)
