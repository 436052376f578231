"""Shape metadata after pruning, built directly where it is known without fake-tensor dispatch.

Pruning changes sizes only: ranks, dtypes, devices and the op of every node stay. Running a node
on fake tensors costs 150-800 µs (FakeTensor's dispatch and its cache); a FakeTensor built over
a meta tensor costs about 15 µs. So, visiting in graph order only the nodes whose inputs changed
(the induction of :func:`graphpress.ir.shapes.propagate_shapes`), a node's new ``meta["val"]``
is built directly in these cases, and every other node runs on fake tensors as there:

* ``operator.getitem`` of a tuple value: the element;
* view ops (the schema's result aliases an input: view, permute, transpose, slice, split,
  expand, unsqueeze, ...): the op runs on plain meta tensors with the inputs' new sizes and
  strides (view kernels compute the output's sizes and strides from the input ones, at a few
  µs without the fake dispatch), and the results are wrapped as FakeTensors. The stride of a
  size-1 dimension is arbitrary, and the meta kernel of a view that computes strides (view,
  reshape, unsqueeze, ...) and the fake one carry an input's size-1 dimension over differently
  unless the input's strides are exactly the contiguous ones: such a view with a size-1
  dimension in its result and in an input that is not exactly contiguous takes the fake path.
  Views that only keep or reorder the input's strides (slice, select, permute, transpose,
  split, expand) do not depend on that choice. Two kinds are not even run: a permute or
  transpose reorders its input's sizes and strides, and ``view`` / ``reshape`` / ``flatten``
  of an input with exactly the contiguous strides has exactly the contiguous strides of its
  new sizes;
* ops whose output is contiguous when their inputs are (pointwise ops, convolution, matmuls,
  norms, softmax, reductions, padding, copies), when the output and every tensor input had
  contiguous strides before and every input has them now, and ``repeat_interleave``,
  ``embedding`` and ``gather`` (contiguous whatever their inputs): contiguous strides over the
  sizes the channel layouts give (each dimension's ``new_size`` of its atoms, the sizes the
  rewritten shape arguments also come from);
* the same ops, and attention whose query, key and value keep their sequence and head sizes
  (the kernel is chosen as before pruning), when the output was dense in some order of its
  dimensions and every input keeps its stride order, none with a size-1 dimension: dense
  strides in the output's previous order (CPU flash attention's output is a transpose).

The fake-tensor path sees the values the incremental propagation would: the stored value of a
node that did not change, and for a changed one its value with the ``requires_grad`` autograd
gives it in this run (any input requiring grad, a floating dtype, grad mode on). Some kernels
choose their output strides by it: CPU attention takes its math path, whose output is
contiguous, for inputs that require grad, and its flash path otherwise. Stored values keep the
``requires_grad`` they had before pruning.

Sizes that are symbolic, a dimension the layouts do not describe, a value that is not dense and
a node pruning added take the fake-tensor path. The PassManager re-runs every changed node on
fake tensors after the pass and raises on a size that differs, and
``tests/passes/prune/test_metadata.py`` compares sizes and strides with the incremental
fake-tensor propagation on every zoo model.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Mapping
from typing import Any

import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.fx import Node
from torch.fx.passes.fake_tensor_prop import FakeTensorProp

from graphpress.analysis.channels.views import new_size
from graphpress.ir.program import Program
from graphpress.ir.shapes import (
    fake_over_meta,
    needs_full_propagation,
    no_dispatch_modes,
    propagate_shapes,
    value_key,
)

__all__ = ["meta_view_strides_agree", "refresh_pruned_shapes"]

aten = torch.ops.aten
_META = torch.device("meta")

# Output contiguous whenever every tensor input is (besides ops tagged pointwise).
_CONTIGUOUS_OUT = {
    aten.convolution.default, aten.conv1d.default, aten.conv2d.default, aten.conv3d.default,
    aten.linear.default, aten.addmm.default, aten.mm.default, aten.bmm.default,
    aten.matmul.default, aten.pad.default, aten.constant_pad_nd.default,
    aten.hardswish.default, aten.hardsigmoid.default,
    aten.layer_norm.default, aten.rms_norm.default, aten.group_norm.default,
    aten.batch_norm.default, aten.instance_norm.default,
    aten._softmax.default, aten.softmax.int, aten._log_softmax.default, aten.log_softmax.int,
    aten.mean.dim, aten.sum.dim_IntList, aten.amax.default, aten.linalg_vector_norm.default,
    aten.embedding.default, aten.clone.default, aten._to_copy.default, aten.dropout.default,
    aten.cat.default, aten.avg_pool2d.default, aten.max_pool2d.default,
    aten.adaptive_avg_pool2d.default, aten._adaptive_avg_pool2d.default,
}


# Output contiguous whatever the inputs' strides (each allocates its result at the index's or
# the repeated sizes; checked on random inputs in tests/passes/prune/test_metadata.py).
_ALWAYS_CONTIGUOUS = {aten.repeat_interleave.self_int, aten.embedding.default,
                      aten.gather.default}


# Views whose result strides are some of the input's, in some order (or 0 where expanded): the
# same in every kernel, size-1 dimensions included.
_STRIDES_KEPT = {
    aten.slice.Tensor, aten.select.int, aten.narrow.default, aten.permute.default,
    aten.transpose.int, aten.t.default, aten.split.Tensor, aten.split_with_sizes.default,
    aten.chunk.default, aten.unbind.int, aten.expand.default, aten.alias.default,
}


class _Refresh:
    """One pass over the changed nodes; ``grads`` holds the run's ``requires_grad`` of each
    value built directly, the runner's environment the values the fake path computed."""

    def __init__(self, program: Program, layouts: Mapping[str, Any], kept: Mapping[int, int],
                 previous: Mapping[Node, Any]) -> None:
        self.mode = program.fake_mode()
        self.graph_module = program.graph_module
        self._runner: FakeTensorProp | None = None   # built on the first node the fake path runs
        self.env: dict[Node, Any] = {}               # the values the fake path computed
        self.layouts, self.kept, self.previous = layouts, kept, previous
        self.grads: dict[Node, bool] = {}
        self._facts: dict[Node, tuple[bool, bool, bool]] = {}
        self.grad_mode = torch.is_grad_enabled()

    def update(self, node: Node) -> None:
        built = self.direct(node)
        if built is None:
            self.on_fake(node)
        else:
            node.meta["val"], self.grads[node] = built

    def on_fake(self, node: Node) -> None:
        if self._runner is None:
            self._runner = FakeTensorProp(self.graph_module, self.mode)
            self._runner.env = self.env
        env, runner = self.env, self._runner
        with self.mode:
            for arg in node.all_input_nodes:
                if arg not in env:
                    env[arg] = self.live(arg) if "val" in arg.meta else runner.run_node(arg)
            env[node] = runner.run_node(node)

    def live(self, node: Node) -> Any:
        """A value built directly, with this run's ``requires_grad``."""
        stored, grad = node.meta["val"], self.grads.get(node)
        if grad is None or not isinstance(stored, FakeTensor) or stored.requires_grad == grad:
            return stored
        return _fake(self.mode, stored.shape, stored.stride(), stored, grad)

    def requires_grad(self, node: Node) -> bool:
        if node in self.env:
            return getattr(self.env[node], "requires_grad", False)
        if node in self.grads:
            return self.grads[node]
        return getattr(node.meta.get("val"), "requires_grad", False)

    def direct(self, node: Node) -> tuple[Any, bool] | None:
        """The node's new value and its run's ``requires_grad``, built without fake dispatch;
        None where they are not known."""
        previous = self.previous
        if node.op != "call_function" or node not in previous:
            return None
        args = node.all_input_nodes
        if node.target is operator.getitem:
            source, index = node.args
            stored = source.meta.get("val") if isinstance(source, Node) else None
            if not isinstance(stored, tuple | list) or source in self.env:
                return None
            return stored[index], self.requires_grad(source)
        target = node.target
        if not isinstance(target, torch._ops.OpOverload) or target is aten.as_strided.default:
            return None
        facts = [self.facts(a) for a in args]
        if not all(f[0] for f in facts):     # usable
            return None
        old = previous[node]
        grad = (self.grad_mode and any(self.requires_grad(a) for a in args)
                and isinstance(old, torch.Tensor | list | tuple))
        if _is_view_op(target):
            value = self.moved_value(node, old)
            if value is None:
                value = _view_value(node, self.mode, old)
        else:
            value = self.dense_value(node, old, facts)
        if value is None:
            return None
        if not grad:
            return value, False
        return value, all(t.dtype.is_floating_point or t.dtype.is_complex
                          for t in _tensors(value))

    def facts(self, node: Node) -> tuple[bool, bool, bool]:
        """Whether a value can feed a directly built one (static and dense before and after
        pruning), whether it was and is contiguous, and whether its dimensions keep their stride
        order (unchanged, contiguous, or dense in the same order without size-1 dimensions)."""
        known = self._facts.get(node)
        if known is None:
            new, old = node.meta.get("val"), self.previous.get(node)
            usable = _static_dense(new) and (old is new or _static_dense(old))
            contiguous = usable and _contiguous(new) and (old is new or _contiguous(old))
            ordered = contiguous or new is old or (
                usable and 1 not in new.shape and _dense_order(new) is not None
                and _dense_order(new) == _dense_order(old))
            known = self._facts[node] = (usable, contiguous, ordered)
        return known

    def dense_value(self, node: Node, old: Any, facts: list[tuple[bool, bool, bool]]
                    ) -> FakeTensor | None:
        """Contiguous ops with contiguous inputs: contiguous; contiguous ops and attention with
        inputs that keep their stride order (and attention its head and sequence sizes): dense
        strides in the order the output had."""
        shape = self.new_shape(node, old) if _static_dense(old) else None
        if shape is None:
            return None
        if node.target in _ALWAYS_CONTIGUOUS or (
                _contiguous_class(node.target) and _contiguous(old)
                and all(f[1] for f in facts)):     # contiguous
            return _kept_or_new(self.mode, shape, _contiguous_strides_of(tuple(shape)), old)
        order = _dense_order(old)
        if (order is None or 1 in old.shape or 1 in shape
                or not all(f[2] for f in facts)     # ordered
                or not (_contiguous_class(node.target) or self.attention_keeps_heads(node))):
            return None
        return _kept_or_new(self.mode, shape, _dense_strides(shape, order), old)

    def moved_value(self, node: Node, old: Any) -> FakeTensor | None:
        """Views computed without running them: a permute or transpose reorders its input's
        sizes and strides; ``view`` / ``reshape`` / ``flatten`` of an input with exactly the
        contiguous strides gives exactly the contiguous strides of its sizes (the channel
        layouts' sizes), unit dimensions included, in the meta and the fake kernel alike
        (checked on random shapes in ``tests/passes/prune/test_metadata.py``)."""
        x = node.args[0]
        if not isinstance(x, Node) or not isinstance(old, FakeTensor):
            return None
        value = x.meta["val"]
        order = _moved_order(node, value.dim())
        if order is not None:
            shape = [value.shape[d] for d in order]
            return _kept_or_new(self.mode, shape, [value.stride(d) for d in order], old)
        shape = self.new_shape(node, old) if node.target in _CONTIGUOUS_VIEWS \
            and _contiguous(value) else None
        if shape is None:
            return None
        return _kept_or_new(self.mode, shape, _contiguous_strides_of(tuple(shape)), old)

    def new_shape(self, node: Node, old: torch.Tensor) -> list[int] | None:
        """The node's sizes once pruned, from its channel layouts; None where they do not
        describe every dimension."""
        layout = self.layouts.get(node.name)
        if not isinstance(layout, list) or len(layout) != old.dim() or None in layout:
            return None
        return [new_size(d, self.kept) for d in layout]

    def attention_keeps_heads(self, node: Node) -> bool:
        """SDPA whose query, key and value keep their sequence and head sizes: the kernel it
        takes is chosen as before pruning, so its output has the same stride order."""
        if node.target is not aten.scaled_dot_product_attention.default:
            return False
        return all(tuple(a.meta["val"].shape[-2:]) == tuple(self.previous[a].shape[-2:])
                   for a in node.args[:3] if isinstance(a, Node))


def refresh_pruned_shapes(program: Program, layouts: Mapping[str, Any], kept: Mapping[int, int],
                          touched: set[Node], previous: Mapping[Node, Any]) -> list[str]:
    """Rewrite ``meta["val"]`` of every node whose value pruning changed (see the module
    docstring); ``previous`` holds each node's value before the rewrite. Returns the names of
    nodes that had no value (what :func:`~graphpress.ir.shapes.propagate_shapes` returns)."""
    if needs_full_propagation(program):
        return propagate_shapes(program, check=False)
    refresh = _Refresh(program, layouts, kept, previous)
    pending, filled = set(touched), []
    for node in program.graph.nodes:
        if node not in pending:
            continue
        if node.op not in ("placeholder", "output"):
            if "val" not in node.meta:
                filled.append(node.name)
            refresh.update(node)
        elif node.op == "placeholder":     # a weight pruning replaced
            pending.update(node.users)
            continue
        if not _same_value(previous.get(node), node.meta.get("val")):
            pending.update(node.users)
    return filled


_CONTIGUOUS_VIEWS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default,
                     aten.flatten.using_ints}


def _moved_order(node: Node, rank: int) -> list[int] | None:
    """The input dimension of each output dimension of a permute or transpose, else None."""
    if node.target is aten.permute.default:
        return [d % rank for d in node.args[1]]
    if node.target is aten.transpose.int or (node.target is aten.t.default and rank == 2):
        a, b = (node.args[1] % rank, node.args[2] % rank) if len(node.args) > 2 else (0, 1)
        order = list(range(rank))
        order[a], order[b] = order[b], order[a]
        return order
    return None


def _view_value(node: Node, mode: FakeTensorMode, old: Any) -> Any:
    with no_dispatch_modes():
        out = node.target(*_mirror(node.args), **{k: _mirror(v) for k, v in node.kwargs.items()})
    if not meta_view_strides_agree(node.target, [a.meta["val"] for a in node.all_input_nodes],
                                   _tensors(out)):
        return None
    if isinstance(out, torch.Tensor):
        return _fake(mode, out.shape, out.stride(), old, old.requires_grad)
    if not isinstance(out, list | tuple) or len(out) != len(old):
        return None
    return type(out)(_fake(mode, t.shape, t.stride(), like, like.requires_grad)
                     if isinstance(t, torch.Tensor) else t for t, like in zip(out, old))


def _mirror(arg: Any) -> Any:
    """Arguments with each node replaced by a plain meta tensor of its value's sizes and
    strides."""
    if isinstance(arg, Node):
        v = arg.meta["val"]
        return torch.empty_strided(v.shape, v.stride(), dtype=v.dtype, device=_META)
    if isinstance(arg, list):       # fx's immutable lists too
        return [_mirror(a) for a in arg]
    if isinstance(arg, tuple):
        return tuple(_mirror(a) for a in arg)
    return arg


def _tensors(value: Any) -> list[torch.Tensor]:
    """The tensors of a value: itself, or the tensors of a list or tuple of values."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, list | tuple):
        return [t for v in value for t in _tensors(v)]
    return []


def meta_view_strides_agree(target: Any, inputs: list[torch.Tensor],
                            outputs: list[torch.Tensor]) -> bool:
    """Whether a view's meta kernel gives the strides its fake kernel gives: always for views
    that keep or reorder the input strides, and for ``contiguous`` (its input where that is
    contiguous, else a contiguous copy); for views that compute strides, unless a size-1
    dimension is in the result and in an input whose strides are not exactly the contiguous
    ones (the stride of a size-1 dimension is arbitrary, and the two kernels carry such an
    input's over differently; ``tests/passes/prune/test_metadata.py`` checks random views of
    every kind against the fake kernel)."""
    if target in _STRIDES_KEPT or target is aten.contiguous.default:   # input or a copy
        return True
    return not (any(1 in t.shape for t in outputs)
                and any(1 in t.shape and not _contiguous(t) for t in inputs))


def _fake(mode: FakeTensorMode, shape: Any, strides: Any, like: FakeTensor,
          requires_grad: bool) -> FakeTensor:
    with no_dispatch_modes():
        elem = torch.empty_strided(shape, strides, dtype=like.dtype, device=_META,
                                   requires_grad=requires_grad)
    return fake_over_meta(mode, elem, like.device)


def _kept_or_new(mode: FakeTensorMode, shape: Any, strides: Any, old: FakeTensor) -> FakeTensor:
    """A value with ``old``'s dtype, device and ``requires_grad`` at these sizes and strides:
    ``old`` itself where they are its own (values are never mutated; copies share them)."""
    if tuple(shape) == old.shape and tuple(strides) == old.stride():
        return old
    return _fake(mode, shape, strides, old, old.requires_grad)


def _same_value(was: Any, now: Any) -> bool:
    """``value_key(was) == value_key(now)``, without building the keys for two tensors."""
    if was is None:
        return False
    if type(was) is FakeTensor and type(now) is FakeTensor and _static_dense(was) \
            and _static_dense(now):
        return (was.shape == now.shape and was.stride() == now.stride() and was.dtype == now.dtype
                and was.device == now.device and was.layout == now.layout)
    return value_key(was) == value_key(now)


@functools.cache
def _is_view_op(target: torch._ops.OpOverload) -> bool:
    schema = target._schema
    return (not schema.is_mutable and len(schema.arguments) > 0
            and schema.arguments[0].alias_info is not None
            and any(r.alias_info is not None for r in schema.returns))


@functools.cache
def _contiguous_class(target: torch._ops.OpOverload) -> bool:
    return target in _CONTIGUOUS_OUT or torch.Tag.pointwise in target.tags


def _static_dense(value: Any) -> bool:
    return (isinstance(value, FakeTensor) and not value._has_symbolic_sizes_strides
            and value.layout == torch.strided)


def _contiguous(value: torch.Tensor) -> bool:
    """Exactly the contiguous strides (size-1 dimensions included, unlike ``is_contiguous``,
    which is exact where no dimension has size 0 or 1)."""
    shape = value.shape
    if 1 in shape or 0 in shape:
        return value.stride() == _contiguous_strides_of(shape)
    return value.is_contiguous()


@functools.lru_cache(maxsize=4096)
def _contiguous_strides_of(shape: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(_contiguous_strides(list(shape)))


def _dense_order(value: torch.Tensor) -> tuple[int, ...] | None:
    """The dimensions from outermost to innermost if the value is dense and non-overlapping
    (strides a permutation of contiguous ones), else None."""
    order = tuple(sorted(range(value.dim()), key=lambda d: (-value.stride(d), d)))
    step = 1
    for d in reversed(order):
        if value.stride(d) != step and value.shape[d] != 1:
            return None
        step *= max(value.shape[d], 1)
    return order


def _dense_strides(shape: list[int], order: tuple[int, ...]) -> list[int]:
    strides, step = [0] * len(shape), 1
    for d in reversed(order):
        strides[d] = step
        step *= max(shape[d], 1)
    return strides


def _contiguous_strides(shape: list[int]) -> list[int]:
    return _dense_strides(shape, tuple(range(len(shape))))
