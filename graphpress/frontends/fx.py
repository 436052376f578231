"""FX frontend: ``torch.fx.symbolic_trace`` first, then export of the traced GraphModule.

Some models trip torch.export but trace symbolically once Python-level choices are fixed:
``concrete_args`` pins arguments (flags, optional inputs) to constants, and any ``GraphModule``
a user already has (from their own FX tooling) is accepted as is. The symbolic trace is then
exported, so the result is the same ATen training IR as the export frontend's, with the same
parameter names (symbolic_trace keeps the module hierarchy).

Where it differs from the export frontend: arguments in ``concrete_args`` are baked in, so the
Program no longer takes them; ``nn_module_stack`` source paths are those of the traced
GraphModule, which match the original module paths for modules symbolic_trace does not inline.
Both traces show a status bar on a terminal when they take over a second
(:mod:`graphpress.ir.progress`).
"""

from __future__ import annotations

import inspect
from typing import Any

import torch

from graphpress.errors import InputError, TraceError
from graphpress.frontends.export import export_program
from graphpress.ir.program import Program
from graphpress.ir.progress import progress_status

__all__ = ["fx_program"]


def _default_pinned_arguments(traced: torch.fx.GraphModule, model: torch.nn.Module,
                              concrete_args: dict[str, Any]) -> None:
    """Make each pinned argument default to its pinned value, so callers may omit it (the
    traced graph asserts the value, and export bakes it in)."""
    names = list(inspect.signature(model.forward).parameters)
    for name, node in zip(names, (n for n in traced.graph.nodes if n.op == "placeholder")):
        if name in concrete_args:
            node.args = (concrete_args[name],)
    traced.recompile()


def fx_program(model: torch.nn.Module, example_inputs: Any = None,
               example_kwargs: dict[str, Any] | None = None, *,
               concrete_args: dict[str, Any] | None = None, dynamic_shapes: Any = None,
               dynamic_batch: bool = False, inplace: bool = False) -> Program:
    if not isinstance(model, torch.nn.Module):
        raise InputError(f"the fx frontend takes an nn.Module, got {type(model).__name__}")
    if isinstance(model, torch.fx.GraphModule) and not concrete_args:
        traced = model
    else:
        try:
            with progress_status(f"tracing {type(model).__name__}") as status:
                status.set_postfix_str("torch.fx.symbolic_trace", refresh=False)
                traced = torch.fx.symbolic_trace(model, concrete_args=concrete_args)
        except Exception as exc:
            raise TraceError(
                f"torch.fx.symbolic_trace could not trace {type(model).__name__}: "
                f"{type(exc).__name__}: {exc}. Symbolic tracing cannot follow control flow on "
                "tensor values; pin Python-level choices with concrete_args={...}, or use "
                "frontend='export'.") from exc
    if concrete_args:
        _default_pinned_arguments(traced, model, concrete_args)
        example_kwargs = {k: v for k, v in (example_kwargs or {}).items()
                          if k not in concrete_args}
    program = export_program(traced, example_inputs, example_kwargs,
                             dynamic_shapes=dynamic_shapes, dynamic_batch=dynamic_batch,
                             inplace=inplace)
    program.frontend = "fx"
    return program
