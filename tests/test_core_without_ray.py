"""The torch core (model, config, loop, data transforms) imports and runs with Ray unimportable."""

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_core_modules_import_and_train_a_step_with_ray_unimportable():
    code = textwrap.dedent(
        """
        import sys
        sys.modules["ray"] = None  # any `import ray` now raises ImportError
        import numpy as np, torch
        import raylm.config, raylm.model, raylm.optim, raylm.tokenizer
        import raylm.train.loop, raylm.train.step, raylm.data.transforms, raylm.data.order, raylm.data.local
        from raylm.config import load_config
        from raylm.data.order import PackedDataset
        from raylm.model import Transformer
        from raylm.optim import build_optimizer
        from raylm.train.loop import RankEnv, run_training
        cfg = load_config(None, ["model.preset=debug", "data.seq_len=32", "train.global_batch_tokens=128",
                                 "train.micro_batch_size=4", "train.max_steps=2", "train.eval_every=0"])
        model = Transformer(cfg.model); model.init_weights()
        rows = np.random.default_rng(0).integers(0, cfg.model.vocab_size, size=(16, 33)).astype(np.int32)
        out = run_training(cfg, model, build_optimizer(model, cfg.optimizer), PackedDataset(rows), None, RankEnv(),
                           hooks=None)
        assert out["step"] == 2, out
        assert "ray" not in {m.split(".")[0] for m in sys.modules if sys.modules[m] is not None}
        print("ok")
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().endswith("ok")
