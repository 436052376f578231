"""Registry of analyses a pass can require.

An analysis is a function of a Program; :meth:`Program.analysis` caches its value against the
Program's version, and a pass lists in ``preserves`` the analyses its rewrite leaves valid.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from graphpress.ir.costs import count_costs
from graphpress.ir.shapes import propagate_shapes, symbolic_shapes

if TYPE_CHECKING:
    from graphpress.ir.program import Program

__all__ = ["ANALYSES", "register_analysis", "run_analysis"]

ANALYSES: dict[str, Callable[[Program], Any]] = {
    "shapes": propagate_shapes,
    "symbolic_shapes": symbolic_shapes,
    "costs": count_costs,
}


def register_analysis(name: str) -> Callable[[Callable[[Program], Any]], Callable[[Program], Any]]:
    """Decorator adding an analysis under ``name`` (e.g. the channel dependency graph)."""
    def decorate(fn: Callable[[Program], Any]) -> Callable[[Program], Any]:
        ANALYSES[name] = fn
        return fn
    return decorate


def run_analysis(name: str, program: Program) -> Any:
    if name not in ANALYSES:
        raise KeyError(f"unknown analysis {name!r}; known: {', '.join(sorted(ANALYSES))}")
    return ANALYSES[name](program)
