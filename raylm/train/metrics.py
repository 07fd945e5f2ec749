"""Run metrics: metrics.jsonl and TensorBoard events in the run directory, MFU and memory.

Only rank 0 writes. metrics.jsonl is appended to, so a resumed run continues the same file.
After a restore (a restart, a resize, a run continued in place) `rewind(step)` drops the
records of the steps after the checkpoint, which are trained again, and marks the restart
with one `{"step": S, "event": "restored"}` line; TensorBoard purges those steps too
(`purge_step`), so both hold one curve.

A run directory on object storage (s3://, gs://) cannot be appended to: the writer keeps
metrics.jsonl and tensorboard/ in a local temporary directory, starting from the run's
metrics.jsonl so far, and uploads them (`sync`) at every checkpoint, at least every
SYNC_EVERY_S seconds while it writes, and when it closes. A rank 0 killed between two uploads
loses only records of steps after the last checkpoint, which the restored run trains (and
records) again.

Experiment tracking (`run.tracking`): the writer that writes (rank 0's) also hands every row to
a `raylm.train.tracking.Tracking`, beside these files, never instead of them.
"""

from __future__ import annotations

import json
import math
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from raylm import storage
from raylm.train.tracking import Tracking, check_available

SYNC_EVERY_S = 60.0
"""Longest time between uploads of the metrics of a run directory on object storage."""

# Dense bf16 peak FLOP/s per device (NVIDIA datasheets, without 2:4 sparsity): H100 SXM 989.4
# TFLOP/s (1,979 with sparsity), H200 SXM 989 (the same Hopper tensor cores), A100 SXM 312,
# B200 (HGX, 1,000 W) 2,250 (4,500 with sparsity). MFU here and `raylm plan` both read this table.
PEAK_BF16_FLOPS = {
    "H200": 989e12,
    "H100": 989e12,
    "A100": 312e12,
    "B200": 2250e12,
    "L40S": 362e12,
    "A10G": 70e12,
}


def device_peak_flops(device: torch.device, configured: float | None) -> float | None:
    """Peak FLOP/s for MFU: the configured value, else the datasheet value of the GPU kind."""
    if configured is not None:
        return configured
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for kind, flops in PEAK_BF16_FLOPS.items():
        if kind in name:
            return flops
    return None


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)  # Linux reports KiB


class MetricsWriter:
    def __init__(self, run_dir: str | Path | None, enabled: bool = True, tensorboard: bool = True,
                 tracking: list[str] = (), params: dict | None = None, tracking_group: str | None = None):
        """`tracking`: the trackers of `run.tracking` (checked on every rank, opened where enabled),
        given `params` (the resolved config) and the sweep `tracking_group`."""
        self.enabled = enabled and run_dir is not None
        self._file = None
        self._tb = None
        self.remote: str | None = None
        self.tracking: Tracking | None = None
        check_available(list(tracking))
        if not self.enabled:
            return
        if storage.is_uri(run_dir):  # written here, uploaded by sync()
            self.remote = str(storage.location(run_dir))
            self.run_dir = Path(tempfile.mkdtemp(prefix="raylm-metrics-"))
            try:
                (self.run_dir / "metrics.jsonl").write_bytes(storage.read_bytes(f"{self.remote}/metrics.jsonl"))
            except FileNotFoundError:
                pass
            self._synced_at = time.monotonic()
        else:
            self.run_dir = Path(run_dir)
            self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / "metrics.jsonl"
        self._file = open(self.path, "a", buffering=1)
        self.tensorboard = tensorboard
        self._open_tensorboard(None)
        if tracking:
            self.tracking = Tracking(list(tracking), storage.location(run_dir), params or {}, group=tracking_group)

    def _open_tensorboard(self, purge_step: int | None) -> None:
        if not self.tensorboard:
            return
        from torch.utils.tensorboard import SummaryWriter  # imports tensorboard: only where used

        self._tb = SummaryWriter(log_dir=str(self.run_dir / "tensorboard"), purge_step=purge_step)

    def rewind(self, step: int) -> None:
        """Forget the records of steps after `step` (they are trained again from a checkpoint)."""
        if not self.enabled:
            return
        if self.tracking is not None:
            self.tracking.rewind(step)
        self._file.close()
        kept, dropped = [], 0
        for line in self.path.read_text().splitlines():
            try:
                record_step = json.loads(line).get("step")
            except (json.JSONDecodeError, AttributeError):
                record_step = None  # a torn last line (the worker was killed while writing)
            if isinstance(record_step, int) and record_step <= step:
                kept.append(line)
            else:
                dropped += 1
        if dropped or step > 0:
            kept.append(json.dumps({"step": step, "event": "restored", "dropped_records": dropped}))
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text("".join(line + "\n" for line in kept))
            tmp.replace(self.path)
        self._file = open(self.path, "a", buffering=1)
        if self._tb is not None and dropped:
            self._tb.close()
            self._open_tensorboard(step + 1)

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        self._file.write(json.dumps(clean) + "\n")
        if self._tb is not None and "step" in record:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._tb.add_scalar(key, value, record["step"])
        if self.tracking is not None:
            self.tracking.metrics(clean)
        if self.remote is not None and time.monotonic() - self._synced_at >= SYNC_EVERY_S:
            self.sync()

    def sync(self) -> None:
        """Upload metrics.jsonl and tensorboard/ to a run directory on object storage (no-op otherwise)."""
        if not self.enabled or self.remote is None:
            return
        if self._file is not None:
            self._file.flush()
        if self._tb is not None:
            self._tb.flush()
        storage.write_bytes(f"{self.remote}/metrics.jsonl", self.path.read_bytes())
        if (self.run_dir / "tensorboard").is_dir():
            storage.copy_dir(self.run_dir / "tensorboard", f"{self.remote}/tensorboard")
        self._synced_at = time.monotonic()

    def close(self) -> None:
        """Flush and upload; then the tracking runs end, after the files they get as artifacts are
        complete: FINISHED, or (called in a `finally` while an exception propagates) KILLED after
        Ctrl-C and FAILED after an error."""
        raised = sys.exc_info()[0]
        status = "FINISHED" if raised is None else "KILLED" if issubclass(raised, KeyboardInterrupt) else "FAILED"
        if self._file is not None:
            self._file.flush()
        if self._tb is not None:
            self._tb.flush()
        try:
            self.sync()
        finally:
            if self._file is not None:
                self._file.close()
                self._file = None
            if self._tb is not None:
                self._tb.close()
                self._tb = None
            if self.tracking is not None:
                self.tracking.close(status)
                self.tracking = None
            if self.remote is not None and self.enabled:
                shutil.rmtree(self.run_dir, ignore_errors=True)
                self.enabled = False
