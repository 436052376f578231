"""Per-op channel rules of the dependency analysis (see ``solver.py`` for the invariant).

A rule maps the layouts of an op's inputs to the layouts of its outputs, unifying dimensions that
must stay aligned and blocking dimensions whose channels the op mixes (normalised, reduced,
reshaped together with another dimension). Rules are keyed by the namespace-qualified op name:
``RULES`` holds the rules of ``aten`` ops (by their bare name), an op of another namespace gets
only the ``channel_rule`` of its entry in the graphpress op registry (``mylib::linear`` never
gets ``aten::linear``'s rule). An op without a rule blocks every dimension of its inputs and
outputs, naming the op and the node.

Sizes are read by their hints: a symbolic size (a dynamic batch) is never specialised, so the
analysis adds no guard to the program's shape environment.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch.fx import Node
from torch.fx.experimental.symbolic_shapes import optimization_hint
from torch.utils import _pytree as pytree

from graphpress.analysis.channels.views import view_rule
from graphpress.ir.graph import get_arg
from graphpress.ir.purity import qualified_name

if TYPE_CHECKING:
    from graphpress.analysis.channels.solver import Layout, Tracer
    from graphpress.ir.program import Program

__all__ = ["RULES", "UNARY", "propagate", "rule_for"]

Rule = Callable[["Tracer", Node, "Program"], Any]
RULES: dict[str, Rule] = {}

UNARY = (
    "relu", "relu_", "gelu", "silu", "silu_", "sigmoid", "tanh", "neg", "abs", "exp", "log",
    "sqrt", "rsqrt", "hardtanh", "hardtanh_", "hardswish", "hardswish_", "hardsigmoid",
    "leaky_relu", "elu", "dropout", "clone", "contiguous", "alias", "detach", "_to_copy", "to",
    "lift_fresh_copy", "erf", "sin", "cos", "relu6", "mish", "gelu_", "clamp", "clamp_min",
    "type_as",
)
_BINARY = ["add", "sub", "mul", "div", "maximum", "minimum", "where", "rsub", "pow", "add_",
           "sub_", "mul_", "div_", "masked_fill", "masked_fill_"]


def rule(*names: str) -> Callable[[Rule], Rule]:
    def register(fn: Rule) -> Rule:
        for name in names:
            RULES[name] = fn
        return fn
    return register


def op_name(node: Node) -> str:
    """The op's name: bare for ``aten`` ops (``linear``), qualified for others (``mylib::op``)."""
    target = node.target
    name = _OP_NAMES.get(target)
    if name is None:
        name = _OP_NAMES[target] = _target_name(target)
    return name


_OP_NAMES: dict[Any, str] = {}     # op targets are interned (OpOverload, builtins): never freed


def _target_name(target: Any) -> str:
    if target is operator.getitem:
        return "getitem"
    qualified = qualified_name(target)
    if qualified:
        return qualified.removeprefix("aten::")
    return str(getattr(target, "__name__", target))


def rule_for(node: Node) -> Rule | None:
    """The channel rule of a node's op, or None (the op then blocks what it touches)."""
    if node.target is operator.getitem:
        return view_rule
    namespace, _, name = qualified_name(node.target).partition("::")
    if namespace == "aten":
        return RULES.get(name, view_rule if name in _VIEWS else None)
    return _registered_rule(f"{namespace}::{name}") if name else None


def _registered_rule(qualified: str) -> Rule | None:
    try:
        from graphpress.ops.registry import lookup
    except ImportError:         # no op library: custom ops have no rule
        return None
    entry = lookup(qualified)
    return entry.channel_rule if entry is not None else None


def size(n: Any) -> int:
    """A size as an int; a symbolic one by its hint, without guarding on it."""
    return optimization_hint(n) if isinstance(n, torch.SymInt) else int(n)


def shape(node: Any) -> tuple[int, ...]:
    dims = node.meta["val"].shape
    for s in dims:
        if type(s) is not int:      # symbolic: every size by its hint
            return tuple(map(size, dims))
    return tuple(dims)


def dims(t: Tracer, node: Node) -> list[Layout | None]:
    """The layouts of a tensor argument; a weight's unbound axes are ``None``."""
    if node.name in t.weights:
        return t.weights[node.name]
    return t.values[node.name]  # type: ignore[return-value]


def dim(t: Tracer, node: Node, axis: int, program: Program) -> Layout:
    """One dimension's layout; an unbound weight axis gets fresh symbols that create channels."""
    layouts = dims(t, node)
    if layouts[axis] is None:
        layouts[axis] = t.created(node.name, axis, shape(node)[axis])
    return layouts[axis]  # type: ignore[return-value]


def link(t: Tracer, node: Node, axis: int, layout: Layout, where: str) -> Layout:
    """Make ``node``'s dimension ``axis`` the same channels as ``layout``."""
    layouts = dims(t, node)
    if layouts[axis] is None:
        layouts[axis] = layout
        return layout
    return t.unify(layouts[axis], layout, where)  # type: ignore[arg-type]


def block_all(t: Tracer, node: Node, reason: str, program: Program) -> None:
    for a in node.all_input_nodes:
        if isinstance(a.meta.get("val"), torch.Tensor):
            t.block([dim(t, a, i, program) for i in range(a.meta["val"].dim())], reason)


def fixed_like(t: Tracer, node: Node, reason: str) -> Any:
    """Fixed layouts for every output (a tuple of them for an op with several outputs)."""
    def one(v: Any) -> Any:
        return [t.fixed(size(s), reason) for s in v.shape] if isinstance(v, torch.Tensor) else None
    val = node.meta.get("val")
    return tuple(one(v) for v in val) if isinstance(val, list | tuple) else one(val)


def propagate(program: Program, t: Tracer, rules: dict[Any, Rule | None] | None = None) -> None:
    """One round: layouts for every node in order; inputs and outputs are fixed. ``rules``
    caches each target's rule across the rounds of one analysis."""
    from graphpress.analysis.channels.zeros import zero_symbols

    rules = {} if rules is None else rules
    weights = program.weight_placeholders()
    for node in program.graph.nodes:
        if node.op == "placeholder":
            weight = weights.get(node.name)
            if weight is not None:
                t.weights[node.name] = [None] * node.meta["val"].dim()
                t.values[node.name] = t.weights[node.name]
                t.names[node.name] = weight
                t.placeholders[node.name] = node
            else:
                t.values[node.name] = fixed_like(t, node, f"model input {node.name}")
        elif node.op == "call_function":
            if node.target not in rules:
                rules[node.target] = rule_for(node)
            fn = rules[node.target]
            if fn is None:
                reason = f"no channel rule for {op_name(node)} (node {node.name})"
                block_all(t, node, reason, program)
                t.values[node.name] = fixed_like(t, node, reason)
            else:
                t.values[node.name] = fn(t, node, program)
                t.zero[node.name] = zero_symbols(t, node, fn is view_rule)
        elif node.op == "output":
            outs = [a for a in pytree.tree_leaves(node.args) if isinstance(a, Node)]
            for out in outs:
                if isinstance(out.meta.get("val"), torch.Tensor):
                    layouts = [dim(t, out, i, program) for i in range(out.meta["val"].dim())]
                    t.block(layouts, f"model output {out.name}")


_VIEWS = {"view", "reshape", "_unsafe_view", "flatten", "unflatten", "squeeze", "unsqueeze",
          "expand", "expand_as", "reshape_as", "view_as", "permute", "transpose", "t", "select",
          "slice", "narrow", "cat", "split", "split_with_sizes", "chunk", "getitem", "unbind"}


@rule(*UNARY)
def _unary(t: Tracer, node: Node, program: Program) -> Any:
    x = node.args[0]
    return [dim(t, x, i, program) for i in range(x.meta["val"].dim())]


@rule(*_BINARY)
def _binary(t: Tracer, node: Node, program: Program) -> Any:
    out = shape(node)
    rank = len(out)
    operands = [(a, shape(a)) for a in node.args if isinstance(a, Node)
                and isinstance(a.meta.get("val"), torch.Tensor)]
    where = f"{op_name(node)} (node {node.name})"
    result = []
    for i, n in enumerate(out):
        aligned = [(a, ax) for a, sizes in operands
                   if (ax := len(sizes) - rank + i) >= 0 and sizes[ax] == n]
        if not aligned:
            result.append(t.fixed(n, f"broadcast in {where}"))
            continue
        base = next((dims(t, a)[ax] for a, ax in aligned if dims(t, a)[ax] is not None), None)
        if base is None:
            base = dim(t, *aligned[0], program)
        for a, ax in aligned:
            link(t, a, ax, base, where)
        result.append(base)
    return result


@rule("adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d", "avg_pool1d",
      "avg_pool2d", "avg_pool3d", "max_pool1d", "max_pool2d", "max_pool3d", "upsample_nearest2d",
      "upsample_bilinear2d", "pad", "constant_pad_nd")
def _pool(t: Tracer, node: Node, program: Program) -> Any:
    x = node.args[0]
    where = f"{op_name(node)} (node {node.name})"
    k = node.meta["val"].dim()
    spatial = {"1d": 1, "2d": 2, "3d": 3}.get(op_name(node)[-2:], 0)
    if op_name(node) in ("pad", "constant_pad_nd"):
        spatial = len(node.args[1]) // 2
    keep = list(dims(t, x))[: k - spatial]
    t.block(list(dims(t, x))[k - spatial:], f"spatial dim of {where}")
    return keep + [t.fixed(n, f"spatial dim of {where}") for n in shape(node)[k - spatial:]]


@rule("mean", "sum", "amax", "amin", "max", "min", "softmax", "_softmax", "log_softmax",
      "_log_softmax", "var", "std", "cumsum", "argmax", "argmin", "norm", "linalg_vector_norm",
      "linalg_norm")
def _reduce(t: Tracer, node: Node, program: Program) -> Any:
    x = node.args[0]
    name = op_name(node)
    where = f"{name} (node {node.name})"
    rank = x.meta["val"].dim()
    layouts = list(dims(t, x))
    axes = get_arg(node, "dim", missing=None)  # overloads without dim reduce over everything
    if axes is None or axes == [] or not isinstance(node.meta["val"], torch.Tensor):
        axes = list(range(rank))
    axes = {a % rank for a in ([axes] if isinstance(axes, int) else axes)}
    reduced = axes
    if t.hidden and name == "mean" and len(axes) == 1 \
            and any(s not in t.opaque for s, _ in layouts[min(axes)]):
        t.normalized[node.name] = min(axes)     # width pruning: a mean over the kept channels
        reduced = set()
    t.block([layouts[a] for a in reduced if not _sums_zeros(t, node, layouts[a])],
            f"{where} reduces over this dimension")
    if name in ("softmax", "_softmax", "log_softmax", "_log_softmax", "cumsum"):
        return layouts
    out = shape(node)
    if not isinstance(node.meta["val"], torch.Tensor):
        return fixed_like(t, node, f"reduction {where}")
    if len(out) == rank:
        return [t.fixed(1, where) if a in axes else layouts[a] for a in range(rank)]
    return [layouts[a] for a in range(rank) if a not in axes]


def _sums_zeros(t: Tracer, node: Node, layout: Layout) -> bool:
    """Whether a reduction over ``layout`` adds exactly 0 for removed channels: a sum, mean
    (rewritten to keep its count) or p-norm (``p > 0``) over channels that are zero in the masked
    original (``zeros.py``)."""
    from graphpress.analysis.channels.zeros import is_zero

    name = op_name(node)
    if name in ("linalg_vector_norm", "norm"):
        p = get_arg(node, "ord" if name == "linalg_vector_norm" else "p", missing=None)
        if not isinstance(p, int | float) or p <= 0:
            return False
    elif name not in ("sum", "mean") or get_arg(node, "dim", missing=None) in (None, []):
        return False
    return any(s not in t.opaque for s, _ in layout) and is_zero(t, node.args[0], layout)


@rule("gather", "index_select")
def _gather(t: Tracer, node: Node, program: Program) -> Any:
    x, d = node.args[0], node.args[1]
    where = f"{op_name(node)} (node {node.name})"
    rank = x.meta["val"].dim()
    d %= rank
    layouts = [dim(t, x, i, program) for i in range(rank)]
    t.block([layouts[d]], f"{where} indexes along this dimension")
    out = []
    for i, n in enumerate(shape(node)):
        if i != d and shape(x)[i] == n:
            if op_name(node) == "gather":
                link(t, node.args[2], i, layouts[i], where)
            out.append(layouts[i])
        else:
            out.append(t.fixed(n, where))
    return out


@rule("index", "_unsafe_index")
def _index(t: Tracer, node: Node, program: Program) -> Any:
    """``x[..., idx, ...]`` with index tensors on some dims (``None`` on the others): the indexed
    dims are blocked (the result mixes their channels), the index tensors' dims are fixed, and
    every other dim passes. Its channels are then those of the table: a constant index into a
    learned bias table ``[entries, heads]`` (relative position bias) leaves the head axis free to
    couple with the attention heads it is added to. The indexed dims are replaced by the index
    tensors' broadcast shape, in place when they are adjacent and in front otherwise (NumPy's
    advanced-indexing rule)."""
    x, indices = node.args[0], list(node.args[1])
    where = f"{op_name(node)} (node {node.name})"
    rank = x.meta["val"].dim()
    layouts = [dim(t, x, i, program) for i in range(rank)]
    indexed = [i for i, idx in enumerate(indices) if idx is not None]
    for i in indexed:
        t.block([layouts[i]], f"{where} indexes along this dimension")
        idx = indices[i]    # a constant index (a buffer) has no channels; a computed one is fixed
        if isinstance(idx, Node) and idx.name not in t.weights:
            t.block([dim(t, idx, j, program) for j in range(idx.meta["val"].dim())],
                    f"index tensor of {where}")
    out = shape(node)
    broadcast = len(out) - (rank - len(indexed))
    new = [t.fixed(n, where) for n in out[:broadcast]] if broadcast >= 0 else []
    rest = [layouts[i] for i in range(rank) if i not in indexed]
    if indexed and indexed == list(range(indexed[0], indexed[-1] + 1)):
        before = [layouts[i] for i in range(indexed[0])]
        new = [t.fixed(n, where) for n in out[len(before):len(before) + broadcast]]
        return [*before, *new, *rest[len(before):]]
    return [*new, *rest]


@rule("_assert_tensor_metadata", "_assert_scalar", "sym_constrain_range_for_size")
def _no_value(t: Tracer, node: Node, program: Program) -> Any:
    return None      # checks dtype/device only: no tensor result, no channel constraint


@rule("sym_size")
def _sym_size(t: Tracer, node: Node, program: Program) -> Any:
    """Reading a size (a dynamic one: static sizes are constants) pins that dimension."""
    x, d = node.args[0], node.args[1]
    t.block([dim(t, x, d % x.meta["val"].dim(), program)], f"sym_size (node {node.name}) reads "
            "this size")
    return None


@rule("repeat_interleave")
def _repeat_interleave(t: Tracer, node: Node, program: Program) -> Any:
    """``repeat_interleave(x, g, dim)`` repeats each element g times: channels span g times more."""
    x, repeats, d = node.args[0], node.args[1], get_arg(node, "dim", missing=None)
    where = f"repeat_interleave (node {node.name})"
    if not isinstance(x, Node) or not isinstance(repeats, int) or d is None:
        block_all(t, node, f"{where} with tensor repeats or no dim", program)
        return fixed_like(t, node, where)
    rank = x.meta["val"].dim()
    layouts = [dim(t, x, i, program) for i in range(rank)]
    d %= rank
    layouts[d] = tuple((s, r * repeats) for s, r in layouts[d])
    return layouts


# the layer and contraction rules register themselves on import
from graphpress.analysis.channels import contractions as _contractions  # noqa: E402, F401
from graphpress.analysis.channels import layers as _layers  # noqa: E402, F401
