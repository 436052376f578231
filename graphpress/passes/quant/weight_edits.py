"""The graph edits of bias correction and EoRA (``weight_algorithms`` decides the tensors):
a corrected or new bias, and the low-rank branch ``y = layer(x) + linear(linear(x, A), B)``."""

from __future__ import annotations

from typing import Any

import torch
from torch.fx import Node

from graphpress.ir.builder import GraphBuilder
from graphpress.ir.graph import set_arg
from graphpress.ir.program import Program
from graphpress.passes.quant.placement import Layer

__all__ = ["add_low_rank", "add_to_bias", "bias_refusal", "gram_error", "layer_fn"]


def layer_fn(layer: Layer) -> Any:
    """``(x, W) -> layer(x, W)`` without bias, the layer's other arguments as traced."""
    rest = layer.node.args[3:]

    def apply(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return layer.node.target(x, weight, None, *rest)
    return apply


def gram_error(error: torch.Tensor, gram: torch.Tensor) -> float:
    """``tr(E H E^T)``: the summed squared output error over the calibration rows."""
    e = error.to(torch.float64)
    return float(((e @ gram.to(torch.float64)) * e).sum())


def add_low_rank(program: Program, layer: Layer, value: Node, a: torch.Tensor,
                 b: torch.Tensor) -> None:
    """``y = layer(x) + linear(linear(x, A), B)``: the branch reads the layer's unquantized
    input, its output replaces the layer's everywhere."""
    node = layer.node
    base = program.source_module(node) or node.name
    with GraphBuilder(program, anchor=node, pass_name="insert_fake_quant") as build:
        a_node = build.weight(program.free_weight_name(f"{base}.eora_a"), a)
        b_node = build.weight(program.free_weight_name(f"{base}.eora_b"), b)
        down = build.call(torch.ops.aten.linear.default, value, a_node)
        up = build.call(torch.ops.aten.linear.default, down, b_node)
    users = list(node.users)
    with GraphBuilder(program, anchor=node, pass_name="insert_fake_quant", after=True) as build:
        total = build.call(torch.ops.aten.add.Tensor, node, up)
    for user in users:
        user.replace_input_with(node, total)
    program.sync_output_specs()


def bias_refusal(program: Program, layer: Layer) -> str:
    """Why the layer's bias cannot take a correction ('' when it can, or when it has none)."""
    bias = _bias_of(layer.node)
    if bias is None or (isinstance(bias, Node) and program.is_constant(bias)
                        and len(bias.users) == 1):
        return ""
    return (f"bias correction: {layer.op} {layer.node.name} has a shared or computed bias "
            "(the correction needs a bias of its own)")


def _bias_of(node: Node) -> Any:
    return node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")


def add_to_bias(program: Program, layer: Layer, weight: Node, shift: torch.Tensor
                ) -> tuple[str, torch.Tensor, bool]:
    """``b + delta`` stored as the layer's bias; a layer without a bias gets ``delta`` as a
    new one. Returns (the bias's weight name or the layer node's name, the tensor, whether it
    is new), for the reference to use the same tensor."""
    node = layer.node
    bias = _bias_of(node)
    if isinstance(bias, Node):
        tensor = program.weight(bias).detach()
        corrected = (tensor.to(torch.float64) + shift).to(tensor.dtype)
        program.replace_weight(bias, corrected)
        return program.weight_name(bias), corrected, False
    dtype = program.weight(weight).dtype
    base = program.source_module(node) or node.name
    name = program.free_weight_name(f"{base}.corrected_bias")
    created = shift.to(dtype)
    with GraphBuilder(program, anchor=node, pass_name="insert_fake_quant") as build:
        set_arg(node, "bias", build.weight(name, created, kind="buffer"))
    return node.name, created, True
