"""The default corpus and the train/validation split, in plain Python (no Ray, no torch).

The default corpus is the source code of the running interpreter's standard library: it is
on every machine that runs raylm, so the demo and the tests need no download. Files are
read in sorted order (deterministic everywhere), test packages and site-packages are left
out, and a byte cap bounds the size. Documents go to validation by a stable hash of their
id, so the split never depends on order, worker count or machine.
"""

from __future__ import annotations

import hashlib
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

Split = Literal["train", "validation"]
_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test"}


@dataclass(frozen=True)
class Document:
    doc_id: str
    """Stable id: a path relative to its source root, or path:line."""
    text: str


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(max_bytes: int | None = None) -> list[Path]:
    """The standard library's .py files in sorted order, up to max_bytes in total."""
    root = stdlib_root()
    files = sorted(
        p for p in root.rglob("*.py") if not (_SKIP_DIRS & set(p.relative_to(root).parts[:-1]))
    )
    if max_bytes is None:
        return files
    chosen, total = [], 0
    for path in files:
        size = path.stat().st_size
        if total + size > max_bytes and chosen:
            break
        chosen.append(path)
        total += size
    return chosen


def is_validation(doc_id: str, val_fraction: float) -> bool:
    """Stable split: the same document is held out on every machine and every run."""
    if val_fraction <= 0:
        return False
    digest = hashlib.blake2b(doc_id.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64 < val_fraction


def stdlib_documents(split: Split, val_fraction: float, max_bytes: int | None = None) -> Iterator[Document]:
    """Documents of the default corpus that fall in `split`."""
    root = stdlib_root()
    for path in stdlib_files(max_bytes):
        doc_id = path.relative_to(root).as_posix()
        if is_validation(doc_id, val_fraction) != (split == "validation"):
            continue
        text = path.read_bytes().decode("utf-8", errors="replace")
        if text.strip():
            yield Document(doc_id, text)
