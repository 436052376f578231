"""Scheduling: the partition of a Program's nodes into fusion groups (one kernel each) and host
nodes (views and ATen fallbacks), in an order that respects every dependency.

A group has one iteration shape ``S``:

* ``pointwise``: every member is element-wise with output shape ``S``;
* ``row``: members are element-wise or reduce over the last dim of ``S``; every member's shape
  is ``S`` or ``S`` with its last dim reduced to 1 (a reduction without ``keepdim`` is stored
  but never read inside the group: its broadcasting would align it with the wrong dims);
* ``matmul``: one matmul (the anchor) whose output has shape ``S``, and element-wise members of
  shape ``S`` after it (the epilogue: bias, activation, residual add, scale);
* ``attention``: one ``scaled_dot_product_attention``, alone.

Invariants, by construction:

* every node is in at most one group: nothing is computed twice;
* a member's value is read inside its group only where the group's layout holds it; a member
  any node outside the group uses is stored (a group may have several outputs);
* the groups and host nodes form an acyclic graph: a node joins a group only if none of its
  inputs from outside the group depends on the group (tracked as bitmasks of group ids).

Nodes are visited in graph order; an element-wise or row node joins the first group of one of
its producers that can take it, else starts its own (an ``identity`` such as ``clone`` never
starts one: alone it is an ATen call).
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.fx import Graph, Node

from graphpress.backends.triton.lowering import node_kind

__all__ = ["Group", "Schedule", "schedule", "shape_key"]


def shape_key(value: Any) -> tuple[Any, ...] | None:
    """A hashable shape: ints and the sympy expressions of symbolic sizes."""
    if not isinstance(value, torch.Tensor):
        return None
    return tuple(d.node.expr if isinstance(d, torch.SymInt) else int(d) for d in value.shape)


def _key(node: Node) -> tuple[Any, ...] | None:
    return shape_key(node.meta.get("val"))


@dataclass(eq=False)
class Group:
    """One kernel: its kind, iteration shape, and members in graph order."""

    index: int
    kind: str
    shape: tuple[Any, ...]
    nodes: list[Node] = field(default_factory=list)

    @property
    def reduced(self) -> tuple[Any, ...]:
        return (*self.shape[:-1], 1)

    def readable_shapes(self) -> tuple[tuple[Any, ...], ...]:
        """Shapes a member may have and still be read by another member."""
        return (self.shape, self.reduced) if self.kind == "row" else (self.shape,)

    def inputs(self) -> list[Node]:
        """Tensors read from outside the group, in order of first use."""
        members, seen = set(self.nodes), {}
        for node in self.nodes:
            for arg in node.all_input_nodes:
                if arg not in members and isinstance(arg.meta.get("val"), torch.Tensor):
                    seen.setdefault(arg, None)
        return list(seen)

    def outputs(self) -> list[Node]:
        """Members used outside the group (or returned), in graph order."""
        members = set(self.nodes)
        return [n for n in self.nodes if any(u not in members for u in n.users)]


@dataclass
class Schedule:
    """Kernel groups and host nodes in execution order."""

    units: list[Group | Node]
    group_of: dict[Node, Group]

    @property
    def groups(self) -> list[Group]:
        return [u for u in self.units if isinstance(u, Group)]


def _can_join(group: Group, node: Node, kind: str, group_of: dict[Node, Group],
              upstream: dict[Node, int]) -> bool:
    key = _key(node)
    if group.kind == "attention":
        return False
    if kind in ("pointwise", "identity"):
        if key not in group.readable_shapes():
            return False
    elif kind == "row":
        if group.kind not in ("pointwise", "row") or _key(node.args[0]) != group.shape:
            return False
    else:
        return False
    for arg in node.all_input_nodes:
        if group_of.get(arg) is group:
            if _key(arg) not in group.readable_shapes():
                return False
        elif upstream.get(arg, 0) >> group.index & 1:
            return False  # the group would feed itself through a node outside it
    return True


def _order(units: list[Group | Node], group_of: dict[Node, Group]) -> list[Group | Node]:
    """Units in dependency order; among ready units, the one whose first node comes first."""
    position = {id(u): i for i, u in enumerate(units)}

    def unit(node: Node) -> Group | Node | None:
        return group_of.get(node, node if id(node) in position else None)

    deps: dict[int, set[int]] = {id(u): set() for u in units}
    users: dict[int, set[int]] = {id(u): set() for u in units}
    for u in units:
        for node in u.nodes if isinstance(u, Group) else [u]:
            for arg in node.all_input_nodes:
                producer = unit(arg)
                if producer is not None and producer is not u:
                    deps[id(u)].add(id(producer))
                    users[id(producer)].add(id(u))
    ready = sorted(position[k] for k, d in deps.items() if not d)
    ordered: list[Group | Node] = []
    heapq.heapify(ready)
    while ready:
        current = units[heapq.heappop(ready)]
        ordered.append(current)
        for user in users[id(current)]:
            deps[user].discard(id(current))
            if not deps[user]:
                heapq.heappush(ready, position[user])
    if len(ordered) != len(units):
        raise AssertionError("the triton schedule has a cycle")  # the bitmasks forbid it
    return ordered


def schedule(graph: Graph) -> Schedule:
    """Partition ``graph`` into groups and host nodes (see the module docstring)."""
    group_of: dict[Node, Group] = {}
    upstream: dict[Node, int] = {}
    units: list[Group | Node] = []
    for node in graph.nodes:
        if node.op in ("placeholder", "output"):
            continue
        kind = node_kind(node)
        group = None
        if kind in ("pointwise", "identity", "row"):
            candidates = dict.fromkeys(group_of[a] for a in node.all_input_nodes
                                       if a in group_of)
            group = next((g for g in candidates
                          if _can_join(g, node, kind, group_of, upstream)), None)
            if group is not None and kind == "row":
                group.kind = "row"
        if group is None and kind in ("pointwise", "row", "matmul", "attention"):
            shape = _key(node.args[0]) if kind == "row" else _key(node)
            group = Group(len([u for u in units if isinstance(u, Group)]), kind, shape)
            units.append(group)
        if group is None:
            units.append(node)
        else:
            group.nodes.append(node)
            group_of[node] = group
        mask = 1 << group.index if group is not None else 0
        for arg in node.all_input_nodes:
            mask |= upstream.get(arg, 0)
        upstream[node] = mask
    return Schedule(_order(units, group_of), group_of)
