"""Shape analyses: fake-tensor propagation and symbolic dimensions.

``propagate_shapes`` re-runs every node on fake tensors in the FakeTensorMode the graph already
carries (a second mode inside one graph would mix symbols from two shape environments) and
writes ``meta["val"]``. Nodes that had a value keep the same shape and dtype if the pass that ran
before left the metadata true; a disagreement is stale metadata and is reported, not overwritten
silently.

With a dynamic dimension declared at trace time, sizes are ``SymInt``s whose ``node.expr`` is a
sympy expression over the input symbols (``s0``, ``2*s0``, ...); ``symbolic_shapes`` exposes them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import sympy
import torch
from torch._guards import detect_fake_mode
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.passes.fake_tensor_prop import FakeTensorProp
from torch.utils import _pytree as pytree

from graphpress.errors import MetadataError

if TYPE_CHECKING:
    from graphpress.ir.program import Program

__all__ = ["fake_mode_of", "propagate_shapes", "symbolic_shapes", "value_signature"]


def fake_mode_of(program: Program) -> FakeTensorMode:
    """The FakeTensorMode of the graph's placeholders (created once if the graph has none)."""
    vals = [n.meta.get("val") for n in program.nodes("placeholder")]
    mode = detect_fake_mode([v for v in vals if v is not None])
    if mode is None:
        mode = program.graph_module.meta.setdefault("graphpress_fake_mode", FakeTensorMode())
    return mode


def value_signature(val: Any) -> Any:
    """A comparable summary of a meta value: shapes and dtypes of tensors, sizes as strings."""
    def one(v: Any) -> Any:
        if isinstance(v, torch.Tensor):
            return ("tensor", tuple(str(s) for s in v.shape), v.dtype)
        if isinstance(v, torch.SymInt | torch.SymFloat | torch.SymBool):
            return ("sym", type(v).__name__)
        return ("py", type(v).__name__)
    return pytree.tree_map(one, val)


def propagate_shapes(program: Program, *, who: str = "", check: bool = True) -> list[str]:
    """Recompute ``meta["val"]`` of every node; return the names of nodes that had none.

    With ``check`` (what the PassManager does after each pass), a node whose existing metadata
    disagrees with the recomputed one raises MetadataError. A pass that changes shapes on
    purpose (pruning) refreshes them itself with ``check=False``.
    """
    mode = program.fake_mode()
    before = {n: value_signature(n.meta["val"]) for n in program.graph.nodes if "val" in n.meta}
    inputs = []
    for node in program.nodes("placeholder"):
        if "val" not in node.meta:
            raise MetadataError(f"placeholder {node.name!r} has no meta['val']"
                                + (f" after {who}" if who else ""))
        inputs.append(node.meta["val"])
    FakeTensorProp(program.graph_module, mode).propagate_dont_convert_inputs(*inputs)
    filled = []
    for node in program.graph.nodes:
        if node.op in ("output", "placeholder"):
            continue
        if node not in before:
            filled.append(node.name)
        elif check and before[node] != value_signature(node.meta.get("val")):
            raise MetadataError(
                f"stale shape metadata{' after ' + who if who else ''}: node {node.name!r} "
                f"({node.target}) had {before[node]} but computes "
                f"{value_signature(node.meta['val'])}"
            )
    return filled


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
