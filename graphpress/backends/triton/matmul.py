"""The matmul kernel: ``out[*batch, *rows, *cols] = sum_k A[*batch, *rows, k] B[*batch, k, *cols]``
with an element-wise epilogue on the float32 accumulator.

Each anchor op is this contraction seen through host views that copy nothing:

=================  =====================  ===================  =====  =====  =====
op                 A                      B                    batch  rows   cols
=================  =====================  ===================  =====  =====  =====
linear(x, W)       x ``[*rows, K]``       ``W.t()``            0      all    1
mm / addmm         a                      b                    0      1      1
matmul, 2-D right  a ``[*rows, K]``       b                    0      all    1
bmm / matmul       a (broadcast batch)    b (broadcast batch)  all    1      1
conv2d 1x1         ``W.flatten(1)``       ``x.flatten(2)``     1 (N)  1 (O)  2 (H, W)
=================  =====================  ===================  =====  =====  =====

A 1x1 convolution with stride 1, no padding and one group is ``W[O, C] @ x[n, C, H*W]`` per
image: the output rows are the output channels and its columns the pixels, already in NCHW order.
``M`` is the product of the row dims, ``N`` of the column dims; the grid is
``(cdiv(M, BLOCK_M), cdiv(N, BLOCK_N), batch)``. The output is contiguous in the anchor's shape,
so a tile is stored at ``(pid_b * M + m) * N + n``; epilogue inputs are addressed through the
coordinates ``b*, m*, c*`` split from ``pid_b``, ``rm`` and ``rn``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.fx import Node

from graphpress.backends.triton.body import Body, decompose
from graphpress.backends.triton.pointwise import literal
from graphpress.backends.triton.schedule import Group
from graphpress.backends.triton.text import (
    RenderedKernel,
    allocations,
    comment,
    launch,
    mark_channels,
    signature,
    strided,
)

__all__ = ["render_matmul"]

aten = torch.ops.aten


@dataclass(frozen=True)
class _Layout:
    a: Node
    a_view: str
    b: Node
    b_view: str
    k: str  # host expression of K, formatted with A's variable
    batch: int
    rows: int
    cols: int


def _layout(anchor: Node) -> _Layout:
    args, target, rank = anchor.args, anchor.target, anchor.meta["val"].dim()
    if target == aten.conv2d.default:
        return _Layout(args[1], "{}.flatten(1)", args[0], "{}.flatten(2)", "{}.shape[1]",
                       1, 1, 2)
    a, b = (args[1], args[2]) if target == aten.addmm.default else (args[0], args[1])
    if target == aten.linear.default:
        return _Layout(a, "{}", b, "{}.t()", "{}.shape[-1]", 0, rank - 1, 1)
    if target in (aten.mm.default, aten.addmm.default) or b.meta["val"].dim() == 2:
        return _Layout(a, "{}", b, "{}", "{}.shape[-1]", 0, rank - 1, 1)
    return _Layout(a, "{}", b, "{}", "{}.shape[-1]", rank - 2, 1, 1)


def _accumulated(anchor: Node, body: Body) -> str:
    """The anchor's value from the float32 accumulator: bias, beta and alpha applied."""
    args, target = anchor.args, anchor.target
    if target in (aten.linear.default, aten.conv2d.default) and len(args) > 2 and (
            args[2] is not None):
        return f"acc + {body.operand(args[2], torch.float32)}"
    if target == aten.addmm.default:
        beta, alpha = anchor.kwargs.get("beta", 1), anchor.kwargs.get("alpha", 1)
        scaled = "acc" if alpha == 1 else f"acc * {literal(alpha)}"
        bias = body.operand(args[0], torch.float32)
        return f"{scaled} + {bias}" if beta == 1 else f"{scaled} + {bias} * {literal(beta)}"
    return "acc"


def _loop(layout: _Layout, precision: str, dtype: torch.dtype) -> list[str]:
    nb, nr = layout.batch, layout.rows
    a_rows = " + ".join([*(f"b{d} * a_st{d}" for d in range(nb)),
                         *(f"m{d} * a_st{nb + d}" for d in range(nr))])
    b_base = " + ".join(f"b{d} * b_st{d}" for d in range(nb)) or "0"
    dot = "tl.dot(a_tile, b_tile" + (f', input_precision="{precision}")'
                                     if dtype == torch.float32 else ")")
    return [f"a_rows = {a_rows}", f"b_base = {b_base}",
            "acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)",
            "for k0 in range(0, K, BLOCK_K):",
            "    rk = k0 + tl.arange(0, BLOCK_K).to(tl.int64)",
            f"    a_tile = tl.load(a_ptr + a_rows[:, None] + rk[None, :] * a_st{nb + nr}, "
            "mask=(rm[:, None] < M) & (rk[None, :] < K), other=0.0)",
            f"    b_tile = tl.load(b_ptr + b_base + rk[:, None] * b_st{nb} + rn[None, :] "
            f"* b_st{nb + 1}, mask=(rk[:, None] < K) & (rn[None, :] < N), other=0.0)",
            f"    acc += {dot}",
            "mask = (rm[:, None] < M) & (rn[None, :] < N)",
            "flat = (pid_b * M + rm[:, None]) * N + rn[None, :]"]


def render_matmul(group: Group, var: Callable[[Node], str], shape_of: Callable[[Node], str],
                  precision: str) -> RenderedKernel:
    """The kernel of a matmul group (see the module docstring)."""
    anchor, g = group.nodes[0], group.index
    name, out = f"matmul_{g}", anchor.meta["val"]
    layout = _layout(anchor)
    nb, nr, nc = layout.batch, layout.rows, layout.cols
    sizes = {"bsize": (0, nb), "msize": (nb, nb + nr), "csize": (nb + nr, nb + nr + nc)}
    coords = [*(f"b{d}" for d in range(nb)), *(f"m{d}[:, None]" for d in range(nr)),
              *(f"c{d}[None, :]" for d in range(nc))] if nc > 1 else [
        *(f"b{d}" for d in range(nb)), *(f"m{d}[:, None]" for d in range(nr)), "rn[None, :]"]
    body = Body(var, f"shape_{g}", "mask", lambda n, _: ("flat", strided(n, coords), "mask"))
    a_host, b_host = layout.a_view.format(var(layout.a)), layout.b_view.format(var(layout.b))
    shape, m_dims, n_dims = f"shape_{g}", f"shape_{g}[{nb}:{nb + nr}]", f"shape_{g}[{nb + nr}:]"
    body.params += [
        ("a_ptr", var(layout.a)),
        (", ".join(f"a_st{d}" for d in range(nb + nr + 1)),
         f"*strides({a_host}, (*{shape}[:{nb + nr}], k_{g}))"),
        ("b_ptr", var(layout.b)),
        (", ".join(f"b_st{d}" for d in range(nb + 2)),
         f"*strides({b_host}, (*{shape}[:{nb}], k_{g}, n_{g}))")]
    operands = (layout.a, layout.b)
    epilogue_inputs = [n for n in group.inputs() if n not in operands or any(
        n in m.all_input_nodes for m in group.nodes[1:])]
    body.lines += [*decompose("pid_b", [f"bsize{d}" for d in range(nb)], "b"),
                   *decompose("rm", [f"msize{d}" for d in range(nr)], "m")]
    if nc > 1:
        body.lines += decompose("rn", [f"csize{d}" for d in range(nc)], "c")
    body.lines += _loop(layout, precision, out.dtype)
    mark_channels(group, body)
    for node in epilogue_inputs:
        body.load(node, out.dim())
    body.define(anchor, _accumulated(anchor, body), torch.float32)
    for node in group.nodes[1:]:
        body.element_wise(node)
    host, stores = allocations(group, body, var, shape_of,
                               lambda j, v, _: f"tl.store(out{j}_ptr + flat, {v}, mask=mask)")
    for prefix, (start, stop) in sizes.items():
        if stop > start and (prefix != "csize" or nc > 1):
            body.params.append((", ".join(f"{prefix}{d}" for d in range(stop - start)),
                                f"*{shape}[{start}:{stop}]"))
    body.params += [("M, N, K", f"m_{g}, n_{g}, k_{g}"),
                    ("BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr", "")]
    header = ["pid_b = tl.program_id(2).to(tl.int64)",
              "rm = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)",
              "rn = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)"]
    batches = f"math.prod({shape}[:{nb}])" if nb else "1"
    host = [f"{shape} = {shape_of(anchor)}", f"k_{g} = {layout.k.format(var(layout.a))}",
            f"m_{g}, n_{g} = math.prod({m_dims}), math.prod({n_dims})", *host,
            *launch(f"{name}[matmul_grid(m_{g}, n_{g}, {batches})]", body.params)]
    source = signature(name, body.params, [*comment(group), *header], [*body.lines, *stores])
    source = ("@triton.autotune(configs=matmul_configs(), key=['M', 'N', 'K'],\n"
              "                 prune_configs_by={'early_config_prune': prune_matmul_configs})\n"
              + source)
    return RenderedKernel(name, source, host)
