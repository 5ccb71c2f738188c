"""Which way imports go (DESIGN.md "Layout"): the contract's types are a leaf of the planner, and the import-linter
contracts of pyproject.toml (one-way dependencies between the parts, nothing imports the CLI, no cycles) hold."""

from __future__ import annotations

import ast
from pathlib import Path

SPECS = Path(__file__).resolve().parents[2] / "planner" / "specs"


def imported_modules(path: Path) -> set[str]:
    """Every module `path` imports, at module level or inside a function (lazy imports count too)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


def test_specs_import_nothing_of_the_planner_but_specs():
    outside = {
        f"{path.name}: {module}"
        for path in sorted(SPECS.glob("*.py"))
        for module in imported_modules(path)
        if module.split(".")[0] in {"planner", "profiler", "executor", "api"} and not module.startswith("planner.specs")
    }
    assert not outside


def test_specs_load_without_the_rest_of_the_planner():
    """Imported on its own, planner.specs pulls in no other planner module (a subprocess: a clean interpreter)."""
    import subprocess
    import sys

    code = (
        "import sys, planner.specs; "
        "print(sorted(m for m in sys.modules if m.startswith('planner.') and not m.startswith('planner.specs')))"
    )
    root = SPECS.parents[1]
    done = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_the_import_contracts_hold():
    """`lint-imports` over the repository (the contracts in pyproject.toml), lazy imports inside functions counted."""
    import os
    import subprocess
    import sys

    root = SPECS.parents[1]
    lint = Path(sys.executable).with_name("lint-imports")
    env = {**os.environ, "PYTHONPATH": str(root)}
    done = subprocess.run([str(lint), "--no-cache"], cwd=root, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "0 broken" in done.stdout
