"""The generated module: kernels first, then ``call(*placeholders)``, the host function that
binds the symbolic sizes from the inputs, runs every unit of the schedule in order (kernel
launches, views and ATen fallbacks) and returns the graph's outputs.

The source is a pure function of the Program and the options: node names become variable
names, kernels are numbered in schedule order, and nothing about the machine, the time or the
path is written into it, so the same Program always gives the same text (the golden tests hold
it to that).
"""

from __future__ import annotations

import builtins
import keyword
import math
import operator
import re
from dataclasses import dataclass, field
from typing import Any

import sympy
import torch
from torch.export.graph_signature import InputKind
from torch.fx import Node
from torch.utils._sympy.functions import FloorDiv, Mod, PythonMod

from graphpress.backends.triton.kernels import render_group
from graphpress.backends.triton.lowering import node_kind
from graphpress.backends.triton.schedule import Group, Schedule, schedule
from graphpress.backends.triton.text import wrap
from graphpress.errors import BackendError
from graphpress.ir.program import Program
from graphpress.ops.registry import lookup

__all__ = ["GeneratedModule", "generate"]

_RUNTIME = ("attention_blocks", "attention_scale", "channels", "dense", "matmul_configs",
            "matmul_grid", "pointwise_block", "prune_matmul_configs", "row_block", "strides",
            "triton_lowering")
_RESERVED = {"torch", "triton", "tl", "aten", "math", "operator", "call", *_RUNTIME}
# names the generated code itself uses: kernels, per-kernel host values, symbolic sizes
_GENERATED = re.compile(r"(pointwise|row|matmul|attention|shape|numel|block|blocks|rows|batch"
                        r"|k|m|n|l|s|e|ev|scale)_\d+|s\d+|lowered_.*")


@dataclass
class GeneratedModule:
    """The generated source and what it is made of."""

    source: str
    schedule: Schedule
    fallbacks: list[Node] = field(default_factory=list)
    library_calls: list[Node] = field(default_factory=list)
    distinct_kernels: int = 0  # kernel functions in the source (equal groups share one)


def _variable(node: Node) -> str:
    name = node.name
    if (keyword.iskeyword(name) or name in _RESERVED or hasattr(builtins, name)
            or _GENERATED.fullmatch(name)):
        return f"{name}_"
    return name


class _Sizes:
    """Renders symbolic sizes as Python over the symbols bound from the inputs' shapes."""

    def __init__(self) -> None:
        self.bound: dict[sympy.Symbol, str] = {}

    def render(self, expr: Any, where: Node) -> str:
        if isinstance(expr, int):
            return str(expr)
        expr = sympy.sympify(expr)
        if expr.is_Integer:
            return str(int(expr))
        if expr.is_Symbol:
            if expr not in self.bound:
                raise BackendError(f"node {where.name}: the size {expr} is not the size of an "
                                   "input dim, which the triton backend needs")
            return str(expr)
        if expr.is_Add:
            return "(" + " + ".join(self.render(a, where) for a in expr.args) + ")"
        if expr.is_Mul:
            return "(" + " * ".join(self.render(a, where) for a in expr.args) + ")"
        if isinstance(expr, FloorDiv):
            return f"({self.render(expr.args[0], where)} // {self.render(expr.args[1], where)})"
        if isinstance(expr, Mod | PythonMod):
            return f"({self.render(expr.args[0], where)} % {self.render(expr.args[1], where)})"
        raise BackendError(f"node {where.name}: the triton backend cannot compute the symbolic "
                           f"size {expr}")

    def shape(self, node: Node) -> str:
        dims = [self.render(d.node.expr if isinstance(d, torch.SymInt) else int(d), node)
                for d in node.meta["val"].shape]
        return "(" + ", ".join(dims) + ("," if len(dims) == 1 else "") + ")"


def _render_value(value: Any, var: Any) -> str:
    if isinstance(value, Node):
        return var(value)
    if isinstance(value, list | tuple):
        inner = ", ".join(_render_value(v, var) for v in value)
        if isinstance(value, list):
            return f"[{inner}]"
        return f"({inner},)" if len(value) == 1 else f"({inner})"
    if isinstance(value, torch.dtype | torch.layout | torch.memory_format):
        return str(value)
    if isinstance(value, torch.device):
        return f"torch.device({str(value)!r})"
    if isinstance(value, float):
        if math.isinf(value):
            return "math.inf" if value > 0 else "-math.inf"
        return "math.nan" if math.isnan(value) else repr(value)
    if value is None or isinstance(value, bool | int | str):
        return repr(value)
    raise BackendError(f"the triton backend cannot write the argument {value!r} "
                       f"({type(value).__name__}) into the host code")


def _callee(node: Node) -> str:
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        entry = lookup(target._schema.name)
        if entry is not None and entry.triton_lowering is not None:
            return f"lowered_{target._schema.name.replace('::', '_')}"
        namespace = "aten" if target.namespace == "aten" else f"torch.ops.{target.namespace}"
        return f"{namespace}.{target._opname}.{target._overloadname}"
    module = getattr(target, "__module__", None)
    if module in ("_operator", "operator"):
        return f"operator.{target.__name__}"
    if module == "math":
        return f"math.{target.__name__}"
    if module is not None and module.startswith("torch") and hasattr(torch, target.__name__):
        return f"torch.{target.__name__}"
    raise BackendError(f"node {node.name}: the triton backend cannot call {target!r}")


def _host_line(node: Node, var: Any) -> str:
    if node.target is operator.getitem:
        return f"{var(node)} = {var(node.args[0])}[{_render_value(node.args[1], var)}]"
    args = [_render_value(a, var) for a in node.args]
    args += [f"{k}={_render_value(v, var)}" for k, v in node.kwargs.items()]
    return f"{var(node)} = {_callee(node)}({', '.join(args)})"


def _header(program: Program, plan: Schedule, fallbacks: list[Node], distinct: int) -> str:
    groups = plan.groups
    kinds = {k: sum(g.kind == k for g in groups)
             for k in ("pointwise", "row", "matmul", "attention")}
    counts: dict[str, int] = {}
    for node in fallbacks:
        counts[str(node.target)] = counts.get(str(node.target), 0) + 1
    fallback_text = ", ".join(f"{k} x{v}" for k, v in sorted(counts.items())) or "none"
    kernels = (f"{len(groups)} kernel launches ({kinds['pointwise']} pointwise, {kinds['row']} "
               f"row, {kinds['matmul']} matmul, {kinds['attention']} attention; {distinct} "
               f"distinct kernels) cover {sum(len(g.nodes) for g in groups)} ATen ops.")
    paragraphs = [f'"""Generated by graphpress (backend "triton") from a program of '
                  f"{program.num_nodes()} nodes.", "",
                  *wrap(kernels), *wrap(f"ATen fallbacks: {fallback_text}."), "",
                  *wrap("call(*weights, *inputs) takes the program's placeholders in order "
                        "and returns its outputs."), '"""']
    return "\n".join(paragraphs) + "\n"




def _check_supported(program: Program) -> None:
    for node in program.graph.nodes:
        if node.op == "call_function" and isinstance(node.target,
                                                     torch._ops.HigherOrderOperator):
            raise BackendError(f"node {node.name}: the higher-order op {node.target.name()} has "
                               "no lowering in the triton backend and no ATen fallback; use "
                               "backend='eager' or remove the region it wraps from forward()")
    for node in program.graph.nodes:
        if node.op not in ("placeholder", "call_function", "output"):
            raise BackendError(f"node {node.name}: {node.op} nodes are not supported by the "
                               "triton backend")


def generate(program: Program, *, precision: str = "ieee") -> GeneratedModule:
    """The Triton module of ``program`` (see the module docstring)."""
    _check_supported(program)
    plan = schedule(program.graph)
    sizes = _Sizes()
    placeholders = [n for n in program.graph.nodes if n.op == "placeholder"]
    binding = []
    user = {spec.arg.name for spec in program.signature.input_specs
            if spec.kind == InputKind.USER_INPUT}
    for node in placeholders:
        val = node.meta.get("val")
        if node.name not in user or not isinstance(val, torch.Tensor):
            continue
        for d, size in enumerate(val.shape):
            if isinstance(size, torch.SymInt) and size.node.expr.is_Symbol and (
                    size.node.expr not in sizes.bound):
                sizes.bound[size.node.expr] = f"{_variable(node)}.shape[{d}]"
                binding.append(f"{size.node.expr} = {_variable(node)}.shape[{d}]")
    kernels: dict[str, str] = {}  # source without its name and comments -> kernel name
    body, fallbacks, library, sources = [], [], [], []
    lowered: dict[str, str] = {}
    for unit in plan.units:
        if isinstance(unit, Group):
            kernel = render_group(unit, _variable, sizes.shape, precision=precision)
            count = f"{len(unit.nodes)} node{'s' if len(unit.nodes) > 1 else ''}"
            same = kernels.get(_canonical(kernel.source, kernel.name))
            if same is None:
                kernels[_canonical(kernel.source, kernel.name)] = kernel.name
                sources.append(kernel.source)
                body += [f"# {kernel.name}: {count}", *kernel.host]
            else:  # the same code as an earlier group: launch that kernel
                body += [f"# {same} again ({kernel.name}: {count})",
                         *(line.replace(f"{kernel.name}[", f"{same}[", 1)
                           for line in kernel.host)]
            continue
        line = _host_line(unit, _variable)
        callee = line.split(" = ", 1)[1].split("(", 1)[0]
        if callee.startswith("lowered_"):
            lowered[callee] = unit.target._schema.name
            library.append(unit)
        elif node_kind(unit) != "view":
            fallbacks.append(unit)
        body.append(line)
    output = program.output_node().args[0]
    body.append(f"return {_render_value(tuple(output), _variable)}")
    signature = ", ".join(_variable(n) for n in placeholders)
    lines = "\n".join(f"    {line}" for line in [*binding, *body])
    libraries = [f"{name} = triton_lowering({op!r})\n" for name, op in sorted(lowered.items())]
    code = "".join([*libraries,
                    *(f"\n\n{source}" for source in sources),
                    f"\n\ndef call({signature}):\n{lines}\n"])
    source = _header(program, plan, fallbacks, len(sources)) + _imports(code) + code
    return GeneratedModule(source, plan, fallbacks, library, len(sources))


def _canonical(source: str, name: str) -> str:
    """The kernel's code without its name and comments: equal for groups that compute alike."""
    lines = source.replace(f"def {name}(", "def _(", 1).splitlines()
    return "\n".join(line.split("  # ")[0] for line in lines if not line.lstrip().startswith("#"))


def _imports(code: str) -> str:
    """The import lines the generated code uses."""
    used = [name for name in _RUNTIME if re.search(rf"\b{name}\b", code)]
    runtime = ("from graphpress.backends.triton.runtime import (\n"
               + "".join(f"    {name},\n" for name in used) + ")\n") if used else ""
    modules = [f"import {m}\n" for m in ("math", "operator") if f"{m}." in code]
    return ("".join(modules) + ("\n" if modules else "") + "import torch\nimport triton\n"
            "import triton.language as tl\n\n" + runtime + "\naten = torch.ops.aten\n")
