"""Readable text form of a Program, and a diff of two Programs.

The text is stable (node names from the graph, weights by qualified name, no addresses), so it
serves golden tests and the ``GRAPHPRESS_DUMP`` files. One line per node::

    %conv2d = aten.conv2d(%x, @conv.weight, @conv.bias) : f32[2, 8, 30, 30]  # conv

``@name`` is a weight, ``%name`` a value, the comment names the source module and, for nodes a
pass created, ``[pass]``.
"""

from __future__ import annotations

import difflib
from typing import TYPE_CHECKING, Any

import torch
from torch.fx import Node

if TYPE_CHECKING:
    from graphpress.ir.program import Program

__all__ = ["diff_programs", "format_program", "format_value"]

_DTYPES = {torch.float32: "f32", torch.float64: "f64", torch.float16: "f16",
           torch.bfloat16: "bf16", torch.int64: "i64", torch.int32: "i32", torch.int8: "i8",
           torch.uint8: "u8", torch.bool: "bool"}


def format_value(val: Any) -> str:
    """``f32[2, 8]`` for a tensor, recursively for tuples/lists, the type name otherwise."""
    if isinstance(val, torch.Tensor):
        dtype = _DTYPES.get(val.dtype, str(val.dtype).removeprefix("torch."))
        return f"{dtype}[{', '.join(str(s) for s in val.shape)}]"
    if isinstance(val, list | tuple):
        return "(" + ", ".join(format_value(v) for v in val) + ")"
    if isinstance(val, torch.SymInt | int):
        return f"int({val})"
    return type(val).__name__


def _target(node: Node) -> str:
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        ns, name = target.namespace, target._schema.name.split("::")[-1]
        overload = target._overloadname
        return f"{ns}.{name}" + ("" if overload == "default" else f".{overload}")
    return getattr(target, "__name__", str(target))


def _arg(program: Program, value: Any) -> str:
    if isinstance(value, Node):
        name = program.weight_name(value) if value.op == "placeholder" else None
        return f"@{name}" if name else f"%{value.name}"
    if isinstance(value, list | tuple):
        inner = ", ".join(_arg(program, v) for v in value)
        return f"[{inner}]" if isinstance(value, list) else f"({inner})"
    if isinstance(value, float):
        return repr(value)
    return str(value)


def format_program(program: Program) -> str:
    lines = []
    user = [f"%{n.name}: {format_value(n.meta.get('val'))}" for n in program.user_inputs()]
    lines.append(f"program({', '.join(user)})")
    weights = program.weights()
    if weights:
        lines.append("weights:")
        for node in program.nodes("placeholder"):
            name = program.weight_name(node)
            if name is not None:
                kind = program.input_kind(node).name.lower()
                lines.append(f"  @{name}: {format_value(weights[name])} {kind}")
    lines.append("graph:")
    for node in program.graph.nodes:
        if node.op == "placeholder":
            continue
        if node.op == "output":
            lines.append(f"  return {_arg(program, node.args[0])}")
            continue
        args = [_arg(program, a) for a in node.args]
        args += [f"{k}={_arg(program, v)}" for k, v in node.kwargs.items()]
        line = f"  %{node.name} = {_target(node)}({', '.join(args)}) : " + format_value(
            node.meta.get("val"))
        notes = [program.source_module(node)]
        if "graphpress_pass" in node.meta:
            notes.append(f"[{node.meta['graphpress_pass']}]")
        note = " ".join(n for n in notes if n)
        lines.append(line + (f"  # {note}" if note else ""))
    return "\n".join(lines) + "\n"


def diff_programs(before: Program, after: Program, *, context: int = 2) -> str:
    """Unified diff of the text forms; empty when the two print the same."""
    return "".join(difflib.unified_diff(
        format_program(before).splitlines(keepends=True),
        format_program(after).splitlines(keepends=True),
        fromfile="before", tofile="after", n=context,
    ))
