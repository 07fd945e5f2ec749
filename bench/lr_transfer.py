"""Does the best learning rate hold across widths? `raylm tune` sweeps it at three widths under
standard parametrisation and under µP, and this draws loss against learning rate, one curve per width.

    python bench/lr_transfer.py --steps 100             # widths 64 128 256, 6 rates x 2 seeds (the published table)
    python bench/lr_transfer.py --widths 64 128 256 --steps 120 --seeds 1234 1235 --out bench/out/lr_transfer

Each (parametrisation, width) is one sweep: a grid over `optimizer.lr` x `train.seed` (every rate
with every seed: weight initialisation and data order differ), no early stopping, on the debug
corpus (one prepared dataset shared by all sweeps), at fixed depth (2 layers, 4 heads, so head_dim
grows with width). A rate's loss is the mean over the seeds. When the best rate of a sweep is the
grid's lowest or highest, the grid is extended past that end by a factor of 2 (a further sweep of
that one rate, every seed), up to --max-extend times, so that the optimum is inside the grid. µP's
base width is the smallest width: there µP and standard are the same model. Prints one JSON line
per sweep (the best rate, every rate's mean final held-out loss and each seed's) and the drift of
the best rate across widths, then writes `lr_transfer.png` and `lr_transfer.json` in --out. Runs
on a local Ray cluster (RAY_ADDRESS if set). Cost: 6 sweeps x 6 rates x 2 seeds = 72 trials of
100 steps, 4 at a time on 2 CPUs (plus 2 per extension): the 2026-12-02 run of 42 trials took
about 40 minutes at load 5-30, so about 70 minutes loaded, 45 quiet (a guess: not run since).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RATES = [2.5e-4, 5e-4, 1e-3, 2e-3, 4e-3, 8e-3]  # 2026-12-02: SP's best at width 256 was the lowest, 1e-3
SEEDS = [1234, 1235]


def sweep_file(out: Path, name: str, parametrization: str, width: int, base_width: int, steps: int,
               rates: list[float], seeds: list[int], prepared: Path) -> Path:
    sweep = {
        "base": str(ROOT / "configs/debug.yaml"),
        "set": {
            "model.dim": width, "model.n_heads": 4, "model.n_kv_heads": 4, "model.multiple_of": 32,
            "model.parametrization": parametrization, "model.mup_base_dim": base_width,
            "train.max_steps": steps, "train.eval_every": steps, "train.eval_batches": 50,
            "train.checkpoint_every": 0, "train.log_every": 50, "optimizer.warmup_steps": max(2, steps // 10),
            "run.sample_tokens": 0, "run.keep_checkpoints": 1, "data.prepared_path": str(prepared),
        },
        "resources": {"num_workers": 1, "cpus_per_worker": 0.45},  # 4 trials at a time on 2 CPUs
        "space": {"optimizer.lr": {"grid": rates}, "train.seed": {"grid": seeds}},
        "scheduler": "none",
        "num_samples": 1,
        "name": name,
        "output_dir": str(out),
    }
    path = out / f"{name}.yaml"
    path.write_text(yaml.safe_dump(sweep, sort_keys=False))
    return path


def run(args) -> dict:
    from raylm.ray.connect import ray_session

    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    prepared = out / "prepared"
    results: dict = {}
    with ray_session(worker_logs=False):
        for parametrization in ("standard", "mup"):
            for width in args.widths:
                name = f"{parametrization}-{width}"
                by_seed: dict[float, dict[int, float | None]] = {}
                rates = list(args.rates)
                for extension in range(args.max_extend + 1):
                    part = name if extension == 0 else f"{name}-x{extension}"
                    for t in sweep_trials(out, part, parametrization, width, min(args.widths), args.steps,
                                          rates, args.seeds, prepared):
                        by_seed.setdefault(t["params"]["optimizer.lr"], {})[t["params"]["train.seed"]] = t["metric"]
                    losses = {lr: mean_loss(v) for lr, v in by_seed.items()}
                    finite = {lr: v for lr, v in losses.items() if math.isfinite(v)}
                    best = min(finite, key=finite.get)
                    if best == min(by_seed):
                        rates = [best / 2]
                    elif best == max(by_seed):
                        rates = [best * 2]
                    else:
                        break
                inside = min(by_seed) < best < max(by_seed)
                results.setdefault(parametrization, {})[width] = {
                    "losses": {lr: (v if math.isfinite(v) else None) for lr, v in losses.items()},
                    "by_seed": by_seed, "best_lr": best, "best_loss": finite[best], "optimum_inside_grid": inside}
                print(json.dumps({"parametrization": parametrization, "width": width, "best_lr": best,
                                  "best_val_loss": round(finite[best], 4), "optimum_inside_grid": inside,
                                  "val_loss_mean": {f"{lr:g}": (round(v, 4) if math.isfinite(v) else None)
                                                    for lr, v in sorted(losses.items())},
                                  "val_loss_by_seed": {f"{lr:g}": [None if x is None else round(x, 4)
                                                                   for _, x in sorted(v.items())]
                                                       for lr, v in sorted(by_seed.items())}}), flush=True)
    for parametrization, by_width in results.items():
        best = [by_width[w]["best_lr"] for w in args.widths]
        print(json.dumps({"parametrization": parametrization, "best_lr_by_width": dict(zip(args.widths, best)),
                          "drift_max_over_min": round(max(best) / min(best), 2)}), flush=True)
    (out / "lr_transfer.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    plot(results, args.widths, out / "lr_transfer.png")
    print(out / "lr_transfer.png")
    return results


def sweep_trials(out: Path, name: str, parametrization: str, width: int, base_width: int, steps: int,
                 rates: list[float], seeds: list[int], prepared: Path) -> list[dict]:
    """The trials of one sweep, run now unless an earlier run of this bench finished it (or resumed if it stopped)."""
    from raylm.ray.tune import resume_command, tune_command
    from raylm.sweep import load_sweep

    sweep_dir = out / name
    if (sweep_dir / "tune").is_dir() and not (sweep_dir / "results.json").is_file():
        resume_command(sweep_dir, log=lambda line: None)  # a run of this bench was interrupted
    elif not (sweep_dir / "results.json").is_file():
        path = sweep_file(out, name, parametrization, width, base_width, steps, rates, seeds, prepared)
        tune_command(load_sweep(path), log=lambda line: None)
    trials = json.loads((sweep_dir / "results.json").read_text())["trials"]
    if any("train.seed" not in t["params"] for t in trials):
        sys.exit(f"bench/lr_transfer.py: {sweep_dir} is from the one-seed version of this bench; "
                 "delete it or pass another --out")
    return trials


def mean_loss(by_seed: dict[int, float | None]) -> float:
    """Mean final held-out loss over the seeds; inf when any seed diverged (no finite loss)."""
    values = [v for v in by_seed.values() if v is not None and math.isfinite(v)]
    return sum(values) / len(values) if values and len(values) == len(by_seed) else math.inf


def plot(results: dict, widths: list[int], path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2, sharey=True)
    for ax, parametrization in zip(axes, ("standard", "mup")):
        for width in widths:
            entry = results[parametrization][width]
            rates = sorted(entry["losses"])
            values = [entry["losses"][r] if entry["losses"][r] is not None else float("nan") for r in rates]
            line, = ax.plot(rates, values, marker="o", label=f"width {width}")
            ax.plot([entry["best_lr"]], [entry["best_loss"]], marker="*", markersize=14, color=line.get_color())
        ax.set_xscale("log")
        ax.set_xlabel("learning rate (optimizer.lr)")
        ax.set_title("standard parametrisation" if parametrization == "standard" else "µP (base width "
                     f"{min(widths)})")
        ax.grid(alpha=0.3)
        ax.legend()
    axes[0].set_ylabel("final held-out loss")
    fig.suptitle("Best learning rate (star) across widths: µP lines the optima up")
    fig.tight_layout()
    fig.savefig(path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--widths", type=int, nargs="+", default=[64, 128, 256])
    p.add_argument("--rates", type=float, nargs="+", default=RATES)
    p.add_argument("--seeds", type=int, nargs="+", default=SEEDS, help="train.seed values: every rate runs with each")
    p.add_argument("--max-extend", type=int, default=3, help="rates added past an end of the grid the optimum sits on")
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--out", default=str(ROOT / "bench/out/lr_transfer"))
    run(p.parse_args())


if __name__ == "__main__":
    main()
