"""The worked example end to end: pretrain -> build the stdlib task -> fine-tune -> evaluate, with its cost.

    python bench/finetune_example.py                     # configs/demo.yaml, then configs/finetune-demo.yaml
    python bench/finetune_example.py --base runs/demo    # reuse a pretrained demo run
    python bench/finetune_example.py --quick             # a smaller model and fewer steps (a loaded machine)

Every stage is the `raylm` command a user types (`train --local`, `task build stdlib`, `eval
--task`), run as a child process, so its wall time and CPU time (user + system of the child) are
measured apart. Prints the table docs/finetune.md shows: the majority-class baseline (the most
common label of the training split, predicted for every test snippet), the base model zero-shot
and few-shot (choice log-likelihood per byte), and the fine-tuned model zero-shot; accuracy and
macro F1 on the same test snippets; the machine, date and commit. Output: OUT (default
/tmp/raylm-finetune-example), deleted first unless --keep.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import resource
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from raylm.use.tasks import classification_metrics  # noqa: E402

QUICK_MODEL = ["model.preset=debug", "model.vocab_size=4096", "model.max_seq_len=256"]
QUICK_PRETRAIN = [*QUICK_MODEL, "train.max_steps=80", "train.global_batch_tokens=2048", "train.micro_batch_size=8",
                  "train.eval_every=80", "train.eval_batches=4", "optimizer.warmup_steps=10"]
QUICK_FINETUNE = [*QUICK_MODEL, "train.max_steps=80", "train.global_batch_tokens=2048", "train.micro_batch_size=8",
                  "train.eval_every=80", "train.checkpoint_every=80", "optimizer.lr=1e-3"]


def run(stage: str, args: list[str], costs: dict, log: Path) -> str:
    """Run `python -m raylm ARGS`; record its wall and CPU seconds under `stage`; return its stdout."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    with open(log, "a") as err:
        err.write(f"\n$ raylm {' '.join(args)}\n")
        err.flush()
        done = subprocess.run([sys.executable, "-m", "raylm", *args], stdout=subprocess.PIPE, stderr=err,
                              text=True, env=env, cwd=REPO)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    wall = time.perf_counter() - start
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    costs[stage] = (costs.get(stage, (0.0, 0.0))[0] + wall, costs.get(stage, (0.0, 0.0))[1] + cpu)
    with open(log, "a") as err:
        err.write(done.stdout)
    if done.returncode != 0:
        sys.exit(f"{stage}: raylm {' '.join(args)} exited {done.returncode}; see {log}")
    return done.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", help="a pretrained demo run to reuse (skips pretraining)")
    parser.add_argument("--out", default="/tmp/raylm-finetune-example")
    parser.add_argument("--quick", action="store_true", help="debug-size model, 80 + 80 steps of 2048 tokens")
    parser.add_argument("--max-examples", type=int, default=None, help="evaluate the first N test snippets")
    parser.add_argument("--fewshot", type=int, default=3, help="few-shot examples for the base model (default 3)")
    parser.add_argument("--keep", action="store_true", help="keep OUT's earlier contents")
    args = parser.parse_args()
    out = Path(args.out)
    if out.exists() and not args.keep:
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    log = out / "log.txt"
    costs: dict[str, tuple[float, float]] = {}
    load_start = os.getloadavg()[0]

    signal.signal(signal.SIGTERM, lambda *_: sys.exit("stopped (SIGTERM)"))
    task_dir = out / "stdlib-task"
    results: dict[str, dict] = {}
    base = args.base
    try:
        if base is None:
            run("pretrain", ["train", "configs/demo.yaml", "--local", f"run.output_dir={out}", "run.name=demo",
                             *(QUICK_PRETRAIN if args.quick else [])], costs, log)
            base = str(out / "demo")
        run("build task", ["task", "build", "stdlib", "--out", str(task_dir)], costs, log)
        run("fine-tune", ["train", "configs/finetune-demo.yaml", "--local", f"run.output_dir={out}", "run.name=finetuned",
                          f"model.init_from={base}", f"data.sources.0.path={task_dir / 'train.jsonl'}",
                          *(QUICK_FINETUNE if args.quick else [])], costs, log)
        finetuned = str(out / "finetuned")

        limit = ["--max-examples", str(args.max_examples)] if args.max_examples else []
        task = str(task_dir / "task.yaml")
        # The fine-tuned model first: the number the example is about, should the run be stopped.
        for name, run_dir, extra in (("fine-tuned, zero-shot", finetuned, []),
                                     ("base, zero-shot", base, []),
                                     (f"base, {args.fewshot}-shot", base, ["--num-fewshot", str(args.fewshot)])):
            path = out / f"eval-{len(results)}.json"
            run(f"eval: {name}", ["eval", run_dir, "--task", task, "--json", str(path), *limit, *extra], costs, log)
            results[name] = json.loads(path.read_text())["metrics"]
            if name.startswith("fine-tuned"):
                run("plot", ["plot", str(path), "--out", str(out)], costs, log)
    finally:  # also when a stage failed or was stopped: the table of what finished
        if (task_dir / "test.jsonl").exists():
            print_table(args, base or str(out / "demo"), task_dir, results, costs, load_start)


def print_table(args, base: str, task_dir: Path, results: dict, costs: dict, load_start: float) -> None:
    train_labels = [json.loads(line)["label"] for line in (task_dir / "train.jsonl").read_text().splitlines()]
    test = [json.loads(line)["label"] for line in (task_dir / "test.jsonl").read_text().splitlines()]
    test = test[:args.max_examples] if args.max_examples else test
    majority = Counter(train_labels).most_common(1)[0][0]
    baseline = classification_metrics(test, [majority] * len(test))

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO).stdout.strip()
    print(f"# bench/finetune_example.py{' --quick' if args.quick else ''}: {platform.machine()}, "
          f"{os.cpu_count()} cores, {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC, commit {commit}, "
          f"load average {load_start:.1f} at the start, {os.getloadavg()[0]:.1f} at the end")
    print(f"task: stdlib, {len(set(test))} labels, {len(test)} test snippets, {len(train_labels)} training snippets"
          f"; base {base}")
    print()
    print("| model | accuracy | macro F1 |")
    print("|---|---:|---:|")
    print(f"| majority class ({majority}) | {baseline['accuracy']:.3f} | {baseline['f1']:.3f} |")
    for name, m in results.items():
        print(f"| {name} | {m['accuracy']:.3f} | {m['f1']:.3f} |")
    print()
    print("| stage | wall s | CPU s (user + system) |")
    print("|---|---:|---:|")
    for stage, (wall, cpu) in costs.items():
        print(f"| {stage} | {wall:.0f} | {cpu:.0f} |")
    total_wall, total_cpu = sum(w for w, _ in costs.values()), sum(c for _, c in costs.values())
    print(f"| total | {total_wall:.0f} | {total_cpu:.0f} |", flush=True)


if __name__ == "__main__":
    main()
