"""The package's shape: short functions, no import cycles, a pure core, and the import-linter contracts."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "coopt_hub"
MAX_FUNCTION_LINES = 60
# What may sit directly under coopt_hub/: the errors, the entry points and the environment switch.
TOP_LEVEL_MODULES = {"__init__.py", "__main__.py", "_env.py", "errors.py"}


def _functions(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node


def test_no_function_is_longer_than_60_lines():
    too_long = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in _functions(ast.parse(path.read_text(), filename=str(path))):
            length = node.end_lineno - node.lineno + 1  # from `def` to the last line, decorators aside
            if length > MAX_FUNCTION_LINES:
                too_long.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {node.name} ({length} lines)")
    assert not too_long, "functions over 60 lines; split them into named steps:\n" + "\n".join(too_long)


def test_only_errors_entry_points_and_environment_sit_at_the_top():
    modules = {path.name for path in PACKAGE.glob("*.py")}
    assert modules == TOP_LEVEL_MODULES, f"modules directly under coopt_hub/: {sorted(modules - TOP_LEVEL_MODULES)}"


def test_no_import_cycles_between_modules():
    """Function-level imports count too: a deferred import may save start-up time, never hide a cycle."""
    grimp = pytest.importorskip("grimp")
    graph = grimp.build_graph("coopt_hub")
    modules = sorted(m for m in graph.modules if m.startswith("coopt_hub"))
    cycles = []
    for module in modules:
        for imported in graph.find_modules_directly_imported_by(module):
            if not imported.startswith("coopt_hub") or imported == module:
                continue
            if module in _ancestors(imported) or imported in _ancestors(module):
                continue  # a package and its own modules (re-exports in __init__) are one unit
            chain = graph.find_shortest_chain(importer=imported, imported=module)
            if chain and not any(_ancestor_pair(a, b) for a, b in zip(chain, chain[1:])):
                cycles.append(" -> ".join([module, *chain]))
    assert not cycles, "import cycles:\n" + "\n".join(sorted(set(cycles)))


def _ancestors(module: str) -> set[str]:
    parts = module.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts))}


def _ancestor_pair(a: str, b: str) -> bool:
    return a in _ancestors(b) or b in _ancestors(a)


def test_importing_the_core_loads_no_hub_client_and_no_torch():
    core = sorted(f"coopt_hub.core.{p.stem}" for p in (PACKAGE / "core").glob("*.py") if p.stem != "__init__")
    code = (
        f"import sys; import {', '.join(core)}\n"
        "heavy = [m for m in ('huggingface_hub', 'datasets', 'torch', 'open_clip', 'timm') if m in sys.modules]\n"
        "print(','.join(heavy))"
    )
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert loaded == "", f"importing coopt_hub.core loaded {loaded}"


def test_the_platform_commands_load_no_torch_until_a_prior_is_loaded():
    """status, verify's module and merge run on machines without a GPU stack and within a merge's memory
    budget: torch (~450 MiB resident) comes in only when a prior is loaded (verify, merge --verify)."""
    modules = ("coopt_hub.platform.merge.run", "coopt_hub.platform.status", "coopt_hub.platform.verify",
               "coopt_hub.cli.merge", "coopt_hub.cli.status")
    code = (f"import sys; import {', '.join(modules)}\n"
            "print(','.join(m for m in ('torch', 'open_clip', 'timm') if m in sys.modules))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert loaded == "", f"importing the platform's commands loaded {loaded}"


def test_import_linter_contracts_hold():
    lint = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    if lint is None:
        pytest.skip("import-linter is not installed (pip install -e '.[dev]')")
    result = subprocess.run([lint, "--no-cache"], capture_output=True, text=True, cwd=PACKAGE.parent)
    assert result.returncode == 0, result.stdout[-3000:]
