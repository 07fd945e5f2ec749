"""`raylm` command line: argument parsing only; the work lives in the library."""

from __future__ import annotations

import argparse
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
    p.add_argument("--local", action="store_true", help="run in this process without Ray (local files only)")

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
            from raylm.data.prepare import prepare_main

            return prepare_main(cfg)
        elif args.command == "train" and args.local:
            from raylm.train.single import train_single_process

            train_single_process(cfg)
        elif args.command == "train":
            from raylm.train.ray_trainer import train_on_ray

            train_on_ray(cfg)
    except RaylmError as e:
        print(f"raylm: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("raylm: interrupted", file=sys.stderr)
        return 130
    return 0
