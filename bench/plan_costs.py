"""The GPU-hours and costs the docs quote for the 7B run and its proxy sweep, from `raylm plan`'s model.

    python bench/plan_costs.py

No measurement: it evaluates `raylm.plan.plan` (the function behind `raylm plan`) for
- the 7B run, configs/llama2-7b.yaml, for 2T tokens on 64 and on 8 H100s (docs/cluster.md, docs/plan.md);
- one full trial of the proxy sweep, configs/sweeps/llama2-7b-proxy.yaml (its `set:` applied to its
  base), on one 8 x H100 node at 40% and 25% MFU (docs/tune.md);
- the sweep's cost under ASHA: the steps its trials run, counted from the sweep's own settings
  (num_samples trials start; at each rung grace_period x reduction_factor^k, 1/reduction_factor of them
  go on), in full trials' worth; and that sweep's share of the 7B run's GPU-hours.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def asha_trials(num_samples: int, grace: int, factor: int, max_steps: int) -> float:
    """Full trials' worth of steps that asynchronous successive halving runs, in expectation."""
    rungs = [grace]
    while rungs[-1] * factor < max_steps:
        rungs.append(rungs[-1] * factor)
    rungs.append(max_steps)
    steps, alive, done = 0.0, float(num_samples), 0
    for rung in rungs:
        steps += alive * (rung - done)
        done, alive = rung, alive / factor
    return steps / max_steps


def main() -> None:
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()
    from raylm.config import load_config
    from raylm.plan import plan

    base = str(ROOT / "configs/llama2-7b.yaml")
    sweep_path = ROOT / "configs/sweeps/llama2-7b-proxy.yaml"
    sweep = yaml.safe_load(sweep_path.read_text())
    proxy_overrides = [f"{k}={v}" for k, v in sweep["set"].items()]

    print("| what | GPUs | MFU | tokens | wall time | GPU-hours | cost (USD, list price) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    runs = {}
    for gpus in (64, 8):
        p = plan(load_config(base), gpus, "h100", tokens=2e12)
        runs[gpus] = p
        print(f"| 7B run, configs/llama2-7b.yaml | {gpus} x H100 | {p.mfu:.0%} | {p.train_tokens / 1e12:.2f}T | "
              f"{p.total_time_s / 86400:.1f} days | {p.gpu_hours:,.0f} | {p.cost:,.0f} |")
    trial = {}
    for mfu in (0.40, 0.25):
        p = plan(load_config(base, proxy_overrides), sweep["resources"]["num_workers"], "h100", mfu=mfu)
        trial[mfu] = p
        print(f"| one proxy trial (125m, µP), full length | {p.gpus} x H100 | {mfu:.0%} | "
              f"{p.train_tokens / 1e9:.2f}B | {p.total_time_s / 60:.1f} min | {p.gpu_hours:.2f} | {p.cost:,.1f} |")
    asha = sweep["asha"]
    full = asha_trials(sweep["num_samples"], asha["grace_period"], asha["reduction_factor"],
                       sweep["set"]["train.max_steps"])
    for mfu, p in trial.items():
        print(f"| proxy sweep, {sweep['num_samples']} trials under ASHA = {full:.2f} full trials | "
              f"{p.gpus} x H100 per trial | {mfu:.0%} | {full * p.train_tokens / 1e9:.1f}B | "
              f"{full * p.total_time_s / 3600 / sweep['max_concurrent']:.1f} h on {sweep['max_concurrent']} busy nodes | "
              f"{full * p.gpu_hours:.1f} | {full * p.cost:,.0f} |")
    share = full * trial[0.25].gpu_hours / runs[64].gpu_hours
    print(f"\nthe sweep at 25% MFU is {share:.3%} of the 7B run's GPU-hours at 40% MFU "
          f"(ASHA: grace {asha['grace_period']}, reduction {asha['reduction_factor']}, "
          f"{sweep['num_samples']} trials of {sweep['set']['train.max_steps']} steps)")


if __name__ == "__main__":
    main()
