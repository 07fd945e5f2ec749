"""Every published benchmark table can be rerun by one command: `python bench/run.py NAME`.

Fast: nothing here runs a benchmark. It reads bench/RESULTS.md, README.md and docs/, imports the
registry of bench/run.py, and asks each registered script for its `--help`.
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
REPRODUCE = re.compile(r"Reproduce: `?python bench/run\.py ([\w-]+)")


def registry() -> dict:
    spec = importlib.util.spec_from_file_location("bench_run", ROOT / "bench" / "run.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_run"] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module.REGISTRY


def results_sections() -> list[tuple[str, str]]:
    """(heading, text) of each `##` and `###` section of bench/RESULTS.md; deeper headings stay in their parent."""
    sections, heading, lines, fenced = [], None, [], False
    for line in (ROOT / "bench" / "RESULTS.md").read_text().splitlines():
        if line.startswith("```"):
            fenced = not fenced
        if not fenced and re.match(r"#{2,3} ", line):
            if heading is not None:
                sections.append((heading, "\n".join(lines)))
            heading, lines = line.lstrip("# ").strip(), []
        elif heading is not None:
            lines.append(line)
    if heading is not None:
        sections.append((heading, "\n".join(lines)))
    return sections


def bears_figures(text: str) -> bool:
    """A section publishes figures when it holds a Markdown table (a header rule such as |---|)."""
    return re.search(r"^\s*\|[\s:|-]*---", text, re.M) is not None


def test_every_results_section_with_a_table_names_a_registry_entry():
    """Each figure-bearing section of bench/RESULTS.md says `Reproduce: python bench/run.py NAME`, NAME registered."""
    entries = registry()
    sections = [(h, t) for h, t in results_sections() if bears_figures(t)]
    assert len(sections) >= 10  # the parser found the tables (there are 12 such sections today)
    unnamed = [h for h, t in sections if not REPRODUCE.search(t)]
    assert not unnamed, f"sections of bench/RESULTS.md with a table but no 'Reproduce: python bench/run.py NAME': {unnamed}"
    unknown = {m for _, t in sections for m in REPRODUCE.findall(t) if m not in entries}
    assert not unknown, f"bench/RESULTS.md names entries bench/run.py does not have: {sorted(unknown)}"


def test_every_run_py_name_in_the_docs_is_registered():
    """A `bench/run.py NAME` in README.md, docs/ or bench/RESULTS.md is an entry of the registry (or all/--list)."""
    entries = set(registry()) | {"all"}
    named = re.compile(r"bench/run\.py ([a-z]\w*)")  # NAME and --list are not entries
    bad = []
    for path in [ROOT / "README.md", ROOT / "bench" / "RESULTS.md", *sorted((ROOT / "docs").glob("*.md"))]:
        bad += [f"{path.relative_to(ROOT)}: {n}" for n in named.findall(path.read_text()) if n not in entries]
    assert not bad, f"names bench/run.py does not know: {bad}"


def test_every_registry_entry_feeds_existing_files():
    """Each entry's script and the files its numbers are published in exist."""
    missing = []
    for name, entry in registry().items():
        if not (ROOT / entry.script).is_file():
            missing.append(f"{name}: {entry.script}")
        for feed in entry.feeds:
            path = feed.split(":", 1)[0]
            if not (ROOT / path).exists():
                missing.append(f"{name}: {path}")
        assert entry.expected_min > 0 and entry.basis, name
    assert not missing, missing


@pytest.mark.parametrize("script", sorted({e.script for e in registry().values()}))
def test_every_registry_script_accepts_help_and_the_entries_flags(script):
    """`python SCRIPT --help` exits 0 and prints a usage line listing every flag its registry entries pass."""
    proc = subprocess.run([sys.executable, str(ROOT / script), "--help"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "usage:" in proc.stdout
    flags = {a for e in registry().values() if e.script == script for a in e.args if a.startswith("--")}
    absent = sorted(f for f in flags if f not in proc.stdout)
    assert not absent, f"{script} --help does not list the registry's flags {absent}"
