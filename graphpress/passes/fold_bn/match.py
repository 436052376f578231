"""The layers ``fold_bn`` folds into: conv, transposed conv and linear calls.

A *layer* is ``aten.linear``, ``aten.conv{1,2,3}d`` (both overloads), ``aten.conv_transpose
{1,2,3}d`` or ``aten.convolution`` (the decomposed form); :class:`Layer` says where its weight
keeps its output and input channels. Views, argument access and erasure are the IR's generic
helpers (:mod:`graphpress.ir.graph`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch.fx import Node

from graphpress.ir.graph import get_arg

__all__ = ["Layer", "as_layer"]

aten = torch.ops.aten
_LINEAR = {aten.linear.default}
_CONV = {getattr(aten, f"conv{d}d").default for d in (1, 2, 3)} | {
    getattr(aten, f"conv{d}d").padding for d in (1, 2, 3)}
_CONV_T = {aten.conv_transpose1d.default, aten.conv_transpose2d.input,
           aten.conv_transpose3d.input}


@dataclass(frozen=True)
class Layer:
    """A conv, transposed conv or linear call, with where its weight keeps its channels."""

    node: Node
    transposed: bool
    groups: int
    zero_padding: bool  # no implicit zero padding (matters for input-side shifts only)

    @property
    def out_axis(self) -> int:
        return 1 if self.transposed else 0

    @property
    def in_axis(self) -> int:
        return 0 if self.transposed else 1

    def arg(self, name: str) -> Any:
        return get_arg(self.node, name)

    def channel_axis(self, value: Node) -> int:
        """Channel axis of the layer's input or output (batched or not): conv ``[N, C, *s]``
        or ``[C, *s]``, linear ``[..., C]``; both are ``ndim - weight.ndim + 1``."""
        return value.meta["val"].ndim - self.arg("weight").meta["val"].ndim + 1


def as_layer(node: Node) -> Layer | None:
    if node.op != "call_function":
        return None
    target = node.target
    if target in _LINEAR:
        return Layer(node, False, 1, True)
    if target is aten.convolution.default:
        transposed = bool(get_arg(node, "transposed"))
    elif target in _CONV or target in _CONV_T:
        transposed = target in _CONV_T
    else:
        return None
    padding = get_arg(node, "padding")
    kernel = get_arg(node, "weight").meta["val"].shape[2:]
    zero_padding = (padding == "valid" or (padding == "same" and all(k == 1 for k in kernel))
                    or (isinstance(padding, list | tuple) and all(p == 0 for p in padding)))
    return Layer(node, transposed, int(get_arg(node, "groups")), zero_padding)
