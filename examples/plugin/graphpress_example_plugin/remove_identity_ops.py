"""Removal of ATen operations that return their input unchanged.

For a node ``y = op(x, ...)`` the pass replaces every use of ``y`` by ``x`` and erases the node
when the rule below holds. Every rule also needs ``y`` to have exactly ``x``'s geometry, read
from the fake tensors in ``meta["val"]``: shape, strides, storage offset, dtype, device, layout
(strided tensors only). Element ``i`` of a tensor lives at ``storage[offset + i . strides]``, so a
view with the same geometry *is* ``x``, and a copy with it holds ``x``'s values in ``x``'s layout
(a later ``view`` that needed the layout still works).

Views, which return ``x`` itself or a view of its storage::

    alias(x) = x            view / reshape / expand(x, x.shape) = x       permute(x, identity) = x
    slice(x, d, 0, end >= size, 1) = x       transpose(x, d, d) = x       squeeze(x) = x (no 1-dims)
    contiguous(x) = x   when x is already contiguous in the requested memory format
    x.to(dtype, device, layout of x) = x     dropout(x, p, train=False) = x

Copies, which return a new tensor with ``x``'s values::

    clone(x) = x            _to_copy(x) = x, x.to(..., copy=True) = x   with x's dtype/device/layout

Arithmetic with a literal, for real (not complex) ``x`` whose dtype the literal does not promote
(``int_tensor * 1.0`` is float, so it stays)::

    x * 1 = x       x / 1 = x       x - 0 = x       x + (-0.0) = x        bit for bit (IEEE 754)
    x + 0 = x       bit for bit for integer x; for floating x only up to the sign of zero
                    (-0.0 + 0 = +0.0, and 1 / y tells them apart), so it is removed only with
                    ``ignore_signed_zero=True``; the same holds for x - (-0.0)

Arithmetic results are copies. A copy differs from ``x`` only in owning its storage, and that is
observable in two ways, both checked on an alias analysis (nodes grouped by the storage they view):

* a write: an in-place op (``add_``, ``copy_``; any op with a mutable schema, and any higher-order
  op, counts as writing all its tensor arguments) to a view of ``x`` or of ``y`` would now reach
  the other; the copy is kept when the graph writes to either;
* an escape: if ``y`` (or a view of it) is returned, the output would share storage with ``x``;
  the copy is kept when ``x``'s storage is a graph input, a weight, or also returned.

Nodes feeding a mutation output (a buffer updated in place) are left alone (the PassManager
re-points the signature's output specs when a returned node is replaced). Not removed:
``detach`` (gradients differ when fine-tuning), ``_unsafe_view`` and in-place ops. Contract:
exact with zero tolerance.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Any

import torch
from torch.export.graph_signature import OutputKind
from torch.fx import Node
from torch.utils import _pytree as pytree

from graphpress.ir.program import Program
from graphpress.pipeline.base import Contract, Pass, PassContext, PassResult, Skip

__all__ = ["RemoveIdentityOps"]

aten = torch.ops.aten

# Ops that return their input, or a view of it, when the geometry does not change.
_VIEWS = {aten.alias, aten.view, aten.reshape, aten.expand, aten.slice, aten.permute,
          aten.transpose, aten.squeeze, aten.contiguous, aten.to, aten.dropout}
# Views that return x itself when nothing changes and a new tensor otherwise.
_RETURNS_SELF = {aten.contiguous, aten.to, aten.dropout}
# Ops that return a new tensor.
_COPIES = {aten.clone, aten._to_copy}
# Ops that may keep the shape and dtype but change the layout: worth a note when they stay.
_RELAYOUTS = {aten.contiguous, aten.to, aten.clone, aten._to_copy}
# Arithmetic overloads whose second argument may be an identity literal.
_ARITHMETIC = {aten.mul.Tensor, aten.mul.Scalar, aten.div.Tensor, aten.div.Scalar,
               aten.add.Tensor, aten.add.Scalar, aten.sub.Tensor, aten.sub.Scalar}
_STAT = {"view": "views", "copy": "copies", "arithmetic": "arithmetic"}


def _bound_args(node: Node) -> dict[str, Any]:
    """The node's arguments by schema name (``copy``, ``train``, ``alpha``, ...)."""
    schema = node.target._schema
    bound = {a.name: v for a, v in zip(schema.arguments, node.args, strict=False)}
    bound.update(node.kwargs)
    return bound


def _geometry(val: Any) -> tuple[Any, ...] | None:
    if not isinstance(val, torch.Tensor) or val.layout != torch.strided:
        return None
    sizes = tuple(str(s) for s in val.shape)
    strides = tuple(str(s) for s in val.stride())
    return sizes, strides, str(val.storage_offset()), val.dtype, val.device


def _is_literal(value: Any) -> bool:
    return type(value) in (int, float)


def _negative_zero(value: int | float) -> bool:
    return value == 0 and math.copysign(1.0, value) < 0


def _kind(node: Node) -> str:
    """'view', 'copy', 'arithmetic' for a candidate node; '' for any other node."""
    if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
        return ""
    if not node.args or not isinstance(node.args[0], Node):
        return ""
    if node.target in _ARITHMETIC:
        return "arithmetic" if len(node.args) > 1 and _is_literal(node.args[1]) else ""
    packet = node.target.overloadpacket
    if packet is aten.to and _bound_args(node).get("copy", False):
        return "copy"
    if packet is aten.dropout:
        return "view" if _bound_args(node).get("train") is False else ""
    if packet in _VIEWS:
        return "view"
    return "copy" if packet in _COPIES else ""


class _Aliases:
    """Which nodes view the same storage, which storages the graph writes, which it returns."""

    def __init__(self, program: Program) -> None:
        self.root: dict[Node, Node] = {}
        self.members: dict[Node, list[Node]] = {}
        self.written: set[Node] = set()
        for node in program.graph.nodes:
            base = self._viewed(node)
            root = self.root[base] if base is not None else node
            self.root[node] = root
            self.members.setdefault(root, []).append(node)
            if self._writes(node):
                self.written.update(self.root[a] for a in _node_args(node))
        self.returned = {self.root[a] for a in _node_args(program.output_node())}

    @staticmethod
    def _viewed(node: Node) -> Node | None:
        """The node whose storage ``node`` views, if any (over-approximated: safe)."""
        if node.op != "call_function" or not node.args or not isinstance(node.args[0], Node):
            return None
        if node.target is operator.getitem:
            return node.args[0]
        if not isinstance(node.target, torch._ops.OpOverload):
            return None
        if node.target.overloadpacket in _RETURNS_SELF:  # x itself, or a new tensor
            same = _geometry(node.meta.get("val")) == _geometry(node.args[0].meta.get("val"))
            return node.args[0] if _kind(node) == "view" and same else None
        if any(r.alias_info is not None for r in node.target._schema.returns):
            return node.args[0]
        return None

    @staticmethod
    def _writes(node: Node) -> bool:
        if node.op in ("call_module", "call_method"):
            return True
        if node.op != "call_function":
            return False
        if isinstance(node.target, torch._ops.OpOverload):
            return node.target._schema.is_mutable
        return isinstance(node.target, torch._ops.HigherOrderOperator)

    def merge(self, copy: Node, source: Node) -> None:
        """``copy`` is replaced by ``source``: its views now view ``source``'s storage."""
        old, new = self.root[copy], self.root[source]
        for member in self.members.pop(old, []):
            self.root[member] = new
            self.members[new].append(member)
        if old in self.returned:
            self.returned.add(new)


def _node_args(node: Node) -> list[Node]:
    return [a for a in pytree.tree_leaves((node.args, node.kwargs)) if isinstance(a, Node)]


@dataclass
class RemoveIdentityOps(Pass):
    """Removes ATen ops that return their input unchanged: no-op views and copies, x * 1, x - 0."""

    ignore_signed_zero: bool = False

    name = "remove_identity_ops"
    contract = Contract.exact(rtol=0.0, atol=0.0)
    preserves = ("symbolic_shapes",)

    def run(self, program: Program, ctx: PassContext) -> PassResult:
        aliases = _Aliases(program)
        stats = {"nodes_removed": 0, "views": 0, "copies": 0, "arithmetic": 0}
        skipped: list[Skip] = []
        for node in list(program.graph.nodes):
            kind = _kind(node)
            if not kind:
                continue
            source = node.args[0]
            reason = self._refusal(program, node, kind, aliases)
            if reason is None:
                continue
            if reason:
                skipped.append(Skip(node.name, reason))
                continue
            if kind != "view":
                aliases.merge(node, source)
            node.replace_all_uses_with(source)
            program.graph.erase_node(node)
            stats["nodes_removed"] += 1
            stats[_STAT[kind]] += 1
        return PassResult(stats["nodes_removed"] > 0, stats, skipped)

    def _refusal(self, program: Program, node: Node, kind: str,
                 aliases: _Aliases) -> str | None:
        """None: not an identity; '': removable; otherwise why it stays."""
        source: Node = node.args[0]
        before, after = _geometry(source.meta.get("val")), _geometry(node.meta.get("val"))
        if before is None or after is None:
            return None
        if kind == "arithmetic":
            reason = self._arithmetic(node, source.meta["val"])
            if reason is None or reason:
                return reason
        if before != after:
            return self._changed(node, kind, before, after)
        if self._feeds_mutation_output(program, node):
            return "it feeds a mutation output (a weight updated in place)"
        if kind == "view":
            return ""
        root = aliases.root[source]
        if root in aliases.written or aliases.root[node] in aliases.written:
            return (f"a copy of %{source.name}, but the graph writes in place to one of them "
                    "(or a view of one)")
        if aliases.root[node] in aliases.returned and (
                root.op == "placeholder" or root in aliases.returned):
            return (f"a copy that is returned; without it the output would share storage with "
                    f"%{root.name}")
        return ""

    @staticmethod
    def _changed(node: Node, kind: str, before: tuple[Any, ...], after: tuple[Any, ...]
                 ) -> str | None:
        """Why a node whose geometry differs from its input's stays (None: not worth a note)."""
        sizes, strides, _, dtype, device = after
        if kind == "arithmetic" and dtype != before[3]:
            return f"the literal promotes {before[3]} to {dtype}"
        relayout = kind == "arithmetic" or node.target.overloadpacket in _RELAYOUTS
        if relayout and (sizes, dtype, device) == (before[0], before[3], before[4]):
            return (f"it changes the memory layout (strides ({', '.join(before[1])}) -> "
                    f"({', '.join(strides)}), storage offset {before[2]} -> {after[2]})")
        return None

    def _arithmetic(self, node: Node, val: torch.Tensor) -> str | None:
        """None: not an identity literal; '': exact identity; otherwise why it stays."""
        packet, literal = node.target.overloadpacket, node.args[1]
        if packet in (aten.add, aten.sub) and _bound_args(node).get("alpha", 1) != 1:
            return None
        identity = (literal == 1 if packet in (aten.mul, aten.div) else literal == 0)
        if not identity:
            return None
        if val.is_complex():
            return "complex tensor: (a+bi) * 1 is not exact when b is infinite"
        flips_zero = (packet is aten.add and not _negative_zero(literal)) or (
            packet is aten.sub and _negative_zero(literal))
        if flips_zero and val.is_floating_point() and not self.ignore_signed_zero:
            return ("x + 0 turns -0.0 into +0.0 for floating x "
                    "(remove it with ignore_signed_zero=True)")
        return ""

    @staticmethod
    def _feeds_mutation_output(program: Program, node: Node) -> bool:
        outputs = program.output_node().args[0]
        return any(value is node and spec.kind != OutputKind.USER_OUTPUT
                   for value, spec in zip(outputs, program.signature.output_specs, strict=True))
