"""Rerun a published benchmark by name and write the table it prints, with machine, date and commit.

    python bench/run.py --list            # every entry: its command, the docs it feeds, its expected time
    python bench/run.py NAME [NAME ...]   # run those entries
    python bench/run.py all               # run every entry this machine can run, in order, and the total time

Each entry is the exact command line whose output a table in README.md, docs/ or bench/RESULTS.md
publishes. The script's stdout is shown as it runs and written to bench/results/NAME.md: a header
(command, machine: `uname -m`, cores, CPU model, memory, GPU, load; the UTC date; the git commit
and whether the working tree was dirty; wall time), the Markdown tables the script printed, and
its whole output (NAME.failed.md when the script fails, keeping the last good file). `all` leaves
out entries that need a GPU or root (network namespaces) where those are missing, and entries
with no published table yet, and says so. Expected times are from the logs of the published runs
(bench/RESULTS.md), scaled to a quiet 2-core machine where the run was measured under load; each
is a guess, not a promise. Run them niced on a shared machine (`nice -n 10 python bench/run.py ...`).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"


@dataclass(frozen=True)
class Entry:
    script: str
    """The bench script, relative to the repository root."""
    args: tuple[str, ...]
    """Its flags, exactly as the published table was made."""
    feeds: tuple[str, ...]
    """Where its numbers are published: a file, and a section heading or phrase in it."""
    expected_min: float
    """Expected wall time on this 2-core machine when quiet, in minutes (from the published runs' logs)."""
    basis: str
    """Where expected_min comes from."""
    needs: tuple[str, ...] = ()
    """'gpu' (a CUDA device) or 'root' (cluster/hosts.sh's network namespaces)."""
    env: dict[str, str] = field(default_factory=dict)
    published: bool = True
    """False: no published table yet (run it by name; `all` leaves it out)."""

    def argv(self) -> list[str]:
        return [sys.executable, str(ROOT / self.script), *self.args]

    def command(self) -> str:
        env = "".join(f"{k}={v} " for k, v in self.env.items())
        return f"{env}python {self.script} {shlex.join(self.args)}".rstrip()


REGISTRY: dict[str, Entry] = {
    "plan_costs": Entry(
        "bench/plan_costs.py", (),
        ("docs/tune.md: The 7B proxy sweep", "docs/cluster.md: GPU-hours", "configs/sweeps/llama2-7b-proxy.yaml"),
        0.2, "seconds: it runs `raylm plan` five times"),
    "mup_coord": Entry(
        "bench/mup_coord.py", (),
        ("docs/mup.md: Checking it",),
        0.5, "2026-12-07: 5 CPU-s (2 min wall at load 45)"),
    "demo": Entry(
        "bench/demo.py", (),
        ("README.md: held-out loss", "README.md: minutes on 2 CPU cores"),
        14, "README: 12 and 15 minutes from fresh clones, install included"),
    "trainer_overhead": Entry(
        "bench/trainer_overhead.py", ("--steps", "60"),
        ("bench/RESULTS.md: Ray Train overhead",),
        3, "2026-11-25 log: 42 s + 50 s of runs, plus `raylm prepare` and two cluster starts"),
    "data_throughput": Entry(
        "bench/data_throughput.py", ("--steps", "60"),
        ("bench/RESULTS.md: Data pipeline",),
        6, "2026-11-25 table: ~75 s of timed runs, corpus copy, 3 cluster starts, 60 training steps of 0.43 s"),
    "restart_cost": Entry(
        "bench/restart_cost.py", ("--early", "10", "--late", "100", "--repeats", "2"),
        ("bench/RESULTS.md: Streaming restart cost", "docs/elastic.md: restart"),
        10, "2026-12-07 table: a 100-step streaming run, 6 restarts of ~25 s, a kill, each with a Ray start"),
    "restart_cost_in_job": Entry(
        "bench/restart_cost.py", ("--in-job", "--early", "2", "--late", "200", "--repeats", "3"),
        ("bench/RESULTS.md: Streaming restart cost (failure restarts inside a job: not measured yet)",),
        15, "a guess, not yet run: 6 jobs of 202 debug-model steps, each with a Ray Train start and 2 restarts "
            "of ~20-25 s (the 2026-12-07 kill took 17.2 s)", published=False),
    "elastic_curve": Entry(
        "bench/elastic_curve.py", ("--steps", "60"),
        ("bench/RESULTS.md: Loss curve through resizes", "docs/elastic.md: docs/img/elastic_curve.png"),
        10, "2026-12-02: two 60-step runs on a 2-node ray.cluster_utils.Cluster with 4 restores"),
    "plan_memory": Entry(
        "bench/plan_memory.py", ("--suite", "cpu"),
        ("bench/RESULTS.md: Planner memory vs measured peak", "docs/plan.md: Planner memory"),
        18, "2026-12-01 log: 'The whole suite took 18 minutes' (load 5-8)"),
    "lr_transfer": Entry(
        "bench/lr_transfer.py", ("--steps", "100"),
        ("bench/RESULTS.md: Learning-rate transfer", "docs/mup.md: Does it transfer?",
         "docs/tune.md: Does it transfer?", "docs/img/lr_transfer.png"),
        45, "2026-12-02: 42 trials in ~40 min (load 5-30); today's grid is 6 rates x 2 seeds = 72 trials, "
            "run 4 at a time, so ~45 min quiet, ~70 loaded"),
    "scale_data": Entry(
        "bench/scale_data.py", ("--where", "local", "--repeats", "5"),
        ("bench/RESULTS.md: Prepared data at scale", "docs/plan.md: Data at scale", "docs/cluster.md: scale_data"),
        4, "2026-12-07 log: local writes 17 + 28 + 97 s, 15 fresh workers of ~2 s (load 30-50)"),
    "scale_data_s3": Entry(
        "bench/scale_data.py", ("--repeats", "3"),
        ("bench/RESULTS.md: Prepared data at scale (the s3 rows)",),
        20, "2026-12-07 log: moto writes 19 + 190 + 716 s at load 30-50 (moto spools to disk), local writes, "
            "18 fresh workers of ~2 s; the local rows of the same run are superseded by scale_data"),
    "scale_checkpoint": Entry(
        "bench/scale_checkpoint.py", ("--preset", "125m", "--every", "8", "--saves", "2"),
        ("bench/RESULTS.md: Checkpoint cost", "docs/plan.md: checkpoint costs", "docs/cluster.md: Checkpoint cost"),
        8, "2026-12-07 20:17 log: runs of 144 s (load ~2) + 286 s (load 10-14), moto start and model builds"),
    "scale_checkpoint_tiny": Entry(
        "bench/scale_checkpoint.py", ("--preset", "tiny", "--every", "8", "--saves", "2"),
        ("bench/RESULTS.md: Checkpoint cost (the tiny preset)",),
        4, "2026-12-07 log: runs of 316 + 294 s at load 35-45 (about 8x a quiet machine's time)"),
    "scale_checkpoint_every3": Entry(
        "bench/scale_checkpoint.py", ("--preset", "tiny", "--every", "3", "--saves", "3"),
        ("bench/RESULTS.md: Checkpoint cost (a save every 3 steps)",),
        3, "2026-12-07 log: runs of 271 + 234 s at load 35-45"),
    "scale_restart": Entry(
        "bench/scale_restart.py", (),
        ("bench/RESULTS.md: Restart reads each checkpoint byte once", "docs/plan.md: restart", "docs/cluster.md: restart"),
        8, "2026-12-07 log: 4 restarts per preset, 125m's 41-76 s each, under load"),
    "scale_memory": Entry(
        "bench/scale_memory.py", (),
        ("bench/RESULTS.md: Gradient accumulation memory", "docs/plan.md: grad_sync"),
        12, "2026-12-07 log: 13:56-14:34 UTC at load 30-50; its docstring: 10-20 min on 2 busy cores"),
    "finetune_example": Entry(
        "bench/finetune_example.py", ("--quick", "--max-examples", "150"),
        ("bench/RESULTS.md: Fine-tuning and task evaluation", "docs/finetune.md"),
        8, "2026-12-07 log: 376 CPU-s in all (2985 s wall at load 25-40)"),
    "finetune_example_full": Entry(
        "bench/finetune_example.py", (),
        ("bench/RESULTS.md: The full-size run", "docs/finetune.md"),
        40, "estimate: the demo's 300 steps plus 120 fine-tuning steps and the evaluations on a quiet machine; "
            "the one attempt (2026-12-07, load 35-127) did not finish", published=False),
    "hosts_faults": Entry(
        "bench/hosts_faults.py", (),
        ("bench/RESULTS.md: Faults on real hosts", "docs/elastic.md: fault table"),
        12, "2026-12-07 quiet test run of the same faults: 625 s (the bench's own run, at load 10-62, took 31 min)",
        needs=("root",)),
    "hosts_faults_detect": Entry(
        "bench/hosts_faults.py", ("--detect",),
        ("bench/RESULTS.md: Detecting a lost host", "docs/elastic.md: declare a cut-off host dead"),
        12, "2026-12-07: 3 settings x 3 cuts of 20-77 s, plus host starts", needs=("root",)),
    "gpu_mfu": Entry(
        "bench/gpu_mfu.py", ("--preset", "1b", "--seq-len", "2048", "--micro-batch", "4"),
        ("bench/RESULTS.md: GPU MFU (not measured yet)",),
        3, "20 steps of the 1B model on one GPU, plus compile", needs=("gpu",)),
}


def git(*args: str) -> str:
    try:
        return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""


def commit() -> str:
    head = git("rev-parse", "--short", "HEAD") or "unknown"
    dirty = git("status", "--porcelain", "--untracked-files=no")
    return f"{head} (+dirty)" if dirty else head


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def memory_gib() -> str:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return f"{int(line.split()[1]) / 2**20:.0f} GiB"
    except OSError:
        pass
    return "? GiB"


def gpu_name() -> str | None:
    if not shutil.which("nvidia-smi"):
        return None
    out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True)
    names = [n.strip() for n in out.stdout.splitlines() if n.strip()]
    return f"{len(names)} x {names[0]}" if names else None


def machine() -> str:
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"{platform.machine()}, {os.cpu_count()} cores ({cpu_model()}), {memory_gib()}, "
            f"{gpu_name() or 'no GPU'}; load average {load:.1f} at the start")


def missing(entry: Entry) -> list[str]:
    out = [] if entry.published else ["a published table (run it by name)"]
    if "gpu" in entry.needs and gpu_name() is None:
        out.append("a GPU")
    if "root" in entry.needs and (os.geteuid() != 0 or not shutil.which("ip")):
        out.append("root and `ip netns`")
    return out


def tables(text: str) -> str:
    """The Markdown tables in text: runs of lines that start with '|' (at least a header and a rule)."""
    blocks, block = [], []
    for line in text.splitlines() + [""]:
        if line.lstrip().startswith("|"):
            block.append(line.strip())
        else:
            if len(block) >= 2:
                blocks.append("\n".join(block))
            block = []
    return "\n\n".join(blocks)


def run_entry(name: str) -> tuple[int, float]:
    entry = REGISTRY[name]
    env = {**os.environ, **entry.env}
    env.setdefault("PYTHONUNBUFFERED", "1")  # the table shows as the script prints it
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    header_machine, header_commit, started = machine(), commit(), datetime.datetime.now(datetime.timezone.utc)
    print(f"== bench/run.py {name}: {entry.command()}", flush=True)
    t0 = time.monotonic()
    proc = subprocess.Popen(entry.argv(), cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True, bufsize=1)
    lines = []
    for line in proc.stdout:  # shown as it comes and kept for the results file
        sys.stdout.write(line)
        lines.append(line)
    rc = proc.wait()
    wall = time.monotonic() - t0
    output = "".join(lines)
    RESULTS.mkdir(parents=True, exist_ok=True)
    found = tables(output)
    path = RESULTS / (f"{name}.md" if rc == 0 else f"{name}.failed.md")  # a failed run keeps the last good file
    path.write_text(
        f"# {name}\n\n"
        f"    {entry.command()}\n\n"
        f"- machine: {header_machine}\n"
        f"- date: {started:%Y-%m-%d %H:%M} UTC\n"
        f"- commit: {header_commit}\n"
        f"- wall time: {wall / 60:.1f} min (expected {entry.expected_min:g}); exit status {rc}\n"
        f"- published in: {'; '.join(entry.feeds)}\n\n"
        + (f"## Tables printed\n\n{found}\n\n" if found else "")
        + f"## Output\n\n```\n{output.rstrip()}\n```\n")
    print(f"== bench/run.py {name}: exit {rc}, {wall / 60:.1f} min; wrote {path.relative_to(ROOT)}",
          flush=True)
    return rc, wall


def list_entries() -> None:
    total = 0.0
    for name, entry in REGISTRY.items():
        skip = missing(entry)
        total += 0 if skip else entry.expected_min
        print(f"{name}\n    {entry.command()}\n    feeds: {'; '.join(entry.feeds)}\n"
              f"    expected: {entry.expected_min:g} min ({entry.basis})"
              + (f"\n    skipped here by `all`: needs {', '.join(skip)}" if skip else ""))
    print(f"all: expected {total:.0f} min on this machine")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help=f"'all' or entries: {', '.join(REGISTRY)}")
    parser.add_argument("--list", action="store_true", help="list the entries with their expected times")
    args = parser.parse_args()
    if args.list or not args.names:
        list_entries()
        return
    if args.names == ["all"]:
        names = [n for n in REGISTRY if not missing(REGISTRY[n])]
        for n in REGISTRY:
            if n not in names:
                print(f"== bench/run.py {n}: skipped (needs {', '.join(missing(REGISTRY[n]))})")
    else:
        unknown = [n for n in args.names if n not in REGISTRY]
        if unknown:
            parser.exit(2, f"bench/run.py: error: unknown entry {unknown[0]!r}; valid: all, {', '.join(REGISTRY)}\n")
        names = args.names
    print(f"== bench/run.py: {len(names)} entries, expected {sum(REGISTRY[n].expected_min for n in names):.0f} min")
    t0, failed = time.monotonic(), []
    for name in names:
        rc, _ = run_entry(name)
        if rc:
            failed.append(name)
    print(f"== bench/run.py: {len(names)} entries in {(time.monotonic() - t0) / 60:.1f} min"
          + (f"; failed: {', '.join(failed)}" if failed else ""))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
