"""The graph structure ``fold_bn`` works on: layers, views and where channels go through them.

* A *layer* is ``aten.linear``, ``aten.conv{1,2,3}d`` (both overloads), ``aten.conv_transpose
  {1,2,3}d`` or ``aten.convolution`` (the decomposed form).
* A *view* moves data without changing values: reshapes, flatten/unflatten, (un)squeeze,
  permute/transpose, clone/alias/detach, a dtype-preserving ``to`` and eval-mode dropout.
  :func:`follow_axis` says where a channel axis goes through one, and returns None when the
  view merges or splits it (then the channel mapping is not provable).
* A user that reads only a value's shape (``reshape_as``'s template, ``sym_size``) does not
  count as another user of it: folding leaves shapes alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch.fx import Node
from torch.fx.experimental.symbolic_shapes import statically_known_true
from torch.utils import _pytree as pytree

from graphpress.ir.program import Program
from graphpress.ir.purity import is_pure

__all__ = ["Layer", "as_layer", "erase_unused", "follow_axis", "get_arg", "is_view",
           "inputs_of", "reads_only_metadata", "set_arg"]

aten = torch.ops.aten
_LINEAR = {aten.linear.default}
_CONV = {getattr(aten, f"conv{d}d").default for d in (1, 2, 3)} | {
    getattr(aten, f"conv{d}d").padding for d in (1, 2, 3)}
_CONV_T = {aten.conv_transpose1d.default, aten.conv_transpose2d.input,
           aten.conv_transpose3d.input}
_RESHAPES = {aten.view.default, aten.reshape.default, aten._unsafe_view.default,
             aten.flatten.using_ints, aten.unflatten.int, aten.squeeze.default, aten.squeeze.dim,
             aten.squeeze.dims, aten.unsqueeze.default, aten.reshape_as.default,
             aten.view_as.default}
_METADATA = {aten.sym_size.int, aten.sym_numel.default, aten.sym_stride.int,
             aten.sym_storage_offset.default}
_SHAPE_OF_OTHER = {aten.reshape_as.default, aten.view_as.default, aten.expand_as.default}
_IDENTITIES = {aten.clone.default, aten.alias.default, aten.detach.default, aten.to.dtype,
               aten.to.dtype_layout, aten._to_copy.default, aten.dropout.default}


def get_arg(node: Node, name: str) -> Any:
    """Argument ``name`` of an ATen call, positional, keyword or defaulted."""
    for index, argument in enumerate(node.target._schema.arguments):
        if argument.name == name:
            if index < len(node.args):
                return node.args[index]
            if name in node.kwargs:
                return node.kwargs[name]
            return argument.default_value if argument.has_default_value() else None
    raise KeyError(f"{node.target} has no argument {name!r}")


def set_arg(node: Node, name: str, value: Any) -> None:
    names = [a.name for a in node.target._schema.arguments]
    index = names.index(name)
    if index < len(node.args):
        node.update_arg(index, value)
    elif index == len(node.args) and name not in node.kwargs:
        node.args = (*node.args, value)
    else:
        node.update_kwarg(name, value)


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


def is_view(node: Node) -> bool:
    if node.op != "call_function" or not node.args or not isinstance(node.args[0], Node):
        return False
    target = node.target
    if target is aten.dropout.default:
        return not get_arg(node, "train")
    if target in _IDENTITIES:
        before, after = node.args[0].meta.get("val"), node.meta.get("val")
        return (isinstance(before, torch.Tensor) and isinstance(after, torch.Tensor)
                and before.dtype == after.dtype and before.shape == after.shape)
    return target in _RESHAPES or target in (aten.permute.default, aten.transpose.int,
                                             aten.t.default)


def reads_only_metadata(user: Node, value: Node) -> bool:
    """Whether ``user`` reads only the shape of ``value`` (``y.reshape_as(value)``, as LeViT
    does around its BatchNorm), which folding does not change."""
    return user.target in _METADATA or (user.target in _SHAPE_OF_OTHER
                                         and user.args[0] is not value)


def follow_axis(view: Node, axis: int) -> int | None:
    """The axis of ``view``'s output holding axis ``axis`` of its input, or None if the view
    merges or splits that axis (or the shapes do not prove it, with symbolic sizes)."""
    source, out = view.args[0].meta["val"].shape, view.meta["val"].shape
    target = view.target
    if target is aten.permute.default:
        return [d % len(source) for d in view.args[1]].index(axis)
    if target in (aten.transpose.int, aten.t.default):
        first, second = ((view.args[1] % len(source), view.args[2] % len(source))
                         if target is aten.transpose.int else (0, 1 if len(source) == 2 else 0))
        return second if axis == first else first if axis == second else axis
    if target not in _RESHAPES:
        return axis
    # Row-major reshape: output axis j holds input axis `axis` if the axes before each have the
    # same number of elements and the axes themselves the same size.
    before, size, elements = math.prod(source[:axis]), source[axis], 1
    for j, dim in enumerate(out):
        if statically_known_true(elements == before) and statically_known_true(dim == size):
            return j
        elements = elements * dim
    return None


def inputs_of(node: Node) -> list[Node]:
    return [a for a in pytree.tree_leaves((node.args, node.kwargs)) if isinstance(a, Node)]


def erase_unused(program: Program, nodes: list[Node]) -> set[Node]:
    """Remove ``nodes`` and what only they used, as far as nothing else uses them."""
    erased: set[Node] = set()
    stack = list(nodes)
    while stack:
        node = stack.pop()
        if node in erased or node.users:
            continue
        if program.is_weight(node):
            program.remove_weight(node)
        elif is_pure(node):
            stack.extend(inputs_of(node))
            program.graph.erase_node(node)
        else:
            continue
        erased.add(node)
    return erased
