"""Cost of a streaming restart: time from restart to the first step, at two points of one run.

One streaming run (`raylm train` on Ray, default corpus, debug model) checkpoints at step
`--early` and at step `--late` (about 10x the tokens). Each checkpoint is then resumed
(`run.resume_from=CHECKPOINT`, a new run that trains a few steps) and timed from the call of
`fit` to the first step's record. Side by side, in the same session, each is also resumed
from a copy of the checkpoint whose `data_anchor` is removed: the pipeline then reads the
corpus from its start and drops the consumed rows, which is what every restart did before
anchors (the 'replay' column). Finally a training worker of a running job is SIGKILLed and
the time from the kill to the next new step is measured (Ray restarts the worker group from
the latest checkpoint).

    python bench/restart_cost.py [--early 20] [--late 200] [--repeats 3] [override ...]

With --in-job, failure restarts inside running jobs instead (what a preempted or crashed worker
costs): each job checkpoints every --early steps and trains to --late + 2; its training worker is
SIGKILLed once just after the checkpoint of step --early and once just after that of step --late
(so the late point has late/early x the tokens: 100x with --early 2 --late 200), and Ray Train
restarts the worker group from the newest checkpoint. Timed: the kill to the next new step's
record. Jobs alternate anchored / replay (every checkpoint's data anchor removed right after each
kill, before the restart reads them), --repeats times each; medians compared.

    python bench/restart_cost.py --in-job --early 2 --late 200 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def step_records(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    out = []
    for line in (path.read_text().splitlines() if path.exists() else []):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "loss" in record:
            out.append(record)
    return out


def without_anchor(checkpoint: Path, out: Path) -> Path:
    """A copy of `checkpoint` whose marker has no data anchor (the marker is not checksummed)."""
    from raylm.train import checkpoint as ckpt

    copy = out / (checkpoint.name + "-replay")
    shutil.copytree(checkpoint, copy)
    marker_file = copy / ckpt.MARKER
    marker = json.loads(marker_file.read_text())
    marker["train_state"]["data_anchor"] = None
    marker_file.write_text(json.dumps(marker))
    return copy


def time_to_first_step(load_config, config, overrides, checkpoint: Path, name: str) -> tuple[float, float]:
    """(seconds from the call of `fit` to the first step's record, of which the first step's
    wait for its data)."""
    from raylm.ray.train import fit
    from raylm.train import checkpoint as ckpt
    from raylm.train.runs import resolve_run

    step = ckpt.read_marker(checkpoint)["train_state"]["step"]
    cfg = load_config(config, [*overrides, f"run.resume_from={checkpoint}", f"run.name={name}",
                               f"train.max_steps={step + 2}", "train.checkpoint_every=0"])
    start = time.time()
    result = fit(resolve_run(cfg), log=lambda line: None)
    first = step_records(Path(result.run_dir))[0]
    assert first["step"] == step + 1
    return first["time"] - start, first["step_time_s"] * first["data_wait_fraction"]


def start_fit(load_config, config, overrides):
    """A Ray Train run of `config` with `overrides`, fitted by a task on this node: (run dir, ref)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from raylm.train.runs import resolve_run

    spec = resolve_run(load_config(config, overrides))

    def run(spec):
        from raylm.ray.train import fit

        fit(spec, log=lambda line: None)

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    return Path(spec.run_dir), ray.remote(num_cpus=0)(run).options(scheduling_strategy=here).remote(spec)


def kill_to_next_step(load_config, config, overrides) -> tuple[float, int]:
    import ray

    run_dir, ref = start_fit(load_config, config,
                             [*overrides, "run.name=killed", "train.max_steps=60", "train.checkpoint_every=10"])
    while len(step_records(run_dir)) < 25:
        time.sleep(0.1)
    pid = worker_pid()
    killed_at_step = step_records(run_dir)[-1]["step"]
    kill_time = time.time()
    os.kill(pid, signal.SIGKILL)
    while True:
        newer = [r for r in step_records(run_dir) if r["time"] > kill_time]
        if newer:
            break
        time.sleep(0.1)
    ray.get(ref)
    return newer[0]["time"] - kill_time, killed_at_step


def strip_anchors(run_dir: Path) -> None:
    """Remove the data anchor from every checkpoint marker of run_dir (the next restart replays the stream)."""
    from raylm.train import checkpoint as ckpt

    for marker_file in Path(run_dir).glob(f"checkpoint_*/{ckpt.MARKER}"):
        marker = json.loads(marker_file.read_text())
        if marker.get("train_state", {}).get("data_anchor") is not None:
            marker["train_state"]["data_anchor"] = None
            marker_file.write_text(json.dumps(marker))


def worker_pid() -> int:
    import ray

    alive = ray._private.state.actors(actor_state_name="ALIVE").values()
    return next(a["Pid"] for a in alive if a["ActorClassName"] == "RayTrainWorker")


def killed_job(load_config, config, overrides, early: int, late: int, replay: bool, name: str) -> list[dict]:
    """One job killed after the checkpoints of steps `early` and `late`: per kill, the step restored
    from, the tokens it had consumed and the seconds from the kill to the next new step."""
    import ray

    from raylm.train import checkpoint as ckpt

    overrides = [*overrides, f"run.name={name}", f"train.max_steps={late + 2}", f"train.checkpoint_every={early}",
                 "run.keep_checkpoints=2", "run.max_failures=4"]
    tokens_per_step = load_config(config, overrides).train.global_batch_tokens
    run_dir, ref = start_fit(load_config, config, overrides)
    kills = []
    for point in (early, late):
        marker = run_dir / ckpt.checkpoint_dir_name(point) / ckpt.MARKER
        while not (marker.exists() and any(r["step"] > point for r in step_records(run_dir))):
            time.sleep(0.05)
        kill_time = time.time()
        os.kill(worker_pid(), signal.SIGKILL)
        if replay:
            strip_anchors(run_dir)
        before = max(r["step"] for r in step_records(run_dir) if r["time"] <= kill_time)
        while not (newer := [r for r in step_records(run_dir) if r["time"] > kill_time]):
            time.sleep(0.05)
        restored = newer[0]["step"] - 1
        kills.append({"point": point, "restored_step": restored, "steps_lost": before - restored,
                      "tokens": restored * tokens_per_step, "seconds": newer[0]["time"] - kill_time})
    ray.get(ref)
    return kills


def in_job(args, load_config, overrides) -> None:
    """--in-job: failure restarts inside running jobs, anchored and replay jobs alternated."""
    times: dict[tuple[str, int], list[float]] = {}
    tokens: dict[int, list[int]] = {}
    for i in range(args.repeats):
        for mode in ("anchored", "replay"):
            for kill in killed_job(load_config, args.config, overrides, args.early, args.late, mode == "replay",
                                   f"{mode}-{i}"):
                times.setdefault((mode, kill["point"]), []).append(kill["seconds"])
                tokens.setdefault(kill["point"], []).append(kill["tokens"])
                print(f"  {mode} job {i}: killed after step {kill['point']}, restored step {kill['restored_step']} "
                      f"({kill['steps_lost']} steps redone): {kill['seconds']:.1f} s to the next new step", flush=True)
    print(f"\nfailure restarts inside one job (a training worker SIGKILLed), {args.repeats} jobs per mode, "
          "anchored and replay alternated; seconds from the kill to the next new step\n")
    print("| killed after step | tokens consumed (median) | anchored, median (s) | anchored, each (s) | "
          "replay, median (s) | replay, each (s) |")
    print("|---:|---:|---:|---|---:|---|")
    med = {k: statistics.median(v) for k, v in times.items()}
    for point in (args.early, args.late):
        a, r = times[("anchored", point)], times[("replay", point)]
        print(f"| {point} | {statistics.median(tokens[point]):,.0f} | {med[('anchored', point)]:.1f} | "
              f"{', '.join(f'{t:.1f}' for t in a)} | {med[('replay', point)]:.1f} | {', '.join(f'{t:.1f}' for t in r)} |")
    ratio = statistics.median(tokens[args.late]) / max(1, statistics.median(tokens[args.early]))
    print(f"| **ratio {args.late} / {args.early}** ({ratio:.0f}x the tokens) | | "
          f"**{med[('anchored', args.late)] / med[('anchored', args.early)]:.2f}** | | "
          f"**{med[('replay', args.late)] / med[('replay', args.early)]:.2f}** | |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "configs/debug.yaml"))
    parser.add_argument("--early", type=int, default=20)
    parser.add_argument("--late", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3, help="anchored restarts at each point (median taken)")
    parser.add_argument("--in-job", action="store_true",
                        help="failure restarts inside running jobs (a worker SIGKILLed), anchored vs replay")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")

    import ray

    from raylm.config import load_config
    from raylm.ray.connect import configure_local_cluster
    from raylm.ray.train import fit
    from raylm.train import checkpoint as ckpt
    from raylm.train.runs import resolve_run

    out = Path(tempfile.mkdtemp(prefix="raylm-restart-"))
    overrides = [f"run.output_dir={out}", "data.sources.0.max_bytes=40000000", "data.seq_len=64",
                 "train.global_batch_tokens=16384", "train.micro_batch_size=32", "train.eval_every=0",
                 "train.log_every=50", "run.sample_tokens=0", "run.keep_checkpoints=10", "scaling.num_workers=1",
                 "scaling.cpus_per_worker=1", *args.overrides]
    configure_local_cluster()
    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    if args.in_job:
        from raylm.data.plan import plan_files, stream_passes

        cfg = load_config(args.config, [*overrides, f"train.max_steps={args.late + 2}"])
        overrides.append(f"data.stream_passes={stream_passes(cfg, plan_files(cfg, 'train'))}")
        in_job(args, load_config, overrides)
        ray.shutdown()
        shutil.rmtree(out, ignore_errors=True)
        return

    # The passes the base run's stream holds (derived from its train.max_steps), fixed for every
    # run here: the resumed runs stop after 2 steps, and would otherwise each plan a stream of
    # their own length (a later restart, a longer plan), which a real restart of the same run
    # does not do.
    from raylm.data.plan import plan_files, stream_passes

    cfg = load_config(args.config, [*overrides, "run.name=base", f"train.max_steps={args.late}",
                                    f"train.checkpoint_every={args.early}"])
    overrides.append(f"data.stream_passes={stream_passes(cfg, plan_files(cfg, 'train'))}")
    cfg = load_config(args.config, [*overrides, "run.name=base", f"train.max_steps={args.late}",
                                    f"train.checkpoint_every={args.early}"])
    start = time.time()
    base = Path(fit(resolve_run(cfg), log=lambda line: None).run_dir)
    print(f"base run: {args.late} steps of {cfg.train.global_batch_tokens:,} tokens in {time.time() - start:.0f} s")

    # Anchored restarts alternate early/late `--repeats` times (the fixed cost of a Ray Train
    # start on a small machine varies by seconds); the medians are compared. Replay runs once.
    anchored: dict[int, list[tuple[float, float]]] = {args.early: [], args.late: []}
    replay, tokens = {}, {}
    for i in range(args.repeats):
        for step in (args.early, args.late):
            checkpoint = base / ckpt.checkpoint_dir_name(step)
            anchored[step].append(time_to_first_step(load_config, args.config, overrides, checkpoint,
                                                     f"anchored-{step}-{i}"))
            print(f"  anchored restart at step {step}: {anchored[step][-1][0]:.1f} s "
                  f"(first step's data wait {anchored[step][-1][1]:.1f} s)", flush=True)
    for step in (args.early, args.late):
        checkpoint = base / ckpt.checkpoint_dir_name(step)
        replay[step] = time_to_first_step(load_config, args.config, overrides, without_anchor(checkpoint, out),
                                          f"replay-{step}")[0]
        tokens[step] = ckpt.read_marker(checkpoint)["train_state"]["tokens_consumed"]
    kill_s, kill_step = kill_to_next_step(load_config, args.config, overrides)
    ray.shutdown()

    median = {step: statistics.median(t for t, _ in runs) for step, runs in anchored.items()}
    wait = {step: statistics.median(w for _, w in runs) for step, runs in anchored.items()}
    print(f"{'restart at step':>16} {'tokens consumed':>16} {'anchored, median (s)':>21} {'of it data wait (s)':>20} "
          f"{'anchored, each (s)':>24} {'replay (s)':>11}")
    for step in (args.early, args.late):
        each = " ".join(f"{t:.1f}" for t, _ in anchored[step])
        print(f"{step:>16} {tokens[step]:>16,} {median[step]:>21.1f} {wait[step]:>20.1f} {each:>24} {replay[step]:>11.1f}")
    e, l = args.early, args.late
    print(f"ratio late/early ({tokens[l] / tokens[e]:.0f}x the tokens): anchored {median[l] / median[e]:.2f} "
          f"(goal <= 1.2), replay {replay[l] / replay[e]:.2f}")
    print(f"worker SIGKILLed after step {kill_step}: {kill_s:.1f} s from the kill to the next step "
          f"(restart from the checkpoint of step {kill_step // 10 * 10})")
    shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
