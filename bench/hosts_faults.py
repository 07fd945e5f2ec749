"""Faults that cross a network, on real hosts (`cluster/hosts.sh`, needs root): what each costs a run.

For each fault a `raylm train` job (debug preset, scaling.num_workers=[1,2], one worker per host,
corpus and run on s3:// through the head's moto_server, a checkpoint every 2 steps but for the
preemption's run, which has only the one it makes at the notice) is submitted from
the client host; after 3 steps on 2 workers the fault hits the worker host h1:

- partition: h1's link down (no process dies) until the run has stepped on 1 worker, then up;
- crash: every process of h1 SIGKILLed at once, then h1 booted again;
- preemption: `ray drain-node` on h1 with a 60 s deadline (a spot reclaim notice); once the run
  has checkpointed at the notice, h1 is crashed (the reclaim, from which the time is counted)
  and then booted again.

Printed per fault: seconds from the fault to the next new step (the first step number the run had
not reached before the fault), the steps redone (trained before the fault and trained again after
the restart), the steps lost and repeated in the final metrics (goal 0 and 0), and the largest
relative loss difference against the same run on one host (both workers on the head),
uninterrupted (the global batch is exact at any world size).

`--detect` measures instead how long the head takes to declare a cut-off host dead (the cost that
decides a partition's), for Ray's default health checks and for the setting docs/elastic.md
recommends: RAY_health_check_period_ms and RAY_health_check_failure_threshold on the head.

    sudo python bench/hosts_faults.py            # the fault table
    sudo python bench/hosts_faults.py --detect   # the detection-time table
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from test_hosts import DETECT_FAST, FAULT_STEPS, UPLOAD, Hosts, Job, alive_nodes, host_processes, why_not  # noqa: E402
from support import frozen  # noqa: E402

FAST = DETECT_FAST


def wait(predicate, what: str, timeout: float = 1800, poll: float = 1.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(poll)
    raise SystemExit(f"bench/hosts_faults.py: timed out waiting for {what}")


def node_id_of(h: Hosts, ip: str) -> str:
    return next(node for node, addr in alive_nodes(h).items() if addr == ip)


def run_fault(h: Hosts, fault: str, reference: dict | None) -> tuple[dict, dict]:
    # The preemption's run has no periodic checkpoint before the notice: the one it restores from
    # must be the one made at the notice.
    every = 1000 if fault == "preemption" else 2
    job = Job(h, f"bench-{fault}", f"train.checkpoint_every={every}")
    try:
        wait(lambda: (r := job.rows()) and r[-1]["world_size"] == 2 and r[-1]["step"] >= 3, "steps on 2 workers")
        with frozen(host_processes(h, "h0")):
            at = job.last_step()
            t0 = time.time()
            if fault == "partition":
                h.sh("cut", "h1")
            elif fault == "crash":
                h.sh("crash", "h1")
            else:
                h.run("h0", f"ray drain-node --node-id {node_id_of(h, '198.18.0.2')} --reason DRAIN_NODE_REASON_PREEMPTION "
                            "--reason-message spot --deadline-remaining-seconds 60")
        if fault == "preemption":  # the reclaim comes once the run has checkpointed at the notice
            wait(lambda: newest_checkpoint_step(h, job.run) >= at, "the just-in-time checkpoint", poll=2)
            with frozen(host_processes(h, "h0")):
                at = job.last_step()
                t0 = time.time()
                h.sh("crash", "h1")
        new = wait(lambda: next((r for r in job.rows() if r["step"] > at and r["time"] > t0), None), "the next new step")
        if fault == "partition":
            h.sh("heal", "h1")
        else:
            h.sh("revive", "h1")
        wait(lambda: "198.18.0.2" in alive_nodes(h).values(), "h1 to rejoin", poll=3)
        job.finish()
    finally:
        if not job.ended():
            job.proc.kill()
    rows = job.rows()
    events = [r for r in records_all(h, job.run) if r.get("event") == "restored"]
    steps = [r["step"] for r in rows]
    if reference is None:
        reference = one_host_reference(h)
    worst = max(abs(r["loss"] - reference[r["step"]]) / abs(reference[r["step"]]) for r in rows)
    restored_at = events[0]["step"] if events else at
    return {
        "fault": fault,
        "seconds to next new step": new["time"] - t0,
        "steps redone": max(0, at - restored_at),
        "steps lost": len(set(range(1, FAULT_STEPS + 1)) - set(steps)),
        "steps repeated": len(steps) - len(set(steps)),
        "max rel loss diff": worst,
        "world sizes": "".join(str(r["world_size"]) for r in rows),
    }, reference


def newest_checkpoint_step(h: Hosts, run: str) -> int:
    out = h.python("client", f"""
from raylm.train import checkpoint as ckpt
found = ckpt.latest_checkpoint({run!r})
print(ckpt.read_marker(found)["train_state"]["step"] if found else -1)
""")
    return int(out.splitlines()[-1])


def records_all(h: Hosts, run: str) -> list[dict]:
    from test_hosts import records
    return records(h, run)


def one_host_reference(h: Hosts) -> dict:
    """Step -> loss of the same run on one host (both workers on the head), uninterrupted."""
    job = Job(h, "bench-one-host", "train.checkpoint_every=1000", "scaling.num_workers=2",
              "scaling.resources_per_worker={host_h0: 0.5}")
    job.finish()
    return {r["step"]: r["loss"] for r in job.rows()}


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
    h = cluster(prefix)
    try:
        print("| fault | seconds to next new step | steps redone | steps lost | steps repeated | "
              "max rel loss diff vs one host | world size per step |")
        print("|---|---:|---:|---:|---:|---:|---|")
        reference = None
        for fault in ("partition", "crash", "preemption"):
            row, reference = run_fault(h, fault, reference)
            print(f"| {row['fault']} | {row['seconds to next new step']:.1f} | {row['steps redone']} | "
                  f"{row['steps lost']} | {row['steps repeated']} | {row['max rel loss diff']:.1e} | "
                  f"{row['world sizes']} |", flush=True)
    finally:
        h.sh("down", check=False)


if __name__ == "__main__":
    main()
