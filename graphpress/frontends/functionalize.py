"""Functionalization: a Program never holds an in-place op.

``torch.export``'s training IR keeps in-place ATen ops (``add_`` on a clone, ``mul_`` on a
buffer, ``relu_``) and records no output for the state they change. Passes that assume values
are immutable then go wrong: cse merges two clones that are mutated differently afterwards,
constant folding freezes a tensor that is mutated on every call. So the frontend rewrites every
in-place op into its functional form before any pass runs:

    b = aten.add_(a, 1); ...uses of a and b after it...
    ==>  a1 = aten.add(a, 1); ...the same uses, now of a1...

Every use of the mutated value that comes after the op (in graph order, which is execution
order) reads the new node instead. A mutated buffer or user input gets the value it holds at
the end of the graph returned as a ``BUFFER_MUTATION`` / ``USER_INPUT_MUTATION`` output, as
torch.export's inference IR does; eager, ONNX and saved programs apply those mutations.

This direct rewrite keeps every other op as it is (``batch_norm``, ``reshape``, ``flatten``
stay what the passes match). A write into a view, or into a tensor that has views, is
rewritten the same way when no other alias is read after it (``flatten(x).dropout_()`` with
``x`` dead afterwards). Where it cannot be proven right, the whole program is functionalized
by torch itself (``run_decompositions({})``, which also rewrites composite ops into their ATen
parts): a write that another alias observes later (``a[0].add_(1); return a``), a write into a
view of a graph input or into a parameter, ops that write more than one argument or into
``out=``, and ops without a functional twin of the same dtype and shape.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.export import ExportedProgram
from torch.export.graph_signature import InputKind, OutputKind, OutputSpec, TensorArgument
from torch.fx import Node

__all__ = ["functionalize", "is_mutating"]


def is_mutating(node: Node) -> bool:
    return (node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload)
            and node.target._schema.is_mutable)


def _returns_alias(node: Node) -> bool:
    target = node.target
    if node.op != "call_function" or not isinstance(target, torch._ops.OpOverload):
        return False
    return any(r.alias_info is not None for r in target._schema.returns)


def _written_argument(node: Node) -> Node | None:
    """The single tensor the op writes, if it writes exactly its first argument."""
    schema = node.target._schema
    written = [i for i, a in enumerate(schema.arguments)
               if a.alias_info is not None and a.alias_info.is_write]
    if written != [0] or schema.arguments[0].kwarg_only or not node.args:
        return None
    base = node.args[0]
    return base if isinstance(base, Node) else None


def _functional_twin(target: torch._ops.OpOverload) -> torch._ops.OpOverload | None:
    namespace, name = target._schema.name.split("::")
    if not name.endswith("_") or name.startswith("_"):
        return None
    packet = getattr(getattr(torch.ops, namespace), name[:-1], None)
    twin = getattr(packet, target._overloadname, None) if packet is not None else None
    if twin is None or twin._schema.is_mutable:
        return None
    return twin


def _same_meta(a: Any, b: Any) -> bool:
    return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)
            and a.shape == b.shape and a.dtype == b.dtype)


def _is_view(node: Node) -> bool:
    return _returns_alias(node) and not is_mutating(node)


def _root(node: Node) -> Node:
    """The tensor whose storage a chain of views reads."""
    while _is_view(node) and node.args and isinstance(node.args[0], Node):
        node = node.args[0]
    return node


def _aliases(root: Node) -> set[Node]:
    """``root`` and every view of it (views of views included)."""
    found, stack = {root}, [root]
    while stack:
        for user in stack.pop().users:
            if _is_view(user) and user not in found:
                found.add(user)
                stack.append(user)
    return found


def _plan(ep: ExportedProgram) -> list[tuple[Node, torch._ops.OpOverload]] | None:
    """The in-place ops to rewrite with their functional twins, or None if some case needs
    torch's functionalization instead.

    A write is rewritten when no other alias of the written tensor (its base, the views of
    either) is read after it: then only later readers of the written tensor itself can see the
    write, and those read the new node. A write into a view of a graph input needs the input's
    mutation output, so it is left to torch."""
    writable = {s.arg.name for s in ep.graph_signature.input_specs
                if s.kind in (InputKind.BUFFER, InputKind.USER_INPUT)}
    order = {node: i for i, node in enumerate(ep.graph.nodes)}
    plans = []
    for node in ep.graph.nodes:
        if not is_mutating(node):
            continue
        base = _written_argument(node)
        twin = _functional_twin(node.target)
        if base is None or twin is None:
            return None
        root = _root(base)
        if root.op == "placeholder" and (root is not base or root.name not in writable):
            return None  # a write into a parameter or constant, or into a view of an input
        others = _aliases(root) - {base}
        if any(order[user] > order[node] for alias in others for user in alias.users
               if user is not node and not _is_view(user)):
            return None  # another alias is read after the write and would see it
        if not _same_meta(node.meta.get("val"), base.meta.get("val")):
            return None  # in-place ops keep their input's dtype and shape; the twin may not
        plans.append((node, twin))
    return plans


def _rewrite(ep: ExportedProgram, plans: list[tuple[Node, torch._ops.OpOverload]]
             ) -> list[Node]:
    graph = ep.graph
    created: list[Node] = []
    order = {node: i for i, node in enumerate(graph.nodes)}
    root_of: dict[Node, Node] = {}   # a rewritten value -> the tensor it was written into
    final: dict[Node, Node] = {}     # mutated placeholder -> its value at the end of the graph
    for node, twin in plans:
        base = node.args[0]
        assert isinstance(base, Node)
        with graph.inserting_after(node):
            new = graph.call_function(twin, tuple(node.args), dict(node.kwargs))
        new.meta.update(node.meta)
        created.append(new)
        position = order[node]
        for user in list(base.users):
            if user is not node and order.get(user, -1) > position:
                user.replace_input_with(base, new)
        node.replace_all_uses_with(new)
        graph.erase_node(node)
        order[new] = position
        root = root_of.get(base, base)
        root_of[new] = root
        if root.op == "placeholder":
            final[root] = new
    kinds = {s.arg.name: s for s in ep.graph_signature.input_specs
             if isinstance(s.arg, TensorArgument)}
    mutation_outputs, mutation_specs = [], []
    def buffers_first(item: tuple[Node, Node]) -> bool:
        return kinds[item[0].name].kind != InputKind.BUFFER

    for placeholder, value in sorted(final.items(), key=buffers_first):
        spec = kinds[placeholder.name]
        if spec.kind == InputKind.BUFFER:
            kind, target = OutputKind.BUFFER_MUTATION, spec.target
        else:
            kind, target = OutputKind.USER_INPUT_MUTATION, placeholder.name
        mutation_outputs.append(value)
        mutation_specs.append(OutputSpec(kind=kind, arg=TensorArgument(name=value.name),
                                         target=target))
    output = graph.output_node()
    output.args = (tuple(mutation_outputs) + tuple(output.args[0]),)
    ep.graph_signature.output_specs[:] = mutation_specs + list(ep.graph_signature.output_specs)
    for spec, value in zip(ep.graph_signature.output_specs, output.args[0]):
        if isinstance(spec.arg, TensorArgument) and isinstance(value, Node):
            spec.arg = TensorArgument(name=value.name)  # a returned in-place op was replaced
    graph.lint()
    ep.graph_module.recompile()
    return created


def functionalize(ep: ExportedProgram) -> tuple[ExportedProgram, list[Node]]:
    """``ep`` without in-place ops (see the module docstring; may be a new program), and the
    nodes the direct rewrite created (their ``meta["val"]`` is the in-place op's, to check)."""
    if not any(is_mutating(n) for n in ep.graph.nodes):
        return ep, []
    plans = _plan(ep)
    if plans is None:
        return ep.run_decompositions({}), []
    return ep, _rewrite(ep, plans)
