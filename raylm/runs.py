"""Run directories: a unique name per run, the resolved config beside the outputs."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from raylm.config import Config


def new_run_name(cfg: Config) -> str:
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return f"{cfg.config_name}-{stamp}"


def create_run_dir(cfg: Config) -> Path:
    """Make `run.output_dir/run.name` (a fresh unique name when unset) and write config.yaml.

    An explicit name that already exists is used as is only to resume; a new run never
    writes into another run's directory.
    """
    root = Path(cfg.run.output_dir)
    if cfg.run.name is None:
        base = new_run_name(cfg)
        name, n = base, 1
        while (root / name).exists():
            n += 1
            name = f"{base}-{n}"
        cfg.run.name = name
    run_dir = root / cfg.run.name
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg.save(run_dir / "config.yaml")
    return run_dir
