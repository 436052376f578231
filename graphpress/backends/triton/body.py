"""The inside of a generated kernel: external inputs loaded through their strides, one Triton
value per member node, and stores of the members used outside.

Every tensor a kernel reads is addressed in the group's iteration shape ``S``: the host passes
its strides as expanded to ``S`` (0 along broadcast dims) and a ``DENSE`` flag (shape ``S`` and
contiguous), a ``tl.constexpr``: a dense input is read at the flat index, any other through the
coordinates, and the branch not taken is compiled away. Outputs are new contiguous tensors.

Values keep their node's dtype; an op reads its operands cast to its compute dtype
(:func:`graphpress.backends.triton.pointwise.operand_dtype`) and rounds its result to the
node's dtype. Reductions see masked lanes as their neutral element.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.fx import Node

from graphpress.backends.triton.lowering import node_kind
from graphpress.backends.triton.pointwise import (
    TRITON_DTYPES,
    literal,
    operand_dtype,
    pointwise_expr,
)
from graphpress.errors import BackendError

__all__ = ["Body", "decompose"]

aten = torch.ops.aten
NEG_INF = 'float("-inf")'


def decompose(index: str, sizes: list[str], prefix: str) -> list[str]:
    """Lines that split the linear ``index`` into coordinates ``{prefix}{d}`` over ``sizes``
    (row-major: the last dim varies fastest)."""
    if not sizes:
        return []
    lines, rest = [], index
    for d in range(len(sizes) - 1, 0, -1):
        lines.append(f"{prefix}{d} = {rest} % {sizes[d]}")
        lines.append(f"{prefix}rest{d} = {rest} // {sizes[d]}")
        rest = f"{prefix}rest{d}"
    lines.append(f"{prefix}0 = {rest}")
    return lines


class Body:
    """Collects the lines of one kernel body and the arguments the host passes for them.

    ``params``: (kernel parameters, host expression) in signature order (a starred host
    expression passes several); ``var``: the host variable of a node; ``shape_expr``: the host
    expression of the iteration shape; ``offset(name, node)``: the (dense, strided, mask)
    address expressions and load mask of input ``name`` whose strides are ``{name}_st{d}``
    (dense equal to strided where the input can never be dense).
    """

    def __init__(self, var: Callable[[Node], str], shape_expr: str, mask: str,
                 offset: Callable[[str, Node], tuple[str, str, str]]) -> None:
        self.var, self.shape_expr, self.mask, self.offset = var, shape_expr, mask, offset
        self.params: list[tuple[str, str]] = []
        self.lines: list[str] = []
        self.values: dict[Node, str] = {}
        self.dtypes: dict[str, torch.dtype] = {}
        self.channel_inputs: set[Node] = set()
        self.defined = 0  # values are numbered (v0, v1, ...), so equal groups give equal code

    # ------------------------------------------------------------------ inputs
    def load(self, node: Node, rank: int) -> str:
        """Load the external input ``node`` (once) and return its Triton value; one in
        ``channel_inputs`` is read through its ``[C, 1, ...]`` view (runtime ``channels``)."""
        if node in self.values:
            return self.values[node]
        index = sum(1 for p, _ in self.params if p.endswith("_ptr"))
        name, host, value = f"in{index}", self.var(node), f"x{index}"
        dense, strided, mask = self.offset(name, node)
        view = f"channels({host}, {rank})" if node in self.channel_inputs else host
        flag = f"{name.upper()}_DENSE"
        self.params.append((f"{name}_ptr", host))
        if rank:
            self.params.append((", ".join(f"{name}_st{d}" for d in range(rank)),
                                f"*strides({view}, {self.shape_expr})"))
        if dense != strided:
            self.params.append((f"{flag}: tl.constexpr", f"dense({view}, {self.shape_expr})"))
        other = "" if node.meta["val"].dtype == torch.bool else ", other=0"
        load = f"tl.load({name}_ptr + {{}}, mask={mask}{other})"
        if dense != strided:
            self.lines += [f"if {flag}:", f"    {value} = {load.format(dense)}",
                           "else:", f"    {value} = {load.format(strided)}"]
        else:
            self.lines.append(f"{value} = {load.format(strided)}")
        self.values[node] = value
        self.dtypes[value] = node.meta["val"].dtype
        return value

    # ------------------------------------------------------------------ values
    def operand(self, arg: Any, dtype: torch.dtype) -> str:
        if not isinstance(arg, Node):
            if dtype == torch.bool:
                return literal(bool(arg))
            return literal(float(arg) if dtype.is_floating_point and not isinstance(arg, bool)
                           else arg)
        value = self.values[arg]
        have = self.dtypes[value]
        if have == dtype:
            return value
        if dtype == torch.bool:
            return f"({value} != 0)"
        return f"{value}.to({TRITON_DTYPES[dtype]})"

    def define(self, node: Node, expr: str, dtype: torch.dtype) -> str:
        """Bind ``node`` to ``expr`` (computed in ``dtype``), rounded to the node's dtype."""
        out = node.meta["val"].dtype
        if dtype != out:
            expr = f"({expr} != 0)" if out == torch.bool else f"({expr}).to({TRITON_DTYPES[out]})"
        value = f"v{self.defined}"
        self.defined += 1
        self.lines.append(f"{value} = {expr}  # {node.name}: {node.target}")
        self.values[node] = value
        self.dtypes[value] = out
        return value

    def element_wise(self, node: Node) -> None:
        if node_kind(node) == "identity":
            source = self.values[node.args[0]]
            self.values[node] = source
            return
        self.define(node, pointwise_expr(node, self.operand), operand_dtype(node))

    # ------------------------------------------------------------------ rows
    def row_op(self, node: Node, length: str) -> None:
        """A reduction over the last dim (axis 1 of a ``[BLOCK_R, BLOCK_N]`` tile)."""
        target, args, mask = node.target, node.args, self.mask
        compute = torch.float64 if node.meta["val"].dtype == torch.float64 else torch.float32
        x = self.operand(args[0], compute)

        def total(expr: str) -> str:
            return f"tl.sum(tl.where({mask}, {expr}, 0.0), axis=1, keep_dims=True)"

        def peak(expr: str, fn: str, neutral: str) -> str:
            return f"tl.{fn}(tl.where({mask}, {expr}, {neutral}), axis=1, keep_dims=True)"

        t = f"t{self.defined}"
        if target == aten.sum.dim_IntList:
            expr = total(x)
        elif target == aten.mean.dim:
            expr = f"{total(x)} / {length}"
        elif target == aten.amax.default:
            expr = peak(x, "max", NEG_INF)
        elif target == aten.amin.default:
            expr = peak(x, "min", 'float("inf")')
        elif target == aten.linalg_vector_norm.default:
            expr = f"tl.sqrt({total(f'{x} * {x}')})"
        elif target in (aten.softmax.int, aten._softmax.default,
                        aten.log_softmax.int, aten._log_softmax.default):
            self.lines += [f"{t}_max = {peak(x, 'max', NEG_INF)}",
                           f"{t}_exp = tl.where({mask}, tl.exp({x} - {t}_max), 0.0)",
                           f"{t}_sum = tl.sum({t}_exp, axis=1, keep_dims=True)"]
            log = target in (aten.log_softmax.int, aten._log_softmax.default)
            expr = f"({x} - {t}_max) - tl.log({t}_sum)" if log else f"{t}_exp / {t}_sum"
        elif target == aten.layer_norm.default:
            weight, bias = [*args[2:4], None, None][:2]
            eps = args[4] if len(args) > 4 else node.kwargs.get("eps", 1e-5)
            self.lines += [f"{t}_mean = {total(x)} / {length}",
                           f"{t}_centered = tl.where({mask}, {x} - {t}_mean, 0.0)",
                           f"{t}_var = tl.sum({t}_centered * {t}_centered, axis=1, "
                           f"keep_dims=True) / {length}"]
            expr = f"{t}_centered / tl.sqrt({t}_var + {literal(float(eps))})"
            expr = self._affine(expr, weight, bias, compute)
        elif target == aten.rms_norm.default:
            weight = args[2] if len(args) > 2 else node.kwargs.get("weight")
            eps = args[3] if len(args) > 3 else node.kwargs.get("eps")
            if eps is None:
                eps = torch.finfo(node.meta["val"].dtype).eps
            self.lines.append(f"{t}_ms = {total(f'{x} * {x}')} / {length}")
            expr = self._affine(f"{x} / tl.sqrt({t}_ms + {literal(float(eps))})", weight, None,
                                compute)
        else:
            raise BackendError(f"node {node.name}: no row lowering for {target}")
        self.define(node, expr, compute)

    def _affine(self, expr: str, weight: Any, bias: Any, compute: torch.dtype) -> str:
        if weight is not None:
            expr = f"({expr}) * {self.operand(weight, compute)}"
        if bias is not None:
            expr = f"{expr} + {self.operand(bias, compute)}"
        return expr
