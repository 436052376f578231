"""Channel rules for ops that move, slice or join dimensions without computing on them.

A reshape maps groups of input dimensions to groups of output dimensions with equal products.
One-to-one groups keep their layout; merging ``C x H x W`` keeps C's channels with ``rep``
multiplied by ``H*W`` (the other dimensions are fixed); splitting a dimension whose channels
each span the trailing sizes (the inverse) restores them. Merging a fixed dimension ``B`` with
channels ``C`` (``(batch, heads) -> batch * heads`` before a ``bmm``) lays C's layout ``B``
times; splitting such a dimension back restores C. ``C -> (heads, head_dim)`` makes the
channels whole heads (``rep = head_dim``, after a rerun); ``C -> (3, heads, head_dim)`` (a fused
qkv) also cuts C into 3 slices sharing their heads. Any other regrouping blocks the channels,
naming the node. ``cat`` lays layouts end to end,
``split``/``slice`` take sub-ranges, which must fall on atom boundaries (or cut them, see
``Tracer.unify``).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from torch.fx import Node

from graphpress.ir.graph import get_arg

if TYPE_CHECKING:
    from graphpress.analysis.channels.solver import Layout, Tracer
    from graphpress.ir.program import Program

__all__ = ["new_size", "slice_layout", "slice_pieces", "view_rule"]


def view_rule(t: Tracer, node: Node, program: Program) -> Any:
    from graphpress.analysis.channels.regrain import cut_fresh_weight
    from graphpress.analysis.channels.rules import dim, fixed_like, op_name, shape, size

    name = op_name(node)
    where = f"{name} (node {node.name})"
    if name == "getitem":
        value = t.values.get(node.args[0].name)
        piece = value[node.args[1]] if isinstance(value, tuple) else None
        return piece if piece is not None else fixed_like(t, node, where)
    if name == "cat":
        return _cat(t, node, program, where)
    x = node.args[0]
    rank = x.meta["val"].dim()
    layouts = [dim(t, x, i, program) for i in range(rank)]
    if name == "permute":
        return [layouts[d % rank] for d in node.args[1]]
    if name in ("transpose", "t"):
        a, b = (node.args[1] % rank, node.args[2] % rank) if name == "transpose" else (0, 1)
        out = list(layouts)
        if rank > 1:
            out[a], out[b] = out[b], out[a]
        return out
    if name in ("expand", "expand_as"):
        out = shape(node)
        lead = len(out) - rank
        same = [False] * lead + [shape(x)[i] == out[lead + i] for i in range(rank)]
        result = [layouts[i - lead] if same[i] else t.fixed(n, where) for i, n in enumerate(out)]
        return _like(t, node, result, same, program, where) if name == "expand_as" else result
    if name == "unsqueeze":     # what _reshape gives: unit dimensions fixed, the others kept
        sizes, d = shape(x), node.args[1] % (rank + 1)
        t.block([layouts[i] for i, n in enumerate(sizes) if n == 1],
                f"{where} drops a unit dimension")
        carried = [*layouts[:d], None, *layouts[d:]]
        return [layout if n != 1 else t.fixed(1, where)
                for layout, n in zip(carried, (*sizes[:d], 1, *sizes[d:]), strict=True)]
    if name in ("select", "unbind"):
        d = get_arg(node, "dim") % rank
        t.block([layouts[d]], f"{where} picks single channels")
        rest = layouts[:d] + layouts[d + 1:]
        return rest if name == "select" else tuple(list(rest) for _ in node.meta["val"])
    if name in ("slice", "narrow"):
        d = get_arg(node, "dim") % rank
        n = shape(x)[d]
        start = get_arg(node, "start") or 0
        if name == "narrow":
            length = node.args[3]
            end = start + length if isinstance(start, int) and isinstance(length, int) else None
        else:
            end = get_arg(node, "end")
            end = n if end is None else end
        why = ("takes strided channels" if name == "slice" and get_arg(node, "step") != 1
               else "has a symbolic bound" if not (isinstance(start, int)
                                                   and isinstance(end, int)) else "")
        if why:
            t.block([layouts[d]], f"{where} {why}")
            return [*layouts[:d], t.fixed(shape(node)[d], where), *layouts[d + 1:]]
        start, end = _clamp(start, n), _clamp(end, n)
        cut_fresh_weight(t, x, d, (start, end))
        layouts[d] = dim(t, x, d, program)
        return [*layouts[:d], slice_layout(t, layouts[d], start, end, where), *layouts[d + 1:]]
    if name in ("split", "split_with_sizes", "chunk"):
        d = get_arg(node, "dim") % rank
        ends = list(itertools.accumulate(size(v.shape[d]) for v in node.meta["val"]))
        cut_fresh_weight(t, x, d, ends)
        layouts[d] = dim(t, x, d, program)
        return tuple([*layouts[:d], piece, *layouts[d + 1:]]
                     for piece in slice_pieces(t, layouts[d], ends, where))
    out = _reshape(t, layouts, shape(x), shape(node), where, lambda: _swapped_pairs(node))
    if name in ("reshape_as", "view_as"):
        return _like(t, node, out, [True] * len(out), program, where)
    return out


def _like(t: Tracer, node: Node, out: list[Layout], carried: list[bool], program: Program,
          where: str) -> list[Layout]:
    """``reshape_as`` / ``view_as`` / ``expand_as(x, other)`` take ``other``'s shape, so every
    output dimension is unified with ``other``'s and keeps matching it after pruning. A dimension
    that ``expand_as`` broadcasts from size 1 (``carried`` False) takes ``other``'s channels: the
    values do not vary along it."""
    from graphpress.analysis.channels.rules import dim

    other = node.args[1]
    return [t.unify(dim(t, other, i, program), layout, where) if keep
            else dim(t, other, i, program) for i, (layout, keep) in enumerate(zip(out, carried))]


def _clamp(i: int, size: int) -> int:
    return max(0, min(size, i + size if i < 0 else i))


def slice_layout(t: Tracer, layout: Layout, start: int, end: int, where: str) -> Layout:
    """The atoms covering elements ``[start, end)``; blocks (or cuts) when a boundary splits one."""
    bounds = [0, *t.bounds(layout)]
    if start in bounds and end in bounds:
        return layout[bounds.index(start):bounds.index(end)]
    t.refined(t.cut_at(layout, {start, end}), [layout], where)
    return t.fixed(end - start, f"a slice of channels that do not align at {where}")


def slice_pieces(t: Tracer, layout: Layout, ends: list[int], where: str) -> list[Layout]:
    """The layouts of consecutive pieces ``[0, ends[0]), [ends[0], ends[1]), ...`` of a
    dimension (a split). Where a boundary falls inside an atom, the cuts of every piece are
    asked for at once, so one rerun aligns them all; a piece that does not align is fixed."""
    from graphpress.analysis.channels.regrain import cut_in_place

    bounds = {0, *t.bounds(layout)}
    if not bounds.issuperset(ends):
        cut = cut_in_place(t, layout, set(ends))
        if cut is not None:         # the pieces the rerun would create
            layout, bounds = cut, {0, *t.bounds(cut)}
        else:
            t.refined(t.cut_at(layout, set(ends)), [layout], where)
    return [slice_layout(t, layout, start, end, where) if {start, end} <= bounds
            else t.fixed(end - start, f"a slice of channels that do not align at {where}")
            for start, end in itertools.pairwise([0, *ends])]


def _cat(t: Tracer, node: Node, program: Program, where: str) -> Any:
    from graphpress.analysis.channels.rules import dim, shape

    inputs = [a for a in node.args[0] if math.prod(shape(a)) > 0]
    rank = node.meta["val"].dim()
    d = get_arg(node, "dim") % rank
    per = [[dim(t, a, i, program) for i in range(rank)] for a in inputs]
    out = []
    for i in range(rank):
        if i == d:
            out.append(tuple(atom for layouts in per for atom in layouts[i]))
            continue
        for layouts in per[1:]:
            t.unify(per[0][i], layouts[i], where)
        out.append(per[0][i])
    return out


def _groups(a: tuple[int, ...], b: tuple[int, ...]) -> list[tuple[list[int], list[int]]] | None:
    """Pair runs of non-unit input and output dims with equal products (None if impossible)."""
    ia = [i for i, n in enumerate(a) if n != 1]
    jb = [j for j, n in enumerate(b) if n != 1]
    out, i, j = [], 0, 0
    while i < len(ia) and j < len(jb):
        gi, gj = [ia[i]], [jb[j]]
        pa, pb = a[ia[i]], b[jb[j]]
        i, j = i + 1, j + 1
        while pa != pb:
            if pa < pb and i < len(ia):
                gi.append(ia[i])
                pa, i = pa * a[ia[i]], i + 1
            elif pb < pa and j < len(jb):
                gj.append(jb[j])
                pb, j = pb * b[jb[j]], j + 1
            else:
                return None
        out.append((gi, gj))
    return out if i == len(ia) and j == len(jb) else None


def _swapped_pairs(node: Node) -> set[tuple[int, int]]:
    """Adjacent output dims ``(j, j + 1)`` that every user of a reshape swaps (a channel shuffle
    ``view(n, g, c/g, h, w).transpose(1, 2)``)."""
    pairs = None
    for user in node.users:
        name = str(user.target)
        if "transpose" in name and len(user.args) == 3:
            rank = node.meta["val"].dim()
            pair = tuple(sorted((user.args[1] % rank, user.args[2] % rank)))
        elif "permute" in name:
            perm = list(user.args[1])
            moved = [i for i, p in enumerate(perm) if i != p]
            pair = tuple(moved) if len(moved) == 2 else ()
        else:
            return set()
        if len(pair) != 2 or pair[1] != pair[0] + 1:
            return set()
        pairs = {pair} if pairs is None else pairs & {pair}
    return pairs or set()


def _reshape(t: Tracer, layouts: list[Layout], a: tuple[int, ...], b: tuple[int, ...],
             where: str, swapped: Callable[[], set[tuple[int, int]]] = set) -> list[Layout]:
    """The layouts of a reshape from sizes ``a`` to ``b``; ``swapped()`` gives the adjacent
    output dims every user swaps (asked only where a dimension splits)."""
    out: list[Layout | None] = [None] * len(b)
    groups = _groups(a, b)
    if groups is None:
        t.block(layouts, f"{where} regroups dimensions")
        return [t.fixed(n, where) for n in b]
    for i, n in enumerate(a):
        if n == 1:
            t.block([layouts[i]], f"{where} drops a unit dimension")
    for gi, gj in groups:
        if len(gi) == 1 and len(gj) == 1:
            out[gj[0]] = layouts[gi[0]]
        elif len(gi) == 1 and len(gj) == 2 and _repeats(layouts[gi[0]], b[gj[0]]):
            layout = layouts[gi[0]]     # (batch * heads) -> (batch, heads): undo the merge below
            out[gj[1]] = layout[: len(layout) // b[gj[0]]]
        elif len(gj) == 1 and len(gi) == 2 and all(s in t.opaque for s, _ in layouts[gi[0]]):
            out[gj[0]] = layouts[gi[1]] * a[gi[0]]   # (heads, head_dim) -> C, head_dim mode
        elif len(gj) == 1:                    # merge: the first dim's channels span the rest
            inner = math.prod(a[i] for i in gi[1:])
            t.block([layouts[i] for i in gi[1:]], f"{where} merges it into another dimension")
            out[gj[0]] = tuple((s, r * inner) for s, r in layouts[gi[0]])
        elif len(gi) == 1 and all(r % math.prod(b[j] for j in gj[1:]) == 0
                                  for _, r in layouts[gi[0]]):
            inner = math.prod(b[j] for j in gj[1:])     # split back a merged C*H*W
            out[gj[0]] = tuple((s, r // inner) for s, r in layouts[gi[0]])
        elif len(gi) == 1 and (len(gj) > 2 or t.head_dim or tuple(gj) in swapped()):
            # (3, heads, head_dim) of a fused qkv: q, k, v share their heads; in head_dim mode
            # every head shares its positions; a channel shuffle's (g, c/g) then transposed:
            # the g groups share their c/g channels, which the merge of (c/g, g) restores
            from graphpress.analysis.channels.layers import same_in_every_group

            piece = same_in_every_group(t, layouts[gi[0]], b[gj[0]], where)
            rest = _reshape(t, [piece], (a[gi[0]] // b[gj[0]],), tuple(b[j] for j in gj[1:]),
                            where)
            for j, layout in zip(gj[1:], rest, strict=True):
                out[j] = layout
        elif len(gi) == 1 and len(gj) == 2:   # C -> (heads, head_dim): ask for whole heads
            from graphpress.analysis.channels.regrain import regrain_in_place

            inner = b[gj[1]]
            coarse = regrain_in_place(t, layouts, gi[0], inner)
            if coarse is not None:      # whole heads already, as the rerun would give
                out[gj[0]] = tuple((s, r // inner) for s, r in coarse)
                continue
            ok = all(t.request_grain(s, inner // math.gcd(r, inner)) for s, r in layouts[gi[0]])
            t.refined(ok, [layouts[gi[0]]], where)
        else:
            t.block([layouts[i] for i in gi],
                    f"{where} splits channels into several dimensions")
    return [o if o is not None else t.fixed(n, where) for o, n in zip(out, b)]


def _repeats(layout: Layout, k: int) -> bool:
    """Whether ``layout`` is one piece laid ``k`` times (a fixed batch merged with channels)."""
    n = len(layout) // k
    return len(layout) == n * k and n > 0 and layout == layout[:n] * k


def new_size(layout: Any, kept: dict[int, int]) -> int:
    """The size of a dimension (layout in group ids) once groups keep ``kept`` channels."""
    if len(layout) == 1:
        g, r, n = layout[0]
        return kept.get(g, n) * r
    return sum(kept.get(g, n) * r for g, r, n in layout)
