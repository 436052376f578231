"""Quantized weights stored as integers in the ONNX model (``quantization="qdq"``).

A fake-quantized constant weight ``fake_quantize_affine(W, block, s, z, ...)`` becomes, in a
copy of the Program made for the export, ``dequantize_affine(Q, block, s, z, ...)`` with the
integer tensor ``Q = quantize_affine(W, block, s, z, ...)`` computed here by the graphpress op
itself. DequantizeLinear then computes ``(Q - z) * s``, the same products the eager program
computes, so the exported weights are bit-identical to eager's. Exporting the float weight
with QuantizeLinear instead would round ``W / s`` in onnxruntime, while graphpress (like
torch's fake-quant ops) rounds ``W * (1 / s)``; the two differ on a few weights in a thousand,
each a one-step change that later layers carry. It also makes the file about 4x smaller
(int8 storage instead of float32; int4 weights are stored in int8 too: one byte a value) and
spares onnxruntime re-quantizing every weight on every call.

A weight read by one ``linear`` is stored transposed, ``[K, N]``, and the linear becomes
``matmul(x, dequantize(Q^T)) + bias``: with ``Transpose(DequantizeLinear(Q))`` between the
weight and the MatMul, onnxruntime matches none of its integer-matmul patterns and dequantizes
the whole weight on every call; ``DequantizeLinear -> MatMul`` it runs as one int8 (or, for
4-bit blocks along K, MatMulNBits) kernel.

Activations keep QuantizeLinear: their rounding of ``x / s`` against ``x * (1 / s)`` flips the
odd value (the report shows the deviation; ``quantization="exact"`` avoids it).
"""

from __future__ import annotations

import torch

from graphpress.ir.builder import GraphBuilder
from graphpress.ir.program import Program
from graphpress.ops.quant import DEQUANTIZE_AFFINE, FAKE_QUANTIZE_AFFINE

__all__ = ["store_quantized_weights"]


def store_quantized_weights(program: Program) -> Program:
    """A copy of ``program`` whose fake-quantized constant weights are stored quantized (see
    the module docstring); ``program`` itself is not changed."""
    lowered = program.copy()
    for node in list(lowered.graph.nodes):
        if node.target is not FAKE_QUANTIZE_AFFINE.op:
            continue
        weight, block, scale, zero_point, quant_min, quant_max, dtype = node.args
        if not (lowered.is_weight(weight) and lowered.is_constant(weight)
                and lowered.is_weight(scale)
                and (zero_point is None or lowered.is_weight(zero_point))):
            continue
        tensor = lowered.weight(weight).detach()
        qparams = [lowered.weight(scale),
                   None if zero_point is None else lowered.weight(zero_point)]
        q = torch.ops.graphpress.quantize_affine(tensor, list(block), *qparams, quant_min,
                                                 quant_max, dtype)
        base = lowered.weight_name(weight)
        linear = _sole_linear_user(node)
        anchor = linear if linear is not None else node
        with GraphBuilder(lowered, anchor=anchor, pass_name="onnx_stored_weights") as build:
            if linear is None:
                stored = build.weight(lowered.free_weight_name(f"{base}_quantized"), q,
                                      kind="buffer")
                result = build.call(DEQUANTIZE_AFFINE.op, stored, list(block), scale,
                                    zero_point, quant_min, quant_max, dtype, tensor.dtype)
                node.replace_all_uses_with(result)
            else:  # x @ W^T with W^T stored [K, N]: the layout onnxruntime's int kernels take
                stored, *qnodes = (
                    build.weight(lowered.free_weight_name(f"{base}_{what}"), t.t().contiguous(),
                                 kind="buffer") if t is not None else None
                    for what, t in (("quantized_t", q), ("scale_t", qparams[0]),
                                    ("zero_point_t", qparams[1])))
                kn = build.call(DEQUANTIZE_AFFINE.op, stored, [block[1], block[0]], *qnodes,
                                quant_min, quant_max, dtype, tensor.dtype)
                result = build.call(torch.ops.aten.matmul.default, linear.args[0], kn)
                bias = linear.args[2] if len(linear.args) > 2 else None
                if bias is not None:
                    result = build.call(torch.ops.aten.add.Tensor, result, bias)
                linear.replace_all_uses_with(result)
                lowered.graph.erase_node(linear)
        lowered.graph.erase_node(node)
        for unused in (weight, scale, zero_point):
            if unused is not None and not unused.users:
                lowered.remove_weight(unused)
    lowered.touch()
    lowered.graph_module.recompile()
    return lowered


def _sole_linear_user(node: torch.fx.Node) -> torch.fx.Node | None:
    """The ``linear`` that is ``node``'s only reader, with ``node`` as its 2-D weight."""
    if len(node.users) != 1:
        return None
    user = next(iter(node.users))
    if (user.target is torch.ops.aten.linear.default and len(user.args) > 1
            and user.args[1] is node and node.meta["val"].dim() == 2):
        return user
    return None
