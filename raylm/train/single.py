"""`raylm train --local`: the whole job in one process, no Ray (tokenizer, data, loop, samples)."""

from __future__ import annotations

from pathlib import Path

import torch

from raylm.config import Config
from raylm.data.local import local_datasets, train_tokenizer_local
from raylm.errors import DataError
from raylm.optim import build_optimizer
from raylm.runs import create_run_dir
from raylm.tokenizer import Tokenizer
from raylm.train.loop import Hooks, RankEnv, resolve_device, run_training, seed_everything
from raylm.train.metrics import MetricsWriter
from raylm.train.parallel import build_model
from raylm.use.sample import sample


def load_or_train_tokenizer(cfg: Config, run_dir: Path, log=print) -> Tokenizer:
    if cfg.tokenizer.path is not None:
        tokenizer = Tokenizer.load(cfg.tokenizer.path)
    else:
        log(f"training a {cfg.tokenizer.model_type} tokenizer with {cfg.model.vocab_size} pieces ...")
        tokenizer = train_tokenizer_local(cfg)
    check_vocab(tokenizer, cfg)
    tokenizer.save(run_dir / "tokenizer.model")
    return tokenizer


def check_vocab(tokenizer: Tokenizer, cfg: Config) -> None:
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise DataError(
            f"tokenizer {tokenizer.source} has {tokenizer.vocab_size} pieces but model.vocab_size="
            f"{cfg.model.vocab_size}; set model.vocab_size >= {tokenizer.vocab_size}"
        )


def print_samples(model, tokenizer: Tokenizer, cfg: Config, log=print) -> list[str]:
    generator = torch.Generator().manual_seed(cfg.train.seed)
    outputs = []
    for prompt in cfg.run.sample_prompts:
        text = sample(model, tokenizer, prompt, cfg.run.sample_tokens, cfg.run.temperature, cfg.run.top_k,
                      cfg.model.max_seq_len, cfg.data.add_bos, generator)
        outputs.append(text)
        log(f"--- sample: {prompt!r}\n{prompt}{text}\n")
    return outputs


def train_single_process(cfg: Config, log=print) -> Path:
    run_dir = create_run_dir(cfg)
    log(f"run directory: {run_dir}")
    tokenizer = load_or_train_tokenizer(cfg, run_dir, log)
    log(f"tokenizer: {tokenizer.vocab_size} pieces, sha256 {tokenizer.sha256[:12]}")
    train_data, val_data = local_datasets(cfg, tokenizer)
    log(f"data: {len(train_data):,} training and {len(val_data) if val_data else 0:,} held-out sequences "
        f"of {cfg.data.seq_len} tokens")

    device = resolve_device(cfg)
    seed_everything(cfg.train.seed)
    model, _ = build_model(cfg, device)  # the same build as a Ray worker's: meta, checkpointing, compile, init
    optimizer = build_optimizer(model, cfg.optimizer, device.type)
    writer = MetricsWriter(run_dir)
    try:
        final = run_training(
            cfg, model, optimizer, train_data, val_data, RankEnv(device=device),
            hooks=Hooks(on_metrics=writer.write, log=log),
        )
    finally:
        writer.close()
    if "val_perplexity" in final:
        log(f"final held-out loss {final['val_loss']:.4f}, perplexity {final['val_perplexity']:.2f}")
    print_samples(model, tokenizer, cfg, log)
    return run_dir
