"""Fingerprints of a Program: what a pass changed, found without asking the pass.

A :class:`Fingerprint` records, in graph order, every node's name, op, target, args and kwargs
and the object in its ``meta["val"]``; the identity of every tensor of the state dict and of
the constants, by name; and the input and output specs. :func:`diff` compares two fingerprints
of one Program, taken before and after a pass.

Invariant: ``diff(before, after)`` is empty in its structure and weights if and only if no node
was added, removed, renamed, reordered, retargeted or rewired, no weight tensor was replaced,
added or removed, and no spec changed. Arguments are compared with nodes by identity (and shown
by name). Why recording the argument tuples is enough: torch.fx stores a node's args and kwargs
as immutable collections and every edit (``node.args = ...``, ``replace_input_with``,
``replace_all_uses_with``) stores new ones, so arguments held by the same object are unchanged;
only differing objects are compared element by element. Weight tensors are never mutated in
place (see :mod:`graphpress.ir.program`), so an unchanged tensor object is an unchanged weight.

``meta["val"]`` objects that a pass replaced are listed separately (:attr:`Diff.meta`): they are
not an edit of the program, but the manager re-checks them, and a replacement with a different
shape or dtype under ``changed=False`` is an edit the pass did not report
(:meth:`Diff.meta_changes`).

:attr:`Diff.touched` lists the nodes whose value may differ from before: those added, rewired
or with a replaced ``meta["val"]``, and the placeholders of replaced weights. Every other node
has the same op, target and argument nodes as before, which is what lets the manager
re-propagate shapes from the touched nodes only (:func:`graphpress.ir.shapes.propagate_shapes`).
A rewired node whose only change is argument nodes replaced by nodes with the same fake value
(what cse does to the users of a merged node) is not touched either: a fake value is a function
of the op, the target and the arguments' fake values, which are all unchanged. If one of those
new argument nodes is itself re-run and its value changes, the propagation re-runs its users.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch.fx import Node
from torch.fx.node import map_aggregate

from graphpress.ir.shapes import value_signature

if TYPE_CHECKING:
    from graphpress.ir.program import Program

__all__ = ["Diff", "Fingerprint", "describe", "diff", "fingerprint"]

# One node: (node, name, op, target, args, kwargs, meta["val"] or None).
_Entry = tuple[Node, str, str, Any, tuple[Any, ...], dict[str, Any], Any]


@dataclass
class Fingerprint:
    """Graph structure, weight identities and specs of a Program at one moment."""

    nodes: list[_Entry]
    weights: dict[str, object]                                   # tensors by name
    input_specs: list[tuple[str, str, str | None, bool | None]]  # kind, arg, target, persistent
    output_specs: list[tuple[str, str, str | None]]              # kind, arg, target

    def values(self) -> dict[Node, Any]:
        """``meta["val"]`` of every node when the fingerprint was taken (None where missing)."""
        return {entry[0]: entry[6] for entry in self.nodes}


def fingerprint(program: Program) -> Fingerprint:
    """Fingerprint ``program`` (linear in nodes and weights; no tensor data is read)."""
    nodes = [(n, n.name, n.op, n.target, n._args, n._kwargs, n.meta.get("val"))
             for n in program.graph.nodes]
    weights: dict[str, object] = {**program.state_dict, **program.constants}
    inputs = [(s.kind.name, getattr(s.arg, "name", str(s.arg)), s.target, s.persistent)
              for s in program.signature.input_specs]
    outputs = [(s.kind.name, getattr(s.arg, "name", str(s.arg)), s.target)
               for s in program.signature.output_specs]
    return Fingerprint(nodes, weights, inputs, outputs)


@dataclass
class Diff:
    """What differs between two fingerprints of one Program."""

    added: list[Node] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    rewired: list[Node] = field(default_factory=list)    # name, op, target, args or kwargs
    substituted: list[Node] = field(default_factory=list)  # rewired to equal-valued nodes
    reordered: bool = False
    weights: list[str] = field(default_factory=list)     # replaced, added or removed tensors
    specs: bool = False
    meta: list[Node] = field(default_factory=list)       # meta["val"] object replaced
    changes: list[str] = field(default_factory=list)     # one line per edit, for messages
    touched: list[Node] = field(default_factory=list)    # where values may have changed
    _meta_pairs: list[tuple[str, Any, Any]] = field(default_factory=list, repr=False)

    @property
    def edited(self) -> bool:
        """Whether the graph, the weights or the specs changed (metadata aside)."""
        return bool(self.changes)

    def meta_changes(self) -> list[str]:
        """The replaced ``meta["val"]`` whose shape or dtype differs from the one before."""
        lines = []
        for name, was, now in self._meta_pairs:
            was, now = (None if v is None else value_signature(v) for v in (was, now))
            if was != now:
                lines.append(f"node %{name} meta['val'] {was} -> {now}")
        return lines


def describe(changes: list[str], limit: int = 5) -> str:
    """Up to ``limit`` change lines joined, and how many more there are."""
    shown = changes[:limit]
    more = len(changes) - len(shown)
    return "; ".join(shown) + (f"; and {more} more" if more > 0 else "")


def _show(value: Any) -> str:
    """An argument as the printer shows it: nodes as %name, targets by their qualified name."""
    return str(map_aggregate(value, lambda v: f"%{v.name}" if isinstance(v, Node) else v))


def _target(target: Any) -> str:
    return str(target) if isinstance(target, torch._ops.OpOverload | str) else getattr(
        target, "__qualname__", str(target))


def _same(a: Any, b: Any) -> bool:
    """Arguments equal, with nodes compared by identity (Node defines no ``__eq__``)."""
    if a is b:
        return True
    if isinstance(a, Node) or isinstance(b, Node):
        return False
    if isinstance(a, tuple | list) and isinstance(b, tuple | list):
        return type(a) is type(b) and len(a) == len(b) and all(map(_same, a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    try:
        return type(a) is type(b) and bool(a == b)
    except Exception:  # e.g. tensors or SymInts as constants: equal only if the same object
        return False


def _same_values(before: Any, after: Any, previous: dict[Node, Any]) -> bool:
    """Arguments that differ only by nodes replaced with nodes of the same fake value (shape,
    stride, dtype, device, layout): cse's rewiring. Such a node's fake value cannot change."""
    if isinstance(before, Node) and isinstance(after, Node):
        if before is after:
            return True
        was, now = previous.get(before), after.meta.get("val")
        return was is not None and now is not None and (
            value_signature(was) == value_signature(now))
    if isinstance(before, tuple | list) and isinstance(after, tuple | list):
        return (type(before) is type(after) and len(before) == len(after)
                and all(_same_values(a, b, previous) for a, b in zip(before, after)))
    if isinstance(before, dict) and isinstance(after, dict):
        return before.keys() == after.keys() and all(
            _same_values(before[k], after[k], previous) for k in before)
    return _same(before, after)


def diff(before: Fingerprint, after: Fingerprint) -> Diff:
    """What changed from ``before`` to ``after`` (two fingerprints of the same Program)."""
    out = Diff()
    old = {entry[0]: entry for entry in before.nodes}
    previous = {entry[0]: entry[6] for entry in before.nodes}
    kept = set()
    for entry in after.nodes:
        node, name, op, target, args, kwargs, val = entry
        prior = old.get(node)
        if prior is None:
            out.added.append(node)
            out.changes.append(f"node %{name} added ({op} {_target(target)})")
            continue
        kept.add(node)
        what = []
        if prior[1] != name:
            what.append(f"renamed from %{prior[1]}")
        if prior[2] != op:
            what.append(f"op {prior[2]} -> {op}")
        if prior[3] is not target and prior[3] != target:
            what.append(f"target {_target(prior[3])} -> {_target(target)}")
        if not _same(prior[4], args):
            what.append(f"args {_show(prior[4])} -> {_show(args)}")
        if not _same(prior[5], kwargs):
            what.append(f"kwargs {_show(prior[5])} -> {_show(kwargs)}")
        if what:
            out.rewired.append(node)
            out.changes.append(f"node %{name} " + ", ".join(what))
            if prior[1:4] == (name, op, target) and _same_values(
                    (prior[4], prior[5]), (args, kwargs), previous):
                out.substituted.append(node)
        if prior[6] is not val:
            out.meta.append(node)
            out._meta_pairs.append((name, prior[6], val))
    for entry in before.nodes:
        if entry[0] not in kept:
            out.removed.append(entry[1])
            out.changes.append(f"node %{entry[1]} removed")
    order_before = [entry[0] for entry in before.nodes if entry[0] in kept]
    order_after = [entry[0] for entry in after.nodes if entry[0] in kept]
    if order_before != order_after:
        out.reordered = True
        out.changes.append("nodes reordered")
    for name in sorted(before.weights.keys() | after.weights.keys()):
        a, b = before.weights.get(name), after.weights.get(name)
        if a is not b:
            out.weights.append(name)
            state = ("added" if a is None else "removed" if b is None else "tensor replaced")
            out.changes.append(f"weight {name!r} {state}")
    for label, a_specs, b_specs in (("input", before.input_specs, after.input_specs),
                                    ("output", before.output_specs, after.output_specs)):
        if a_specs != b_specs:
            out.specs = True
            out.changes.append(f"{label} specs {_spec_change(a_specs, b_specs)}")
    by_name = {entry[1]: entry[0] for entry in after.nodes}
    changed_weights = set(out.weights)
    weight_placeholders = [by_name[arg] for _, arg, target, _ in after.input_specs
                           if target in changed_weights and arg in by_name]
    substituted = set(out.substituted)
    rewired = [n for n in out.rewired if n not in substituted or n in out.meta]
    out.touched = list(dict.fromkeys([*out.added, *rewired, *out.meta, *weight_placeholders]))
    return out


def _spec_change(a: list[Any], b: list[Any]) -> str:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return f"#{i} {x} -> {y}"
    return f"count {len(a)} -> {len(b)}"
