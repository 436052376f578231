"""Channel dependency analysis: which tensor dimensions must shrink together when pruning.

Every dimension of every tensor in the graph is a *layout*: a tuple of atoms ``(symbol, rep)``
laid end to end, where a symbol stands for ``n`` channels and ``rep`` is how many consecutive
elements each channel occupies (``rep > 1`` after flattening ``C x H x W``). Op rules
(``rules.py``, ``contractions.py``, ``views.py``, ``layers.py``) unify the symbols of dimensions
that must stay aligned (a conv's input channels and its weight's axis 1, the two operands of an
add, ...) in a union-find, so grouping is near-linear in graph size. A concat lays atoms end
to end; a split or slice whose boundary falls inside an atom *cuts* the weight dimensions that
created it, and the analysis reruns with those cuts (a few rounds at most). A round collects as
many requests as it can: a split asks for every piece's cuts at once, and a group already
waiting for a rerun still takes more cuts (element offsets of a weight axis, the same whatever
else is cut); a request for coarser channels (whole heads) waits for the rerun instead, since
its range would be the uncut atom's.

Invariant: a group is prunable only if every tensor dimension in it is one whose channels can be
removed without changing any other value: it never reaches a model input or output, an op with
no rule, a normalisation or reduction over it, or a reshape that mixes it with another dimension.
Any such place *blocks* the group and is recorded as the reason (op and node named), so the
analysis never cuts wrongly and never crashes on an unknown op.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from graphpress.ir.analyses import register_analysis

if TYPE_CHECKING:
    from torch.fx import Node

    from graphpress.ir.program import Program

__all__ = ["ChannelAnalysis", "ChannelGroup", "ChannelSlice", "channel_groups"]

Atom = tuple[int, int]          # (symbol, elements per channel)
Layout = tuple[Atom, ...]       # one tensor dimension
_MAX_ROUNDS = 5
_MAX_REASONS = 4


@dataclass(frozen=True)
class ChannelSlice:
    """Where a group's channels sit in one weight: ``axis``, from ``offset``, ``rep`` each."""

    weight: str
    axis: int
    offset: int
    rep: int = 1


@dataclass
class ChannelGroup:
    """A set of weight slices whose channels must be removed together."""

    id: int
    size: int
    slices: list[ChannelSlice]
    reasons: list[str] = field(default_factory=list)
    heads: bool = False         # channels are attention heads (a KV head with its query heads)

    @property
    def prunable(self) -> bool:
        return not self.reasons and self.size > 1

    @property
    def weights(self) -> list[str]:
        return sorted({s.weight for s in self.slices})


@dataclass
class ChannelAnalysis:
    """The groups of a program, and each node's dimension layouts in group ids."""

    groups: list[ChannelGroup]
    # node -> per dim ((group or -1, rep, channels), ...); a tuple of those for several outputs
    layouts: dict[str, object]
    # hidden mode: node -> the dim of its input it normalises over (layer_norm, rms_norm, mean),
    # computed over the kept channels once pruned
    normalized: dict[str, int] = field(default_factory=dict)
    rounds: int = 1     # propagation rounds until no op asked for cuts or coarser channels

    def prunable(self) -> list[ChannelGroup]:
        return [g for g in self.groups if g.prunable]

    def to_networkx(self) -> Any:
        """A bipartite networkx graph: group nodes ``("group", id)`` linked to weight names,
        one edge attribute ``slices`` per pair listing ``(axis, offset, rep)``."""
        import networkx as nx

        graph = nx.Graph()
        for g in self.groups:
            graph.add_node(("group", g.id), size=g.size, prunable=g.prunable, reasons=g.reasons)
            for s in g.slices:
                if not graph.has_edge(("group", g.id), s.weight):
                    graph.add_edge(("group", g.id), s.weight, slices=[])
                graph.edges[("group", g.id), s.weight]["slices"].append((s.axis, s.offset, s.rep))
        return graph


class Tracer:
    """Union-find over channel symbols plus the per-node layouts of one propagation round."""

    def __init__(self, cuts: dict[tuple[str, int], set[int]],
                 grain: dict[tuple[str, int], dict[tuple[int, int], int]]) -> None:
        self.parent: list[int] = []
        self.size: list[int] = []
        self.blocked: dict[int, list[str]] = {}
        self.rerun: dict[int, list[str]] = {}   # roots realigned by the next round, and where
        self.origin: dict[int, tuple[str, int, int, int]] = {}   # -> (weight, axis, start, rep)
        self.cuts = cuts            # (weight, axis) -> element offsets where channels split
        self.grain = grain          # (weight, axis) -> {(start, end): elements per channel}
        self.heads: set[int] = set()
        self.head_dim = False       # C -> (heads, head_dim): channels are head_dim positions
        self.hidden = False         # normalised dims pass (width pruning of the residual stream)
        self.normalized: dict[str, int] = {}    # hidden mode: node -> dim it normalises over
        self.opaque: set[int] = set()   # symbols of fixed dimensions (never channels)
        self.dirty = False
        self.values: dict[str, object] = {}
        self.zero: dict[str, set[int]] = {}     # node -> its symbols zero in the masked original
        self.weights: dict[str, list[Layout | None]] = {}   # by placeholder name
        self.names: dict[str, str] = {}                      # placeholder -> weight name
        self.placeholders: dict[str, Node] = {}              # weight placeholders by name

    # ------------------------------------------------------------ union-find
    def new(self, n: int, reason: str | None = None) -> int:
        self.parent.append(len(self.parent))
        self.size.append(n)
        if reason:
            self.blocked[len(self.parent) - 1] = [reason]
        return len(self.parent) - 1

    def find(self, s: int) -> int:
        while self.parent[s] != s:
            self.parent[s] = self.parent[self.parent[s]]
            s = self.parent[s]
        return s

    def union(self, a: int, b: int) -> None:
        a, b = self.find(a), self.find(b)
        if a == b:
            return
        self.parent[b] = a
        for table in (self.blocked, self.rerun):
            reasons = table.pop(b, []) + table.get(a, [])
            if reasons:
                table[a] = reasons[:_MAX_REASONS]

    def block(self, layouts: Iterable[Layout | None], reason: str, *,
              table: dict[int, list[str]] | None = None) -> None:
        table = self.blocked if table is None else table
        for layout in layouts:
            for sym, _ in layout or ():
                root = self.find(sym)
                reasons = table.setdefault(root, [])
                if reason not in reasons and len(reasons) < _MAX_REASONS:
                    reasons.append(reason)

    def reasons(self, sym: int) -> list[str]:
        """Why ``sym``'s group cannot be pruned in this round (empty: it can)."""
        root = self.find(sym)
        return (self.blocked.get(root, []) + self.rerun.get(root, []))[:_MAX_REASONS]

    def fixed(self, n: int, reason: str) -> Layout:
        """A dimension of fixed size (batch, spatial, a model input's)."""
        sym = self.new(n, reason)
        self.opaque.add(sym)
        return ((sym, 1),)

    # ------------------------------------------------------------- weights
    def created(self, weight: str, axis: int, n: int) -> Layout:
        """Fresh channel symbols for a weight axis that creates channels, split at its cuts and
        grouped by its grain (``rep`` consecutive elements per channel)."""
        grains, cuts = self.grain.get((weight, axis)), self.cuts.get((weight, axis))
        if n and not grains and not cuts:     # one atom of n channels, one element each
            sym = self.new(n)
            self.origin[sym] = (weight, axis, 0, 1)
            return ((sym, 1),)
        grains = grains or {}
        bounds = sorted({0, n} | {c for c in cuts or () if 0 < c < n})
        atoms = []
        for start, end in itertools.pairwise(bounds):
            g = math.lcm(1, *(k for (lo, hi), k in grains.items() if lo <= start < hi))
            rep = g if (end - start) % g == 0 and start % g == 0 else 1
            sym = self.new((end - start) // rep)
            self.origin[sym] = (weight, axis, start, rep)
            atoms.append((sym, rep))
        return tuple(atoms)

    def sites(self, sym: int, *, through_rerun: bool = False
               ) -> list[tuple[int, tuple[str, int, int, int]]]:
        """The weight atoms of ``sym``'s group: (symbol, (weight, axis, start, rep)); none for
        a blocked group, nor (unless ``through_rerun``) for one the next round realigns."""
        root = self.find(sym)
        if root in self.blocked or (root in self.rerun and not through_rerun):
            return []
        return [(s, o) for s, o in self.origin.items() if self.find(s) == root]

    def request_grain(self, sym: int, factor: int) -> bool:
        """Ask for the channels of ``sym``'s group to be ``factor`` times coarser (whole heads),
        in the range of each weight axis its atoms occupy (a fused q|k|v keeps one grain per
        part)."""
        sites = self.sites(sym)
        for s, (weight, axis, start, rep) in sites:
            ranges = self.grain.setdefault((weight, axis), {})
            span = (start, start + self.size[s] * rep)
            ranges[span] = math.lcm(ranges.get(span, 1), rep * factor)
        return bool(sites)

    # ------------------------------------------------------------- unify
    def unify(self, a: Layout, b: Layout, where: str) -> Layout:
        """Make two layouts of one dimension size the same channels; returns ``a``."""
        if a == b:
            return a
        if len(a) == len(b) and all(self.size[x] * r == self.size[y] * q
                                    for (x, r), (y, q) in zip(a, b)):
            if all(r == q for (_, r), (_, q) in zip(a, b)):
                for (x, _), (y, _) in zip(a, b):
                    self.union(x, y)
                return a
            ok = all(r == q or (q % r == 0 and self.request_grain(x, q // r))
                     or (r % q == 0 and self.request_grain(y, r // q))
                     for (x, r), (y, q) in zip(a, b))
            self.refined(ok, (a, b), where)
            return a
        ok = self.cut_at(a, set(self.bounds(b))) and self.cut_at(b, set(self.bounds(a)))
        self.refined(ok, (a, b), where)
        return a

    def refined(self, ok: bool, layouts: Iterable[Layout], where: str) -> None:
        """After asking for cuts or grain: rerun if they were recorded, else block for good."""
        layouts = list(layouts)
        if ok:
            self.dirty = True
            self.block(layouts, f"channel ranges realigned (rerun) at {where}", table=self.rerun)
            return
        blocked = [r for layout in layouts for s, _ in layout or () for r in self.reasons(s)]
        cause = f" with a dimension blocked by {blocked[0]}" if blocked else ""
        self.block(layouts, f"channel ranges do not align at {where}{cause}")

    def cut_at(self, a: Layout, bounds: set[int]) -> bool:
        """Ask for the weight axes creating ``a`` to be cut at element offsets ``bounds``."""
        start = 0
        for sym, rep in a:
            end = start + self.size[sym] * rep
            for e in sorted(x for x in bounds if start < x < end):
                if (e - start) % rep or not self.request_cut(sym, (e - start) // rep):
                    return False
            start = end
        return True

    def request_cut(self, sym: int, channel: int) -> bool:
        """Ask for the weight axes of ``sym``'s group to be cut ``channel`` channels into
        ``sym``. Cuts are element offsets, the same whatever else the next round cuts, so a
        group already realigned for other cuts takes more (every cut in one rerun)."""
        sites = self.sites(sym, through_rerun=True)
        for _, (weight, axis, start, rep) in sites:
            self.cuts.setdefault((weight, axis), set()).add(start + channel * rep)
        return bool(sites)

    def bounds(self, layout: Layout) -> list[int]:
        """Element offsets where the atoms of a layout end."""
        out, pos = [], 0
        for sym, rep in layout:
            pos += self.size[sym] * rep
            out.append(pos)
        return out


def _analyse(program: Program, head_dim: bool, hidden: bool) -> tuple[Tracer, int]:
    from graphpress.analysis.channels.rules import propagate

    cuts: dict[tuple[str, int], set[int]] = {}
    grain: dict[tuple[str, int], dict[tuple[int, int], int]] = {}
    rules: dict[Any, Any] = {}
    rounds = 0
    while True:
        rounds += 1
        tracer = Tracer(cuts, grain)
        tracer.head_dim = head_dim
        tracer.hidden = hidden
        propagate(program, tracer, rules)
        if not tracer.dirty or rounds == _MAX_ROUNDS:
            return tracer, rounds


@register_analysis("channel_groups")
def channel_groups(program: Program, *, head_dim: bool = False,
                   hidden: bool = False) -> ChannelAnalysis:
    """The channel groups of ``program``: which weight slices must be pruned together, and why a
    group cannot be pruned. Needs only shapes (works on ``meta``-device weights).

    ``C -> (heads, head_dim)`` reshapes make whole heads the channels; with ``head_dim=True``
    the channels are instead the head_dim positions, the same ones in every head. With
    ``hidden=True`` a ``layer_norm`` / ``rms_norm`` over one dim and a ``mean`` over one channel
    dim no longer block it: they are recorded in ``normalized``, to be computed over the kept
    channels (width pruning of a transformer's residual stream)."""
    t, rounds = _analyse(program, head_dim, hidden)
    members: dict[int, list[ChannelSlice]] = {}
    for weight, dims in t.weights.items():
        for axis, layout in enumerate(dims):
            pos = 0
            for sym, rep in layout or ():
                members.setdefault(t.find(sym), []).append(
                    ChannelSlice(t.names[weight], axis, pos, rep))
                pos += t.size[sym] * rep
    ids = {root: i for i, root in enumerate(members)}
    heads = {t.find(s) for s in t.heads}
    groups = [ChannelGroup(ids[root], t.size[root], slices, t.reasons(root), root in heads)
              for root, slices in members.items()]

    converted: dict[Layout, tuple[tuple[int, int, int], ...]] = {}   # nodes share layouts
    layouts = {k: _in_groups(v, t, ids, converted) for k, v in t.values.items()}
    return ChannelAnalysis(groups, layouts, dict(t.normalized), rounds)


def _in_groups(value: object, t: Tracer, ids: dict[int, int],
               converted: dict[Layout, tuple[tuple[int, int, int], ...]]) -> object:
    """A node's value in group ids: each layout's atoms as ``(group id, rep, channels)`` (-1 for
    a symbol in no group), a tuple of values for an op with several outputs. Module-level, not
    a closure over the tracer: a recursive closure is a reference cycle that would keep the
    tracer alive until the cyclic garbage collector runs."""
    if isinstance(value, tuple):    # an op with several outputs
        return tuple(_in_groups(v, t, ids, converted) for v in value)
    if not isinstance(value, list):
        return None
    out = []
    for layout in value:
        if layout is None:
            out.append(None)
            continue
        known = converted.get(layout)
        if known is None:
            known = converted[layout] = tuple((ids.get(t.find(s), -1), r, t.size[s])
                                              for s, r in layout)
        out.append(known)
    return out

