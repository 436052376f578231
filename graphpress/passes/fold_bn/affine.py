"""The per-channel affine ops ``fold_bn`` folds: ``x * s + t`` on one axis of ``x``.

* eval-mode ``aten.batch_norm`` / ``aten._native_batch_norm_legit_no_training`` (axis 1), with
  ``s = gamma / sqrt(var + eps)`` and ``t = beta - mean * s``;
* ``mul``, ``div``, ``add`` or ``sub`` of ``x`` and a constant ``c`` (a weight, a literal, or a
  pure computation on those) whose shape, aligned to ``x``'s from the right, has one axis other
  than 1 (the channel axis) or none (one value for all channels): ``x * c``, ``x / c``
  (``s = 1 / c``, no zero in ``c``), ``x + alpha * c``, ``x - alpha * c``, ``c + alpha * x``,
  ``c - alpha * x``. The op may not broadcast ``x`` or change its dtype.

BatchNorm that cannot fold (training mode, no running statistics, statistics that are not
constants) is still recognized, with a ``refusal``: the pass reports it.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.fx import Node
from torch.fx.experimental.symbolic_shapes import statically_known_true
from torch.utils import _pytree as pytree

from graphpress.ir.graph import get_arg, inputs_of
from graphpress.ir.program import Program
from graphpress.ir.purity import is_pure
from graphpress.passes.fold_bn.algebra import batchnorm_affine

__all__ = ["Affine", "Constants", "as_affine"]

aten = torch.ops.aten
_ARITHMETIC = {aten.mul.Tensor: "mul", aten.mul.Scalar: "mul", aten.div.Tensor: "div",
               aten.div.Scalar: "div", aten.add.Tensor: "add", aten.add.Scalar: "add",
               aten.sub.Tensor: "sub", aten.sub.Scalar: "sub"}


class Constants:
    """Which graph values are constants (weights, literals, pure computations on them, found
    in one pass over the graph) and their values."""

    def __init__(self, program: Program) -> None:
        self.program = program
        self._constant: set[Node] = set()
        for node in program.graph.nodes:
            if (program.is_weight(node) if node.op == "placeholder" else
                    is_pure(node) and isinstance(node.meta.get("val"), torch.Tensor)
                    and all(a in self._constant for a in inputs_of(node))):
                self._constant.add(node)

    def is_constant(self, value: Any) -> bool:
        if isinstance(value, bool) or value is None:
            return False
        if isinstance(value, int | float):
            return True
        return isinstance(value, Node) and (value in self._constant or (
            value.op == "placeholder" and self.program.is_weight(value)))  # added since

    def value(self, value: Any) -> torch.Tensor:
        """The value of a constant (check :meth:`is_constant` first)."""
        if not isinstance(value, Node):
            return torch.tensor(value, dtype=torch.float64)
        if self.program.is_weight(value):
            return self.program.weight(value)
        args, kwargs = pytree.tree_map(
            lambda a: self.value(a) if isinstance(a, Node) else a, (value.args, value.kwargs))
        with torch.no_grad():
            return value.target(*args, **kwargs)


@dataclass
class Affine:
    """``node = source * scale + shift`` per channel on ``axis`` of ``source`` (None: one value
    for all channels); float64 ``scale``/``shift`` of one value per channel, or None (1 / 0)."""

    node: Node
    source: Node
    axis: int | None
    scale: torch.Tensor | None = None
    shift: torch.Tensor | None = None
    batchnorm: bool = False
    refusal: str = ""
    operands: list[Node] = field(default_factory=list)  # constants feeding only this op
    calls: list[Node] = field(default_factory=list)  # nodes erased with it, last first

    @property
    def has_shift(self) -> bool:
        return self.shift is not None and bool(self.shift.any())


def as_affine(node: Node, constants: Constants, *, arithmetic: bool) -> Affine | None:
    """The affine op computed at ``node``, or None. BatchNorm that cannot fold carries a
    ``refusal``; arithmetic ops (``arithmetic=True`` only) that are not per-channel are None."""
    if node.op != "call_function":
        return None
    if node.target in (aten.batch_norm.default,
                       aten._native_batch_norm_legit_no_training.default):
        return _batchnorm(node, constants)
    if arithmetic and node.target in _ARITHMETIC:
        return _arithmetic(node, constants, _ARITHMETIC[node.target])
    return None


def _batchnorm(node: Node, constants: Constants) -> Affine:
    source = node.args[0]
    affine = Affine(node, source, 1, batchnorm=True, calls=[node])
    if node.target is aten._native_batch_norm_legit_no_training.default:
        getters = list(node.users)
        if len(getters) != 1 or getters[0].target is not operator.getitem or getters[0].args[1]:
            affine.refusal = "its saved mean/inverse std outputs are used"
            return affine
        affine.node, affine.calls = getters[0], [getters[0], node]
        training = False
    else:
        training = bool(get_arg(node, "training"))
    names = ("weight", "bias", "running_mean", "running_var")
    weight, bias, mean, var = (get_arg(node, n) for n in names)
    if mean is None or var is None:
        affine.refusal = ("it has no running statistics (track_running_stats=False): it always "
                          "normalizes with batch statistics")
    elif training:
        affine.refusal = ("it is in training mode (normalizes with batch statistics); call "
                          "model.eval() before compiling")
    elif not all(constants.is_constant(a) for a in (weight, bias, mean, var) if a is not None):
        affine.refusal = ("its statistics or affine parameters are not constants of the program "
                          "(runtime inputs? under torch.compile, use options={'freeze': True})")
    if affine.refusal:
        return affine
    values = [None if a is None else constants.value(a) for a in (weight, bias, mean, var)]
    affine.scale, affine.shift = batchnorm_affine(*values, eps=float(get_arg(node, "eps")))
    affine.operands = [a for a in (weight, bias, mean, var) if isinstance(a, Node)]
    program = constants.program
    if isinstance(mean, Node) and program.is_weight(mean):  # its unused batch counter goes too
        counter = program.weight_name(mean).removesuffix("running_mean") + "num_batches_tracked"
        if counter in program.weights():
            affine.operands.append(program.weight_node(counter))
    return affine


def _per_channel_axis(constant: torch.Size, data: torch.Size) -> tuple[bool, int | None]:
    """Whether a constant of shape ``constant`` is per-channel for data of shape ``data``, and
    on which axis of the data (None: one value for all)."""
    if len(constant) > len(data) or not all(isinstance(d, int) for d in constant):
        return False, None
    offset = len(data) - len(constant)
    axes = [offset + i for i, d in enumerate(constant) if d != 1]
    if not axes:
        return True, None
    if len(axes) > 1 or not statically_known_true(data[axes[0]] == constant[axes[0] - offset]):
        return False, None
    return True, axes[0]


def _arithmetic(node: Node, constants: Constants, op: str) -> Affine | None:
    first, second = node.args[0], node.args[1]
    if constants.is_constant(first) == constants.is_constant(second):
        return None
    data_first = constants.is_constant(second)
    data, constant = (first, second) if data_first else (second, first)
    if not isinstance(data, Node) or (op == "div" and not data_first):
        return None
    before, after = data.meta.get("val"), node.meta.get("val")
    if not (isinstance(before, torch.Tensor) and isinstance(after, torch.Tensor)
            and before.is_floating_point() and before.dtype == after.dtype
            and before.shape == after.shape):
        return None
    shape = constant.meta["val"].shape if isinstance(constant, Node) else torch.Size()
    per_channel, axis = _per_channel_axis(shape, before.shape)
    if not per_channel:
        return None
    value = constants.value(constant).double().reshape(-1)
    alpha = float(get_arg(node, "alpha")) if op in ("add", "sub") else 1.0
    affine = Affine(node, data, axis, calls=[node])
    affine.operands = [constant] if isinstance(constant, Node) else []
    if op == "mul":
        affine.scale = value
    elif op == "div":
        if not bool(value.all()):
            return None
        affine.scale = 1.0 / value
    elif data_first:  # x + alpha * c, x - alpha * c
        affine.shift = value * (alpha if op == "add" else -alpha)
    else:  # c + alpha * x, c - alpha * x
        factor = alpha if op == "add" else -alpha
        affine.shift = value
        if factor != 1.0:
            affine.scale = torch.tensor([factor], dtype=torch.float64)
    return affine
