"""Docs that name code name code that exists: every `raylm.x.y` dotted name, every
`from raylm.x import y` and every `tests/test_x.py` or `tests/test_x.py::name` in README.md and
docs/*.md resolves (the module imports, the attribute is there, the test file defines the test).

The docs are found by glob and the names by pattern, so a new page or a renamed function is
covered the day it lands; nothing here is a hand-kept list of names.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# `raylm.train.runs`, `raylm.optim.set_lr`: the package, then identifiers (a sentence's full stop
# or a file suffix such as `.py` after it is not part of the name)
DOTTED = re.compile(r"(?<![\w./-])raylm(?:\.[A-Za-z_]\w*)+")
FROM_IMPORT = re.compile(r"^[ \t]*from[ \t]+(raylm(?:\.\w+)*)[ \t]+import[ \t]+(\([^)]*\)|[^\n#]+)", re.MULTILINE)
TEST_REF = re.compile(r"(?<![\w/])tests/[\w/]+\.py(?:::[\w]+(?:\[[^\]\s]*\])?)*")


def doc_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def file_names_raylm_writes() -> set[str]:
    """Names in the docs that are files raylm writes, not modules: the run directory's lease
    (`raylm.lock`, also a module) and the guard file beside it where a directory cannot be flocked."""
    from raylm import lock

    guard = inspect.getsource(lock._LocalStore._guard)
    assert 'f"{self.path}.guard"' in guard, "the guard file is no longer named after the lease"
    return {lock.LOCK_FILE, f"{lock.LOCK_FILE}.guard"}


def tags_raylm_writes() -> set[str]:
    """Names in the docs that are the experiment-tracking tags raylm sets (`raylm.sweep_parent`,
    `raylm.restored_at_step`), not modules: each must be a string raylm/train/tracking.py writes."""
    from raylm.train import tracking

    return set(re.findall(r"[\"'`](raylm\.[a-z_]+)[\"'`]", inspect.getsource(tracking)))


def resolves(dotted: str) -> bool:
    """`dotted` is a module, or an attribute (at any depth) of the longest module prefix that imports."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for attr in parts[cut:]:
            if not hasattr(obj, attr):
                return False
            obj = getattr(obj, attr)
        return True
    return False


def defines_test(ref: str) -> bool:
    """`tests/x.py` exists, and defines `::name` (a function or class at module level; `::Class::method`)."""
    path, *names = ref.split("::")
    if not (ROOT / path).is_file():
        return False
    scope = ast.parse((ROOT / path).read_text()).body
    for name in names:
        name = name.split("[")[0]  # a parametrized case: the function it comes from
        found = [n for n in scope if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
                 and n.name == name]
        if not found:
            return False
        scope = found[0].body
    return True


def named_in_docs() -> dict[str, set[str]]:
    """The names README.md and docs/*.md use: {"dotted": raylm.x.y names, "imports": module.name of
    each `from raylm.x import name`, "tests": tests/x.py and tests/x.py::name references}."""
    found: dict[str, set[str]] = {"dotted": set(), "imports": set(), "tests": set()}
    for doc in doc_files():
        text = doc.read_text()
        found["dotted"] |= set(DOTTED.findall(text))
        for module, names in FROM_IMPORT.findall(text):
            for name in names.strip("()").split(","):
                if name := name.split(" as ")[0].strip():
                    found["imports"].add(f"{module}.{name}")
        found["tests"] |= set(TEST_REF.findall(text))
    return found


def where(name: str) -> str:
    """`doc:line` of each mention of `name`, for the failure message."""
    return ", ".join(f"{doc.relative_to(ROOT)}:{i}" for doc in doc_files()
                     for i, line in enumerate(doc.read_text().splitlines(), 1) if name in line)


def test_the_patterns_find_the_names_the_docs_use():
    """The scan is not vacuous: it sees a dotted name, an import from a code block and a test by name."""
    found = named_in_docs()
    assert "raylm.optim.set_lr" in found["dotted"]
    assert "raylm.ray.train.fit" in found["imports"]
    assert any("::" in ref for ref in found["tests"])
    assert "tests/test_plan.py" in found["tests"]


def test_the_checks_refuse_names_that_do_not_exist():
    assert resolves("raylm.optim.set_lr") and resolves("raylm.lock") and resolves("raylm.train.runs.resolve_run")
    assert not resolves("raylm.optim.no_such_function") and not resolves("raylm.no_such_module.f")
    assert defines_test("tests/test_docs_names.py::test_the_checks_refuse_names_that_do_not_exist")
    assert not defines_test("tests/test_docs_names.py::test_that_was_renamed")
    assert not defines_test("tests/test_no_such_file.py")


def test_every_raylm_name_in_the_docs_imports():
    files = file_names_raylm_writes() | tags_raylm_writes()
    found = named_in_docs()
    missing = sorted(n for n in found["dotted"] | found["imports"] if n not in files and not resolves(n))
    assert not missing, "; ".join(f"{n} (named at {where(n.rsplit('.', 1)[-1] if n in found['imports'] else n)})"
                                  for n in missing)


def test_every_test_the_docs_name_exists():
    missing = sorted(ref for ref in named_in_docs()["tests"] if not defines_test(ref))
    assert not missing, "; ".join(f"{ref} (named at {where(ref)})" for ref in missing)
