"""The README's main job, timed: `raylm train configs/demo.yaml`, then `raylm eval` of its final checkpoint.

    python bench/demo.py [--out /tmp/raylm-demo] [override ...]

Runs the two commands a user types, as child processes (so the Ray cluster is the command's own,
as from a fresh shell), and prints what README.md quotes: the training command's wall time, the
held-out loss of the final checkpoint (`raylm eval RUN --json`), the mean training loss of the
metrics.jsonl rows of the last 50 steps, and the held-out split's size (sequences). Not timed: the
install. The README's "12 and 15 minutes from fresh clones" included `pip install`; this is the
training alone. OUT is deleted first.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="/tmp/raylm-demo", help="run.output_dir (deleted first)")
    p.add_argument("overrides", nargs="*", help="extra config overrides (the published figures use none)")
    args = p.parse_args()
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    raylm = [sys.executable, "-m", "raylm"]
    t0 = time.monotonic()
    subprocess.run([*raylm, "train", "configs/demo.yaml", f"run.output_dir={out}", *args.overrides], cwd=ROOT,
                   check=True)
    train_s = time.monotonic() - t0
    (run,) = [d for d in out.iterdir() if (d / "metrics.jsonl").is_file()]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    train = [r for r in rows if "loss" in r and "step" in r]
    last_step = max(r["step"] for r in train)
    tail = [r["loss"] for r in train if r["step"] > last_step - 50]
    eval_json = out / "eval.json"
    subprocess.run([*raylm, "eval", str(run), "--json", str(eval_json)], cwd=ROOT, check=True)
    held_out = json.loads(eval_json.read_text())
    print("| what | value |")
    print("|---|---:|")
    print(f"| `raylm train configs/demo.yaml`, wall time (no install) | {train_s / 60:.1f} min |")
    print(f"| steps | {last_step} |")
    print(f"| held-out loss of the final checkpoint (`raylm eval`) | {held_out['loss']:.2f} |")
    print(f"| mean training loss, metrics.jsonl rows of the last 50 steps ({len(tail)} rows) | "
          f"{statistics.mean(tail):.2f} |")
    print(f"| held-out sequences evaluated | {held_out.get('sequences', '?'):,} |")


if __name__ == "__main__":
    main()
