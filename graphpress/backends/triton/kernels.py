"""Kernel renderers: one ``@triton.jit`` function per fusion group, and the host lines that
allocate its outputs and launch it.

* **pointwise** over shape ``S``: a 1-D grid of ``BLOCK`` elements; the flat index is split
  into coordinates ``i0 .. i{R-1}`` for the inputs that are not dense.
* **row** over ``S = [*outer, N]``: a tile of ``BLOCK_R`` rows by ``BLOCK_N >= N`` columns, so a
  whole row is in registers and every reduction of the group is one ``tl.sum`` / ``tl.max`` over
  axis 1; the row index is split into coordinates over ``outer``.
* **matmul** ``[*batch, *rows, K] @ [*batch, K, N]``: ``BLOCK_M x BLOCK_N`` output tiles, K in
  ``BLOCK_K`` steps, float32 accumulation (IEEE products for float32: no TF32 unless asked),
  then the epilogue members on the accumulator before the one store. The grid's third axis runs
  over the batch; rows of ``A`` are addressed through their own strides, so no operand is
  copied to make it 2-D.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.fx import Node

from graphpress.backends.triton.body import Body, decompose
from graphpress.backends.triton.lowering import channel_operands, literal
from graphpress.backends.triton.schedule import Group, shape_key

__all__ = ["RenderedKernel", "render_group"]

aten = torch.ops.aten


class RenderedKernel:
    """A kernel's source and the host lines that run it."""

    def __init__(self, name: str, source: str, host: list[str]) -> None:
        self.name, self.source, self.host = name, source, host


def _strided(name: str, coords: list[str]) -> str:
    return " + ".join(f"{c} * {name}_st{d}" for d, c in enumerate(coords)) or "0"


def _signature(name: str, params: list[tuple[str, str]], header: list[str],
               lines: list[str]) -> str:
    args = ",\n        ".join(p for p, _ in params)
    body = "\n".join(f"    {line}" for line in [*header, *lines])
    return f"@triton.jit\ndef {name}(\n        {args},\n):\n{body}\n"


def _comment(group: Group) -> list[str]:
    ops = ", ".join(f"{n.name} ({n.target})" for n in group.nodes)
    return [f"# {line}" for line in _wrap(f"covers: {ops}")]


def _wrap(text: str, width: int = 92) -> list[str]:
    lines, current = [], ""
    for word in text.split(" "):
        if current and len(current) + len(word) + 1 > width:
            lines.append(current)
            current = word
        else:
            current = f"{current} {word}" if current else word
    return [*lines, current]


def _mark_channels(group: Group, body: Body) -> None:
    for node in group.nodes:
        body.channel_inputs.update(a for a in channel_operands(node) if a not in group.nodes)


def _allocations(group: Group, body: Body, var: Callable[[Node], str],
                 shape_of: Callable[[Node], str], store: Callable[[int, str, Node], str]
                 ) -> tuple[list[str], list[str]]:
    """Host lines allocating every output, and the kernel's store lines."""
    device = f"{var(group.inputs()[0])}.device"
    host, stores = [], []
    for j, node in enumerate(group.outputs()):
        val = node.meta["val"]
        host.append(f"{var(node)} = torch.empty({shape_of(node)}, dtype={val.dtype}, "
                    f"device={device})")
        body.params.append((f"out{j}_ptr", var(node)))
        stores.append(store(j, body.values[node], node))
    return host, stores


def _render_pointwise(group: Group, var: Callable[[Node], str],
                      shape_of: Callable[[Node], str]) -> RenderedKernel:
    name, rank, g = f"pointwise_{group.index}", len(group.shape), group.index
    coords = [f"i{d}" for d in range(rank)]
    body = Body(var, f"shape_{g}", "mask",
                lambda n, _: ("offs", _strided(n, coords) if rank else "offs * 0", "mask"))
    body.lines += decompose("offs", [f"size{d}" for d in range(rank)], "i")
    _mark_channels(group, body)
    for node in group.inputs():
        body.load(node, rank)
    for node in group.nodes:
        body.element_wise(node)
    host, stores = _allocations(group, body, var, shape_of,
                                lambda j, v, _: f"tl.store(out{j}_ptr + offs, {v}, mask=mask)")
    if rank:
        body.params.append((", ".join(f"size{d}" for d in range(rank)), f"*shape_{g}"))
    body.params += [("numel", f"numel_{g}"), ("BLOCK: tl.constexpr", f"BLOCK=block_{g}")]
    header = ["offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)",
              "mask = offs < numel"]
    first = var(group.outputs()[0])
    host = [f"shape_{g} = {group_shape(group, shape_of)}", *host,
            f"numel_{g} = {first}.numel()", f"block_{g} = pointwise_block(numel_{g})",
            *_launch(f"{name}[(triton.cdiv(numel_{g}, block_{g}),)]", body)]
    return RenderedKernel(name, _signature(name, body.params, [*_comment(group), *header],
                                           [*body.lines, *stores]), host)


def group_shape(group: Group, shape_of: Callable[[Node], str]) -> str:
    """The host expression of the group's iteration shape."""
    anchor = group.nodes[0].args[0] if group.kind == "row" else group.nodes[0]
    return shape_of(anchor)


def _launch(callee: str, body: Body, width: int = 92) -> list[str]:
    """The launch call, its arguments wrapped on indented lines (one input's per line)."""
    lines, current = [f"{callee}("], ""
    for _, host in body.params:
        if not host:
            continue
        piece = f"{host}, "
        if current and len(current) + len(piece) > width:
            lines.append(f"    {current.rstrip()}")
            current = ""
        current += piece
    lines.append(f"    {current.rstrip(', ')})")
    return lines


def _render_row(group: Group, var: Callable[[Node], str],
                shape_of: Callable[[Node], str]) -> RenderedKernel:
    name, rank, g = f"row_{group.index}", len(group.shape), group.index
    length = int(group.shape[-1])
    outer = [f"i{d}" for d in range(rank - 1)]

    def offset(n: str, node: Node) -> tuple[str, str, str]:
        val = node.meta["val"]
        per_row = length > 1 and (val.dim() == 0 or val.shape[-1] == 1)
        cols = [*outer, "0"] if per_row else [*outer, "cols"]
        strided = _strided(n, cols)
        if per_row:
            return strided, strided, "row_mask"
        return "rows * N + cols", strided, "mask"

    body = Body(var, f"shape_{g}", "mask", offset)
    body.lines += decompose("rows", [f"size{d}" for d in range(rank - 1)], "i")
    _mark_channels(group, body)
    for node in group.inputs():
        body.load(node, rank)
    for node in group.nodes:
        if node.target in _ROW_TARGETS:
            body.row_op(node, "N")
        else:
            body.element_wise(node)

    def store(j: int, value: str, node: Node) -> str:
        if shape_key(node.meta["val"]) == group.shape:
            return f"tl.store(out{j}_ptr + rows * N + cols, {value}, mask=mask)"
        return f"tl.store(out{j}_ptr + rows, {value}, mask=row_mask)"

    host, stores = _allocations(group, body, var, shape_of, store)
    if rank > 1:
        body.params.append((", ".join(f"size{d}" for d in range(rank - 1)), f"*shape_{g}[:-1]"))
    block_n = max(2, 1 << (length - 1).bit_length())
    body.params += [("n_rows", f"rows_{g}"), ("N", str(length)),
                    ("BLOCK_R: tl.constexpr", f"BLOCK_R=block_{g}"),
                    ("BLOCK_N: tl.constexpr", f"BLOCK_N={block_n}")]
    header = ["rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)[:, None]",
              "cols = tl.arange(0, BLOCK_N).to(tl.int64)[None, :]", "row_mask = rows < n_rows",
              "mask = row_mask & (cols < N)"]
    host = [f"shape_{g} = {group_shape(group, shape_of)}", *host,
            f"rows_{g} = math.prod(shape_{g}[:-1])", f"block_{g} = row_block(rows_{g}, "
            f"{block_n})", *_launch(f"{name}[(triton.cdiv(rows_{g}, block_{g}),)]", body)]
    return RenderedKernel(name, _signature(name, body.params, [*_comment(group), *header],
                                           [*body.lines, *stores]), host)


_ROW_TARGETS = {aten.sum.dim_IntList, aten.mean.dim, aten.amax.default, aten.amin.default,
                aten.linalg_vector_norm.default, aten.softmax.int, aten._softmax.default,
                aten.log_softmax.int, aten._log_softmax.default, aten.layer_norm.default,
                aten.rms_norm.default}


def _matmul_operands(anchor: Node) -> tuple[Node, str, Node, str, int]:
    """(A, its host view, B, its host view as [*batch, K, N], number of batch dims)."""
    args, target = anchor.args, anchor.target
    a, b = (args[1], args[2]) if target == aten.addmm.default else (args[0], args[1])
    out = anchor.meta["val"]
    if target == aten.linear.default:
        return a, "{}", b, "{}.t()", 0
    if target in (aten.mm.default, aten.addmm.default) or b.meta["val"].dim() == 2:
        return a, "{}", b, "{}", 0
    return a, "{}", b, "{}", out.dim() - 2


def _render_matmul(group: Group, var: Callable[[Node], str], shape_of: Callable[[Node], str],
                   precision: str) -> RenderedKernel:
    anchor, g = group.nodes[0], group.index
    name = f"matmul_{g}"
    a, a_view, b, b_view, n_batch = _matmul_operands(anchor)
    out = anchor.meta["val"]
    n_rows = out.dim() - 1 - n_batch
    batch = [f"b{d}" for d in range(n_batch)]
    row_coords = [f"m{d}" for d in range(n_rows)]
    coords = [*batch, *[f"{m}[:, None]" for m in row_coords], "rn[None, :]"]
    rank = out.dim()

    body = Body(var, f"shape_{g}", "mask",
                lambda n, _: ("flat", _strided(n, coords), "mask"))
    a_host, b_host = a_view.format(var(a)), b_view.format(var(b))
    a_shape = f"(*shape_{g}[:-1], k_{g})"
    b_shape = f"(*shape_{g}[:{n_batch}], k_{g}, shape_{g}[-1])"
    body.params += [("a_ptr", var(a)),
                    (", ".join(f"a_st{d}" for d in range(rank)), f"*strides({a_host}, {a_shape})"),
                    ("b_ptr", var(b)),
                    (", ".join(f"b_st{d}" for d in range(n_batch + 2)),
                     f"*strides({b_host}, {b_shape})")]
    epilogue_inputs = [n for n in group.inputs() if n not in (a, b) or any(
        n in m.all_input_nodes for m in group.nodes[1:])]
    lines = [*decompose("pid_b", [f"bsize{d}" for d in range(n_batch)], "b"),
             *decompose("rm", [f"msize{d}" for d in range(n_rows)], "m")]
    a_rows = " + ".join([*(f"b{d} * a_st{d}" for d in range(n_batch)),
                         *(f"m{d} * a_st{n_batch + d}" for d in range(n_rows))])
    b_base = " + ".join(f"b{d} * b_st{d}" for d in range(n_batch)) or "0"
    dot = "tl.dot(a_tile, b_tile" + (f', input_precision="{precision}")'
                                     if out.dtype == torch.float32 else ")")
    lines += [f"a_rows = {a_rows}", f"b_base = {b_base}",
              "acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)",
              "for k0 in range(0, K, BLOCK_K):",
              "    rk = k0 + tl.arange(0, BLOCK_K).to(tl.int64)",
              f"    a_tile = tl.load(a_ptr + a_rows[:, None] + rk[None, :] * a_st{rank - 1}, "
              "mask=(rm[:, None] < M) & (rk[None, :] < K), other=0.0)",
              f"    b_tile = tl.load(b_ptr + b_base + rk[:, None] * b_st{n_batch} + rn[None, :] "
              f"* b_st{n_batch + 1}, mask=(rk[:, None] < K) & (rn[None, :] < N), other=0.0)",
              f"    acc += {dot}",
              "mask = (rm[:, None] < M) & (rn[None, :] < N)",
              "flat = pid_b * M * N + rm[:, None] * N + rn[None, :]"]
    body.lines += lines
    _mark_channels(group, body)
    for node in epilogue_inputs:
        body.load(node, rank)
    body.define(anchor, _accumulated(anchor, body), torch.float32)
    for node in group.nodes[1:]:
        body.element_wise(node)
    host, stores = _allocations(group, body, var, shape_of,
                                lambda j, v, _: f"tl.store(out{j}_ptr + flat, {v}, mask=mask)")
    if n_batch:
        body.params.append((", ".join(f"bsize{d}" for d in range(n_batch)),
                            f"*shape_{g}[:{n_batch}]"))
    body.params += [(", ".join(f"msize{d}" for d in range(n_rows)),
                     f"*shape_{g}[{n_batch}:-1]"),
                    ("M, N, K", f"m_{g}, shape_{g}[-1], k_{g}"),
                    ("BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr", "")]
    header = ["pid_b = tl.program_id(2).to(tl.int64)",
              "rm = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)",
              "rn = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)"]
    batches = f"math.prod(shape_{g}[:{n_batch}])" if n_batch else "1"
    host = [f"shape_{g} = {shape_of(anchor)}", f"k_{g} = {var(a)}.shape[-1]",
            f"m_{g} = math.prod(shape_{g}[{n_batch}:-1])", *host,
            *_launch(f"{name}[matmul_grid(m_{g}, shape_{g}[-1], {batches})]", body)]
    source = _signature(name, body.params, [*_comment(group), *header], [*body.lines, *stores])
    source = ("@triton.autotune(configs=matmul_configs(), key=['M', 'N', 'K'],\n"
              "                 prune_configs_by={'early_config_prune': prune_matmul_configs})\n"
              + source)
    return RenderedKernel(name, source, host)


def _accumulated(anchor: Node, body: Body) -> str:
    """The anchor's value from the float32 accumulator: bias, beta and alpha applied."""
    args = anchor.args
    if anchor.target == aten.linear.default and len(args) > 2 and args[2] is not None:
        return f"acc + {body.operand(args[2], torch.float32)}"
    if anchor.target == aten.addmm.default:
        beta, alpha = anchor.kwargs.get("beta", 1), anchor.kwargs.get("alpha", 1)
        scaled = "acc" if alpha == 1 else f"acc * {literal(alpha)}"
        bias = body.operand(args[0], torch.float32)
        return f"{scaled} + {bias}" if beta == 1 else f"{scaled} + {bias} * {literal(beta)}"
    return "acc"


def render_group(group: Group, var: Callable[[Node], str], shape_of: Callable[[Node], str],
                 *, precision: str = "ieee") -> RenderedKernel:
    """The kernel of ``group`` (see the module docstring)."""
    if group.kind == "pointwise":
        return _render_pointwise(group, var, shape_of)
    if group.kind == "row":
        return _render_row(group, var, shape_of)
    return _render_matmul(group, var, shape_of, precision)
