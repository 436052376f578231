"""The pruning plan as data, and applying it to a Program.

A plan is, per channel group, the weight slices of the group (``weight, axis, offset, rep``) and
the kept channel indices. ``PrunePlan.weight_indices()`` lists it as (parameter, axis, kept
element indices); ``save``/``load`` write it as JSON so it can be re-applied to another program
of the same architecture (a fresh checkpoint): groups are matched by their slices.

Applying a plan keeps, in every weight slice of a group, the elements of the kept channels
(``rep`` consecutive elements per channel), rewrites the shape arguments of
view/reshape/expand/unflatten/split/slice/narrow nodes, the ``groups`` of depthwise
convolutions and the ``num_groups`` of group norms from the channel layouts of the analysis, and
refreshes shape metadata (``metadata.py``: built directly where the layouts determine it).

Only the sizes pruning changes are rewritten: every other argument, a symbolic size included,
stays as it was, so a dynamic batch stays dynamic. A symbolic size that does change (a batch
merged with heads, ``batch * heads``) is rewritten symbolically: ``s * new // old`` as
``(s // q) * p`` with ``p / q = new / old`` in lowest terms, exact because such a size is the
fixed batch times whole copies of the pruned layout.
"""

from __future__ import annotations

import json
import math
import operator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.fx import Node

from graphpress.analysis.channels.rules import op_name, size
from graphpress.analysis.channels.solver import ChannelAnalysis, ChannelGroup
from graphpress.analysis.channels.views import new_size
from graphpress.ir.builder import GraphBuilder
from graphpress.ir.graph import get_arg
from graphpress.ir.program import Program
from graphpress.passes.prune.metadata import refresh_pruned_shapes

__all__ = ["GroupPlan", "PrunePlan", "apply_plan", "kept_elements", "kept_indices", "masked_copy"]

Key = tuple[str, int, int, int]


@dataclass
class GroupPlan:
    """Kept channels of one group, and the weight slices the group spans."""

    slices: list[Key]
    size: int
    keep: list[int]

    def dropped(self) -> list[int]:
        """The channels the plan removes, in order."""
        return sorted(set(range(self.size)).difference(self.keep))


@dataclass
class PrunePlan:
    """What to keep, per channel group; data that can be saved and re-applied."""

    groups: list[GroupPlan] = field(default_factory=list)

    def removed(self) -> dict[tuple[str, int], set[int]]:
        """(weight, axis) -> removed element indices along that axis."""
        out: dict[tuple[str, int], set[int]] = {}
        for g in self.groups:
            drop = g.dropped()
            for weight, axis, offset, rep in g.slices:
                out.setdefault((weight, axis), set()).update(
                    offset + c * rep + r for c in drop for r in range(rep))
        return {k: v for k, v in out.items() if v}

    def weight_indices(self, program: Program) -> list[tuple[str, int, list[int]]]:
        """(parameter, axis, kept element indices) for every pruned weight axis."""
        return [(w, axis, mask.nonzero().flatten().tolist())
                for (w, axis), mask in kept_elements(self, program).items()]

    def to_json(self) -> str:
        return json.dumps({"groups": [vars(g) for g in self.groups]})

    @classmethod
    def from_json(cls, text: str) -> PrunePlan:
        data = json.loads(text)
        return cls([GroupPlan([tuple(s) for s in g["slices"]], g["size"], g["keep"])
                    for g in data["groups"]])

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> PrunePlan:
        return cls.from_json(Path(path).read_text())


def key_of(group: ChannelGroup) -> list[Key]:
    return sorted((s.weight, s.axis, s.offset, s.rep) for s in group.slices)


def kept_elements(plan: PrunePlan, program: Program) -> dict[tuple[str, int], torch.Tensor]:
    """(weight, axis) -> bool mask of the elements kept along that axis (pruned axes only)."""
    dropped: dict[tuple[int, int], torch.Tensor] = {}
    return {(weight, axis): _mask(program.weight(weight).shape[axis], found, dropped)
            for (weight, axis), found in _spans(plan).items()}


def _spans(plan: PrunePlan) -> dict[tuple[str, int], list[tuple[GroupPlan, int, int]]]:
    """(weight, axis) -> the (group, offset, rep) of every pruned group's slice on it."""
    spans: dict[tuple[str, int], list[tuple[GroupPlan, int, int]]] = {}
    for g in plan.groups:
        if len(g.keep) < g.size:
            if g.keep and (min(g.keep) < 0 or max(g.keep) >= g.size):
                raise ValueError(f"plan group over {g.slices[0][0]!r} keeps channels outside "
                                 f"0..{g.size - 1}: {sorted(g.keep)}")
            for weight, axis, offset, rep in g.slices:
                spans.setdefault((weight, axis), []).append((g, offset, rep))
    return spans


def _mask(n: int, found: list[tuple[GroupPlan, int, int]],
          dropped: dict[tuple[int, int], torch.Tensor]) -> torch.Tensor:
    """The kept elements of an axis of ``n`` as a bool mask; ``dropped`` caches each group's
    dropped elements at offset 0 by (group, rep)."""
    mask = torch.ones(n, dtype=torch.bool)
    for g, offset, rep in found:
        at_zero = dropped.get((id(g), rep))
        if at_zero is None:
            at_zero = dropped[(id(g), rep)] = _elements(g.dropped(), rep)
        mask[at_zero + offset if offset else at_zero] = False
    return mask


def _elements(channels: list[int], rep: int) -> torch.Tensor:
    """The element indices of ``channels`` (in order) when each spans ``rep`` elements."""
    index = torch.tensor(channels, dtype=torch.long)
    return index if rep == 1 else (index[:, None] * rep + torch.arange(rep)).flatten()


def _kept_index(plan: PrunePlan, program: Program) -> dict[tuple[str, int], torch.Tensor]:
    """(weight, axis) -> the indices of the elements kept along that axis (pruned axes only),
    the ``True`` positions of ``kept_elements``'s mask, built from the plan: each slice's kept
    channels moved to its offset, the elements between slices kept. Overlapping slices (not
    made by the analysis) take the mask."""
    out: dict[tuple[str, int], torch.Tensor] = {}
    kept: dict[tuple[int, int], torch.Tensor] = {}      # (group, rep) -> kept elements at 0
    made: dict[tuple[Any, ...], torch.Tensor] = {}      # axes laid out alike share an index
    for (weight, axis), found in _spans(plan).items():
        n = program.weight(weight).shape[axis]
        if len(found) == 1 and found[0][1] == 0 and found[0][0].size * found[0][2] == n:
            out[(weight, axis)] = _kept_at_zero(kept, found[0][0], found[0][2])
            continue        # one slice over the whole axis: the group's kept elements
        pattern = (n, *[(id(g), offset, rep) for g, offset, rep in found])
        if pattern in made:
            out[(weight, axis)] = made[pattern]
            continue
        pieces, end = [], 0
        for g, offset, rep in sorted(found, key=lambda f: f[1]):
            if offset < end or offset + g.size * rep > n:
                out[(weight, axis)] = _mask(n, found, {}).nonzero().flatten()
                break
            if offset > end:
                pieces.append(torch.arange(end, offset))
            index = _kept_at_zero(kept, g, rep)
            pieces.append(index + offset if offset else index)
            end = offset + g.size * rep
        else:
            if end < n:
                pieces.append(torch.arange(end, n))
            out[(weight, axis)] = made[pattern] = pieces[0] if len(pieces) == 1 \
                else torch.cat(pieces)
    return out


def _kept_at_zero(cache: dict[tuple[int, int], torch.Tensor], g: GroupPlan, rep: int
                  ) -> torch.Tensor:
    """The elements a group's kept channels span at offset 0, cached by (group, rep)."""
    index = cache.get((id(g), rep))
    if index is None:
        index = cache[(id(g), rep)] = _elements(sorted(set(g.keep)), rep)
    return index


def masked_copy(program: Program, plan: PrunePlan) -> Program:
    """The original program with every removed channel zeroed in every slice of its group."""
    masked = program.copy()
    for (weight, axis), mask in kept_elements(plan, program).items():
        tensor = masked.weight(weight).detach().clone()
        shape = [1] * tensor.dim()
        shape[axis] = -1
        masked.replace_weight(weight, tensor * mask.view(shape).to(tensor.dtype))
    return masked


def apply_plan(program: Program, plan: PrunePlan, analysis: ChannelAnalysis) -> int:
    """Prune ``program`` in place; returns the number of weight elements removed."""
    by_key = {tuple(key_of(g)): g for g in analysis.groups}
    kept: dict[int, int] = {}
    for gp_ in plan.groups:
        group = by_key.get(tuple(sorted(gp_.slices)))
        if group is None or group.size != gp_.size:
            raise ValueError(f"plan group over {gp_.slices[0][0]!r} (axis {gp_.slices[0][1]}) "
                             "does not match a channel group of this program")
        if len(gp_.keep) < gp_.size:
            kept[group.id] = len(gp_.keep)
    previous = {n: n.meta.get("val") for n in program.graph.nodes}
    touched: set[Node] = set()
    before = 0
    by_weight: dict[str, list[tuple[int, torch.Tensor]]] = {}
    for (weight, axis), index in _kept_index(plan, program).items():
        by_weight.setdefault(weight, []).append((axis, index))
    replaced: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for weight, axes in by_weight.items():     # every pruned axis of a weight, one replacement
            new = tensor = program.weight(weight)
            before += tensor.numel()
            for axis, index in axes:
                if tensor.is_meta:
                    new = torch.empty_like(new).narrow(axis, 0, len(index))
                else:
                    new = new.index_select(axis, index if tensor.is_cpu
                                           else index.to(tensor.device))
            replaced[weight] = new.contiguous()
            before -= new.numel()
    touched.update(program.replace_weights(replaced))
    for node in list(program.graph.nodes):
        name = op_name(node) if node.op == "call_function" else ""
        if name in _SIZED or (name and node.name in analysis.normalized):
            signature = (node.target, node.args, node.kwargs)
            _rewrite_args(program, node, name, analysis.layouts, kept, analysis.normalized)
            if (node.target, node.args, node.kwargs) != signature:
                touched.add(node)
    touched.update(n for n in program.graph.nodes if n not in previous)
    program.set_analysis("shapes", refresh_pruned_shapes(program, analysis.layouts, kept, touched,
                                                         previous))
    return before


def kept_indices(layout: Any, analysis: ChannelAnalysis, plan: PrunePlan) -> torch.Tensor:
    """The element indices a dimension of layout ``layout`` (an analysis layout: ``(group, rep,
    channels)`` atoms) keeps under ``plan``."""
    keep = {tuple(sorted(g.slices)): g.keep for g in plan.groups}
    by_id = {g.id: keep.get(tuple(key_of(g))) for g in analysis.groups}
    out, start = [], 0
    for gid, rep, n in layout:
        channels = by_id.get(gid)
        channels = range(n) if channels is None else channels
        out += [start + c * rep + r for c in channels for r in range(rep)]
        start += n * rep
    return torch.tensor(out, dtype=torch.long)


# ops whose arguments hold sizes or counts that pruning changes (each handled in _rewrite_args;
# apply_plan calls it for these only)
_SIZED = {"view", "reshape", "_unsafe_view", "expand", "unflatten", "split", "split_with_sizes",
          "chunk", "slice", "narrow", "scaled_dot_product_attention", "mean", "group_norm",
          "conv1d", "conv2d", "conv3d", "convolution"}


def _rewrite_args(program: Program, node: Node, name: str, layouts: dict[str, Any],
                  kept: dict[int, int], normalized: dict[str, int]) -> None:
    """The size arguments of a node of ``_SIZED`` (or a normalisation in ``normalized``) once
    pruned; ``name`` is its ``op_name``."""
    out = layouts.get(node.name)
    if out is None or (isinstance(out, list) and any(o is None for o in out)):
        return
    if node.name in normalized:     # width pruning: over the kept channels
        if name in ("layer_norm", "rms_norm"):
            _set(node, 1, [new_size(layouts[node.args[0].name][-1], kept)])
        return
    if name in ("view", "reshape", "_unsafe_view", "expand"):
        old = node.meta["val"].shape
        _set(node, 1, [_resized(program, node, s, old[i], out[i], kept)
                       for i, s in enumerate(node.args[1])])
    elif name == "unflatten":
        d = node.args[1] % node.args[0].meta["val"].dim()
        old = node.meta["val"].shape
        _set(node, 2, [_resized(program, node, s, old[d + i], out[d + i], kept)
                       for i, s in enumerate(node.args[2])])
    elif name in ("split", "split_with_sizes", "chunk"):
        rank = node.args[0].meta["val"].dim()
        d = (node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)) % rank
        sizes = [new_size(piece[d], kept) for piece in out]
        old = [size(v.shape[d]) for v in node.meta["val"]]
        if sizes != old:
            node.target = torch.ops.aten.split_with_sizes.default
            node.args, node.kwargs = (node.args[0], sizes, d), {}
    elif name in ("slice", "narrow"):
        _rewrite_slice(node, name, layouts, kept)
    elif name == "scaled_dot_product_attention" and "scale" not in node.kwargs \
            and len(node.args) < 7:
        q = node.args[0]
        old = size(q.meta["val"].shape[-1])
        if new_size(layouts[q.name][-1], kept) != old:   # pin the default 1/sqrt(head_dim)
            node.kwargs = {**node.kwargs, "scale": old ** -0.5}
    elif name == "mean" and isinstance(node.args[0], Node):
        _rewrite_mean(program, node, layouts[node.args[0].name], kept)
    elif name == "group_norm":      # whole norm groups were removed: fewer of them
        channels = size(node.args[0].meta["val"].shape[1])
        per = channels // node.args[1]
        _set(node, 1, new_size(layouts[node.args[0].name][1], kept) // per)
    elif name in ("conv1d", "conv2d", "conv3d", "convolution"):
        index = 8 if name == "convolution" else 6
        groups = node.args[index] if len(node.args) > index else 1
        channels = size(node.args[0].meta["val"].shape[1])
        if groups > 1 and groups == channels:       # depthwise: one group per channel
            _set(node, index, new_size(layouts[node.args[0].name][1], kept))


def _rewrite_mean(program: Program, node: Node, source: Any, kept: dict[int, int]) -> None:
    """A mean over pruned channels (zero in the masked original, see ``zeros.py``) keeps its
    unpruned count: ``sum(x, dims) / n_old``."""
    if source is None or any(d is None for d in source):
        return
    dims = get_arg(node, "dim", missing=None)
    rank = len(source)
    axes = [d % rank for d in ([dims] if isinstance(dims, int) else dims or [])]
    old = math.prod(size(node.args[0].meta["val"].shape[d]) for d in axes)
    if not axes or math.prod(new_size(source[d], kept) for d in axes) == old:
        return
    node.target = torch.ops.aten.sum.dim_IntList
    with GraphBuilder(program, anchor=node, pass_name="prune_channels", after=True) as build:
        scaled = build.call(torch.ops.aten.div.Tensor, node, old)
    node.replace_all_uses_with(scaled, delete_user_cb=lambda user: user is not scaled)


def _resized(program: Program, node: Node, arg: Any, old: Any, layout: Any,
             kept: dict[int, int]) -> Any:
    """A size argument once pruned: unchanged unless pruning changes it, symbolic if it was."""
    before, after = size(old), new_size(layout, kept)
    if after == before or (isinstance(arg, int) and arg == -1):
        return arg
    if isinstance(arg, int):
        return after
    g = math.gcd(before, after)
    q, p = before // g, after // g
    with GraphBuilder(program, anchor=node, pass_name="prune_channels") as build:
        whole = build.call(operator.floordiv, arg, q) if q != 1 else arg
        return build.call(operator.mul, whole, p) if p != 1 else whole


def _rewrite_slice(node: Node, name: str, layouts: dict[str, Any], kept: dict[int, int]) -> None:
    source = layouts.get(node.args[0].name)
    d = node.args[1] % node.args[0].meta["val"].dim()
    if source is None or source[d] is None:
        return
    n = size(node.args[0].meta["val"].shape[d])
    start = node.args[2] if len(node.args) > 2 and node.args[2] is not None else 0
    end = node.args[3] if len(node.args) > 3 and node.args[3] is not None else n
    if not isinstance(start, int) or not isinstance(end, int):
        return          # a symbolic bound: the analysis kept this dimension whole
    end = start + end if name == "narrow" else end
    start = start + n if start < 0 else start
    end = min(n, end + n if end < 0 else end)
    _set(node, 2, _moved(source[d], start, kept))
    if name == "narrow":
        _set(node, 3, _moved(source[d], end, kept) - _moved(source[d], start, kept))
    else:
        _set(node, 3, _moved(source[d], end, kept))


def _moved(layout: Any, position: int, kept: dict[int, int]) -> int:
    """Where an element boundary of the old dimension lands after pruning (atom-aligned)."""
    old = new = 0
    for g, r, n in layout:
        if position <= old:
            break
        if position < old + n * r:      # inside an atom: only unpruned atoms are cut by slices
            return new + position - old
        old, new = old + n * r, new + kept.get(g, n) * r
    return new


def _set(node: Node, index: int, value: Any) -> None:
    args = list(node.args)
    if args[index] != value:
        args[index] = value
        node.args = tuple(args)
