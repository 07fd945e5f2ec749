"""Faults that cross a network, on real hosts (`cluster/hosts.sh`, needs root): what each costs a run.

One `raylm train` job (debug preset, scaling.num_workers=[1,2], one worker per host, corpus and
run on s3:// through the head's moto_server, a checkpoint every 4 steps, the preemption check
every step, health checks as docs/elastic.md recommends) is submitted from the client host. After
6 steps on 2 workers it takes three faults on worker host h1, one after the other, each made while
the head's training workers are stopped at a step the bench has read, and each followed by h1's
return and the run's growth back to 2 workers (tests/test_hosts.py makes the same faults):

- partition: h1's link down (no process dies) until the run has stepped on 1 worker, then up;
- crash: every process of h1 SIGKILLed at once, then h1 booted again;
- preemption: `ray drain-node` on h1 with a 120 s deadline (a spot reclaim notice); once the run
  has checkpointed at the notice, h1 is crashed (the reclaim, from which the time is counted)
  and then booted again.

The run is then stopped (`ray job stop`) and the same run on one host (both workers on the head),
uninterrupted, is trained to the same step. Printed per fault: seconds from the fault to the next
new step (the first step number the run had not reached before the fault), the steps redone
(trained before the fault and trained again after the restore), and the largest relative loss
difference against the one-host run over the steps from the fault to the next; and for the whole
run, the steps lost and repeated in the final metrics (goal 0 and 0).

`--detect` measures instead how long the head takes to declare a cut-off host dead (the cost that
decides a partition's), for Ray's default health checks and for the setting docs/elastic.md
recommends: RAY_health_check_period_ms and RAY_health_check_failure_threshold on the head.

    sudo python bench/hosts_faults.py            # the fault table
    sudo python bench/hosts_faults.py --detect   # the detection-time table
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from test_hosts import (DETECT_FAST, OPEN_ENDED, UPLOAD, Faults, Hosts, Job, alive_nodes,  # noqa: E402
                        node_id_of, restores, why_not)

FAST = DETECT_FAST


def wait(predicate, what: str, timeout: float = 1800, poll: float = 1.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(poll)
    raise SystemExit(f"bench/hosts_faults.py: timed out waiting for {what}")


def fault_table(h: Hosts) -> list[str]:
    job = Job(h, "bench-faults", *OPEN_ENDED, "train.checkpoint_every=4", "train.preemption_check_every=1",
              "run.max_failures=10")
    try:
        wait(lambda: (r := job.rows()) and r[-1]["world_size"] == 2 and r[-1]["step"] >= 6, "steps on 2 workers")
        faults = Faults(h, job)
        seen = [faults.hit(fault) for fault in ("partition", "crash", "preemption")]
        job.stop()
    finally:
        job.kill()
    rows = job.rows()
    steps = [r["step"] for r in rows]
    last = max(steps)
    restored = restores(h, job.run)
    reference_job = Job(h, "bench-one-host", *OPEN_ENDED[1:], f"train.max_steps={last}", "train.checkpoint_every=1000",
                        workers="2", resources="{host_h0: 0.5}")
    reference_job.finish()
    reference = {r["step"]: r["loss"] for r in reference_job.rows()}
    lines = []
    for i, out in enumerate(seen):
        end = seen[i + 1]["at"] if i + 1 < len(seen) else last
        diff = max(abs(r["loss"] - reference[r["step"]]) / abs(reference[r["step"]])
                   for r in rows if out["at"] < r["step"] <= end)
        redone = out["at"] - restored[out["restores_before"]]["step"]
        lines.append(f"| {out['fault']} | {out['next_new_step_s']:.1f} | {redone} | {diff:.1e} |")
    before = max(abs(r["loss"] - reference[r["step"]]) / abs(reference[r["step"]])
                 for r in rows if r["step"] <= seen[0]["at"])
    lines.append(f"| (before the first fault) | | | {before:.1e} |")
    lost = len(set(range(1, last + 1)) - set(steps))
    repeated = len(steps) - len(set(steps))
    lines.append(f"\nwhole run: {last} steps, {lost} lost, {repeated} repeated; world size per step: "
                 + "".join(str(r["world_size"]) for r in rows))
    return lines


def detect(h: Hosts) -> float:
    """Seconds from cutting h1 off to the head listing it as dead; h1 then rejoins."""
    h1 = node_id_of(h, "198.18.0.2")
    t0 = time.time()
    h.sh("cut", "h1")
    wait(lambda: h1 not in alive_nodes(h), "h1 declared dead", poll=0.5)
    seconds = time.time() - t0
    h.sh("heal", "h1")
    wait(lambda: "198.18.0.2" in alive_nodes(h).values(), "h1 to rejoin", poll=3)
    return seconds


def cluster(prefix: str, env: str = "") -> Hosts:
    h = Hosts(prefix, Path("/var/lib/raylm-hosts"))
    if env:
        h.env["RAYLM_HOSTS_ENV"] = env
    h.sh("up", "2", "--cpus", "2", timeout=1800)
    h.python("client", UPLOAD)
    return h


def header() -> None:
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    print(f"# {datetime.date.today()} commit {commit} on {platform.machine()}, {os.cpu_count()} cores, "
          f"load average {os.getloadavg()[0]:.1f} at the start")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--detect", action="store_true", help="the detection-time table instead")
    parser.add_argument("--repeats", type=int, default=3, help="cuts per setting with --detect")
    parser.add_argument("--setting", choices=("both", "default", "fast"), default="both",
                        help="which health-check setting --detect measures")
    args = parser.parse_args()
    if reason := why_not():
        raise SystemExit(f"bench/hosts_faults.py: {reason}")
    header()
    prefix = f"rlb{os.getpid() % 100000}"
    if args.detect:
        print("| health checks on the head | seconds to declare a cut-off host dead (each cut) | median |")
        print("|---|---|---:|")
        settings = {"default": ("Ray's defaults", ""), "fast": (FAST, FAST)}
        for name, env in [settings[k] for k in ("default", "fast") if args.setting in (k, "both")]:
            h = cluster(prefix, env)
            try:
                times = [detect(h) for _ in range(args.repeats)]
            finally:
                h.sh("down", check=False)
            print(f"| {name} | {', '.join(f'{t:.1f}' for t in times)} | {sorted(times)[len(times) // 2]:.1f} |",
                  flush=True)
        return
    h = cluster(prefix, FAST)
    try:
        print("| fault | seconds to next new step | steps redone | max rel loss diff vs one host, to the next fault |")
        print("|---|---:|---:|---:|")
        for line in fault_table(h):
            print(line, flush=True)
    finally:
        h.sh("down", check=False)


if __name__ == "__main__":
    main()
