"""Coordinate check: the logits' standard deviation after a few Adam steps, at widths 32 to 256, standard vs µP.

    python bench/mup_coord.py [--steps 4] [--lr 1e-2] [--seeds 0 1 2]

The setting of tests/test_mup.py's coordinate check (2 layers, 2 heads, vocabulary 128, one fixed
batch of 4 x 16 random tokens, AdamW at lr 1e-2 with weight decay 0.1, µP's base width 32, one torch
thread), for each seed of the weights and the batch. Prints the logits' std per width and its growth
from width 32 to 256 (docs/mup.md quotes it). A few seconds on one CPU core.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def logit_std(dim: int, parametrization: str, steps: int, lr: float, seed: int) -> float:
    import torch

    from raylm.config import OptimizerConfig
    from raylm.model import ModelConfig, Transformer
    from raylm.optim import build_optimizer, set_lr

    cfg = ModelConfig(dim=dim, parametrization=parametrization, mup_base_dim=32, n_layers=2, n_heads=2,
                      n_kv_heads=2, vocab_size=128, multiple_of=32, max_seq_len=64)
    cfg.validate()
    torch.manual_seed(seed)
    model = Transformer(cfg)
    batch = torch.randint(0, 128, (4, 17), generator=torch.Generator().manual_seed(seed))  # (B, T + 1)
    optimizer = build_optimizer(model, OptimizerConfig(lr=lr, weight_decay=0.1))
    for _ in range(steps):
        set_lr(optimizer, lr)
        logits = model(batch[:, :-1])  # (B, T, vocab)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        return model(batch[:, :-1]).std().item()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = p.parse_args()
    import torch

    torch.set_num_threads(1)
    widths = [32, 64, 128, 256]
    print(f"logits' std after {args.steps} AdamW steps at lr {args.lr:g} (mean over seeds {args.seeds}); µP base width 32\n")
    print("| parametrisation | " + " | ".join(f"width {w}" for w in widths) + " | 256 / 32 (each seed) |")
    print("|---|" + "---:|" * len(widths) + "---|")
    for parametrization in ("standard", "mup"):
        stds = {s: [logit_std(w, parametrization, args.steps, args.lr, s) for w in widths] for s in args.seeds}
        means = [statistics.mean(stds[s][i] for s in args.seeds) for i in range(len(widths))]
        growth = ", ".join(f"{stds[s][-1] / stds[s][0]:.2f}" for s in args.seeds)
        name = "standard" if parametrization == "standard" else "µP"
        print(f"| {name} | " + " | ".join(f"{m:.3f}" for m in means) + f" | {means[-1] / means[0]:.2f}x ({growth}) |")


if __name__ == "__main__":
    main()
