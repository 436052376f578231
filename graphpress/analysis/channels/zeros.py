"""Which channels are exactly zero in the masked original (see ``solver.py`` for the invariant).

The masked original zeroes the removed channels in every weight slice of their group. A
channel symbol ``s`` is *zero* in a tensor when, for whatever channels of ``s``'s group are
removed, the tensor's elements at those channels are 0 in the masked original. That holds:

- in every weight (the slices are zeroed);
- in the channels a layer's weight creates: linear, ``addmm``'s columns, conv, embedding (rows
  and biases zeroed); batch/group norm's channels when it has an affine weight
  (``(x - mu) / sigma * 0 + 0``);
- through ops with ``f(0) = 0`` applied to zero channels: data movement (views, slices, cat),
  ``relu``/``gelu``/``silu``/``tanh``/..., pooling, sums, norms and maxima over *other* dims,
  matrix products (a zero row of ``A`` or column of ``B`` gives a zero row or column);
- for a product ``a * b`` when one factor is zero at that channel, for a quotient when the
  numerator is; for a sum ``a + b`` (``sub``, ``maximum``, ``where``) only when every operand
  covers the dimension and is zero there, with no nonzero scalar.

Anything else (``sigmoid``, ``exp``, ``x + 1``, softmax, attention) is not zero. The property
is what lets a sum, mean or p-norm *over* a channel dimension stay exact: the removed channels
add 0 in the masked original and are absent after pruning (a mean keeps its old count: the pass
rewrites it as a sum divided by the unpruned size).
"""

from __future__ import annotations

import numbers
from typing import TYPE_CHECKING

import torch
from torch.fx import Node

from graphpress.analysis.channels.rules import op_name, shape

if TYPE_CHECKING:
    from graphpress.analysis.channels.solver import Layout, Tracer

__all__ = ["is_zero", "zero_symbols"]

_ZERO_PRESERVING = {
    "relu", "relu_", "gelu", "gelu_", "silu", "silu_", "tanh", "neg", "abs", "sqrt", "hardtanh",
    "hardtanh_", "hardswish", "hardswish_", "leaky_relu", "elu", "dropout", "clone",
    "contiguous", "alias", "detach", "_to_copy", "to", "lift_fresh_copy", "erf", "sin", "relu6",
    "mish", "type_as", "repeat_interleave", "adaptive_avg_pool1d", "adaptive_avg_pool2d",
    "adaptive_avg_pool3d", "avg_pool1d", "avg_pool2d", "avg_pool3d", "max_pool1d",
    "max_pool2d", "max_pool3d", "upsample_nearest2d", "upsample_bilinear2d", "mean", "sum",
    "amax", "amin", "var", "std", "cumsum", "linalg_vector_norm", "norm", "matmul", "bmm", "mm",
    "index", "_unsafe_index", "index_select", "gather",
}
_PRODUCTS = {"mul", "mul_", "div", "div_"}
_SUMS = {"add", "add_", "sub", "sub_", "maximum", "minimum", "where"}
_CREATE_LAST = {"linear", "addmm", "embedding"}
_CREATE_CHANNEL = {"conv1d", "conv2d", "conv3d", "convolution", "conv_transpose1d",
                   "conv_transpose2d", "conv_transpose3d"}
_AFFINE_NORMS = {"batch_norm": 1, "_native_batch_norm_legit_no_training": 1, "group_norm": 2}


def _layouts(t: Tracer, node: Node) -> list[Layout | None]:
    value = t.values.get(node.name)
    return value if isinstance(value, list) else []


def is_zero(t: Tracer, node: Node, layout: Layout) -> bool:
    """Whether every channel of ``layout`` (a dimension of ``node``) is zero there."""
    if node.name in t.weights:
        return True
    zero = t.zero.get(node.name, set())
    return bool(layout) and all(s in zero for s, _ in layout)


def _syms(layouts: object) -> set[int]:
    if isinstance(layouts, tuple):
        return set().union(*(_syms(v) for v in layouts))
    if not isinstance(layouts, list):
        return set()
    return {s for layout in layouts if layout for s, _ in layout}


def _inputs_zero(t: Tracer, node: Node) -> set[int]:
    out: set[int] = set()
    for a in node.all_input_nodes:
        out |= _syms(t.values.get(a.name)) if a.name in t.weights else t.zero.get(a.name, set())
    return out


def zero_symbols(t: Tracer, node: Node, is_view: bool) -> set[int]:
    """The symbols of ``node``'s output that are zero in the masked original."""
    name = op_name(node)
    out = _layouts(t, node)
    if is_view or name in _ZERO_PRESERVING:
        zero = _inputs_zero(t, node)
        return _syms(t.values.get(node.name)) & zero if zero else zero
    if name in _CREATE_LAST and out and out[-1]:
        return {s for s, _ in out[-1]}
    if name in _CREATE_CHANNEL and len(out) > 1 and out[1]:
        return {s for s, _ in out[1]}
    if name in _AFFINE_NORMS:
        value = t.values.get(node.name)
        layouts = value[0] if isinstance(value, tuple) else value
        weight = node.args[_AFFINE_NORMS[name]] if len(node.args) > _AFFINE_NORMS[name] else None
        if isinstance(weight, Node) and layouts and layouts[1]:
            return {s for s, _ in layouts[1]}
        return set()
    if name in _PRODUCTS or name in _SUMS:
        return _elementwise(t, node, out)
    return set()


def _elementwise(t: Tracer, node: Node, out: list[Layout | None]) -> set[int]:
    name = op_name(node)
    args = list(node.args[1:]) if name == "where" else list(node.args)
    if name in ("div", "div_"):
        args = args[:1]
    tensors = [a for a in args if isinstance(a, Node) and isinstance(a.meta.get("val"),
                                                                     torch.Tensor)]
    scalars = [a for a in node.args[1:] if isinstance(a, numbers.Number)]
    if name in _SUMS and any(s != 0 for s in scalars):
        return set()
    zero: set[int] = set()
    rank = len(out)
    for i, layout in enumerate(out):
        if not layout:
            continue
        hits = []
        for a in tensors:
            ax = a.meta["val"].dim() - rank + i
            full = ax >= 0 and shape(a)[ax] == shape(node)[i]
            hits.append(full and is_zero(t, a, _layouts(t, a)[ax] or ()))
        if hits and (any(hits) if name in _PRODUCTS else all(hits)):
            zero |= {s for s, _ in layout}
    return zero
