"""What each ATen op becomes in the Triton backend: its kind (the element-wise expressions are
in :mod:`graphpress.backends.triton.pointwise`).

Kinds (:func:`node_kind`):

* ``pointwise``: one output element from the elements at the same (broadcast) position of the
  inputs (their expressions: ``pointwise.py``). ``identity`` is the special case that computes
  nothing (``clone``, ``contiguous``, ``dropout`` in eval mode): it joins a kernel for free and
  never starts one. ``batch_norm`` in eval mode is element-wise too: its per-channel tensors
  are read through a ``[C, 1, ...]`` view (:func:`channel_operands`).
* ``row``: a reduction over the last dim (``sum`` / ``mean`` / ``amax`` / ``amin`` /
  ``linalg_vector_norm``) or an op built from such reductions (``softmax``, ``log_softmax``,
  ``layer_norm``, ``rms_norm`` over the last dim).
* ``matmul``: ``linear`` / ``mm`` / ``addmm`` / ``bmm`` / ``matmul`` in floating point, and
  ``conv2d`` with a 1x1 kernel, stride 1, no padding and one group.
* ``attention``: ``scaled_dot_product_attention`` without dropout or ``enable_gqa``, heads of
  at most 256, a boolean or additive mask (``attention.py``).
* ``view``: metadata only (``view``, ``permute``, ``slice``, ...) or a host value (``getitem``,
  ``sym_size``): run by the host, launching nothing.
* ``fallback``: everything else, called through ATen by the host.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
from torch.fx import Node

from graphpress.backends.triton.pointwise import CASTS, POINTWISE, TRITON_DTYPES

__all__ = ["MAX_ROW", "ROW_OPS", "channel_operands", "node_kind", "row_length",
           "sdpa_arguments"]

aten = torch.ops.aten

MATMUL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_ROW = 16384  # the longest last dim a row kernel holds in registers

_IDENTITY = {aten.clone.default, aten.contiguous.default, aten.dropout.default,
             aten.lift_fresh_copy.default}
_REDUCTIONS = {aten.sum.dim_IntList, aten.mean.dim, aten.amax.default, aten.amin.default,
               aten.linalg_vector_norm.default}
ROW_OPS = _REDUCTIONS | {aten.softmax.int, aten._softmax.default, aten.log_softmax.int,
                         aten._log_softmax.default, aten.layer_norm.default,
                         aten.rms_norm.default}
MATMULS = {aten.linear.default, aten.mm.default, aten.addmm.default, aten.bmm.default,
           aten.matmul.default}
_VIEWS = {
    aten.view.default, aten._unsafe_view.default, aten.reshape.default, aten.permute.default,
    aten.transpose.int, aten.t.default, aten.expand.default, aten.unsqueeze.default,
    aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default, aten.slice.Tensor,
    aten.select.int, aten.flatten.using_ints, aten.unflatten.int, aten.alias.default,
    aten.split.Tensor, aten.split_with_sizes.default, aten.chunk.default, aten.unbind.int,
    aten.narrow.default, aten.detach.default, aten.view_as.default, aten.reshape_as.default,
    aten.expand_as.default, aten.movedim.int, aten.diagonal.default, aten.sym_size.int,
    aten.sym_numel.default, aten.sym_stride.int, aten._assert_tensor_metadata.default,
    aten.sym_constrain_range_for_size.default, aten._assert_scalar.default,
}


def _val(arg: Any) -> Any:
    return arg.meta.get("val") if isinstance(arg, Node) else arg


def _tensor_inputs(node: Node) -> list[torch.Tensor]:
    vals = [_val(a) for a in node.all_input_nodes]
    return [v for v in vals if isinstance(v, torch.Tensor)]


def row_length(node: Node) -> int | None:
    """The static length of the last dim a row op reduces over, or None if it is not static."""
    source = _val(node.args[0])
    if not isinstance(source, torch.Tensor) or source.dim() == 0:
        return None
    size = source.shape[-1]
    return size if isinstance(size, int) else None


def _last_dim(node: Node, dim: Any) -> bool:
    rank = _val(node.args[0]).dim()
    dims = dim if isinstance(dim, list | tuple) else [dim]
    return len(dims) == 1 and isinstance(dims[0], int) and dims[0] % rank == rank - 1


def _row_op_ok(node: Node) -> bool:
    target, args = node.target, node.args
    length = row_length(node)
    if length is None or length > MAX_ROW or not _val(node).is_floating_point():
        return False
    if target in (aten.sum.dim_IntList, aten.mean.dim):
        return (len(args) > 1 and _last_dim(node, args[1])
                and node.kwargs.get("dtype") is None)
    if target in (aten.amax.default, aten.amin.default):
        return len(args) > 1 and _last_dim(node, args[1])
    if target == aten.linalg_vector_norm.default:
        order = args[1] if len(args) > 1 else node.kwargs.get("ord", 2)
        dim = args[2] if len(args) > 2 else node.kwargs.get("dim")
        return order == 2 and dim is not None and _last_dim(node, dim) and (
            node.kwargs.get("dtype") is None)
    if target in (aten.softmax.int, aten.log_softmax.int):
        return _last_dim(node, args[1]) and (len(args) < 3 or args[2] is None) and (
            node.kwargs.get("dtype") is None)
    if target in (aten._softmax.default, aten._log_softmax.default):
        return _last_dim(node, args[1]) and not args[2]
    if target in (aten.layer_norm.default, aten.rms_norm.default):
        return len(args[1]) == 1
    return False


def node_kind(node: Node) -> str:
    """``pointwise`` / ``identity`` / ``row`` / ``matmul`` / ``attention`` / ``view`` /
    ``fallback``."""
    if node.op != "call_function":
        return "view"
    target = node.target
    if target is operator.getitem or not isinstance(target, torch._ops.OpOverload):
        return "view"
    out = _val(node)
    if target in _VIEWS or not isinstance(out, torch.Tensor):
        return "view"
    tensors = _tensor_inputs(node)
    if any(t.dtype not in TRITON_DTYPES for t in [*tensors, out]):
        return "fallback"
    if target in _IDENTITY:
        if target == aten.dropout.default and node.args[2]:
            return "fallback"
        if target == aten.clone.default and node.kwargs.get("memory_format") not in (
                None, torch.contiguous_format, torch.preserve_format):
            return "fallback"
        return "identity"
    if target in POINTWISE:
        if target in CASTS and any(t.device != out.device for t in tensors):
            return "fallback"
        if target == aten.gelu.default and node.kwargs.get("approximate", "none") not in (
                "none", "tanh"):
            return "fallback"
        if target == aten.batch_norm.default and (node.args[5] or out.dim() < 2):
            return "fallback"  # training mode reduces over the batch
        return "pointwise"
    if target in ROW_OPS:
        return "row" if _row_op_ok(node) else "fallback"
    if target == aten.conv2d.default:
        return "matmul" if _pointwise_conv(node) else "fallback"
    if target == aten.scaled_dot_product_attention.default:
        return "attention" if _attention_ok(node) else "fallback"
    if target in MATMULS:
        left, right = node.args[1:3] if target == aten.addmm.default else node.args[:2]
        if out.dtype in MATMUL_DTYPES and all(t.dtype == out.dtype for t in tensors) and (
                _val(left).dim() >= 2 and _val(right).dim() >= 2):
            return "matmul"
        return "fallback"
    return "fallback"


MAX_HEAD_DIM = 256  # the widest query / value head an attention kernel holds in registers


def sdpa_arguments(node: Node) -> dict[str, Any]:
    """The arguments of a ``scaled_dot_product_attention`` node by name (positional or not)."""
    names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale")
    return dict(zip(names, node.args, strict=False)) | dict(node.kwargs)


def _attention_ok(node: Node) -> bool:
    values = sdpa_arguments(node)
    q, k, v = (_val(values[n]) for n in ("query", "key", "value"))
    mask = _val(values.get("attn_mask"))
    dims = (q.shape[-1], v.shape[-1])
    return (values.get("dropout_p", 0.0) == 0.0 and not values.get("enable_gqa", False)
            and q.dtype in MATMUL_DTYPES and k.dtype == v.dtype == q.dtype and q.dim() >= 2
            and k.dim() == v.dim() == q.dim()
            and all(isinstance(d, int) and d <= MAX_HEAD_DIM for d in dims)
            and (mask is None or mask.dtype in (torch.bool, q.dtype)))


def _pointwise_conv(node: Node) -> bool:
    """A 1x1 conv2d with stride 1, no padding and one group (a matmul over the channels)."""
    args = [*node.args, *([None] * 7)][:7]
    x, weight = _val(args[0]), _val(args[1])
    stride, padding, dilation, groups = (args[3] or [1, 1], args[4] or [0, 0],
                                         args[5] or [1, 1], args[6] or 1)
    if isinstance(padding, str) or x is None or x.dim() != 4 or weight is None:
        return False
    return (tuple(weight.shape[2:]) == (1, 1) and groups == 1
            and all(int(v) == 1 for v in [*stride, *dilation]) and all(p == 0 for p in padding)
            and x.dtype in MATMUL_DTYPES and weight.dtype == x.dtype
            and not isinstance(weight.shape[1], torch.SymInt))


def channel_operands(node: Node) -> list[Node]:
    """The inputs a node reads per channel of dim 1 (batch norm's statistics and affine, a
    1x1 convolution's bias)."""
    if node.target == aten.batch_norm.default:
        return [a for a in node.args[1:5] if isinstance(a, Node)]
    if node.target == aten.conv2d.default and len(node.args) > 2 and isinstance(
            node.args[2], Node):
        return [node.args[2]]
    return []
