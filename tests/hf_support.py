"""Shared pieces of the generate and Hugging Face tests: a small mixed corpus, a real sentencepiece
tokenizer trained on it, and run directories holding a checkpoint of a model with random weights
(saved by `save_checkpoint`, as a run would, without training)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch.distributed.fsdp import FSDPModule

from raylm.config import Config, load_config
from raylm.model import Transformer
from raylm.tokenizer import Tokenizer
from raylm.train import checkpoint as ckpt
from raylm.train.runs import CONFIG_FILE, TOKENIZER_FILE

CODE = '''\
import os
from dataclasses import dataclass


@dataclass
class Point:
    """A point in the plane."""

    x: float = 0.0
    y: float = 0.0

    def norm(self) -> float:
        return (self.x ** 2 + self.y ** 2) ** 0.5


def fibonacci(n):
\tif n < 2:
\t\treturn n
\treturn fibonacci(n - 1) + fibonacci(n - 2)


class Stack:
    def __init__(self):
        self.items = []

    def push(self, item):
        self.items.append(item)

    def pop(self):
        return self.items.pop()


for i in range(10):
    print(i, fibonacci(i), os.path.join("a", str(i)))
'''

PROSE = '''\
The quick brown fox jumps over the lazy dog. Les élèves étudient à l'école; die Straße ist grün.
Größe, naïve café, jalapeño, smörgåsbord. Ελληνικά και русский текст. 日本語のテキストと中文。
Numbers 12345 and 67890, dates 2024-06-01, prices $3.50 and 4,20 €.
'''

MIXED = ('def f(x):\n\treturn  x ** 2  # squared 123456\n\n\n    indented    line\n\t\t  tabs and spaces\n'
         'unicode: héllo wörld 世界 🙂 naïve – “quotes” ∑ x² \u00a0nbsp and 한국어\n'
         '    if a  ==  b:\n        pass   # trailing   \n<s> literal </s> and ▁ and \\n escaped\n  ')


def corpus() -> list[str]:
    return [CODE, PROSE, CODE.replace("    ", "  "), PROSE.upper(), CODE.replace("item", "element")]


def train_tokenizer(vocab_size: int = 480) -> Tokenizer:
    return Tokenizer.train(corpus(), vocab_size)


def run_config(out: Path, **model: object) -> Config:
    overrides = [f"model.{key}={'null' if value is None else value}" for key, value in model.items()]
    return load_config(None, ["model.preset=debug", "model.vocab_size=512", "model.max_seq_len=64",
                              "data.seq_len=32", f"run.output_dir={out}", *overrides])


def randomize(model: Transformer, seed: int) -> None:
    """Weights far from the init: large enough that logits are peaked (greedy choices are clear),
    norm gains not all 1 (so a swapped norm would show)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=generator)
            p.copy_(1 + 0.2 * noise if name.endswith("norm.weight") else 0.15 * noise)


def save_run(run_dir: Path, cfg: Config, model: Transformer, tokenizer: Tokenizer, step: int = 1) -> Path:
    """A run directory with one complete checkpoint of `model`, as `raylm train` leaves it."""
    optimizer = torch.optim.AdamW(model.parameters())
    files = {CONFIG_FILE: cfg.to_yaml().encode(), TOKENIZER_FILE: tokenizer.to_bytes()}
    ckpt.save_checkpoint(run_dir / ckpt.checkpoint_dir_name(step), model, optimizer, {"step": step},
                         extra_files=files)
    return run_dir


def random_run(root: Path, tokenizer: Tokenizer, seed: int = 0, **model: object) -> tuple[Path, Transformer, Config]:
    cfg = run_config(root, **model)
    torch.manual_seed(seed)
    transformer = Transformer(cfg.model)
    randomize(transformer, seed)
    transformer.eval()
    return save_run(root / "run", cfg, transformer, tokenizer), transformer, cfg


def save_sharded(rank: int, out: Path, cfg_yaml: str, tokenizer_path: str, hf_dir: str) -> dict:
    """On each rank of a gloo group (`support.run_ranks`): an FSDP2-sharded model filled from the
    HF directory `hf_dir` by `load_hf_weights`, compared with `out`/full.pt, then saved as the
    checkpoint of the run `out`/run."""
    import dataclasses

    import yaml
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from raylm.config import config_from_dict
    from raylm.train.parallel import build_model
    from raylm.train.hf_import import load_hf_weights

    cfg = config_from_dict(yaml.safe_load(cfg_yaml))
    model = build_model(cfg, torch.device("cpu"))
    load_hf_weights(model, dataclasses.replace(cfg.model, init_from=f"hf:{hf_dir}"))
    gathered = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    full = torch.load(out / "full.pt", weights_only=True)
    exact = gathered.keys() == full.keys() and all(torch.equal(gathered[k], v) for k, v in full.items())
    save_run(out / "run", cfg, model, Tokenizer.load(tokenizer_path))
    return {"sharded": isinstance(model, FSDPModule), "imported_exactly": exact}


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """Tiny models run faster on one thread, and much faster on a shared, busy machine where
    intra-op threads wait on each other; the previous setting comes back afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
