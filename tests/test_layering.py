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
    # compute kernels over plain tensors (Triton): below ops, whose ops call them on CUDA, so
    # they import nothing of graphpress
    "kernels": set(),
    "ops": {"ir", "kernels"},
    "analysis": {"ir", "ops"},
    "frontends": {"ir", "ops"},
    "pipeline": {"ir", "ops", "analysis"},
    "quant": {"ir", "ops", "analysis", "pipeline"},
    "passes": {"ir", "ops", "analysis", "pipeline", "quant", "testing"},
    "backends": {"ir", "ops"},
    # the independent references verification compares with (the zoo imports nothing of ours)
    "testing": set(),
    # on top: they drive the whole flow (gp.quant.convert calls gp.compile)
    "integrations": {"ir", "ops", "analysis", "pipeline", "quant", "passes", "frontends",
                     "backends", "api"},
}
# on top of everything: the API, the command line and the demo it runs (demo.py drives
# compile and the ONNX backend, like cli.py)
TOP = {"api", "cli", "demo", "__init__", "__main__"}
# single modules that may also import these layers, inside functions only (so importing their
# package never loads them, and no import cycle can form): gp.quant.convert compiles the
# frozen QAT module (graphpress.integrations.qat drives the frontend and the backends)
LATE: dict[str, set[str]] = {"quant/qat.py": {"integrations"}}


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _imports(path: Path) -> list[tuple[str, int, bool]]:
    """(module, line, inside a function) of every graphpress import in the file."""
    tree = ast.parse(path.read_text())
    in_function = {id(inner) for node in ast.walk(tree)
                   if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
                   for inner in ast.walk(node) if inner is not node}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.module, node.lineno, id(node) in in_function))
        elif isinstance(node, ast.Import):
            found.extend((alias.name, node.lineno, id(node) in in_function)
                         for alias in node.names)
    return [(m, line, late) for m, line, late in found
            if m == "graphpress" or m.startswith("graphpress.")]


def test_imports_follow_the_data_flow() -> None:
    violations = []
    for path in sorted(ROOT.rglob("*.py")):
        relative = path.relative_to(ROOT)
        owner = relative.parts[0].removesuffix(".py")
        if owner in TOP or owner in BASE:
            continue
        assert owner in ALLOWED, f"new subpackage {owner!r}: add it to the layering table"
        late_allowed = LATE.get(relative.as_posix(), set())
        for module, line, late in _imports(path):
            target = _layer(module)
            if target == owner or target in BASE or (late and target in late_allowed):
                continue
            if target not in ALLOWED[owner]:
                violations.append(f"graphpress/{relative}:{line} imports {module} "
                                  f"({owner} -> {target})")
    assert not violations, "imports against the data flow:\n" + "\n".join(violations)


def test_late_imports_are_function_level() -> None:
    """A LATE edge at module level would load the upper layers with the package."""
    for name, layers in LATE.items():
        path = ROOT / name
        assert path.exists(), f"LATE names graphpress/{name}, which does not exist"
        top_level = [f"graphpress/{name}:{line} imports {module}"
                     for module, line, late in _imports(path)
                     if not late and _layer(module) in layers]
        assert not top_level, "late imports at module level:\n" + "\n".join(top_level)


def test_table_matches_the_tree() -> None:
    packages = {p.name for p in ROOT.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert packages == set(ALLOWED), (packages ^ set(ALLOWED))
