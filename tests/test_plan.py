"""`raylm plan`: parameter and FLOP counts, the published Llama 2 7B check, the table, the fit
verdict, one-line errors (no Ray, no GPU). The memory estimate against measured peaks is a
benchmark, `bench/plan_memory.py` (bench/RESULTS.md): a process's peak memory depends on its
machine and what ran before it, as a test's assertion should not."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest

from raylm.cli import main
from raylm.config import load_config
from raylm.model import ModelConfig
from raylm.plan import GIB, GPUS, estimate_memory, implied_mfu, plan

ROOT = Path(__file__).resolve().parents[1]
LLAMA2_7B = str(ROOT / "configs" / "llama2-7b.yaml")
TABLE_ARGS = ["plan", LLAMA2_7B, "--gpus", "64", "--gpu", "h100", "--tokens", "2e12"]


def value(table: str, label: str) -> str:
    """The value column of the first row whose label starts with `label`."""
    for line in table.splitlines():
        if line.startswith(label):
            return re.split(r"\s{2,}", line.strip())[-1]
    raise AssertionError(f"no row {label!r} in:\n{table}")


def test_llama2_7b_config_has_its_published_6_738_415_616_parameters():
    """The model's own count (tests/test_model.py checks it against the built model)."""
    cfg = load_config(LLAMA2_7B)
    assert plan(cfg, 64, "h100").params == cfg.model.num_params() == 6_738_415_616


def test_flops_per_token_is_the_models_counter_6_matmul_weights_plus_attention():
    """Llama 2 7B at seq 4096, by hand: matmul weights = N - embedding (32000 x 4096) - norm
    gains (65 x 4096) = 6,607,077,376; attention 12 * L * H * Q * T = 12 * 32 * 32 * 128 * 4096."""
    cfg = load_config(LLAMA2_7B)
    by_hand = 6 * (6_738_415_616 - 32000 * 4096 - 65 * 4096) + 12 * 32 * 32 * 128 * 4096
    assert by_hand == 46_084_915_200
    assert plan(cfg, 64, "h100").flops_per_token == cfg.model.flops_per_token(4096) == by_hand


def test_llama2_7b_published_gpu_hours_imply_an_mfu_inside_the_35_to_55_percent_band():
    """Meta: 184,320 A100-80GB GPU-hours for 2T tokens at seq 4096. The docs print the MFU."""
    mfu = implied_mfu(ModelConfig.preset("llama2-7b"), 4096, 2e12, 184_320, GPUS["a100"].peak_bf16_flops)
    assert 0.35 <= mfu <= 0.55
    assert f"{mfu:.1%}" == "44.5%"
    assert "44.5%" in (ROOT / "docs" / "plan.md").read_text()


def test_the_64_h100_table_has_the_counts_memory_split_fit_and_consistent_time_and_cost(capsys):
    assert main(TABLE_ARGS) == 0
    table = capsys.readouterr().out
    assert value(table, "parameters") == "6,738,415,616"
    assert value(table, "FLOPs per token") == "4.608e+10"
    for row in ("  parameters, fp32, 1/64 each", "  optimizer state, AdamW 2 x fp32, 1/64 each", "  gradients, fp32",
                "  activations, checkpointing full", "  peak", "  needed / GPU memory", "  none (fits)",
                "  full (fits, this config)", "smallest GPU count that fits", "  every (fits, this config",
                "  last (fits"):
        assert any(line.startswith(row) for line in table.splitlines()), row
    assert table.rstrip().splitlines()[-1].startswith("fits: 64 x H100 SXM 80GB needs ")

    # The time section follows from the MFU it states, whichever source gave it.
    mfu = float(re.search(r"time at MFU ([0-9.]+)%", table).group(1)) / 100
    tokens_per_s = 64 * 989e12 * mfu / 46_084_915_200
    total, per_gpu = (float(x.replace(",", "")) for x in value(table, "  tokens/s").split(" / "))
    assert total == pytest.approx(tokens_per_s, abs=0.5) and per_gpu == pytest.approx(tokens_per_s / 64, abs=0.5)
    assert value(table, "  steps") == f"{math.ceil(2e12 / 4_194_304):,}"
    gpu_hours = 64 * 2e12 / tokens_per_s / 3600
    assert float(value(table, "  GPU-hours").replace(",", "")) == pytest.approx(gpu_hours, abs=0.5)
    assert float(value(table, "  cost at $7.00").lstrip("$").replace(",", "")) == pytest.approx(7 * gpu_hours, abs=0.5)


def test_every_row_of_the_table_lines_its_values_up_in_one_column(capsys):
    main(TABLE_ARGS)
    rows = [line for line in capsys.readouterr().out.splitlines() if re.search(r"\S\s{2,}\S", line)]
    assert len(rows) > 20 and len({len(line) for line in rows}) == 1


def test_a_config_that_cannot_fit_says_so_in_its_last_line_and_names_the_smallest_count_that_fits(capsys):
    """Exit 0 (the table is the answer); the verdict is the last line, one line."""
    assert main(["plan", LLAMA2_7B, "--gpus", "1", "--gpu", "h100"]) == 0
    last = capsys.readouterr().out.rstrip().splitlines()[-1]
    smallest = int(re.search(r"the smallest count that fits is (\d+) \(--gpus \1\)", last).group(1))
    assert last.startswith("does not fit: 1 x H100 SXM 80GB needs ")
    cfg = load_config(LLAMA2_7B)
    assert plan(cfg, smallest, "h100").fits
    assert not any(plan(cfg, w, "h100").fits for w in range(1, smallest))


def test_when_no_count_fits_the_verdict_names_the_count_with_micro_batch_1_and_full_checkpointing(capsys):
    args = ["train.micro_batch_size=16", "train.activation_checkpointing=none"]
    assert main(["plan", LLAMA2_7B, *args, "--gpus", "8", "--gpu", "h100"]) == 0
    last = capsys.readouterr().out.rstrip().splitlines()[-1]
    would = int(re.search(r"no count up to 1,024 GPUs .* fits; with train.micro_batch_size=1 and "
                          r"train.activation_checkpointing=full, (\d+) would$", last).group(1))
    cfg = load_config(LLAMA2_7B, ["train.micro_batch_size=1", "train.activation_checkpointing=full"])
    assert plan(cfg, would, "h100").fits and not plan(cfg, would - 1, "h100").fits


@pytest.mark.parametrize("bad", [["--gpus", "0"], ["--gpus", "1025"], ["--gpus", "8", "--mfu", "0"],
                                 ["--gpus", "8", "--mfu", "1.5"], ["--gpus", "8", "--mfu", "nan"],
                                 ["--gpus", "8", "--tokens", "-1"], ["--gpus", "8", "--tokens", "inf"],
                                 ["--gpus", "8", "--price", "-1"], ["--gpus", "8", "--storage-gbps", "0"]])
def test_a_bad_gpus_mfu_tokens_or_price_is_one_line_naming_the_flag_and_exit_2(bad, capsys):
    assert main(["plan", LLAMA2_7B, *bad]) == 2
    out = capsys.readouterr()
    assert out.out == ""
    assert out.err.count("\n") == 1 and out.err.startswith(f"raylm: error: {bad[-2]} ")


def test_checkpoint_and_data_traffic_follow_from_the_parameter_count_the_rows_and_the_storage_rate(capsys):
    """A checkpoint is 12 bytes a parameter (fp32 weights + AdamW's two moments), 1/W per GPU; a
    restart reads it once at the storage rate; a step reads its rows (seq_len + 1 uint16 tokens
    each, the 32k vocabulary fits) once, 1/W per GPU; the whole run's prepared data is its
    sequences' rows."""
    cfg = load_config(LLAMA2_7B)
    st = plan(cfg, 64, "h100", storage_gbps=5.0).storage
    N, G, S = cfg.model.num_params(), cfg.sequences_per_step, cfg.data.seq_len
    assert st.checkpoint_bytes == 12 * N and st.checkpoint_bytes_per_gpu == 12 * N // 64
    assert st.restore_s == pytest.approx(12 * N / 5e9) and st.save_s == pytest.approx(12 * N / 5e9)
    assert st.background  # train.checkpoint_async: auto is on for GPU runs
    assert st.data_bytes_per_step == G * (S + 1) * 2 and st.data_bytes_per_gpu_step == G * (S + 1) * 2 // 64
    assert st.dataset_bytes == pytest.approx(cfg.train.max_steps * G * (S + 1) * 2, rel=1e-9)
    assert "set --storage-gbps" in plan(cfg, 64, "h100").storage.storage_source
    main(TABLE_ARGS + ["--storage-gbps", "5"])
    table = capsys.readouterr().out
    assert "storage at 5 GB/s for the cluster (--storage-gbps)" in table
    assert value(table, "  restart: reads each byte once") == f"{12 * N / 5e9:.1f} s"


def test_the_mfu_is_the_measured_figure_for_that_gpu_else_a_stated_assumption():
    cfg = load_config(LLAMA2_7B)
    table = {"h100": (0.43, "64 x H100, llama2-7b"), "a100": (0.61, "other GPU")}
    measured = plan(cfg, 64, "h100", measured=table)
    assert measured.mfu == 0.43 and "measured" in measured.mfu_source and "64 x H100" in measured.mfu_source
    assumed = plan(cfg, 64, "h100", measured={})
    assert assumed.mfu == 0.40 and assumed.mfu_source.startswith("assumed")
    assert plan(cfg, 64, "h100", mfu=0.5, measured=table).mfu == 0.5


def test_the_planner_reads_no_repository_file_so_an_installed_wheel_plans_the_same(tmp_path, capsys):
    """`raylm plan` from a copy of the package alone (no bench/, docs/ or configs/ beside it, as
    in an installed wheel) prints the same table as from the repository."""
    import os
    import shutil
    import subprocess
    import sys

    import raylm

    shutil.copytree(Path(raylm.__file__).parent, tmp_path / "site" / "raylm",
                    ignore=shutil.ignore_patterns("__pycache__"))
    args = ["plan", LLAMA2_7B, "--gpus", "64"]
    code = "import sys; from raylm.cli import main; sys.exit(main(sys.argv[1:]))"
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site")}
    from_wheel = subprocess.run([sys.executable, "-c", code, *args], env=env, cwd=tmp_path, capture_output=True,
                                text=True, check=True).stdout
    main(args)
    assert "raylm.plan.MEASURED_MFU" in from_wheel and from_wheel == capsys.readouterr().out


def test_torchtitan_llama3_8b_published_peak_lies_between_full_and_no_checkpointing():
    """torchtitan: Llama 3.1 8B, seq 8192, local batch 2, 8 GPUs, FSDP2, selective op
    checkpointing (saves less than none, more than full): 82.4 GiB eager."""
    cfg = load_config(None, ["model.dim=4096", "model.n_layers=32", "model.n_heads=32", "model.n_kv_heads=8",
                             "model.vocab_size=128256", "model.ffn_dim_multiplier=1.3", "model.multiple_of=1024",
                             "model.max_seq_len=8192", "data.seq_len=8192", "train.micro_batch_size=2",
                             f"train.global_batch_tokens={16 * 8192}", "train.precision=bf16"])
    assert cfg.model.ffn_hidden_dim == 14336
    full = estimate_memory(cfg, 8, "cuda", "full").total_bytes / GIB
    none = estimate_memory(cfg, 8, "cuda", "none").total_bytes / GIB
    assert full < 82.4 < none
