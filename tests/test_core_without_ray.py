"""The layers: every module outside the Ray adapter (`raylm/ray/`) imports and runs with Ray unimportable.

Modules are found by glob, not by a hand-kept list, so a new module is covered the day it lands.
"""

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ADAPTER = ROOT / "raylm" / "ray"


def core_modules() -> list[str]:
    out = []
    for path in sorted((ROOT / "raylm").rglob("*.py")):
        if ADAPTER in path.parents or path.name == "__main__.py":  # __main__ runs the CLI on import
            continue
        parts = path.relative_to(ROOT).with_suffix("").parts
        out.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return out


def test_the_glob_finds_the_core_and_the_adapter():
    modules = core_modules()
    assert {"raylm.cli", "raylm.config", "raylm.model", "raylm.train.trainer", "raylm.data.plan",
            "raylm.use.load"} <= set(modules)
    assert not any(m.startswith("raylm.ray") for m in modules)
    assert (ADAPTER / "train.py").is_file() and (ADAPTER / "data.py").is_file()


def test_no_module_outside_the_adapter_imports_ray_even_inside_a_function():
    offenders = []
    for path in sorted((ROOT / "raylm").rglob("*.py")):
        if ADAPTER in path.parents:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
            offenders += [f"{path.relative_to(ROOT)}:{node.lineno} {n}" for n in names
                          if n == "ray" or n.startswith("ray.")]
    assert offenders == []


def test_every_core_module_imports_and_the_trainer_trains_with_ray_unimportable(tmp_path):
    code = textwrap.dedent(
        f"""
        import importlib, sys
        sys.modules["ray"] = None  # any `import ray` now raises ImportError
        for name in {core_modules()!r}:
            importlib.import_module(name)
        import numpy as np
        from raylm.config import load_config
        from raylm.data.order import PackedDataset
        from raylm.train.trainer import LocalSink, RankEnv, Trainer
        cfg = load_config(None, ["model.preset=debug", "data.seq_len=32", "train.global_batch_tokens=128",
                                 "train.micro_batch_size=4", "train.max_steps=2", "train.eval_every=0"])
        rows = np.random.default_rng(0).integers(0, cfg.model.vocab_size, size=(16, 33)).astype(np.int32)
        sink = LocalSink({str(tmp_path)!r}, keep_checkpoints=1)
        out = Trainer(cfg, RankEnv(), sink, PackedDataset(rows), log=lambda line: None).fit()
        sink.close()
        assert out["step"] == 2, out
        assert "ray" not in {{m.split(".")[0] for m in sys.modules if sys.modules[m] is not None}}
        print("ok")
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().endswith("ok")
    assert (tmp_path / "checkpoint_00000002" / "raylm_checkpoint.json").is_file()
