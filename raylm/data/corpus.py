"""The default corpus and the train/validation split, in plain Python (no Ray, no torch).

The default corpus is the source code of the running interpreter's standard library: it is
on every machine that runs raylm, so the demo and the tests need no download. Files are
read in sorted order (deterministic everywhere), test packages and site-packages are left
out, and a byte cap takes a sample of files from every package. Documents go to validation by a stable hash of their
id, so the split never depends on order, worker count or machine.
"""

from __future__ import annotations

import hashlib
import sysconfig
from dataclasses import dataclass
from pathlib import Path

_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test"}


@dataclass(frozen=True)
class Document:
    doc_id: str
    """Stable id: a path relative to its source root, or path:line."""
    text: str


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(max_bytes: int | None = None) -> list[Path]:
    """The standard library's .py files in sorted order; with max_bytes, a sample of them that
    fills at most max_bytes.

    The sample takes files in a stable pseudo-random order (a hash of the relative path) and
    keeps each that still fits, so a slice of the corpus is drawn from every package: the first
    files in sorted order would be a few packages (a 6 MB slice was one third `encodings/`
    tables, which made held-out loss on its few held-out files a poor estimate).
    """
    root = stdlib_root()
    files = sorted(
        p for p in root.rglob("*.py") if not (_SKIP_DIRS & set(p.relative_to(root).parts[:-1]))
    )
    if max_bytes is None:
        return files
    chosen, total = [], 0
    for path in sorted(files, key=lambda p: _sample_key(p.relative_to(root).as_posix())):
        size = path.stat().st_size
        if total + size <= max_bytes:
            chosen.append(path)
            total += size
    return sorted(chosen)


def _sample_key(relative: str) -> bytes:
    return hashlib.blake2b(relative.encode("utf-8"), digest_size=8, person=b"raylm-sample").digest()


def hash_fraction(doc_id: str) -> float:
    """A stable uniform number in [0, 1) per document id."""
    digest = hashlib.blake2b(doc_id.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def is_validation(doc_id: str, val_fraction: float) -> bool:
    """Stable split of records: the same document is held out on every machine and every run.
    (Whole text files are chosen by bytes instead: `raylm.data.plan.heldout_text_files`.)"""
    return val_fraction > 0 and hash_fraction(doc_id) < val_fraction
