"""Carry a smaller token count through the nodes downstream of a merge.

An exported graph spells its shapes out: ``view(x, [2, 197, -1, 64])``, ``expand(m, [2, -1,
197, 197])``. After a merge the token axis of everything downstream is shorter, so each node
that reads a changed value is re-specialized in graph order:

* the changed axes of an input are those whose size differs from its size before the pass;
* a reshape's output axes are grouped with its input axes by equal products (row-major); a
  group holding a changed axis gets the new product on its one axis larger than 1. A group
  that *splits* a token axis into several (windowed attention, a 2-D spatial layout) is refused;
* ``expand`` sizes follow their input's axes (right-aligned);
* ``select`` / ``slice`` on a token axis must stay inside the protected prefix;
* reductions and concatenations over a token axis are refused (a mean over merged tokens
  would weight them wrongly);
* everything else must be an op that treats tokens independently or is attention (pointwise,
  norms, linear, matmul, softmax, sdpa) and is re-run on fake tensors; a failure names the node
  (e.g. a per-token tensor computed outside the blocks meets the merged tokens: a positional
  embedding added in every block).
"""

from __future__ import annotations

import math
import operator
from typing import Any

import torch
from torch.fx import Node
from torch.fx.experimental.symbolic_shapes import statically_known_true
from torch.utils import _pytree as pytree

from graphpress.errors import PassError
from graphpress.ir.graph import get_arg, is_view

__all__ = ["Refusal", "changed_axes", "respecialize"]

aten = torch.ops.aten
_RESHAPES = {aten.view.default, aten.reshape.default, aten._unsafe_view.default}
_REDUCTIONS = {aten.mean.dim, aten.sum.dim_IntList, aten.amax.default, aten.amin.default,
               aten.max.dim, aten.min.dim, aten.argmax.default, aten.var.correction,
               aten.std.correction, aten.any.dims, aten.all.dims, aten.prod.dim_int}
_TOKENWISE = {aten.layer_norm.default, aten.native_layer_norm.default, aten.rms_norm.default,
              aten.linear.default, aten.matmul.default, aten.bmm.default, aten.softmax.int,
              aten._softmax.default, aten.log_softmax.int,
              aten.scaled_dot_product_attention.default,
              aten.dropout.default, aten.contiguous.default, aten.clone.default,
              aten._to_copy.default, aten.to.dtype, aten.to.dtype_layout, aten.to.device,
              aten.alias.default, aten.detach.default, aten.gelu.default, aten.silu.default,
              aten.relu.default, aten.tanh.default, aten.sigmoid.default,
              aten.split.Tensor, aten.split_with_sizes.default, aten.chunk.default,
              aten.unbind.int, aten.repeat_interleave.self_int, aten.masked_fill.Scalar,
              aten.where.self, aten.where.ScalarOther, aten.where.ScalarSelf,
              aten.flatten.using_ints, aten.unflatten.int, aten.unsqueeze.default,
              aten.squeeze.dim, aten.squeeze.dims, aten.permute.default, aten.transpose.int,
              aten.t.default, operator.getitem}


class Refusal(PassError):
    """The merged token count cannot be carried through a node (the message says why)."""


def _shape(value: Any) -> tuple[Any, ...] | None:
    return tuple(value.shape) if isinstance(value, torch.Tensor) else None


def _same(a: Any, b: Any) -> bool:
    return statically_known_true(a == b) if not (isinstance(a, int) and isinstance(b, int)) \
        else a == b


def changed_axes(old: Any, new: Any) -> list[int]:
    """The axes whose size differs (of any element, for an op with several outputs)."""
    if isinstance(old, tuple | list) and isinstance(new, tuple | list) and len(old) == len(new):
        return sorted({axis for a, b in zip(old, new) for axis in changed_axes(a, b)})
    before, after = _shape(old), _shape(new)
    if before is None or after is None or len(before) != len(after):
        return []
    return [i for i, (x, y) in enumerate(zip(before, after)) if not _same(x, y)]


def _groups(source: tuple[Any, ...], target: tuple[Any, ...]) -> list[tuple[range, range]]:
    groups, i, j = [], 0, 0
    while i < len(source) or j < len(target):
        i0, j0 = i, j
        a = source[i] if i < len(source) else 1
        c = target[j] if j < len(target) else 1
        i, j = min(i + 1, len(source)), min(j + 1, len(target))
        while not _same(a, c):
            if (i < len(source)) and (j >= len(target) or statically_known_true(a < c)):
                a, i = a * source[i], i + 1
            elif j < len(target):
                c, j = c * target[j], j + 1
            else:
                raise Refusal("reshape sizes do not line up")
        groups.append((range(i0, i), range(j0, j)))
    return groups


def _reshape_sizes(node: Node, old_in: tuple, new_in: tuple, old_out: tuple) -> list[Any]:
    sizes = list(get_arg(node, 1))
    changed = {i for i, (x, y) in enumerate(zip(old_in, new_in)) if not _same(x, y)}
    for inputs, outputs in _groups(old_in, old_out):
        if not changed & set(inputs):
            continue
        wide = [j for j in outputs if not _same(old_out[j], 1)]
        if len(wide) != 1:
            raise Refusal(f"%{node.name} ({node.target}) splits the token axis into several "
                          f"axes ({[old_in[i] for i in inputs]} -> "
                          f"{[old_out[j] for j in outputs]}): windowed attention or a 2-D "
                          "token layout, which merging tokens would break")
        (j,) = wide
        if not (isinstance(sizes[j], int) and sizes[j] == -1):
            size = math.prod(new_in[i] for i in inputs)
            if not isinstance(size, int):
                raise Refusal(f"%{node.name} ({node.target}) folds the token axis into a "
                              "dynamic dimension; trace with a static batch")
            sizes[j] = size
    return sizes


def _fake(node: Node) -> tuple[tuple[Any, ...], dict[str, Any]]:
    return pytree.tree_map(lambda v: v.meta["val"] if isinstance(v, Node) else v,
                           (node.args, node.kwargs))


def respecialize(node: Node, old: dict[Node, Any], protected: int, fake_mode: Any) -> None:
    """Fix ``node``'s size arguments for its inputs' new sizes and recompute ``meta["val"]``;
    ``old`` holds each value's metadata before the pass."""
    changed = {}
    for parent in node.all_input_nodes:
        axes = changed_axes(old.get(parent, parent.meta["val"]), parent.meta["val"])
        if axes:
            changed[parent] = axes
    if not changed:
        return
    where = f"%{node.name} ({node.target})"
    target = node.target
    first = node.args[0] if node.args else None
    axes = changed.get(first, []) if isinstance(first, Node) else []
    if target in _RESHAPES:
        node.update_arg(1, _reshape_sizes(node, _shape(old[first]), _shape(first.meta["val"]),
                                          _shape(old[node])))
    elif target is aten.expand.default:
        sizes, offset = list(node.args[1]), len(node.args[1]) - len(_shape(first.meta["val"]))
        for axis in axes:
            if not (isinstance(sizes[axis + offset], int) and sizes[axis + offset] == -1):
                sizes[axis + offset] = first.meta["val"].shape[axis]
        node.update_arg(1, sizes)
    elif target in (aten.select.int, aten.slice.Tensor):
        ndim = len(first.meta["val"].shape)
        dim = get_arg(node, "dim") % ndim
        if dim in axes:
            if target is aten.select.int:
                index = get_arg(node, "index")
                if not 0 <= index < protected:
                    raise Refusal(f"{where} reads token {index} by position, which is not a "
                                  f"protected token (the first {protected}): merging moves it")
            else:
                start, end = get_arg(node, "start") or 0, get_arg(node, "end")
                if start != 0 or end is None or end > protected:
                    raise Refusal(f"{where} slices the token axis [{start}:{end}] beyond the "
                                  f"{protected} protected tokens: a per-token output (use "
                                  "unmerge=True for dense heads)")
    elif target in _REDUCTIONS:
        ndim = len(first.meta["val"].shape)
        dims = get_arg(node, 1)
        dims = list(range(ndim)) if dims is None else [dims] if isinstance(dims, int) else dims
        if {d % ndim for d in dims} & set(axes):
            raise Refusal(f"{where} reduces over the token axis: merged tokens would each count "
                          "once whatever their size (use unmerge=True to restore the tokens "
                          "first)")
    elif target is aten.cat.default:
        ndim = len(node.meta["val"].shape)
        if get_arg(node, "dim") % ndim in {a for axs in changed.values() for a in axs}:
            raise Refusal(f"{where} concatenates along the token axis after a merge")
    elif not (target in _TOKENWISE or is_view(node)
              or (hasattr(target, "tags") and torch.Tag.pointwise in target.tags)):
        raise Refusal(f"{where} reads merged tokens, and merge_tokens does not know how that op "
                      "treats the token axis")
    args, kwargs = _fake(node)
    try:
        with fake_mode, torch.no_grad():
            node.meta["val"] = target(*args, **kwargs)
    except Exception as exc:
        others = [p.name for p in node.all_input_nodes if p not in changed]
        raise Refusal(f"{where} combines merged tokens with values that keep the original "
                      f"token count ({', '.join('%' + o for o in others) or 'its arguments'}): "
                      f"a per-token tensor computed outside the blocks, such as a positional "
                      f"embedding applied in every block ({type(exc).__name__}: {exc})") from None
