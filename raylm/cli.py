"""`raylm` command line: argument parsing only; the work lives in the library."""

from __future__ import annotations

import argparse
import os
import sys

from raylm.errors import ConfigError, RaylmError


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML config, e.g. configs/demo.yaml")
    p.add_argument("overrides", nargs="*", help="dotted overrides: train.max_steps=50 optimizer.lr=3e-4")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="raylm", description="Train Llama-style language models on Ray.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train on Ray (RAY_ADDRESS, else a local cluster); tokenizer first if none")
    _config_args(p)
    p.add_argument("--local", action="store_true",
                   help="train in this process without Ray (files on disk, s3:// or gs://); implied under torchrun")

    p = sub.add_parser("prepare", help="tokenise and pack the corpus once into Parquet shards + manifest")
    _config_args(p)

    p = sub.add_parser("tune", help="sweep hyperparameters with Ray Tune: small proxy trainings, ASHA, best.yaml")
    p.add_argument("sweep", nargs="?", metavar="SWEEP.yaml", help="sweep file, e.g. configs/sweeps/debug.yaml")
    p.add_argument("overrides", nargs="*",
                   help="sweep keys (num_samples=8) or config keys for every trial (train.max_steps=50)")
    p.add_argument("--resume", metavar="SWEEP_DIR",
                   help="continue an interrupted sweep (a local directory or an s3:// / gs:// URI); "
                        "finished trials are kept")
    p.add_argument("--to-preset", metavar="NAME",
                   help="write best.yaml for this model preset (e.g. 1b), keeping the transferable hyperparameters")
    p.add_argument("--to", action="append", default=[], metavar="KEY=VALUE",
                   help="an override applied to best.yaml only, e.g. --to model.n_layers=24 (repeatable)")

    p = sub.add_parser("config", help="print the fully resolved config")
    _config_args(p)

    p = sub.add_parser("generate", help="continue prompts with a trained model, streaming the text")
    p.add_argument("path", metavar="RUN_OR_CHECKPOINT", help="a run directory (its newest checkpoint) or a checkpoint")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--prompt", help="the prompt (default: all of stdin)")
    source.add_argument("--prompts", metavar="FILE",
                        help="one prompt per line; a .jsonl file: a JSON string or {\"prompt\": ...} per line")
    # defaults: raylm.use.generate.SamplingOptions's (docs/use.md lists them)
    p.add_argument("--temperature", type=float, help="0 is greedy (default 0.8)")
    p.add_argument("--top-k", type=int, help="sample among the k most likely tokens; 0 disables (default 40)")
    p.add_argument("--top-p", type=float, help="nucleus sampling; 1 disables (default 1)")
    p.add_argument("--max-new-tokens", type=int, help="per prompt (default 128)")
    p.add_argument("--seed", type=int, default=None, help="seed of the sampling (default: fresh)")
    p.add_argument("--device", default="auto", help="auto (GPU when there is one, in bf16), cpu, cuda, cuda:N")

    p = sub.add_parser("export", help="write a checkpoint as a Hugging Face Llama directory")
    p.add_argument("path", metavar="RUN_OR_CHECKPOINT", help="a run directory (its newest checkpoint) or a checkpoint")
    p.add_argument("--format", choices=["hf"], default="hf", help="hf: transformers' LlamaForCausalLM")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="new (or empty) output directory, or an s3:// / gs:// prefix that holds nothing yet")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                   help="weight dtype (default float32: exactly the trained weights)")
    p.add_argument("--max-shard-size", default="5GB", help="largest safetensors file (default 5GB)")

    p = sub.add_parser("eval", help="held-out loss, perplexity, accuracy and bits per byte of a trained model")
    p.add_argument("path", metavar="RUN_OR_CHECKPOINT", help="a run directory (its newest checkpoint) or a checkpoint")
    p.add_argument("--data", metavar="PATH",
                   help="file, directory, glob or s3:// / gs:// URI to evaluate (default: the run's own held-out split)")
    p.add_argument("--format", choices=["text", "lines", "jsonl", "parquet"], default=None,
                   help="format of --data (default: from the file names; text for directories)")
    p.add_argument("--text-key", default="text", help="JSONL / Parquet field that holds the text (default text)")
    p.add_argument("--max-sequences", type=int, default=None, help="evaluate at most this many packed sequences")
    p.add_argument("--batch-size", type=int, default=None, help="sequences per forward (default: train.micro_batch_size)")
    p.add_argument("--ray", choices=["auto", "yes", "no"], default="auto",
                   help="tokenise and pack through Ray Data (auto: when the data is larger than 64 MB); "
                        "--task: score in a Ray Data actor pool (auto: above 20,000 examples)")
    p.add_argument("--device", default="auto", help="auto (GPU when there is one, in bf16), cpu, cuda, cuda:N")
    p.add_argument("--json", metavar="FILE", help="also write the numbers as JSON to FILE")
    task = p.add_mutually_exclusive_group()
    task.add_argument("--task", metavar="TASK.yaml",
                      help="evaluate a task (choice, generate or loglikelihood; docs/tasks.md) instead of --data")
    task.add_argument("--harness", metavar="TASKS",
                      help="run lm-evaluation-harness tasks (comma-separated; needs raylm[eval])")
    p.add_argument("--include-path", metavar="DIR", help="--harness: a directory of lm-eval task YAMLs of your own")
    p.add_argument("--num-fewshot", type=int, default=None, help="few-shot examples per question (--task: overrides the task file's fewshot.num)")
    p.add_argument("--max-examples", type=int, default=None, help="--task / --harness: evaluate the first N examples")

    p = sub.add_parser("task", help="build a task's files, e.g. `raylm task build stdlib --out DIR`")
    p.add_argument("action", choices=["build"])
    p.add_argument("name", choices=["stdlib"], help="stdlib: a Python snippet labelled by its standard-library package")
    p.add_argument("--out", required=True, metavar="DIR", help="new (or empty) directory for the task's files")
    p.add_argument("--config", default=None, metavar="CONFIG.yaml",
                   help="the pretraining config whose held-out files stay out of the training split "
                        "(default configs/demo.yaml's settings)")

    p = sub.add_parser("plot", help="PNGs of loss, learning rate, throughput and MFU against step")
    p.add_argument("path", metavar="RUN_DIR", help="a run directory (holds metrics.jsonl), local or s3:// / gs://; "
                                                     "or an `eval --task --json` file: its confusion matrix")
    p.add_argument("--out", metavar="DIR", help="where the PNGs go (default: RUN_DIR/plots), local or a URI")

    p = sub.add_parser("plan", help="memory per GPU, fit, time and cost of a config on N GPUs (no GPU needed)")
    _config_args(p)
    p.add_argument("--gpus", type=int, required=True, help="number of GPUs (= training workers)")
    p.add_argument("--gpu", choices=["h100", "h200", "a100", "b200"], default="h100", help="GPU type (default h100)")
    p.add_argument("--tokens", type=float, default=None, help="tokens to train, e.g. 2e12 (default: train.max_steps' worth)")
    p.add_argument("--mfu", type=float, default=None,
                   help="model FLOPs utilisation (default: raylm.plan.MEASURED_MFU, else an assumption)")
    p.add_argument("--price", type=float, default=None, help="USD per GPU-hour (default: a rough list price)")
    p.add_argument("--storage-gbps", type=float, default=None,
                   help="GB/s between the bucket and the cluster, for checkpoint and data times (default: an assumption)")
    return parser


USE_COMMANDS = ("generate", "export", "eval", "plot")


def _ray_rows(*args, **kwargs):
    """`raylm eval`'s Ray Data path, imported only when used (the library below never imports Ray)."""
    from raylm.ray.evaluate import ray_rows

    yield from ray_rows(*args, **kwargs)


def _ray_task_predictions(*args, **kwargs):
    """`raylm eval --task`'s Ray Data actor pool, imported only when used."""
    from raylm.ray.evaluate import ray_task_predictions

    return ray_task_predictions(*args, **kwargs)


def _check_path_args(args: argparse.Namespace) -> None:
    """A URI of a scheme raylm does not know is one line naming the argument, never a local folder."""
    from raylm import storage

    run = "RUN_DIR" if args.command == "plot" else "RUN_OR_CHECKPOINT"
    storage.check_scheme(args.path, run, storage.SCHEMES)
    storage.check_scheme(getattr(args, "out", None), "--out", storage.SCHEMES)
    storage.check_scheme(getattr(args, "data", None), "--data", storage.READ_SCHEMES)


def _use_command(args: argparse.Namespace) -> None:
    """Commands on a run or checkpoint rather than on a config."""
    _check_path_args(args)
    if args.command == "eval" and (args.task or args.harness) and args.data:
        raise ConfigError(f"--data and --{'task' if args.task else 'harness'}: give one (a task names its own data)")
    if args.command == "eval" and args.task:
        from raylm.use.tasks import task_command

        task_command(args.path, args.task, json_path=args.json, batch_size=args.batch_size or 8,
                     limit=args.max_examples, device=args.device, num_fewshot=args.num_fewshot,
                     use_ray=args.ray, ray_predict=_ray_task_predictions)
    elif args.command == "eval" and args.harness:
        from raylm.use.harness import harness_command

        harness_command(args.path, args.harness, include_path=args.include_path, num_fewshot=args.num_fewshot,
                        limit=args.max_examples, batch_size=args.batch_size or 8, device=args.device,
                        json_path=args.json)
    elif args.command == "eval":
        from raylm.use.evaluate import eval_command

        eval_command(args.path, data=args.data, fmt=args.format, text_key=args.text_key,
                     max_sequences=args.max_sequences, batch_size=args.batch_size, use_ray=args.ray,
                     device=args.device, json_path=args.json, ray_rows=_ray_rows)
    elif args.command == "plot":
        from raylm.use.plot import plot_run

        for path in plot_run(args.path, args.out):
            print(path)
    elif args.command == "generate":
        from raylm.use.generate import SamplingOptions, generate_command, read_prompts

        given = {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "top_k": args.top_k,
                 "top_p": args.top_p}
        options = SamplingOptions(**{k: v for k, v in given.items() if v is not None}, seed=args.seed)
        options.validate()
        generate_command(args.path, read_prompts(args.prompt, args.prompts, sys.stdin), options, args.device)
    else:
        from raylm.use.hf import export_hf, parse_size

        export_hf(args.path, args.out, dtype=args.dtype, max_shard_bytes=parse_size(args.max_shard_size))


def _tune_command(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    if (args.sweep is None) == (args.resume is None):
        parser.error("tune: give a sweep file, or --resume SWEEP_DIR")
    if args.resume and args.overrides:
        parser.error("tune --resume: a resumed sweep keeps its settings; no overrides")
    from raylm.ray.tune import resume_command, tune_command
    from raylm.sweep import load_sweep

    if args.resume:
        resume_command(args.resume, to_preset=args.to_preset, to_overrides=args.to)
    else:
        tune_command(load_sweep(args.sweep, args.overrides), to_preset=args.to_preset, to_overrides=args.to)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # Flags may sit between the config and its overrides (`train C --local a.b=1`): argparse
    # leaves overrides after a flag unparsed, so they are collected here.
    args, extra = parser.parse_known_args(argv)
    unknown = [e for e in extra if "=" not in e or e.startswith("-")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if extra and not hasattr(args, "overrides"):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    try:
        if args.command in USE_COMMANDS:
            _use_command(args)
            return 0
        if args.command == "tune":
            _tune_command(args, parser)
            return 0
        if args.command == "task":
            from raylm.use.task_build import build_stdlib_task

            for line in build_stdlib_task(args.out, config=args.config):
                print(line)
            return 0
        from raylm.config import load_config

        cfg = load_config(args.config, args.overrides)
        if args.command == "config":
            print(cfg.to_yaml(), end="")
        elif args.command == "plan":
            from raylm.plan import plan, format_plan

            print(format_plan(plan(cfg, args.gpus, args.gpu, tokens=args.tokens, mfu=args.mfu, price=args.price,
                                        storage_gbps=args.storage_gbps)))
        elif args.command == "prepare":
            from raylm.data.prepared import summary_lines
            from raylm.ray.connect import ray_session
            from raylm.ray.prepare import prepare

            with ray_session(progress_bars=True):
                out = prepare(cfg)
            print("\n".join(summary_lines(out)))
        elif args.command == "train" and (args.local or "TORCHELASTIC_RUN_ID" in os.environ):  # torchrun
            from raylm.train.local import train_local
            from raylm.use.sample import print_samples

            train_local(cfg, samples=print_samples)  # the CLI, above use/, shows the trained model
        elif args.command == "train":
            from raylm.ray.train import train_command

            train_command(cfg)
    except RaylmError as e:  # exit status 2: fix the input; 1: the run stopped otherwise (a lost Ray cluster)
        print(f"raylm: error: {e}", file=sys.stderr)
        return getattr(e, "exit_code", 2)
    except KeyboardInterrupt as e:
        run_dir = getattr(e, "run_dir", None)
        if getattr(e, "sweep_dir", None):
            print(f"raylm: interrupted: finished trials are kept; continue with raylm tune --resume {e.sweep_dir}",
                  file=sys.stderr)
        elif run_dir:
            print(f"raylm: interrupted: the newest good checkpoint is kept; continue with run.resume_from={run_dir}",
                  file=sys.stderr)
        else:
            print("raylm: interrupted", file=sys.stderr)
        return 130
    return 0
