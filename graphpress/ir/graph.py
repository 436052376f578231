"""Generic helpers over the ATen graph of a Program: arguments, inputs, views, erasure.

* One argument accessor: :func:`get_arg` reads an argument of an op call by its schema name or
  position, whether it was passed positionally, by keyword, or left to its default;
  :func:`set_arg` writes one the same way.
* One way to list the nodes a node reads: :func:`inputs_of` (each input node once, in argument
  order; literals are not nodes).
* A *view* moves data without changing values: reshapes, flatten/unflatten, (un)squeeze,
  permute/transpose, a shape- and dtype-preserving clone/alias/detach/``to`` and eval-mode
  dropout. :func:`view_source` walks up through views; :func:`follow_axis` says where an axis
  goes through one, or None when the view merges or splits it.
* A user that reads only a value's shape (``reshape_as``'s template, ``sym_size``) does not
  use its values: :func:`reads_only_metadata`.
* :func:`erase_unused` removes nodes nobody uses, and what only they used: pure nodes and weights
  (through :meth:`Program.remove_weight`, so the signature stays in step); impure nodes stay.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
from torch.fx import Node
from torch.fx.experimental.symbolic_shapes import statically_known_true

from graphpress.ir.purity import is_pure

if TYPE_CHECKING:
    from graphpress.ir.program import Program

__all__ = ["erase_unused", "follow_axis", "get_arg", "inputs_of", "is_view",
           "reads_only_metadata", "set_arg", "view_source"]

aten = torch.ops.aten
_RESHAPES = {aten.view.default, aten.reshape.default, aten._unsafe_view.default,
             aten.flatten.using_ints, aten.unflatten.int, aten.squeeze.default, aten.squeeze.dim,
             aten.squeeze.dims, aten.unsqueeze.default, aten.reshape_as.default,
             aten.view_as.default}
_PERMUTES = {aten.permute.default, aten.transpose.int, aten.t.default}
_METADATA = {aten.sym_size.int, aten.sym_numel.default, aten.sym_stride.int,
             aten.sym_storage_offset.default}
_SHAPE_OF_OTHER = {aten.reshape_as.default, aten.view_as.default, aten.expand_as.default}
_IDENTITIES = {aten.clone.default, aten.alias.default, aten.detach.default, aten.to.dtype,
               aten.to.dtype_layout, aten._to_copy.default}


def _schema_index(node: Node, key: str | int) -> tuple[int, Any]:
    schema = getattr(node.target, "_schema", None)
    if schema is None:
        raise TypeError(f"node {node.name!r} calls {node.target!r}, which has no schema; "
                        "read its node.args directly")
    arguments = schema.arguments
    if isinstance(key, int):
        if not 0 <= key < len(arguments):
            raise IndexError(f"{node.target} has {len(arguments)} arguments, no position {key}")
        return key, arguments[key]
    for index, argument in enumerate(arguments):
        if argument.name == key:
            return index, argument
    names = ", ".join(a.name for a in arguments)
    raise KeyError(f"{node.target} has no argument {key!r} (its arguments: {names})")


_REQUIRED = object()
_NO_ARGUMENT = object()
# (op, key) -> (position, name, default) of a schema argument, or _NO_ARGUMENT; ops are interned
_ARGUMENTS: dict[tuple[Any, str | int], Any] = {}


def _argument(node: Node, key: str | int) -> Any:
    """``(position, name, default)`` of argument ``key`` of the node's op (read from the schema
    once per op and key, which builds Python objects for every argument), or _NO_ARGUMENT."""
    cache_key = (node.target, key)
    found = _ARGUMENTS.get(cache_key)
    if found is None:
        schema = getattr(node.target, "_schema", None)
        names = [a.name for a in schema.arguments] if schema is not None else []
        if (key not in names) if isinstance(key, str) else not 0 <= key < len(names):
            found = _NO_ARGUMENT
        else:
            index, argument = _schema_index(node, key)
            default = argument.default_value if argument.has_default_value() else None
            found = (index, argument.name, default)
        if schema is not None:
            _ARGUMENTS[cache_key] = found
    return found


def get_arg(node: Node, key: str | int, *, missing: Any = _REQUIRED) -> Any:
    """Argument ``key`` (schema name or position) of an op call: positional, keyword, or its
    schema default (None when it has none). An overload without that argument (``aten.max``
    without ``dim``) is an error, or ``missing`` when given."""
    found = _argument(node, key)
    if found is _NO_ARGUMENT:
        if missing is not _REQUIRED:
            return missing
        _schema_index(node, key)    # raises, naming the op and its arguments
    index, name, default = found
    if index < len(node.args):
        return node.args[index]
    if name in node.kwargs:
        return node.kwargs[name]
    return list(default) if isinstance(default, list) else default     # callers may edit it


def set_arg(node: Node, key: str | int, value: Any) -> None:
    """Set argument ``key`` (schema name or position) of an op call, where it was passed (a
    keyword if it was left to its default and is not the next positional one)."""
    index, argument = _schema_index(node, key)
    if index < len(node.args):
        node.update_arg(index, value)
    elif index == len(node.args) and argument.name not in node.kwargs:
        node.args = (*node.args, value)
    else:
        node.update_kwarg(argument.name, value)


def inputs_of(node: Node) -> list[Node]:
    """The nodes ``node`` reads (args and kwargs, nested lists included), each once, in order."""
    return node.all_input_nodes


def is_view(node: Node) -> bool:
    """Whether ``node`` only moves the data of its first argument (see the module docstring)."""
    if node.op != "call_function" or not node.args or not isinstance(node.args[0], Node):
        return False
    target = node.target
    if target is aten.dropout.default:
        return not get_arg(node, "train")
    if target in _IDENTITIES:
        before, after = node.args[0].meta.get("val"), node.meta.get("val")
        return (isinstance(before, torch.Tensor) and isinstance(after, torch.Tensor)
                and before.dtype == after.dtype and before.shape == after.shape)
    return target in _RESHAPES or target in _PERMUTES


def view_source(node: Node) -> list[Node]:
    """The chain of views ending at ``node``, starting at the first value that is not a view:
    ``[source, view_1, ..., node]`` (just ``[node]`` if ``node`` is no view)."""
    path = [node]
    while is_view(path[0]):
        path.insert(0, path[0].args[0])
    return path


def reads_only_metadata(user: Node, value: Node) -> bool:
    """Whether ``user`` reads only the shape of ``value`` (``y.reshape_as(value)``,
    ``sym_size(value)``), so a rewrite that keeps shapes does not change what it computes."""
    return user.target in _METADATA or (user.target in _SHAPE_OF_OTHER
                                         and user.args[0] is not value)


def follow_axis(view: Node, axis: int) -> int | None:
    """The axis of ``view``'s output holding axis ``axis`` of its input, or None if the view
    merges or splits that axis (or the shapes do not prove it, with symbolic sizes)."""
    source, out = view.args[0].meta["val"].shape, view.meta["val"].shape
    target = view.target
    if target is aten.permute.default:
        return [d % len(source) for d in view.args[1]].index(axis)
    if target in (aten.transpose.int, aten.t.default):
        first, second = ((view.args[1] % len(source), view.args[2] % len(source))
                         if target is aten.transpose.int else (0, 1 if len(source) == 2 else 0))
        return second if axis == first else first if axis == second else axis
    if target not in _RESHAPES:
        return axis
    # Row-major reshape: output axis j holds input axis `axis` if the axes before each have the
    # same number of elements and the axes themselves the same size.
    before, size, elements = math.prod(source[:axis]), source[axis], 1
    for j, dim in enumerate(out):
        if statically_known_true(elements == before) and statically_known_true(dim == size):
            return j
        elements = elements * dim
    return None


def erase_unused(program: Program, nodes: list[Node]) -> set[Node]:
    """Remove ``nodes`` and what only they used, as far as nothing else uses them; returns the
    erased nodes. Weights go through ``remove_weight``; impure nodes are kept."""
    erased: set[Node] = set()
    stack = list(nodes)
    while stack:
        node = stack.pop()
        if node in erased or node.users:
            continue
        if program.is_weight(node):
            program.remove_weight(node)
        elif is_pure(node):
            stack.extend(inputs_of(node))
            program.graph.erase_node(node)
        else:
            continue
        erased.add(node)
    return erased
