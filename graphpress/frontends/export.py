"""Export frontend: ``torch.export`` (non-strict, training IR) into a Program.

The training IR is then functionalized (:mod:`graphpress.frontends.functionalize`): no
in-place op is left, and state changes are the signature's mutation outputs. The shapes
analysis starts current: torch.export's metadata is its own fake propagation, and the nodes the
functionalization created are re-checked.

The exported state dict aliases the user's parameters, so the frontend clones every weight
(unless ``inplace=True``): passes can never change the user's ``nn.Module``. Outputs of any
pytree type (tuples, dicts, Hugging Face ``ModelOutput``) are kept in the output spec and come
back in the same type.

A failure to trace is classified and re-raised as :class:`TraceError` with the likely fix:
data-dependent control flow, a dynamic dimension the model specializes, an untraceable Python
construct.

Tracing a large model takes a while: a status bar (:mod:`graphpress.ir.progress`: on a
terminal, after a second) shows the stage (torch.export, functionalize, clone weights, shapes)
and the elapsed time.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.export import Dim, ExportedProgram
from torch.utils import _pytree as pytree

from graphpress.errors import InputError, TraceError
from graphpress.frontends.functionalize import functionalize
from graphpress.frontends.inputs import normalize_inputs
from graphpress.ir.program import Program
from graphpress.ir.progress import progress_status
from graphpress.ir.shapes import propagate_shapes

__all__ = ["batch_dynamic_shapes", "export_program", "program_from_exported"]


def batch_dynamic_shapes(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, Any]:
    """dynamic_shapes marking dim 0 of every tensor input as one shared ``batch`` dimension."""
    batch = Dim("batch")

    def spec(leaf: Any) -> Any:
        if isinstance(leaf, torch.Tensor) and leaf.dim() > 0:
            return {0: batch}
        return None
    return pytree.tree_map(spec, args), pytree.tree_map(spec, kwargs)


def _clone_weights(ep: ExportedProgram) -> None:
    for name, tensor in list(ep.state_dict.items()):
        copy = tensor.detach().clone()
        if isinstance(tensor, torch.nn.Parameter):
            copy = torch.nn.Parameter(copy, requires_grad=tensor.requires_grad)
        ep.state_dict[name] = copy
    for name, value in list(ep.constants.items()):
        if isinstance(value, torch.Tensor):
            ep.constants[name] = value.detach().clone()


def program_from_exported(ep: ExportedProgram, *, frontend: str = "export",
                          inplace: bool = False, status: Any = None) -> Program:
    """The Program of an exported program (``status``: a :func:`progress_status` bar whose
    stage it names)."""
    def stage(name: str) -> None:
        if status is not None:
            status.set_postfix_str(name, refresh=False)

    stage("functionalize")
    ep, rewritten = functionalize(ep)
    if not inplace:
        stage("clone weights")
        _clone_weights(ep)
    stage("shapes")
    program = Program(ep, frontend=frontend)
    # torch.export computed every node's meta["val"] by fake propagation; only the nodes the
    # functionalization created carry a value it did not compute, so only they are re-checked
    touched = [*rewritten, program.output_node()]  # the output node's value is the tuple
    previous = {node: node.meta.get("val") for node in touched}
    program.set_analysis("shapes", propagate_shapes(
        program, who="functionalization", touched=touched, previous=previous))
    return program


def _diagnose(exc: Exception) -> str:
    text = f"{type(exc).__name__}: {exc}"
    lowered = text.lower()
    if "data-dependent" in lowered or "guardondatadependent" in lowered or (
            "could not guard on" in lowered):
        return ("the model branches on the value of a tensor (data-dependent control flow). "
                "Fixes: rewrite the branch with torch.cond or torch.where, or trace with "
                "frontend='fx' and concrete_args that fix the branch.")
    if "constraint" in lowered and ("specializ" in lowered or "dynamic" in lowered):
        return ("a dimension declared dynamic is specialized by the model (it only works for "
                "the traced size). Fixes: drop that dimension from dynamic_shapes / use "
                "dynamic_batch=False, or give Dim(min=..., max=...) bounds the model accepts.")
    if "unsupported" in lowered or "not supported" in lowered:
        return ("the model uses a Python construct torch.export cannot trace. Fixes: try "
                "frontend='fx', or move the construct out of forward().")
    return ("torch.export could not trace the model. Try frontend='fx', or check that the "
            "example inputs are what forward() expects.")


def export_program(model: torch.nn.Module, example_inputs: Any = None,
                   example_kwargs: dict[str, Any] | None = None, *,
                   dynamic_shapes: Any = None, dynamic_batch: bool = False,
                   inplace: bool = False) -> Program:
    """Trace ``model`` with ``torch.export.export(strict=False)`` into a Program."""
    if not isinstance(model, torch.nn.Module):
        raise InputError(
            f"the export frontend takes an nn.Module, got {type(model).__name__}; wrap a "
            "function in an nn.Module whose forward calls it")
    args, kwargs = normalize_inputs(example_inputs, example_kwargs)
    if dynamic_batch and dynamic_shapes is None:
        arg_shapes, kwarg_shapes = batch_dynamic_shapes(args, kwargs)
        fixed, varargs = _positional_layout(model)
        if varargs:  # forward(self, a, *rest): torch.export wants rest's specs as one tuple
            arg_shapes = (*arg_shapes[:fixed], tuple(arg_shapes[fixed:]))
        dynamic_shapes = arg_shapes if not kwargs else {
            **dict(zip(_positional_names(model, len(arg_shapes)), arg_shapes)), **kwarg_shapes}
    with progress_status(f"tracing {type(model).__name__}") as status:
        status.set_postfix_str("torch.export", refresh=False)
        try:
            ep = torch.export.export(model, args, kwargs, dynamic_shapes=dynamic_shapes,
                                     strict=False)
        except Exception as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            raise TraceError(
                f"could not trace {type(model).__name__} with torch.export: "
                f"{_diagnose(exc)}\ncause: {type(exc).__name__}: {first}") from exc
        return program_from_exported(ep, inplace=inplace, status=status)


def _positional_layout(model: torch.nn.Module) -> tuple[int, bool]:
    """(number of named positional parameters of forward, whether it takes ``*args``)."""
    import inspect

    kinds = [p.kind for p in inspect.signature(model.forward).parameters.values()]
    named = sum(k in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
                for k in kinds)
    return named, inspect.Parameter.VAR_POSITIONAL in kinds


def _positional_names(model: torch.nn.Module, count: int) -> list[str]:
    import inspect

    params = list(inspect.signature(model.forward).parameters)
    return params[:count]
