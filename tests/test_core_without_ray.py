"""The layers: every module outside the Ray adapter (`raylm/ray/`) imports and runs with Ray unimportable,
and no import runs upward through the core's layers (`docs/architecture.md`, "Layers").

Modules are found by glob, not by a hand-kept list, so a new module is covered the day it lands; its
imports are read from the source (AST), those inside functions included.
"""

import ast
import functools
import subprocess
from collections import defaultdict
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ADAPTER = ROOT / "raylm" / "ray"


def core_modules() -> list[str]:
    out = []
    for path in sorted((ROOT / "raylm").rglob("*.py")):
        if ADAPTER in path.parents or path.name == "__main__.py":  # __main__ runs the CLI on import
            continue
        parts = path.relative_to(ROOT).with_suffix("").parts
        out.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return out


def test_the_glob_finds_the_core_and_the_adapter():
    modules = core_modules()
    assert {"raylm.cli", "raylm.config", "raylm.model", "raylm.train.trainer", "raylm.data.plan",
            "raylm.use.load"} <= set(modules)
    assert not any(m.startswith("raylm.ray") for m in modules)
    assert (ADAPTER / "train.py").is_file() and (ADAPTER / "data.py").is_file()


def test_no_module_outside_the_adapter_imports_ray_even_inside_a_function():
    offenders = []
    for path in sorted((ROOT / "raylm").rglob("*.py")):
        if ADAPTER in path.parents:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
            offenders += [f"{path.relative_to(ROOT)}:{node.lineno} {n}" for n in names
                          if n == "ray" or n.startswith("ray.")]
    assert offenders == []


def test_every_core_module_imports_and_the_trainer_trains_with_ray_unimportable(tmp_path):
    code = textwrap.dedent(
        f"""
        import importlib, sys
        sys.modules["ray"] = None  # any `import ray` now raises ImportError
        for name in {core_modules()!r}:
            importlib.import_module(name)
        import numpy as np
        from raylm.config import load_config
        from raylm.data.order import PackedDataset
        from raylm.train.trainer import RunDirSink, RankEnv, Trainer
        cfg = load_config(None, ["model.preset=debug", "data.seq_len=32", "train.global_batch_tokens=128",
                                 "train.micro_batch_size=4", "train.max_steps=2", "train.eval_every=0"])
        rows = np.random.default_rng(0).integers(0, cfg.model.vocab_size, size=(16, 33)).astype(np.int32)
        sink = RunDirSink({str(tmp_path)!r}, keep_checkpoints=1)
        out = Trainer(cfg, RankEnv(), sink, PackedDataset(rows), log=lambda line: None).fit()
        sink.close()
        assert out["step"] == 2, out
        assert "ray" not in {{m.split(".")[0] for m in sys.modules if sys.modules[m] is not None}}
        print("ok")
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().endswith("ok")
    assert (tmp_path / "checkpoint_00000002" / "raylm_checkpoint.json").is_file()


# ---------------------------------------------------------------------------------------
# The package graph: errors, storage, model, config -> tokenizer, optim -> data -> train -> use -> cli,
# with ray/ the adapter beside them.

LAYERS = [
    {"raylm", "errors", "storage", "model", "config", "lock"},  # the ground: what everything may use
    {"tokenizer", "optim"},
    {"data"},
    {"train", "sweep"},  # sweep: `raylm tune`'s pure part (the sweep file, results), beside train
    {"use", "plan"},  # plan: `raylm plan`, a tool over the model and the trainer's memory
    {"cli", "__main__"},
]
LAYER_OF = {part: i for i, parts in enumerate(LAYERS) for part in parts}
ADAPTER_PART = "ray"
# Where the adapter may import use/: the driver entry points that show a finished run, and the
# whole of ray/evaluate.py, the Ray path of `raylm eval` (a use/ command; "*": the module).
ADAPTER_MAY_USE = {"raylm.ray.train": {"train_command"}, "raylm.ray.tune": {"_curve"}, "raylm.ray.evaluate": {"*"}}
ENTRY_POINTS = ", ".join(m if f == "*" else f"{m}.{f}" for m, fs in sorted(ADAPTER_MAY_USE.items()) for f in sorted(fs))
"""The adapter's driver entry points that show a finished run or sweep, and only they, import `use/`
(inside the function, so neither a Ray worker nor a Tune trial loads it)."""


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def raylm_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted((ROOT / "raylm").rglob("*.py"))}


def part_of(module: str) -> str:
    """The layer unit of a module: `raylm.train.runs` -> train, `raylm.config` -> config."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "raylm"


def imports_of(module: str, path: Path, known: set[str]) -> list[tuple[int, str, str | None]]:
    """(line, imported raylm module, enclosing function or None) for every import in the file."""
    is_package = path.name == "__init__.py"
    out = []

    def visit(node, function):
        for child in ast.iter_child_nodes(node):
            inner = child.name if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) else function
            targets = []
            if isinstance(child, ast.Import):
                targets = [a.name for a in child.names]
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    package = module.split(".")[: len(module.split(".")) - (0 if is_package else 1)]
                    package = package[: len(package) - (child.level - 1)]
                    base = ".".join(package + ([child.module] if child.module else []))
                # `from raylm import storage` imports raylm.storage; `from raylm.config import Config`, raylm.config
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in child.names]
            for target in targets:
                if target == "raylm" or target.startswith("raylm."):
                    while target not in known and "." in target:  # `import raylm.train.runs as r` and the like
                        target = target.rsplit(".", 1)[0]
                    if (child.lineno, target, function) not in out:
                        out.append((child.lineno, target, function))
            visit(child, inner)

    visit(ast.parse(path.read_text()), None)
    return out


@functools.cache
def import_graph() -> dict[str, list[tuple[int, str, str | None]]]:
    """{module: its imports of raylm modules}; callers copy it before changing it."""
    modules = raylm_modules()
    return {m: imports_of(m, p, set(modules)) for m, p in modules.items()}


def test_every_module_has_a_layer_or_is_the_adapter():
    """A new top-level module or package must be placed in a layer before it lands."""
    unplaced = {part_of(m) for m in raylm_modules()} - set(LAYER_OF) - {ADAPTER_PART}
    assert unplaced == set(), f"place these in LAYERS (tests/test_core_without_ray.py): {sorted(unplaced)}"


def upward_imports(graph) -> list[str]:
    """Every import that runs against the layers, as `file:line imports target (why)`."""
    modules = raylm_modules()
    offenders = []
    for module, imports in graph.items():
        source, where = part_of(module), modules[module].relative_to(ROOT)
        for line, target, function in imports:
            to = part_of(target)
            if source == ADAPTER_PART:
                if to == ADAPTER_PART or LAYER_OF[to] <= LAYER_OF["train"]:
                    continue
                if to == "use" and ({function, "*"} & ADAPTER_MAY_USE.get(module, set())):
                    continue
                offenders.append(f"{where}:{line} imports {target} (the adapter uses the core up to train/, "
                                 f"and use/ only inside {ENTRY_POINTS})")
            elif to == ADAPTER_PART:
                if LAYER_OF[source] != LAYER_OF["cli"]:
                    offenders.append(f"{where}:{line} imports {target} (only the CLI imports the Ray adapter)")
            elif LAYER_OF[to] > LAYER_OF[source]:
                offenders.append(f"{where}:{line} imports {target} (upward: {source} is below {to})")
    return offenders


def test_no_import_runs_upward_through_the_layers_even_inside_a_function():
    """errors, storage, model, config, lock -> tokenizer, optim -> data -> train (and sweep) -> use (and
    plan) -> cli; the Ray adapter beside them imports the core up to train/ and use/ only from the
    driver entry points that show a finished run. The message names the file, line and target."""
    assert upward_imports(import_graph()) == []


def test_the_layer_check_names_an_upward_import_by_file_line_and_target():
    """The check is live: a core module importing use/ (the circle this layering broke) is reported."""
    graph = dict(import_graph())
    graph["raylm.train.runs"] = graph["raylm.train.runs"] + [(7, "raylm.use.hf", "resolve_run")]
    graph["raylm.ray.data"] = graph["raylm.ray.data"] + [(9, "raylm.use.load", None)]
    assert upward_imports(graph) == [
        "raylm/ray/data.py:9 imports raylm.use.load (the adapter uses the core up to train/, and use/ only inside "
        "raylm.ray.evaluate, raylm.ray.train.train_command, raylm.ray.tune._curve)",
        "raylm/train/runs.py:7 imports raylm.use.hf (upward: train is below use)",
    ]


def import_cycle(graph: dict[str, list[tuple[int, str, str | None]]]) -> list[str] | None:
    """A cycle of modules (the first found by depth-first search), or None."""
    edges = defaultdict(set)
    for module, imports in graph.items():
        edges[module] |= {target for _, target, _ in imports if target != module}
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def dfs(module):
        state[module] = 1
        path.append(module)
        for target in sorted(edges[module]):
            if state.get(target) == 1:
                return path[path.index(target):] + [target]
            if target not in state and (found := dfs(target)) is not None:
                return found
        state[module] = 2
        path.pop()
        return None

    for module in sorted(edges):
        if module not in state and (found := dfs(module)) is not None:
            return found
    return None


def test_no_import_cycle_between_the_core_modules():
    """No module of the core reaches itself through imports, lazy ones included (a cycle is how an
    upward import hides: train/runs -> use/hf -> train/runs was one)."""
    core = {m: [i for i in imports if part_of(i[1]) != ADAPTER_PART]
            for m, imports in import_graph().items() if part_of(m) != ADAPTER_PART}
    assert import_cycle(core) is None, " -> ".join(import_cycle(core))
    assert import_cycle({"a": [(1, "b", None)], "b": [(1, "c", "f")], "c": [(1, "a", None)]}) == ["a", "b", "c", "a"]
