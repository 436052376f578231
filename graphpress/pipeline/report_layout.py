"""Layered layout of a dataflow graph for the HTML report (top to bottom, as data flows).

The method (a light Sugiyama scheme):

1. **Ranks.** Nodes are ordered topologically (Kahn's algorithm, ties broken by the given
   order; a node on a cycle is placed after its other inputs and the edge that closes the
   cycle is ignored). A node's rank is one more than the largest rank among its inputs; a node
   without inputs (a weight, an input) is then moved down to one rank above its first user, so
   a layer's weights sit beside the layer instead of at the top of the page.
2. **Order and coordinates.** Each rank starts packed left to right in topological order.
   Sweeps then move every node towards the mean x of its neighbours in the ranks above (down
   sweeps) or below (up sweeps): a rank is sorted by those targets and placed left to right at
   ``x_i = max(target_i, x_(i-1) + (w_(i-1) + w_i) / 2 + gap)``, then shifted as a whole so that
   its mean displacement from the targets is zero. Three down/up pairs and a final down sweep.
3. ``y = rank * (height + vertical gap)``; the result is shifted so that the leftmost box starts
   at x = 0.

Cost: ``O(sweeps * (V log V + E))`` for ``V`` nodes and ``E`` edges; a few thousand nodes lay
out in well under a second.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["Layout", "layered_layout"]

_SWEEPS = 3


@dataclass
class Layout:
    """Centre coordinates per node (in the input order), and the drawing's size."""

    x: list[float]
    y: list[float]
    width: float
    height: float
    ranks: list[int]


def _topological(count: int, preds: list[list[int]], succs: list[list[int]]) -> list[int]:
    indegree = [len(p) for p in preds]
    ready = [i for i in range(count) if indegree[i] == 0]
    heapq.heapify(ready)
    order: list[int] = []
    placed = [False] * count
    while len(order) < count:
        if not ready:  # a cycle: release the earliest node not yet placed
            heapq.heappush(ready, next(i for i in range(count) if not placed[i]))
        node = heapq.heappop(ready)
        if placed[node]:
            continue
        placed[node] = True
        order.append(node)
        for s in succs[node]:
            indegree[s] -= 1
            if indegree[s] == 0 and not placed[s]:
                heapq.heappush(ready, s)
    return order


def _ranks(order: list[int], preds: list[list[int]], succs: list[list[int]]) -> list[int]:
    position = {node: i for i, node in enumerate(order)}
    rank = [0] * len(order)
    for node in order:
        earlier = [rank[p] for p in preds[node] if position[p] < position[node]]
        rank[node] = max(earlier, default=-1) + 1
    for node in order:
        later = [rank[s] for s in succs[node] if position[s] > position[node]]
        if not preds[node] and later:
            rank[node] = max(0, min(later) - 1)
    return rank


def _place(layer: list[int], target: dict[int, float], widths: Sequence[float],
           x: list[float], gap: float) -> None:
    layer.sort(key=lambda v: (target[v], x[v]))
    previous = None
    for v in layer:
        x[v] = target[v] if previous is None else max(
            target[v], x[previous] + (widths[previous] + widths[v]) / 2 + gap)
        previous = v
    shift = sum(target[v] - x[v] for v in layer) / len(layer)
    for v in layer:
        x[v] += shift


def _sweep(layers: list[list[int]], neighbours: list[list[int]], widths: Sequence[float],
           x: list[float], gap: float) -> None:
    for layer in layers:
        target = {}
        for v in layer:
            near = neighbours[v]
            target[v] = sum(x[u] for u in near) / len(near) if near else x[v]
        _place(layer, target, widths, x, gap)


def layered_layout(widths: Sequence[float], edges: Sequence[tuple[int, int]], *,
                   height: float = 26.0, gap: float = 14.0,
                   vertical_gap: float = 34.0) -> Layout:
    """Lay out nodes ``0..len(widths)-1`` (box widths given) joined by ``(source, target)``."""
    count = len(widths)
    if count == 0:
        return Layout([], [], 0.0, 0.0, [])
    preds: list[list[int]] = [[] for _ in range(count)]
    succs: list[list[int]] = [[] for _ in range(count)]
    for a, b in set(edges):
        if a != b:
            succs[a].append(b)
            preds[b].append(a)
    order = _topological(count, preds, succs)
    rank = _ranks(order, preds, succs)
    layers: list[list[int]] = [[] for _ in range(max(rank) + 1)]
    for node in order:
        layers[rank[node]].append(node)
    x = [0.0] * count
    for layer in layers:
        cursor = 0.0
        for v in layer:
            x[v] = cursor + widths[v] / 2
            cursor += widths[v] + gap
    above = [[u for u in preds[v] if rank[u] < rank[v]] for v in range(count)]
    below = [[u for u in succs[v] if rank[u] > rank[v]] for v in range(count)]
    for _ in range(_SWEEPS):
        _sweep(layers, above, widths, x, gap)
        _sweep(layers[::-1], below, widths, x, gap)
    _sweep(layers, above, widths, x, gap)
    left = min(x[v] - widths[v] / 2 for v in range(count))
    right = max(x[v] + widths[v] / 2 for v in range(count))
    x = [value - left for value in x]
    y = [r * (height + vertical_gap) + height / 2 for r in rank]
    return Layout(x, y, right - left, len(layers) * (height + vertical_gap) - vertical_gap,
                  rank)
