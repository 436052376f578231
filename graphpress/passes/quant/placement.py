"""Where insert_fake_quant puts fake-quant: the layers, their weight and activation operands.

A *layer* is a call of ``linear``, ``conv*`` / ``conv_transpose*`` / ``convolution``,
``matmul`` / ``mm`` / ``addmm`` / ``bmm`` whose right operand is a constant weight (directly or
through one transpose), or ``embedding`` (only with ``config.embeddings``). For each layer:

* the **weight** operand, a constant weight placeholder, quantized with the layer's weight
  spec. Its block shape depends on the layer: the output-channel axis (per channel) and the
  contracted axis K (per group) are, for a weight of shape ``W``:

  | layer | out axis | K axis |
  |---|---|---|
  | linear ``[N, K]``, matmul with ``W.t()`` | 0 | 1 |
  | matmul / mm / addmm with ``W`` as ``[K, N]`` | 1 | 0 |
  | conv ``[Cout, Cin/g, *k]`` | 0 | 1 |
  | conv_transpose ``[Cin, Cout/g, *k]`` | 1 | 0 |
  | embedding ``[V, D]`` | 0 (rows) | 1 |

* the **activation** operand (the layer's input), quantized with the activation spec, once
  per (value, spec) even when several layers read it (q, k and v share their input).

Attention's own products (``config.attention``) are placed by
:mod:`~graphpress.passes.quant.attention`, the inputs of cat and residual adds that share one
scale (``config.shared_qparams``) by :mod:`~graphpress.passes.quant.sharing`.

Per-group weight specs (``int4_weight_only``, ``int3_weight_only``, ``w4a8``) apply to linear
and matmul layers, as in the LLM recipes they come from; convolutions stay float under them,
reported. A layer the
config keeps in float (an override to None, ``keep_first_last``) or a weight that is computed
in the graph becomes a refusal with its reason, never a silent omission; a group size that does
not divide a linear layer's K is an error naming the layer and K.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.fx import Node

from graphpress.analysis.channels.rules import op_name
from graphpress.ir.program import Program
from graphpress.pipeline.base import Skip
from graphpress.quant.config import QuantConfig
from graphpress.quant.spec import QuantSpec, weight_block_size

__all__ = ["Layer", "Operand", "activation_block", "activation_refusal", "find_layers",
           "layer_context"]

_CONV = ("conv1d", "conv2d", "conv3d", "convolution")
_CONV_T = ("conv_transpose1d", "conv_transpose2d", "conv_transpose3d")
_MATMUL = ("matmul", "mm", "bmm")
_TRANSPOSES = (torch.ops.aten.t.default, torch.ops.aten.transpose.int,
               torch.ops.aten.permute.default)


@dataclass
class Operand:
    """One tensor to fake-quantize: ``value`` as read by ``layer`` at argument ``index``
    (``layer`` is the transpose a weight is read through, where there is one)."""

    role: str                  # "weight" or "activation"
    layer: Node
    index: int                 # position in layer.args
    value: Node                # the node whose value is quantized (a placeholder for weights)
    spec: QuantSpec
    block_size: list[int | None]   # None: a symbolic (dynamic) dim, the whole of it
    position: int | None = None  # index in the list at layer.args[index] (cat's tensors)


@dataclass
class Layer:
    node: Node
    op: str
    module: str
    config: QuantConfig
    operands: list[Operand]


def _weight_operand(program: Program, node: Node, op: str) -> tuple[int, Node, int, int] | str:
    """(argument index, weight placeholder, out axis, K axis), or why there is none."""
    if op == "linear":
        index, out_axis, k_axis = 1, 0, 1
    elif op in _CONV:
        transposed = op == "convolution" and bool(node.args[6])
        index, out_axis, k_axis = (1, 1, 0) if transposed else (1, 0, 1)
    elif op in _CONV_T:
        index, out_axis, k_axis = 1, 1, 0
    elif op == "embedding":
        index, out_axis, k_axis = 0, 0, 1
    elif op in (*_MATMUL, "addmm"):
        index = 2 if op == "addmm" else 1
        operand = node.args[index]
        if (isinstance(operand, Node) and operand.target in _TRANSPOSES
                and operand.meta["val"].dim() == 2 and program.is_weight(operand.args[0])):
            return index, operand.args[0], 0, 1          # x @ W.t(): W is [N, K]
        index, out_axis, k_axis = index, -1, -2          # x @ W: W is [..., K, N]
    else:
        return "not a quantizable layer"
    weight = node.args[index]
    if not isinstance(weight, Node) or not program.is_weight(weight):
        return "its weight operand is computed in the graph, not a stored weight"
    if not program.is_constant(weight):
        return "its weight is a buffer the program writes"
    return index, weight, out_axis, k_axis


def _quantizable(node: Node) -> str:
    if node.op != "call_function":
        return ""
    op = op_name(node)
    if op in ("linear", "embedding", "addmm", *_CONV, *_CONV_T, *_MATMUL):
        return op
    return ""


def find_layers(program: Program, config: QuantConfig) -> tuple[list[Layer], list[Skip]]:
    """The layers to quantize and their operands, and the refusals with their reasons."""
    layers, skipped = [], []
    candidates = [(n, op) for n in program.graph.nodes if (op := _quantizable(n))]
    if config.keep_first_last and candidates:
        ends = {candidates[0][0], candidates[-1][0]}
        for node in ends:
            skipped.append(Skip(node.name, "first/last layer kept in float (keep_first_last)"))
        candidates = [(n, op) for n, op in candidates if n not in ends]
    for node, op in candidates:
        module, where, layer_config = layer_context(program, config, node, op)
        if op == "embedding" and not config.embeddings:
            skipped.append(Skip(node.name, "embedding tables are kept in float "
                                           "(QuantConfig(embeddings=True) quantizes them)"))
            continue
        if layer_config is None:
            skipped.append(Skip(node.name, f"kept in float by an override ({where})"))
            continue
        found = _weight_operand(program, node, op)
        if isinstance(found, str):
            if op in _MATMUL:
                continue  # a matmul between activations: attention (config.attention)
            skipped.append(Skip(node.name, f"{where}: {found}"))
            continue
        index, weight, out_axis, k_axis = found
        if (layer_config.weight is not None and layer_config.weight.granularity == "per_group"
                and op in (*_CONV, *_CONV_T)):
            skipped.append(Skip(node.name, f"{where}: per_group weights are for linear and "
                                           "matmul layers; convolutions stay float under this "
                                           "scheme (override 'op:" + op + "' with a per-channel "
                                           "config to quantize them)"))
            continue
        operands = []
        if layer_config.weight is not None:
            shape = tuple(weight.meta["val"].shape)
            block = weight_block_size(layer_config.weight, shape, out_axis, k_axis, where)
            # a weight read through a transpose is quantized where the transpose reads it
            reader = node.args[index] if node.args[index] is not weight else node
            operands.append(Operand("weight", reader, 0 if reader is not node else index,
                                    weight, layer_config.weight, block))
        activation = _activation_operand(node, op)
        spec = layer_config.activation
        if spec is not None and activation is not None:
            reason = activation_refusal(activation[1], spec)
            if reason:
                skipped.append(Skip(node.name, f"{where}: activation kept in float: {reason}"))
            else:
                block = activation_block(spec, activation[1])
                operands.append(Operand("activation", node, activation[0], activation[1], spec,
                                        block))
        if operands:
            layers.append(Layer(node, op, module, layer_config, operands))
    return layers, skipped


def _activation_operand(node: Node, op: str) -> tuple[int, Node] | None:
    if op == "embedding":
        return None  # its input is indices
    index = 1 if op == "addmm" else 0
    value = node.args[index]
    return (index, value) if isinstance(value, Node) else None


def layer_context(program: Program, config: QuantConfig, node: Node, op: str
                  ) -> tuple[str, str, QuantConfig | None]:
    """``node``'s module path, its description for messages (``op name in 'module'``), and
    the config that applies to it (None: kept in float by an override)."""
    module = program.source_module(node)
    where = f"{op} {node.name}" + (f" in {module!r}" if module else "")
    return module, where, config.for_layer(module, op)


def activation_block(spec: QuantSpec, value: Node, *, columns: bool = False) -> list[int | None]:
    """The block shape of an activation: ``spec``'s, or with ``columns`` (a per-token spec on
    the right operand of a product) one block per column, spanning dim -2. A symbolic
    (dynamic) block length is None: the whole dim, whatever its size on a call."""
    shape = list(value.meta["val"].shape)
    if columns and spec.granularity == "per_token":
        block = [1] * len(shape)
        block[-2] = shape[-2]
    else:
        block = spec.block_size(shape)
    return [b if isinstance(b, int) else None for b in block]


def activation_refusal(value: Node, spec: QuantSpec) -> str:
    val = value.meta.get("val")
    if not isinstance(val, torch.Tensor) or not val.is_floating_point():
        return "it is not a floating-point tensor"
    symbolic = any(not isinstance(s, int) for s in val.shape)
    if symbolic and spec.granularity not in ("per_tensor", "per_token"):
        return (f"it has a symbolic (dynamic) shape, which fixed {spec.granularity} blocks "
                "cannot cover; trace without dynamic_batch, or use a per-tensor or per-token "
                "spec")
    if symbolic and spec.granularity == "per_token" and not isinstance(val.shape[-1], int):
        return "its last dim (the token's features) is symbolic: per-token blocks need it fixed"
    if spec.granularity == "per_group":
        return "per_group is a weight granularity"
    return ""
