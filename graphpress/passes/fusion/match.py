"""Find the layers ``fuse_dequant_matmul`` rewrites: a matmul whose weight operand is a
fake-quantized constant, and what that fake-quant says.

A layer is ``linear(x, w, b)`` (``w`` in ``[N, K]``), ``matmul(x, w)`` / ``mm(x, w)``
(``w`` in ``[K, N]``, ``x`` with any leading dims for ``matmul``) or
``addmm(b, x, w, beta=1, alpha=1)``, where ``w`` is ``fake_quantize_affine(W, block, s, z,
qmin, qmax, dtype)`` of a stored constant ``W``, directly or through transposes (``t``,
``transpose(0, 1)``, ``permute([1, 0])``; each one flips which axis of ``W`` is K). The
weight's blocks must run along K: ``block = [rows, group]`` in ``[N, K]`` orientation with
``group`` dividing K (``group == K`` is per channel) and ``rows`` dividing N. The dynamic
activation quantization ``int8_dynamic`` inserts, ``fake_quantize_affine(x, [1, .., 1, K],
*choose_qparams_affine(x, [1, .., 1, K], -128, 127, symmetric, 'int8'), -128, 127, 'int8')``,
is recognised on the input so that the W8A8 op can take it over.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
from torch.fx import Node

from graphpress.ir.graph import get_arg
from graphpress.ir.program import Program
from graphpress.ops.quant import CHOOSE_QPARAMS_AFFINE, FAKE_QUANTIZE_AFFINE

__all__ = ["ActivationQuant", "Layer", "PACKABLE_DTYPES", "WeightQuant", "match_layer"]

aten = torch.ops.aten
PACKABLE_DTYPES = ("int4", "uint4", "int8", "uint8")
_LAYERS = {aten.linear.default: "linear", aten.matmul.default: "matmul",
           aten.mm.default: "mm", aten.addmm.default: "addmm"}


@dataclass(frozen=True)
class WeightQuant:
    """The fake-quant of a layer's weight, read in ``[N, K]`` orientation."""

    node: Node             # the fake_quantize_affine node
    path: tuple[Node, ...]  # the transposes between it and the layer
    weight: Node           # the float weight placeholder
    transposed: bool       # whether W is stored [K, N]
    block: tuple[int, int]  # (rows, group) in [N, K] orientation
    dtype: str


@dataclass(frozen=True)
class ActivationQuant:
    """A dynamic per-token int8 fake-quant of a layer's input."""

    node: Node
    source: Node
    symmetric: bool


@dataclass(frozen=True)
class Layer:
    node: Node
    kind: str
    x: Node
    bias: Node | None
    weight: WeightQuant
    activation: ActivationQuant | None


def _is_transpose(node: Node) -> bool:
    if node.op != "call_function" or len(node.meta["val"].shape) != 2:
        return False
    if node.target == aten.t.default:
        return True
    if node.target == aten.transpose.int:
        return sorted(d % 2 for d in node.args[1:3]) == [0, 1]
    return node.target == aten.permute.default and [d % 2 for d in node.args[1]] == [1, 0]


def _operands(node: Node, kind: str) -> tuple[Node, Node, Node | None, str]:
    """(x, weight operand, bias, refusal)."""
    if kind == "linear":
        return node.args[0], node.args[1], get_arg(node, "bias"), ""
    if kind == "addmm":
        beta, alpha = get_arg(node, "beta"), get_arg(node, "alpha")
        reason = "" if beta == 1 and alpha == 1 else (
            f"addmm with beta={beta}, alpha={alpha} (the op computes bias + x @ W)")
        return node.args[1], node.args[2], node.args[0], reason
    return node.args[0], node.args[1], None, ""


def _weight_quant(program: Program, operand: Node, kind: str) -> tuple[WeightQuant | None, str]:
    path: list[Node] = []
    value = operand
    while isinstance(value, Node) and _is_transpose(value):
        path.append(value)
        value = value.args[0]
    if not isinstance(value, Node) or value.target is not FAKE_QUANTIZE_AFFINE.op:
        if isinstance(value, Node) and program.is_weight(value):
            return None, ("its weight is float (no fake-quant: activation-only quantization or "
                          "a layer kept in float): nothing to pack")
        return None, ""
    weight, block, scale, zero_point, _, _, dtype = value.args
    if dtype not in PACKABLE_DTYPES:
        return None, (f"its weight is fake-quantized to {dtype}, which the op cannot pack "
                      f"(dequant_matmul packs {', '.join(PACKABLE_DTYPES)})")
    if not (program.is_weight(weight) and program.is_constant(weight)):
        return None, "its fake-quantized weight is computed in the graph, not a stored constant"
    for role, qparam in (("scale", scale), ("zero point", zero_point)):
        if qparam is not None and not (program.is_weight(qparam)
                                       and program.is_constant(qparam)):
            return None, f"the weight's {role} is computed in the graph, not a stored constant"
    if len(block) != 2 or len(operand.meta["val"].shape) != 2:
        return None, f"its weight has shape {tuple(weight.meta['val'].shape)}, not a matrix"
    # the layer reads [N, K] (linear) or [K, N]; each transpose on the path flips W's axes
    transposed = (kind != "linear") != (len(path) % 2 == 1)
    rows, group = (block[1], block[0]) if transposed else (block[0], block[1])
    return WeightQuant(value, tuple(path), weight, transposed, (rows, group), dtype), ""


def _activation_quant(x: Node) -> ActivationQuant | None:
    if not isinstance(x, Node) or x.target is not FAKE_QUANTIZE_AFFINE.op:
        return None
    source, block, scale, zero_point, qmin, qmax, dtype = x.args
    shape = x.meta["val"].shape
    if (dtype != "int8" or (qmin, qmax) != (-128, 127) or len(block) != len(shape)
            or list(block[:-1]) != [1] * (len(block) - 1) or block[-1] != shape[-1]):
        return None
    if not (isinstance(scale, Node) and scale.target is operator.getitem
            and scale.args[1] == 0):
        return None
    choose = scale.args[0]
    if choose.target is not CHOOSE_QPARAMS_AFFINE.op or choose.args[0] is not source:
        return None
    c_block, c_min, c_max, symmetric, c_dtype = choose.args[1:6]
    if (list(c_block) != list(block) or (c_min, c_max, c_dtype) != (qmin, qmax, dtype)
            or len(choose.args) > 6 or choose.kwargs):  # a non-default eps
        return None
    if zero_point is None:
        return ActivationQuant(x, source, True) if symmetric else None
    if not (zero_point.target is operator.getitem and zero_point.args == (choose, 1)):
        return None
    return ActivationQuant(x, source, bool(symmetric))


def match_layer(program: Program, node: Node) -> tuple[Layer | None, str]:
    """The layer ``node`` is, or None with why it is not fused ('' for nodes that are no
    layer at all, which are not reported)."""
    kind = _LAYERS.get(node.target)
    if kind is None:
        return None, ""
    x, operand, bias, refusal = _operands(node, kind)
    weight, reason = _weight_quant(program, operand, kind)
    if weight is None:
        return None, reason
    if refusal:
        return None, refusal
    n = node.meta["val"].shape[-1]
    if bias is not None and tuple(bias.meta["val"].shape) != (n,):
        return None, (f"its bias has shape {tuple(bias.meta['val'].shape)}; the op adds a bias "
                      f"of [{n}]")
    if kind == "mm" and len(x.meta["val"].shape) != 2:
        return None, "mm of a non-matrix input"
    if not x.meta["val"].is_floating_point():
        return None, f"its input is {x.meta['val'].dtype}, not floating point"
    return Layer(node, kind, x, bias, weight, _activation_quant(x)), ""
