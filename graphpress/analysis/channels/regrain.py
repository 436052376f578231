"""Refinements within a round: whole attention heads and norm groups, and cuts, without a
rerun.

A reshape ``C -> (heads, head_dim)`` needs the channels of C's group to be whole heads (``rep =
head_dim`` elements per channel where the weights create them), a ``group_norm`` whole norm
groups (``rep = C / G``). The general answer is a request for that grain and a rerun of the
propagation (``Tracer.request_grain``). The rerun differs from
the round so far only in the atoms of that group: each weight atom ``(s, 1)`` of ``n`` channels
is created as ``(s', f)`` of ``n / f`` channels. So where nothing yet depends on how finely the
group is cut, the round can be put in the state the rerun would reach at this node instead, by
rewriting those atoms in place (:func:`regrain_in_place`):

- the group is one atom of ``rep`` 1 at the reshape (or norm), not blocked, no rerun asked for
  yet in this round, every weight atom ``(s, 1)`` created at an offset and a length that are
  multiples of ``f``, on a weight axis with no grain yet where it starts (so the rerun would
  create exactly ``(s', f)``);
- every value already computed that holds the group's atoms comes from nodes whose rules only
  unify them or carry them whole, whatever their ``rep``: ``linear`` and ``addmm``, an
  ungrouped or depthwise convolution, elementwise ``add`` / ``sub`` / ``mul`` / ``div``, the
  unary ops, pooling and padding, a batch norm with the group on its channel dim, views that
  move the group's one dimension to one output dimension (permute, expand, or a reshape whose
  dimension groups pair it with one), and splits, slices and concatenations (they place whole
  atoms at element offsets, which neither a regrain nor a cut moves), reached from the group's
  weights along the graph (a split or merge of its dimension, a norm over the channels, a
  reduction, a contraction or any other consumer makes the request take the rerun);
- each such atom has ``rep`` 1 and only the reshaped (normalised) dimension of the input holds
  the group.

Then every ``(s, 1)`` of the group becomes ``(s, f)``, each symbol counts ``n / f`` channels,
and the grain is recorded as the request would record it (a later rerun of this round, for
another reason, creates the same atoms).

A slice or split of a weight that no computed node reads yet (``position_ids[:, :seq]``) would
ask for cuts of that weight's axis and a rerun; its axis was created by this very node, so it is
created again with the cuts instead (:func:`cut_fresh_weight`), the atoms the rerun would create.
A split whose boundaries fall inside an atom (a grouped convolution's groups, ``chunk``) is cut
in place under the same conditions as a regrain (:func:`cut_in_place`): every symbol of the
group becomes one symbol per piece, the pieces of all weights unified piece by piece, as the
rerun's atoms would be, and the cuts recorded as the request would record them. A rule that
splits a layout reads it again from the tracer afterwards.

Finding the group's values walks the graph from its weights; where that walk would visit more
ops than a quarter of the nodes computed so far (8 at least), the rerun is about as cheap and
is taken instead. Symbol numbers differ from the rerun's, which nothing reads: groups are
listed by their weights. ``tests/analysis/test_channels.py`` checks groups and layouts equal
those of the rerun on every zoo model.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from torch.fx import Node

from graphpress.analysis.channels.rules import UNARY, op_name, shape
from graphpress.analysis.channels.views import _groups
from graphpress.ir.graph import get_arg

if TYPE_CHECKING:
    from graphpress.analysis.channels.solver import Layout, Tracer

__all__ = ["cut_fresh_weight", "cut_in_place", "regrain_in_place"]

_ONLY_UNIFY = {"linear", "addmm", "add", "sub", "mul", "div", *UNARY}
_MOVES = {"permute", "transpose", "t", "expand"}
# atoms carried whole into pieces or laid end to end at element offsets, which a regrain or a
# cut keeps (a processed split of the group met atom boundaries, or the round would be dirty)
_PIECES = {"split", "split_with_sizes", "chunk", "slice", "narrow", "getitem", "cat"}
_SPATIAL = {"adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d", "avg_pool1d",
            "avg_pool2d", "avg_pool3d", "max_pool1d", "max_pool2d", "max_pool3d", "pad",
            "constant_pad_nd"}    # channels carried, spatial dims blocked (a blocked group stops)
_RESHAPES = {"view", "reshape", "_unsafe_view", "reshape_as", "view_as", "flatten", "unflatten",
             "unsqueeze", "squeeze"}
_CONVS = {"conv1d", "conv2d", "conv3d", "convolution", "conv_transpose1d", "conv_transpose2d",
          "conv_transpose3d"}


def regrain_in_place(t: Tracer, layouts: list[Layout], index: int, factor: int
                     ) -> Layout | None:
    """Make the channels of ``layouts[index]`` (a reshaped input dimension) ``factor`` times
    coarser in place, where that is what a rerun would give (see the module docstring); returns
    the dimension's new layout, or None (then ask for the grain and rerun)."""
    layout = layouts[index]
    if t.dirty or len(layout) != 1 or layout[0][1] != 1 or t.size[layout[0][0]] % factor:
        return None
    root = t.find(layout[0][0])
    sites = t.sites(root)       # none for a blocked group or one waiting for the rerun
    if not sites or any(_holds(t, a, root) for i, a in enumerate(layouts) if i != index):
        return None
    for s, (weight, axis, start, rep) in sites:
        if rep != 1 or start % factor or t.size[s] % factor or any(
                lo <= start < hi for lo, hi in t.grain.get((weight, axis), {})):
            return None
    found = _holders(t, root, {weight for _, (weight, *_) in sites})
    if found is None:
        return None
    holders = _values(found)
    symbols = {root, *(s for s, _ in sites)}
    for value, held in holders:
        for i in held:
            for s, r in value[i]:
                if t.find(s) == root:
                    if r != 1 or t.size[s] % factor:
                        return None
                    symbols.add(s)
    for value, held in holders:
        for i in held:
            value[i] = tuple((s, factor) if t.find(s) == root else (s, r) for s, r in value[i])
    for s, (weight, axis, start, _) in sites:
        t.grain.setdefault((weight, axis), {})[(start, start + t.size[s])] = factor
        t.origin[s] = (weight, axis, start, factor)
    for s in symbols:
        t.size[s] //= factor
    return ((layout[0][0], factor),)


def _holders(t: Tracer, root: int, weights: set[str]
             ) -> list[tuple[Node, list[Layout | None], list[int]]] | None:
    """The computed nodes whose values (lists of layouts) hold ``root``'s atoms, with the
    dimensions that hold them, found from its weights along the graph; None where a node on
    the way is not one that only unifies, or where the walk would cost about as much as the
    rerun it saves (it visits more ops than a quarter of the nodes computed so far, 8 at least:
    a rerun recomputes every node once, the walk checks and rewrites each op it visits)."""
    stack: list[Node] = [t.placeholders[w] for w in weights]
    seen: set[Node] = set()
    found: list[tuple[Node, list[Layout | None], list[int]]] = []
    budget = max(8, len(t.values) // 4)
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        if node.op == "call_function":
            budget -= 1
            if budget < 0:
                return None
        value = t.values.get(node.name)
        if node.op == "call_function" and not _unifies_only(t, node, root):
            return None
        lists = [value] if isinstance(value, list) else list(value) \
            if isinstance(value, tuple) else [None]
        if not all(isinstance(v, list) for v in lists):
            return None
        holds = False
        for v in lists:
            dims = [i for i, a in enumerate(v) if _holds(t, a, root)]
            if dims:
                found.append((node, v, dims))
                holds = True
        if node.op == "call_function":
            stack.extend(a for a in node.all_input_nodes if a.name in t.weights)
        if holds or node.op == "placeholder":
            stack.extend(u for u in node.users if u.name in t.values)
    return found


def _holds(t: Tracer, layout: Layout | None, root: int) -> bool:
    """Whether a dimension's layout has an atom of ``root``'s group."""
    for s, _ in layout or ():  # noqa: SIM110 (no generator: called for every dim of the walk)
        if t.find(s) == root:
            return True
    return False


def _values(holders: list[tuple[Node, list[Layout | None], list[int]]]
            ) -> list[tuple[list[Layout | None], list[int]]]:
    """Each held value once (nodes may share a list), with the dimensions that hold the group."""
    return list({id(value): (value, held) for _, value, held in holders}.values())


def cut_fresh_weight(t: Tracer, weight: Node, axis: int, bounds: Iterable[int]) -> None:
    """Where ``weight`` is a weight no computed node reads yet, create its ``axis`` again with
    cuts at the element offsets ``bounds`` that fall inside an atom (see the module docstring);
    a no-op otherwise."""
    if weight.name not in t.weights or any(u.name in t.values for u in weight.users):
        return
    layout = t.weights[weight.name][axis]
    n = t.bounds(layout)[-1]
    needed = {e for e in bounds if 0 < e < n}.difference(t.bounds(layout))
    if not needed or any(t.find(s) != s or s not in t.origin for s, _ in layout):
        return
    t.cuts.setdefault((weight.name, axis), set()).update(needed)
    for s, _ in layout:
        del t.origin[s]
    t.weights[weight.name][axis] = t.created(weight.name, axis, n)


def _unifies_only(t: Tracer, node: Node, root: int) -> bool:
    """Whether ``node``'s rule only unified ``root``'s atoms or carried them to one output
    dimension, whatever their ``rep``: the ops of ``_ONLY_UNIFY``, pooling and padding, an
    ungrouped or depthwise convolution, a batch norm with the group on its channel dim, and
    views that move the group's one input dimension to one output dimension whole."""
    name = op_name(node)
    if name in _ONLY_UNIFY or name in _MOVES or name in _SPATIAL or name in _PIECES:
        return True
    if name in _CONVS:          # ungrouped, or depthwise (output channel i reads input i)
        groups = node.args[8] if name == "convolution" else get_arg(node, "groups")
        transposed = node.args[6] if name == "convolution" else "transpose" in name
        x, w = node.args[0], node.args[1]
        return groups == 1 or (not transposed and groups == shape(x)[1] == shape(node)[1]
                               and shape(w)[1] == 1)
    held = _held_dims(t, node.args[0], root) if isinstance(node.args[0], Node) else set()
    if name == "batch_norm":
        return held <= {1}
    if name in _RESHAPES and len(held) == 1:
        pairs = _groups(shape(node.args[0]), shape(node))
        return pairs is not None and any(gi == [*held] and len(gj) == 1 for gi, gj in pairs)
    return False


def _held_dims(t: Tracer, node: Node, root: int) -> set[int]:
    value = t.values.get(node.name)
    if not isinstance(value, list):
        return {-1}
    return {i for i, a in enumerate(value) if _holds(t, a, root)}


def cut_in_place(t: Tracer, layout: Layout, bounds: set[int]) -> Layout | None:
    """Cut the atoms of ``layout`` at the element offsets ``bounds`` that fall inside them, in
    place, where that is what the rerun would give (each group one atom of ``rep`` 1 in this
    layout, its values computed by ops that only unify it, each holding it in one dimension, its
    weight axes without grain); returns the cut layout, or None (then ask for the cuts)."""
    if t.dirty:
        return None
    offsets: dict[int, list[int]] = {}     # root -> channel offsets of the cuts in its atom
    pos = 0
    for s, r in layout:
        end = pos + t.size[s] * r
        inside = sorted(e - pos for e in bounds if pos < e < end)
        root = t.find(s)
        if inside and (r != 1 or root in offsets):
            return None
        if inside:
            offsets[root] = inside
        pos = end
    plans = []
    for root, inside in offsets.items():
        sites = t.sites(root)   # none for a blocked group or one waiting for the rerun
        found = _holders(t, root, {weight for _, (weight, *_) in sites}) if sites else None
        if found is None or any((w, a) in t.grain or rep != 1 for _, (w, a, _, rep) in sites):
            return None
        symbols = {s for s, _ in sites}
        for _, value, held in found:
            atoms = value[held[0]]
            if len(held) > 1 or any(r != 1 for s, r in atoms if t.find(s) == root):
                return None
            symbols.update(s for s, _ in atoms if t.find(s) == root)
        if len({t.size[s] for s in symbols}) != 1:
            return None
        plans.append((root, inside, sites, found, symbols))
    pieces: dict[int, tuple[tuple[int, int], ...]] = {}
    for _, inside, sites, found, symbols in plans:
        n = t.size[next(iter(symbols))]
        sizes = [b - a for a, b in zip([0, *inside], [*inside, n], strict=True)]
        first = None
        for s in symbols:
            pieces[s] = tuple((t.new(k), 1) for k in sizes)
            first = first or pieces[s]
            for (a, _), (b, _) in zip(first, pieces[s], strict=True):
                t.union(a, b)
        for s, (weight, axis, start, _) in sites:
            t.cuts.setdefault((weight, axis), set()).update(start + c for c in inside)
            del t.origin[s]
            for (piece, _), at in zip(pieces[s], [0, *inside], strict=True):
                t.origin[piece] = (weight, axis, start + at, 1)
        for node, *_ in found:
            zero = t.zero.get(node.name)
            if zero and zero & symbols:
                t.zero[node.name] = (zero - symbols) | {p for s in zero & symbols
                                                        for p, _ in pieces[s]}
        for value, _ in _values(found):
            for i, a in enumerate(value):
                if a and any(s in pieces for s, _ in a):
                    value[i] = tuple(p for s, r in a for p in (pieces.get(s) or ((s, r),)))
        if t.heads & symbols:
            t.heads = (t.heads - symbols) | {p for s in t.heads & symbols for p, _ in pieces[s]}
    return tuple(p for s, r in layout for p in (pieces.get(s) or ((s, r),)))
