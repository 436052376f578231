"""Cost model: parameter counts and multiply-accumulates (MACs).

MACs count the multiply-accumulates of the contraction ops, evaluated at the traced example
shapes (symbolic sizes use their hint):

* conv (and transposed conv): ``numel(out) * C_in / groups * prod(kernel)`` for conv;
  ``numel(in) * C_out / groups * prod(kernel)`` for transposed conv;
* linear / mm / addmm / bmm / matmul: ``numel(out) * K``;
* scaled_dot_product_attention: ``B * H * L * S * (E + E_v)``.

Elementwise ops, norms and reductions are not counted: MACs are a proxy for the matmul work,
and latency (measured by the benchmarks) is the figure that matters.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch.export.graph_signature import InputKind
from torch.fx.experimental.symbolic_shapes import optimization_hint

if TYPE_CHECKING:
    from graphpress.ir.program import Program

__all__ = ["Costs", "count_costs", "node_macs"]

aten = torch.ops.aten


@dataclass(frozen=True)
class Costs:
    parameters: int      # elements of trainable parameters
    parameter_bytes: int
    buffer_bytes: int    # buffers and constant tensors
    macs: int
    nodes: int


def _numel(val: object) -> int:
    if not isinstance(val, torch.Tensor):
        return 0
    return math.prod(optimization_hint(s, fallback=1) for s in val.shape)


def _size(val: torch.Tensor, dim: int) -> int:
    return optimization_hint(val.shape[dim], fallback=1)


def node_macs(node: torch.fx.Node) -> int:
    """The multiply-accumulates of one node (0 for anything but a contraction)."""
    target = node.target
    out = node.meta.get("val")
    args = [a.meta.get("val") if isinstance(a, torch.fx.Node) else a for a in node.args]
    if target in (aten.conv1d.default, aten.conv2d.default, aten.conv3d.default,
                  aten.convolution.default, aten.conv_transpose1d.default,
                  aten.conv_transpose2d.input, aten.conv_transpose3d.input):
        weight = args[1]
        transposed = target in (aten.conv_transpose1d.default, aten.conv_transpose2d.input,
                                aten.conv_transpose3d.input) or (
            target == aten.convolution.default and bool(args[6]))
        kernel = math.prod(_size(weight, d) for d in range(2, weight.dim()))
        if transposed:
            return _numel(args[0]) * _size(weight, 1) * kernel
        return _numel(out) * _size(weight, 1) * kernel
    if target in (aten.linear.default, aten.mm.default, aten.addmm.default, aten.bmm.default,
                  aten.matmul.default, aten.baddbmm.default):
        operand = args[0] if target not in (aten.addmm.default, aten.baddbmm.default) else args[1]
        return _numel(out) * _size(operand, -1)
    if target == aten.scaled_dot_product_attention.default:
        query, key, value = args[:3]
        batch_heads = _numel(query) // (_size(query, -2) * _size(query, -1))
        return batch_heads * _size(query, -2) * _size(key, -2) * (
            _size(query, -1) + _size(value, -1))
    return 0


def count_costs(program: Program) -> Costs:
    params = param_bytes = buffer_bytes = 0
    for spec in program.signature.input_specs:
        if spec.kind == InputKind.PARAMETER:
            t = program.weight(spec.target)
            params += t.numel()
            param_bytes += t.numel() * t.element_size()
        elif spec.kind in (InputKind.BUFFER, InputKind.CONSTANT_TENSOR):
            t = program.weight(spec.target)
            buffer_bytes += t.numel() * t.element_size()
    macs = sum(node_macs(n) for n in program.graph.nodes if n.op == "call_function")
    return Costs(params, param_bytes, buffer_bytes, macs, program.num_nodes())
