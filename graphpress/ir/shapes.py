"""Shape analyses: fake-tensor propagation and symbolic dimensions.

``propagate_shapes`` re-runs nodes on fake tensors in the FakeTensorMode the graph already
carries (a second mode inside one graph would mix symbols from two shape environments) and
writes ``meta["val"]``. Nodes that had a value keep the same shape and dtype if the pass that ran
before left the metadata true; a disagreement is stale metadata and is reported, not overwritten
silently.

Full or from the touched nodes. Without ``touched`` every node is re-run. With ``touched`` (the
nodes a pass added, rewired or gave a new ``meta["val"]``, and the placeholders of weights it
replaced: :attr:`graphpress.pipeline.fingerprint.Diff.touched`) and ``previous`` (each node's
``meta["val"]`` before the pass), only the touched nodes are re-run, then, in graph order, the
users of every node whose recomputed value differs from its previous one in shape, stride,
dtype, device or layout. Each re-run node is checked against its stored metadata as in the full
propagation, so a pass that leaves a wrong value on a node it touched, or a stale one on a node
downstream of a change, is caught.

Why that equals the full propagation: before the pass every node's metadata was what the full
propagation computes (checked after the previous pass, or by the first full propagation). A
node's fake value is a function of its op, its target, its arguments and its argument nodes'
values. A node that is not touched has the same op, target and arguments; if none of its
argument nodes' values changed, its value is unchanged, so it needs no re-run; induction over
graph order covers every node. The argument fails, and ``propagate_shapes`` falls back to the
full propagation, in two cases:

* a mutating op anywhere in the graph (``aten.add_``, ``resize_``, a schema with ``Tensor(a!)``):
  a node's value then also depends on the mutations run before it, which are not its arguments;
* nested graphs (``cond``, ``while_loop``, ``invoke_subgraph``): a pass can edit a subgraph
  without touching a node of the outer graph, and the fingerprint sees only the outer graph.

A data-dependent size (an unbacked symbol) gets a fresh symbol on every re-run, in either mode.

With a dynamic dimension declared at trace time, sizes are ``SymInt``s whose ``node.expr`` is a
sympy expression over the input symbols (``s0``, ``2*s0``, ...); ``symbolic_shapes`` exposes them.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterable, Mapping
from functools import cache
from typing import TYPE_CHECKING, Any

import sympy
import torch
from torch._guards import detect_fake_mode
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorConfig, FakeTensorMode
from torch.fx import GraphModule, Node
from torch.fx.passes.fake_tensor_prop import FakeTensorProp
from torch.utils import _pytree as pytree

from graphpress.errors import MetadataError

if TYPE_CHECKING:
    from graphpress.ir.program import Program

__all__ = ["fake_mode_of", "fake_over_meta", "needs_full_propagation", "no_dispatch_modes",
           "propagate_shapes", "symbolic_shapes", "value_key", "value_signature"]

# mode -> {(device, is_param): the attribute state FakeTensor's constructor gives a new tensor}
_FAKE_STATE: weakref.WeakKeyDictionary[FakeTensorMode, dict[tuple[torch.device, bool],
                                                            dict[str, Any]]] = (
    weakref.WeakKeyDictionary())


def fake_mode_of(program: Program) -> FakeTensorMode:
    """The FakeTensorMode of the graph's placeholders (created once if the graph has none)."""
    first = next((v for n in program.nodes("placeholder")
                  if isinstance(v := n.meta.get("val"), FakeTensor)), None)
    mode = detect_fake_mode([first] if first is not None else [])   # they share one mode
    if mode is None:
        mode = program.graph_module.meta.setdefault("graphpress_fake_mode", FakeTensorMode())
    return mode


def fake_over_meta(mode: FakeTensorMode, elem: torch.Tensor, device: torch.device, *,
                   is_param: bool = False) -> FakeTensor:
    """``FakeTensor(mode, elem, device, _is_param=is_param)`` for a plain meta tensor ``elem``,
    about 2x faster (5-9 µs against 12-15 on this machine).

    The constructor makes the subclass instance over ``elem`` with the fake device's dispatch
    keys, flags its data pointer, then sets Python attributes that are the same for every tensor
    of one mode, device and parameter flag: the mode, the normalised device, no constant, no
    real tensor, empty memos. The first call for each (mode, device, flag) runs the constructor
    and keeps that attribute state; later calls make the instance the same way and copy the
    state (``tests/ir/test_shapes.py`` checks the two agree in type, attributes, dispatch keys,
    sizes, strides, dtype, device and ``requires_grad``). With FakeTensor's debug tracebacks
    on, or while exporting (its constructor then tracks tensors), the constructor runs."""
    states = _FAKE_STATE.get(mode)
    if states is None:
        states = _FAKE_STATE[mode] = {}
    state = states.get((device, is_param))
    if state is None or FakeTensorConfig.debug or torch.compiler.is_exporting():
        value = FakeTensor(mode, elem, device, _is_param=is_param)
        if value.fake_device == device:     # "cuda" means the current device: not cached
            states[(device, is_param)] = dict(value.__dict__)
        return value
    if not elem.is_meta:
        raise ValueError(f"fake_over_meta needs a meta tensor, got one on {elem.device}")
    value = torch.Tensor._make_subclass(FakeTensor, elem, elem.requires_grad,
                                        dispatch_device=True, device_for_backend_keys=device)
    if mode._allow_unsafe_data_ptr_access:
        torch._C._set_warn_deprecated_on_mutable_data_ptr(value)
    else:
        torch._C._set_throw_on_mutable_data_ptr(value)
    if value.__dict__:      # not so in this torch: keep what the subclass maker set
        value.__dict__.update(state)
    else:                   # a presized copy, several times faster than filling a new dict
        value.__dict__ = state.copy()
    return value


def no_dispatch_modes() -> Any:
    """A context without dispatch modes, to build plain meta tensors (entering the disabling
    context costs ~10 µs, so it is skipped when no mode is active)."""
    if torch._C._len_torch_dispatch_stack() == 0:
        return contextlib.nullcontext()
    return torch.utils._python_dispatch._disable_current_modes()


def value_signature(val: Any) -> Any:
    """A comparable summary of a meta value: shapes and dtypes of tensors, sizes as strings."""
    def one(v: Any) -> Any:
        if isinstance(v, torch.Tensor):
            return ("tensor", tuple(str(s) for s in v.shape), v.dtype)
        if isinstance(v, torch.SymInt | torch.SymFloat | torch.SymBool):
            return ("sym", type(v).__name__)
        return ("py", type(v).__name__)
    return pytree.tree_map(one, val)


def propagate_shapes(program: Program, *, who: str = "", check: bool = True,
                     touched: Iterable[Node] | None = None,
                     previous: Mapping[Node, Any] | None = None) -> list[str]:
    """Recompute ``meta["val"]``; return the names of nodes that had none.

    With ``check`` (what the PassManager does after each pass), a node whose existing metadata
    disagrees with the recomputed one raises MetadataError. A pass that changes shapes on
    purpose (pruning) refreshes them itself with ``check=False``. With ``touched`` and
    ``previous``, only the touched nodes and the users of changed values are re-run (see the
    module docstring, which also names the graphs that always get the full propagation).
    """
    who = f" after {who}" if who else ""
    if touched is None or previous is None or needs_full_propagation(program):
        return _propagate_all(program, who, check)
    return _propagate_from(program, set(touched), previous, who, check)


def needs_full_propagation(program: Program) -> bool:
    """Whether a change can alter values beyond its touched nodes' users: the graph has a
    mutating op or a nested graph (see the module docstring)."""
    if any(isinstance(m, GraphModule) for m in program.graph_module.children()):
        return True
    return any(node.op == "call_function" and _mutating(node.target)
               for node in program.graph.nodes)


@cache
def _mutating(target: Any) -> bool:
    if isinstance(target, torch._ops.HigherOrderOperator):
        return True
    return isinstance(target, torch._ops.OpOverload) and target._schema.is_mutable


def _stale(node: Node, had: Any, who: str) -> MetadataError:
    return MetadataError(
        f"stale shape metadata{who}: node {node.name!r} ({node.target}) had "
        f"{value_signature(had)} but computes {value_signature(node.meta['val'])}")


def _inputs(program: Program, who: str) -> list[Any]:
    inputs = []
    for node in program.nodes("placeholder"):
        if "val" not in node.meta:
            raise MetadataError(f"placeholder {node.name!r} has no meta['val']{who}")
        inputs.append(node.meta["val"])
    return inputs


def _propagate_all(program: Program, who: str, check: bool) -> list[str]:
    mode = program.fake_mode()
    before = {n: n.meta["val"] for n in program.graph.nodes if "val" in n.meta}
    FakeTensorProp(program.graph_module, mode).propagate_dont_convert_inputs(
        *_inputs(program, who))
    filled = []
    for node in program.graph.nodes:
        if node.op in ("output", "placeholder"):
            continue
        if node not in before:
            filled.append(node.name)
        elif check and value_signature(before[node]) != value_signature(node.meta.get("val")):
            raise _stale(node, before[node], who)
    return filled


def _propagate_from(program: Program, touched: set[Node], previous: Mapping[Node, Any],
                    who: str, check: bool) -> list[str]:
    mode = program.fake_mode()
    runner = FakeTensorProp(program.graph_module, mode)
    pending, filled = touched, []
    with mode:
        for node in program.graph.nodes:
            if node not in pending:
                continue
            if node.op == "placeholder":
                if "val" not in node.meta:
                    raise MetadataError(f"placeholder {node.name!r} has no meta['val']{who}")
            else:
                for arg in node.all_input_nodes:
                    if arg not in runner.env:
                        runner.env[arg] = (arg.meta["val"] if "val" in arg.meta
                                           else runner.run_node(arg))
                had = node.meta.get("val")
                runner.env[node] = runner.run_node(node)
                if node.op == "output":
                    continue
                if had is None:
                    filled.append(node.name)
                elif check and value_signature(had) != value_signature(node.meta.get("val")):
                    raise _stale(node, had, who)
            was = previous.get(node)
            if was is None or value_key(was) != value_key(node.meta.get("val")):
                pending.update(node.users)
    return filled


def value_key(val: Any) -> Any:
    """What a user's fake value can depend on: shapes, strides, dtype, device, layout."""
    def sizes(values: Any) -> tuple[Any, ...]:
        return tuple(s if type(s) is int else str(s) for s in values)

    def one(v: Any) -> Any:
        if isinstance(v, torch.Tensor):
            strides = sizes(v.stride()) if v.layout == torch.strided else ()
            return ("tensor", sizes(v.shape), strides, v.dtype, v.device, v.layout)
        if isinstance(v, torch.SymInt | torch.SymFloat | torch.SymBool):
            return ("sym", str(v))
        if isinstance(v, int | float | bool | str | type(None)):
            return ("py", type(v).__name__, v)
        return ("py", type(v).__name__)
    return pytree.tree_map(one, val)


def _expr(size: Any) -> sympy.Expr | int:
    if isinstance(size, torch.SymInt):
        return size.node.expr
    return int(size)


def symbolic_shapes(program: Program) -> dict[str, tuple[sympy.Expr | int, ...]]:
    """Shape of every tensor-valued node as sympy expressions (ints where static)."""
    shapes: dict[str, tuple[sympy.Expr | int, ...]] = {}
    for node in program.graph.nodes:
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor):
            shapes[node.name] = tuple(_expr(s) for s in val.shape)
    return shapes
