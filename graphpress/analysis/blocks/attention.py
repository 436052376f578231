"""Attention cores in the ATen graph and the token axis of their queries and keys.

An attention core is either

* ``scaled_dot_product_attention(q, k, v, attn_mask, is_causal=...)``, or
* ``softmax(s * matmul(q, k^T) + mask, dim=-1)`` whose probabilities (through eval dropout and
  views) are the first operand of ``matmul(p, v)`` (``matmul`` or ``bmm``; the scale may be a
  ``mul`` or a ``div`` by a number, the mask an ``add``).

``q``, ``k``, ``v`` are ``[..., N, D]`` (``[B, H, N, D]`` or ``[B * H, N, D]``): the token axis
is ``-2``. Where the key reaches the matmul transposed, :attr:`Attention.key` is the value
before the transpose. :func:`token_axis_path` follows an axis of a ``[B, N, C]`` value forward
through the views, permutes, ``select`` / ``unbind`` (fused qkv) and channel ``split`` the graph
really has, so the finder can prove that axis 1 of the block input is axis ``-2`` of the keys.
"""

from __future__ import annotations

import itertools
import operator
from dataclasses import dataclass

import torch
from torch.fx import Node

from graphpress.ir.graph import follow_axis, get_arg, is_view

__all__ = ["Attention", "find_attention", "follow_token_axis", "source_of"]

aten = torch.ops.aten
_MATMULS = {aten.matmul.default, aten.bmm.default}
_SCALES = {aten.mul.Tensor, aten.div.Tensor, aten.mul.Scalar, aten.div.Scalar}
_SELECTS = {aten.select.int, aten.unbind.int, aten.split.Tensor, aten.split_with_sizes.default,
            aten.chunk.default}
# keep every axis where it is: a head repeat (grouped KV heads), a broadcast, a scale
_KEEPS = {aten.repeat_interleave.self_int, aten.expand.default, *_SCALES}


@dataclass(frozen=True)
class Attention:
    """One attention core: its node, inputs, mask and what kind it is."""

    node: Node                # the sdpa node, or the softmax
    kind: str                 # "sdpa" | "softmax"
    query: Node
    key: Node                 # [..., N, D] (before the transpose of the softmax form)
    value: Node
    output: Node              # the sdpa node, or matmul(probabilities, v)
    mask: Node | None         # attn_mask of sdpa, or the added mask of the softmax form
    mask_add: Node | None     # softmax form: add(logits, mask)
    causal: bool


def _is_transpose_last(node: Node) -> bool:
    if node.target is aten.transpose.int:
        ndim = len(node.args[0].meta["val"].shape)
        return {node.args[1] % ndim, node.args[2] % ndim} == {ndim - 2, ndim - 1}
    if node.target is aten.permute.default:
        dims = list(node.args[1])
        n = len(dims)
        return dims[:-2] == list(range(n - 2)) and dims[-2:] == [n - 1, n - 2]
    return False


def _through_identities(node: Node) -> Node:
    """Up through eval dropout, clone, contiguous (value-preserving, shape-preserving)."""
    while (isinstance(node, Node) and node.op == "call_function"
           and (node.target is aten.contiguous.default
                or (is_view(node) and node.target not in (aten.transpose.int,
                                                          aten.permute.default)
                    and node.meta["val"].shape == node.args[0].meta["val"].shape))):
        node = node.args[0]
    return node


def _softmax_attention(softmax: Node) -> Attention | None:
    if get_arg(softmax, "dim") % len(softmax.meta["val"].shape) != len(
            softmax.meta["val"].shape) - 1:
        return None
    # forward: probabilities -> matmul(p, v)
    out, frontier = None, [softmax]
    while frontier and out is None:
        node = frontier.pop()
        for user in node.users:
            if user.target in _MATMULS and user.args[0] is node:
                out = user
            elif is_view(user) and user.meta["val"].shape == node.meta["val"].shape:
                frontier.append(user)
    if out is None:
        return None
    # backward: logits = scale * matmul(q, k^T) (+ mask)
    mask = mask_add = None
    node = softmax.args[0]
    for _ in range(6):
        node = _through_identities(node)
        if node.target in _MATMULS:
            break
        if node.target in _SCALES and not isinstance(node.args[1], Node):
            node = node.args[0]
        elif node.target is aten.add.Tensor and mask is None:
            first, second = node.args[0], node.args[1]
            if not (isinstance(first, Node) and isinstance(second, Node)):
                return None
            mask_add = node
            node, mask = (first, second) if _reaches_matmul(first) else (second, first)
        else:
            return None
    else:
        return None
    if node.target not in _MATMULS:
        return None
    query, key_t = node.args[0], node.args[1]
    key = key_t.args[0] if _is_transpose_last(key_t) else None
    if key is None:
        return None
    return Attention(softmax, "softmax", query, key, out.args[1], out, mask, mask_add, False)


def _reaches_matmul(node: Node) -> bool:
    for _ in range(4):
        node = _through_identities(node)
        if node.target in _MATMULS:
            return True
        if node.target in _SCALES and isinstance(node.args[0], Node):
            node = node.args[0]
        else:
            return False
    return False


def find_attention(node: Node) -> Attention | None:
    """The attention core at ``node`` (an sdpa or softmax node), or None."""
    if node.op != "call_function":
        return None
    if node.target is aten.scaled_dot_product_attention.default:
        q, k, v = node.args[:3]
        return Attention(node, "sdpa", q, k, v, node, get_arg(node, "attn_mask"), None,
                         bool(get_arg(node, "is_causal")))
    if node.target in (aten.softmax.int, aten._softmax.default):
        return _softmax_attention(node)
    return None


def source_of(node: Node) -> list[Node]:
    """The chain ``[source, ..., node]`` of views, selects and splits ending at ``node``."""
    path = [node]
    while _moves_data(path[0]):
        path.insert(0, path[0].args[0])
    return path


def _moves_data(node: Node) -> bool:
    if is_view(node):
        return True
    if node.op != "call_function" or not isinstance(node.args[0], Node):
        return False
    if node.target in _KEEPS:
        return len(node.args[0].meta["val"].shape) == len(node.meta["val"].shape)
    return node.target in _SELECTS or (node.target is operator.getitem
                                       and node.args[0].target in _SELECTS)


def follow_token_axis(path: list[Node], axis: int) -> int | None:
    """Where axis ``axis`` of ``path[0]`` is in ``path[-1]`` (None if merged, split or
    selected away)."""
    for prev, node in itertools.pairwise(path):
        if node.target is operator.getitem:
            continue  # the element of an unbind / split keeps the layout its op gave it
        if node.target in _KEEPS:
            continue
        if node.target in _SELECTS:
            ndim = len(prev.meta["val"].shape)
            dim = get_arg(node, "dim") % ndim
            if dim == axis:
                return None
            if node.target in (aten.select.int, aten.unbind.int) and dim < axis:
                axis -= 1
            continue
        axis = follow_axis(node, axis)
        if axis is None:
            return None
    return axis
