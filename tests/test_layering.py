"""The import rule of docs/architecture.md: imports follow the data flow
frontends -> ir / analysis / ops -> pipeline / passes -> backends, and never run against it.

Every ``graphpress.*`` import in every module (top-level or inside a function, type-checking
imports included) is checked against the table of allowed dependencies.
"""

from __future__ import annotations

import ast
from pathlib import Path

import graphpress

ROOT = Path(graphpress.__file__).parent

# what each subpackage may import besides itself; "base" modules (errors, numerics) are free
BASE = {"errors", "numerics", "_version"}
ALLOWED: dict[str, set[str]] = {
    "ir": set(),
    "ops": {"ir"},
    "analysis": {"ir", "ops"},
    "frontends": {"ir", "ops"},
    "pipeline": {"ir", "ops", "analysis"},
    "quant": {"ir", "ops", "analysis", "pipeline"},
    "passes": {"ir", "ops", "analysis", "pipeline", "quant", "testing"},
    "backends": {"ir", "ops"},
    # the independent references verification compares with (the zoo imports nothing of ours)
    "testing": set(),
    # on top: they drive the whole flow
    "integrations": {"ir", "ops", "analysis", "pipeline", "quant", "passes", "frontends",
                     "backends"},
}
TOP = {"api", "cli", "__init__", "__main__"}


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _imports(path: Path) -> list[tuple[str, int]]:
    tree = ast.parse(path.read_text())
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.module, node.lineno))
        elif isinstance(node, ast.Import):
            found.extend((alias.name, node.lineno) for alias in node.names)
    return [(m, line) for m, line in found if m == "graphpress" or m.startswith("graphpress.")]


def test_imports_follow_the_data_flow() -> None:
    violations = []
    for path in sorted(ROOT.rglob("*.py")):
        relative = path.relative_to(ROOT)
        owner = relative.parts[0].removesuffix(".py")
        if owner in TOP or owner in BASE:
            continue
        assert owner in ALLOWED, f"new subpackage {owner!r}: add it to the layering table"
        for module, line in _imports(path):
            target = _layer(module)
            if target == owner or target in BASE:
                continue
            if target not in ALLOWED[owner]:
                violations.append(f"graphpress/{relative}:{line} imports {module} "
                                  f"({owner} -> {target})")
    assert not violations, "imports against the data flow:\n" + "\n".join(violations)


def test_table_matches_the_tree() -> None:
    packages = {p.name for p in ROOT.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert packages == set(ALLOWED), (packages ^ set(ALLOWED))
