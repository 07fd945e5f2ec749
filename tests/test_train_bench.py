"""bench/gpu_mfu.py runs tiny on CPU: in one process, and sharded under torchrun with 2 ranks."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def load_bench():
    spec = importlib.util.spec_from_file_location("gpu_mfu", ROOT / "bench/gpu_mfu.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_mfu_tiny_runs_on_cpu_in_one_process(capsys):
    result = load_bench().main(["--tiny"])
    assert result["world_size"] == 1 and result["tokens_per_second"] > 0
    assert "tokens/s" in capsys.readouterr().out


@pytest.mark.slow  # a torchrun group
def test_gpu_mfu_tiny_runs_under_torchrun_with_two_fsdp_ranks():
    torchrun = Path(sys.executable).with_name("torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node=2", str(ROOT / "bench/gpu_mfu.py"),
                           "--tiny"], capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "on 2 x cpu" in done.stdout
