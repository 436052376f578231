"""Quantized attention (``QuantConfig(attention=True)``): the operands of attention's products.

The operands are every ``matmul`` / ``mm`` / ``bmm`` whose two operands are activations (the
``q @ k^T`` and ``p @ v`` of attention written out, as in eager Hugging Face models), and the
query, key and value of ``scaled_dot_product_attention``. Each gets the layer's activation
spec. Per-tensor specs take the whole tensor. Per-token specs follow the product's contracted
dim so that an integer kernel can take the scales out of its sums, ``sum_k (s_i a_ik)(t_j b_kj)
= s_i t_j sum_k a_ik b_kj``:

* the left operand ``a`` of ``a @ b`` (``[..., M, K]``) gets one scale per row (blocks over K,
  the last dim): per token for ``q`` in ``q @ k^T`` and for the probabilities in ``p @ v``;
* the right operand ``b`` (``[..., K, N]``) one scale per column (blocks over K, dim -2): per
  token for ``k^T``, per channel for ``v``.

SDPA's query and key are the left operands of ``q @ k^T`` (per token); its value is the right
operand of ``p @ v`` (per channel). The softmax probabilities inside SDPA stay float: the op
does not expose them.
"""

from __future__ import annotations

from torch.fx import Node

from graphpress.analysis.channels.rules import op_name
from graphpress.ir.program import Program
from graphpress.passes.quant.placement import (
    Layer,
    Operand,
    activation_block,
    activation_refusal,
    layer_context,
)
from graphpress.pipeline.base import Skip
from graphpress.quant.config import QuantConfig

__all__ = ["attention_layers"]

_PRODUCTS = ("matmul", "mm", "bmm")
_SDPA = "scaled_dot_product_attention"


def _sides(program: Program, node: Node, op: str) -> list[tuple[int, str]]:
    """(argument index, side) of the operands to quantize, or [] if ``node`` is not one."""
    if op == _SDPA:
        return [(0, "left"), (1, "left"), (2, "right")]
    if op not in _PRODUCTS or len(node.args) < 2:
        return []
    left, right = node.args[0], node.args[1]
    if not all(isinstance(v, Node) and not program.is_weight(v) for v in (left, right)):
        return []
    return [(0, "left"), (1, "right")]


def attention_layers(program: Program, config: QuantConfig, taken: set[Node]
                     ) -> tuple[list[Layer], list[Skip]]:
    """The attention products to quantize (none of the layers in ``taken``, which already are
    quantized as layers with a weight) and the refusals, with their reasons."""
    layers, skipped = [], []
    for node in program.graph.nodes:
        if node.op != "call_function" or node in taken:
            continue
        op = op_name(node)
        sides = _sides(program, node, op)
        if not sides:
            continue
        module, where, layer_config = layer_context(program, config, node, op)
        spec = layer_config.activation if layer_config is not None else None
        if spec is None:
            skipped.append(Skip(node.name, f"{where}: attention kept in float by an override"))
            continue
        operands = []
        for index, side in sides:
            value = node.args[index]
            reason = activation_refusal(value, spec) if isinstance(value, Node) else "a constant"
            if reason:
                skipped.append(Skip(node.name, f"{where}: operand {index} kept in float: "
                                               f"{reason}"))
                continue
            operands.append(Operand("activation", node, index, value, spec,
                                    activation_block(spec, value, columns=side == "right")))
        if operands:
            layers.append(Layer(node, op, module, layer_config, operands))
    return layers, skipped
