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
  copied to make it 2-D (``matmul.py``).
* **attention**: ``scaled_dot_product_attention`` with an online softmax (``attention.py``).
"""

from __future__ import annotations

from collections.abc import Callable

from torch.fx import Node

from graphpress.backends.triton.attention import render_attention
from graphpress.backends.triton.body import Body, decompose
from graphpress.backends.triton.lowering import ROW_OPS
from graphpress.backends.triton.matmul import render_matmul
from graphpress.backends.triton.schedule import Group, shape_key
from graphpress.backends.triton.text import (
    RenderedKernel,
    allocations,
    comment,
    group_shape,
    launch,
    mark_channels,
    signature,
    strided,
)

__all__ = ["RenderedKernel", "render_group"]


def _render_pointwise(group: Group, var: Callable[[Node], str],
                      shape_of: Callable[[Node], str]) -> RenderedKernel:
    name, rank, g = f"pointwise_{group.index}", len(group.shape), group.index
    coords = [f"i{d}" for d in range(rank)]
    body = Body(var, f"shape_{g}", "mask",
                lambda n, _: ("offs", strided(n, coords) if rank else "offs * 0", "mask"))
    body.lines += decompose("offs", [f"size{d}" for d in range(rank)], "i")
    mark_channels(group, body)
    for node in group.inputs():
        body.load(node, rank)
    for node in group.nodes:
        body.element_wise(node)
    host, stores = allocations(group, body, var, shape_of,
                                lambda j, v, _: f"tl.store(out{j}_ptr + offs, {v}, mask=mask)")
    if rank:
        body.params.append((", ".join(f"size{d}" for d in range(rank)), f"*shape_{g}"))
    body.params += [("numel", f"numel_{g}"), ("BLOCK: tl.constexpr", f"BLOCK=block_{g}")]
    header = ["offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)",
              "mask = offs < numel"]
    first = var(group.outputs()[0])
    host = [f"shape_{g} = {group_shape(group, shape_of)}", *host,
            f"numel_{g} = {first}.numel()", f"block_{g} = pointwise_block(numel_{g})",
            *launch(f"{name}[(triton.cdiv(numel_{g}, block_{g}),)]", body.params)]
    return RenderedKernel(name, signature(name, body.params, [*comment(group), *header],
                                           [*body.lines, *stores]), host)


def _render_row(group: Group, var: Callable[[Node], str],
                shape_of: Callable[[Node], str]) -> RenderedKernel:
    name, rank, g = f"row_{group.index}", len(group.shape), group.index
    length = int(group.shape[-1])
    outer = [f"i{d}" for d in range(rank - 1)]

    def offset(n: str, node: Node) -> tuple[str, str, str]:
        val = node.meta["val"]
        per_row = length > 1 and (val.dim() == 0 or val.shape[-1] == 1)
        cols = [*outer, "0"] if per_row else [*outer, "cols"]
        address = strided(n, cols)
        if per_row:
            return address, address, "row_mask"
        return "rows * N + cols", address, "mask"

    body = Body(var, f"shape_{g}", "mask", offset)
    body.lines += decompose("rows", [f"size{d}" for d in range(rank - 1)], "i")
    mark_channels(group, body)
    for node in group.inputs():
        body.load(node, rank)
    for node in group.nodes:
        if node.target in ROW_OPS:
            body.row_op(node, "N")
        else:
            body.element_wise(node)

    def store(j: int, value: str, node: Node) -> str:
        if shape_key(node.meta["val"]) == group.shape:
            return f"tl.store(out{j}_ptr + rows * N + cols, {value}, mask=mask)"
        return f"tl.store(out{j}_ptr + rows, {value}, mask=row_mask)"

    host, stores = allocations(group, body, var, shape_of, store)
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
            f"{block_n})", *launch(f"{name}[(triton.cdiv(rows_{g}, block_{g}),)]", body.params)]
    return RenderedKernel(name, signature(name, body.params, [*comment(group), *header],
                                           [*body.lines, *stores]), host)




def render_group(group: Group, var: Callable[[Node], str], shape_of: Callable[[Node], str],
                 *, precision: str = "ieee") -> RenderedKernel:
    """The kernel of ``group`` (see the module docstring)."""
    if group.kind == "pointwise":
        return _render_pointwise(group, var, shape_of)
    if group.kind == "row":
        return _render_row(group, var, shape_of)
    if group.kind == "attention":
        return render_attention(group, var, shape_of, precision)
    return render_matmul(group, var, shape_of, precision)
