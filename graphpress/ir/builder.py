"""Insert nodes into a Program with their metadata complete the moment they exist.

A node a pass creates with ``graph.call_function`` has no ``meta["val"]`` until the PassManager
re-propagates shapes after the pass, so the pass itself cannot read its shape (a pattern that
matches its own output in the same run silently misses it). :class:`GraphBuilder` sets, in one
call, everything the rest of graphpress reads from a node:

* ``meta["val"]``: the target run on the inputs' fake values in the graph's own FakeTensorMode
  (``program.fake_mode()``; never a second mode, whose symbols would not mix with the graph's);
* ``meta["nn_module_stack"]`` and ``meta["stack_trace"]``: copied from the anchor node, so the
  new node is attributed to the source module of the node it replaces or serves;
* ``meta["graphpress_pass"]``: the pass that created it (provenance).

Invariant: every node the builder returns has all three, and its ``meta["val"]`` is what the
manager's re-propagation will compute (so it is never stale).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch.fx import Node
from torch.utils import _pytree as pytree

from graphpress.errors import MetadataError

if TYPE_CHECKING:
    from graphpress.ir.program import Program

__all__ = ["GraphBuilder"]

_COPIED = ("nn_module_stack", "stack_trace")


class GraphBuilder:
    """Creates nodes next to ``anchor`` (before it, or after it with ``after=True``), in order.

    ``with GraphBuilder(program, anchor=node, pass_name=self.name) as b:`` then
    ``y = b.call(torch.ops.aten.mul.Tensor, x, 2.0)``: nodes of one builder are inserted in
    the order they are created (a subgraph reads top to bottom), before the anchor by default,
    after it with ``after=True``. ``weight(...)`` adds a weight placeholder the same way.
    """

    def __init__(self, program: Program, *, anchor: Node, pass_name: str,
                 after: bool = False) -> None:
        if not pass_name:
            raise ValueError("GraphBuilder needs the creating pass's name (pass_name=self.name) "
                             "for the nodes' provenance")
        self.program = program
        self.anchor = anchor
        self.pass_name = pass_name
        self._after = after
        self._last: Node | None = None
        self._active = False

    def __enter__(self) -> GraphBuilder:
        self._active = True
        return self

    def __exit__(self, *exc: object) -> None:
        self._active = False

    def _insertion(self) -> Any:
        if not self._active:
            raise RuntimeError("use the builder as a context: `with GraphBuilder(...) as b:`; "
                               "the insertion point is valid only inside it")
        graph = self.program.graph
        if self._after:
            return graph.inserting_after(self._last or self.anchor)
        return graph.inserting_before(self.anchor)

    def _stamp(self, node: Node) -> Node:
        for key in _COPIED:
            if key in self.anchor.meta:
                node.meta[key] = self.anchor.meta[key]
        node.meta["graphpress_pass"] = self.pass_name
        return node

    def call(self, target: Any, *args: Any, **kwargs: Any) -> Node:
        """Insert ``target(*args, **kwargs)`` (an op overload or a Python function of values,
        like ``operator.getitem``); node arguments must have ``meta["val"]``."""
        def fake(value: Any) -> Any:
            if not isinstance(value, Node):
                return value
            if "val" not in value.meta:
                raise MetadataError(
                    f"cannot compute meta['val'] of a new {target} node: its input "
                    f"{value.name!r} has none; create inputs with the GraphBuilder too")
            return value.meta["val"]

        fake_args, fake_kwargs = pytree.tree_map(fake, (args, kwargs))
        with self.program.fake_mode(), torch.no_grad():
            val = target(*fake_args, **fake_kwargs)
        with self._insertion():
            node = self.program.graph.call_function(target, args, kwargs)
        node.meta["val"] = val
        self._last = node
        return self._stamp(node)

    def weight(self, name: str, tensor: torch.Tensor, *, kind: str = "parameter") -> Node:
        """``program.add_weight`` (kind ``"parameter"``, ``"buffer"`` or ``"constant"``) with
        the anchor's module stack and the provenance stamped on the placeholder it returns.
        Placeholders always sit among the graph inputs, wherever the builder inserts."""
        return self._stamp(self.program.add_weight(name, tensor, kind=kind))
