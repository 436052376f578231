"""Channel rules of layers with weights: conv (grouped, depthwise, transposed), linear, norms,
embedding, and scaled_dot_product_attention (see ``solver.py`` for the invariant).

A layer's output channels are *created* by its weight's output axis; its input channels are
unified with the weight's input axis. Grouped convolutions keep the same local channels in every
group; normalisations block the dimensions they normalise over; attention couples heads whole.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from torch.fx import Node

from graphpress.analysis.channels.rules import (
    dim,
    dims,
    fixed_like,
    link,
    op_name,
    rule,
    shape,
)
from graphpress.ir.graph import get_arg

if TYPE_CHECKING:
    from graphpress.analysis.channels.solver import Layout, Tracer
    from graphpress.ir.program import Program

__all__ = ["same_in_every_group"]


@rule("linear")
def _linear(t: Tracer, node: Node, program: Program) -> Any:
    x, w, b = node.args[0], node.args[1], get_arg(node, "bias")
    where = f"linear (node {node.name})"
    link(t, w, 1, dims(t, x)[-1], where)
    out = dim(t, w, 0, program)
    if b is not None:
        link(t, b, 0, out, where)
    return [*list(dims(t, x)[:-1]), out]


@rule("conv1d", "conv2d", "conv3d", "convolution", "conv_transpose1d", "conv_transpose2d",
      "conv_transpose3d")
def _conv(t: Tracer, node: Node, program: Program) -> Any:
    name = op_name(node)
    x, w, b = node.args[0], node.args[1], get_arg(node, "bias")
    if name == "convolution":
        transposed, groups = node.args[6], node.args[8]
    else:
        transposed = name.startswith("conv_transpose")
        groups = get_arg(node, "groups")
    where = f"{name} (node {node.name})"
    out_axis, in_axis = (1, 0) if transposed else (0, 1)
    xin = dims(t, x)[1]
    cin, cout = shape(x)[1], shape(node)[1]
    if groups == 1:
        link(t, w, in_axis, xin, where)
        out = dim(t, w, out_axis, program)
    elif not transposed and groups == cin == cout and shape(w)[1] == 1:
        out = link(t, w, 0, xin, where)     # depthwise: output channel i reads input channel i
    elif not transposed:                    # every group keeps the same local channels
        per_in = same_in_every_group(t, xin, groups, where)
        link(t, w, 1, per_in, where)
        if dims(t, w)[0] is None:
            t.cuts.setdefault((w.name, 0), set()).update(range(0, cout, cout // groups))
        out = dim(t, w, 0, program)
        same_in_every_group(t, out, groups, where)
        out = dims(t, w)[0]                 # as cut within the round, if it was
    else:                                   # transposed: W is [Cin, Cout/groups, k...]
        same_in_every_group(t, xin, groups, where)
        link(t, w, 0, dims(t, x)[1], where)     # as cut within the round, if it was
        out = dim(t, w, 1, program) * groups
    if b is not None:
        link(t, b, 0, out, where)
    t.block(dims(t, x)[2:], f"spatial dim of {where}")
    spatial = [t.fixed(n, f"spatial dim of {where}") for n in shape(node)[2:]]
    return [dims(t, x)[0], out, *spatial]


def same_in_every_group(t: Tracer, layout: Layout, groups: int, where: str) -> Layout:
    """Unify the ``groups`` equal slices of a channel layout; returns the first slice."""
    from graphpress.analysis.channels.views import slice_pieces

    n = t.bounds(layout)[-1] // groups
    pieces = slice_pieces(t, layout, [(j + 1) * n for j in range(groups)], where)
    for piece in pieces[1:]:
        t.unify(pieces[0], piece, where)
    return pieces[0]


@rule("batch_norm", "_native_batch_norm_legit_no_training", "instance_norm")
def _batch_norm(t: Tracer, node: Node, program: Program) -> Any:
    """Every channel is normalised on its own: eval mode by its running statistics, training
    mode (and instance norm) by statistics over the *other* dims, which are therefore blocked.
    A weight-standardized conv (``batch_norm(W.reshape(1, O, -1), training=True)``) keeps its
    output channels O prunable; its input channels, summarised by the statistics, are not,
    except in hidden mode, where a batch of one normalised over one dim is a normalisation over
    the kept channels (recorded in ``normalized``)."""
    x = node.args[0]
    where = f"{op_name(node)} (node {node.name})"
    layouts = list(dims(t, x))
    if op_name(node) == "instance_norm" or (op_name(node) == "batch_norm"
                                             and get_arg(node, "training")):
        reduced = [0, *range(2, len(layouts))] if op_name(node) == "batch_norm" else \
            list(range(2, len(layouts)))
        if t.hidden and op_name(node) == "batch_norm" and len(layouts) == 3 \
                and shape(x)[0] == 1:   # weight standardization: over the kept inputs
            t.normalized[node.name] = 2
            reduced = [0]
        t.block([layouts[i] for i in reduced],
                f"{where} in training mode normalises over this dimension")
    for p in node.args[1:5]:
        if isinstance(p, Node):
            link(t, p, 0, layouts[1], where)
    return (layouts, None, None) if op_name(node).startswith("_native") else layouts


@rule("layer_norm", "rms_norm")
def _norm(t: Tracer, node: Node, program: Program) -> Any:
    x = node.args[0]
    where = f"{op_name(node)} (node {node.name})"
    layouts = list(dims(t, x))
    k = len(node.args[1])
    axis = len(layouts) - k
    if t.hidden and k == 1:     # width pruning: normalised over the kept channels once pruned
        t.normalized[node.name] = axis
    else:
        t.block(layouts[-k:], f"{where} normalises over this dimension")
    for p in (get_arg(node, "weight"), get_arg(node, "bias")):
        if isinstance(p, Node):
            for i in range(p.meta["val"].dim()):
                link(t, p, i, layouts[axis + i], where)
    return layouts


@rule("group_norm")
def _group_norm(t: Tracer, node: Node, program: Program) -> Any:
    """``group_norm(x, G)`` normalises each of G groups of ``C / G`` consecutive channels (and
    the spatial dims) on its own, so whole groups can be removed: a channel of the analysis must
    span whole norm groups (its elements a multiple of ``C / G``, asked for as a coarser grain,
    after a rerun). The pass then rewrites ``num_groups``. In the masked original a removed group
    is normalised alone and multiplied by its zeroed affine weight: it contributes nothing."""
    x, groups = node.args[0], node.args[1]
    where = f"group_norm (node {node.name})"
    layouts = list(dims(t, x))
    t.block(layouts[2:], f"{where} normalises over this dimension")
    per = shape(x)[1] // groups
    channel = layouts[1]
    if groups == 1:
        t.block([channel], f"{where} normalises over all channels (num_groups=1)")
    elif any(b % per for b in t.bounds(channel)):
        t.block([channel], f"{where} normalises groups of {per} channels: only whole groups can "
                "be removed, and channels coupled elsewhere straddle a group boundary")
    elif any(r % per for _, r in channel):
        from graphpress.analysis.channels.regrain import regrain_in_place

        coarse = regrain_in_place(t, layouts, 1, per)
        if coarse is not None:      # whole norm groups already, as the rerun would give
            channel = layouts[1] = coarse
        else:
            ok = all(t.request_grain(s, per // math.gcd(r, per)) for s, r in channel)
            t.refined(ok, [channel], where)
    for p in (get_arg(node, "weight"), get_arg(node, "bias")):
        if isinstance(p, Node):
            link(t, p, 0, channel, where)
    return layouts


@rule("embedding")
def _embedding(t: Tracer, node: Node, program: Program) -> Any:
    w, idx = node.args[0], node.args[1]
    return [*list(dims(t, idx)), dim(t, w, 1, program)]


@rule("scaled_dot_product_attention")
def _sdpa(t: Tracer, node: Node, program: Program) -> Any:
    """Heads of q, k, v couple (a KV head with its ``Hq / Hk`` query heads under GQA). In
    head_dim mode the head_dim positions of q and k couple (``q k^T`` sums over them; the pass
    then pins the default scale) and v's pass to the output."""
    q, k, v = node.args[:3]
    where = f"sdpa (node {node.name})"
    dq, dk, dv = ([dim(t, x, i, program) for i in range(x.meta["val"].dim())] for x in (q, k, v))
    if t.head_dim and len(dq) >= 3:  # q.k^T sums over head_dim: zeroed positions add 0
        t.unify(dq[-1], dk[-1], where)
    else:
        t.block([dq[-1], dk[-1], dv[-1]], f"{where}: head_dim is not pruned")
    if len(dq) < 3:
        t.block(dq + dk + dv, f"{where} without a heads dimension")
        return fixed_like(t, node, where)
    for i in range(-len(dq), -3):
        t.unify(dq[i], t.unify(dk[i], dv[i], where), where)
    heads = t.unify(dk[-3], dv[-3], where)
    hq, hk = shape(q)[-3], shape(k)[-3]
    if hq != hk:
        heads = tuple((s, r * (hq // hk)) for s, r in heads)   # GQA: one KV head per Hq/Hk
    t.unify(dq[-3], heads, where)
    if not t.head_dim:
        t.heads.update(s for s, _ in dq[-3])
    mask = get_arg(node, "attn_mask")
    if isinstance(mask, Node):
        dm = [dim(t, mask, i, program) for i in range(mask.meta["val"].dim())]
        if len(dm) >= 3 and shape(mask)[-3] == hq:
            t.unify(dq[-3], dm[-3], where)
    return [*dq[:-1], dv[-1]]
