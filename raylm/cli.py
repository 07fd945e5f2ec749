"""`raylm` command line: argument parsing only; the work lives in the library."""

from __future__ import annotations

import argparse
import os
import sys

from raylm.errors import RaylmError


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML config, e.g. configs/demo.yaml")
    p.add_argument("overrides", nargs="*", help="dotted overrides: train.max_steps=50 optimizer.lr=3e-4")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="raylm", description="Train Llama-style language models on Ray.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train on Ray (RAY_ADDRESS, else a local cluster); tokenizer first if none")
    _config_args(p)
    p.add_argument("--local", action="store_true",
                   help="train in this process without Ray (local files only); implied under torchrun")

    p = sub.add_parser("prepare", help="tokenise and pack the corpus once into Parquet shards + manifest")
    _config_args(p)

    p = sub.add_parser("config", help="print the fully resolved config")
    _config_args(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # Flags may sit between the config and its overrides (`train C --local a.b=1`): argparse
    # leaves overrides after a flag unparsed, so they are collected here.
    args, extra = parser.parse_known_args(argv)
    unknown = [e for e in extra if "=" not in e or e.startswith("-")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    try:
        from raylm.config import load_config

        cfg = load_config(args.config, args.overrides)
        if args.command == "config":
            print(cfg.to_yaml(), end="")
        elif args.command == "prepare":
            from raylm.data.prepared import summary_lines
            from raylm.ray.connect import ray_session
            from raylm.ray.prepare import prepare

            with ray_session(progress_bars=True):
                out = prepare(cfg)
            print("\n".join(summary_lines(out)))
        elif args.command == "train" and (args.local or "TORCHELASTIC_RUN_ID" in os.environ):  # torchrun
            from raylm.train.local import train_local

            train_local(cfg)
        elif args.command == "train":
            from raylm.ray.train import train_command

            train_command(cfg)
    except RaylmError as e:
        print(f"raylm: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        run_dir = getattr(e, "run_dir", None)
        if run_dir:
            print(f"raylm: interrupted: the newest good checkpoint is kept; continue with run.resume_from={run_dir}",
                  file=sys.stderr)
        else:
            print("raylm: interrupted", file=sys.stderr)
        return 130
    return 0
