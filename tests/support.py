"""Shared test pieces: a sink that keeps records in memory (checkpoints, when asked, in a directory)."""

from __future__ import annotations

import tempfile
from pathlib import Path

from raylm.train import checkpoint as ckpt


class ListSink:
    """The trainer's Sink protocol with records kept in `records` and reports in `reports`."""

    def __init__(self, checkpoint_root: Path | None = None):
        self.records: list[dict] = []
        self.reports: list[tuple[int, Path | None]] = []
        self.root = checkpoint_root

    def write(self, record: dict) -> None:
        self.records.append(record)

    def checkpoint_dir(self, step: int) -> Path:
        if self.root is None:  # a test that does not look at checkpoints: they go to a temporary directory
            self.root = Path(tempfile.mkdtemp(prefix="raylm-test-"))
        return self.root / ckpt.checkpoint_dir_name(step)

    def report(self, record: dict, checkpoint: Path | None) -> None:
        self.reports.append((record["step"], checkpoint))

    def restore_candidates(self) -> list[Path]:
        return ckpt.list_checkpoints(self.root) if self.root is not None else []

    def close(self) -> None:
        pass

    def losses(self) -> dict[int, float]:
        return {r["step"]: r["loss"] for r in self.records if "loss" in r}
