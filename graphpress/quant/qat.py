"""Quantization-aware training: :func:`prepare_qat` (a trainable module that simulates
quantization) and :func:`freeze` (the same computation with constant qparams, which
``gp.quant.convert`` traces into a Program).

**Layers.** Every ``nn.Linear`` / ``nn.Conv{1,2,3}d`` the model calls on the example inputs is
replaced by a :class:`QATLayer`, with the spec ``config.for_layer(module_path, op_name)`` gives
it (``op_name``: ``linear``, ``conv1d``, ``conv2d``, ``conv3d``, as in the graph). Its weight
and its input pass through :class:`FakeQuantize`::

    q     = clamp(round(x * (1 / s)) + z, qmin, qmax)      x_hat = (q - z) * s

per block (``graphpress::fake_quantize_affine``; float8: ``x_hat = fp8(clamp(x / s)) * s``).
Weight blocks follow ``insert_fake_quant``: per channel along the output axis 0, per group along
the input axis 1 (K of a linear weight, input channels of a conv).

**Gradients: the straight-through estimator.** ``d x_hat / d x = 1`` where
``round(x / s) + z`` lies in ``[qmin, qmax]``, else 0. With ``learn_scales=True`` (LSQ, Esser et
al. 2020) every scale is a parameter, initialised from the first min-max, with

    d x_hat / d s = x_hat / s - (x / s) * inside     (round(v) - v inside, q - z when clamped)

summed over the block and multiplied by ``g = 1 / sqrt(n * qmax)``, ``n`` the number of
elements that share the scale in one call. The zero point stays at its initial value.

**Qparams.** Weights: the min and max of each block of the current weight on every call
(fixed learned scales with LSQ). Static activations: a moving-average min-max observer per
layer input, ``m <- m + c * (batch_min - m)`` (``c = averaging_constant``, the first batch sets
``m``), updated in training mode until :func:`enable_observers` turns it off; ``calibration_data``
seeds it with the plain min and max over the batches first. Dynamic activations: the min-max
of the current tensor (``choose_qparams_affine``). Qparams from a range:
``qparams_from_minmax`` (the formula every graphpress observer uses).

**Conv-BN (simulated folding).** A BatchNorm that reads only a conv's (or a linear's, 2-d)
output is folded into it: with ``sigma = sqrt(running_var + eps)``, ``f = gamma / sigma``,
``W_f = W * f`` per output channel,

    training:  y = BN_batch(conv(x, FQ(W_f)) / f + b)       (batch statistics; updates running)
    eval:      y = conv(x, FQ(W_f)) + beta + (b - running_mean) * f

The weight is always quantized folded with the running statistics, the grid the deployed
program uses; in training the output is rescaled and normalised with the batch statistics
(the conv-bn QAT recipe of Krishnamoorthi 2018, as torch.ao's ``ConvBn2d``). Without
fake-quant both equal ``BN(conv(x, W) + b)`` at fp32 rounding. :func:`freeze_bn_stats` switches
training to the eval form (running statistics fixed), a common last phase of QAT.

:func:`freeze` deep-copies the module and replaces each QATLayer by a :class:`FrozenLayer`
holding the folded weight and bias and every qparam as a buffer; its forward calls the ops with
those constants, so the traced Program has ``graphpress::fake_quantize_affine`` nodes and equals
the QAT module in eval mode.
"""

from __future__ import annotations

import copy
import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree

import graphpress.ops.quant  # noqa: F401  (defines the torch.ops.graphpress quant ops)
from graphpress.ops.quant import fake_quantize_affine, qparams_from_minmax
from graphpress.quant.config import QuantConfig
from graphpress.quant.spec import QuantSpec, block_minmax, weight_block_size

__all__ = ["FakeQuantize", "FrozenLayer", "QATInfo", "QATLayer", "convert", "enable_fake_quant",
           "enable_observers", "freeze", "freeze_bn_stats", "prepare_qat", "qat_info"]

_LAYERS: dict[type[nn.Module], str] = {nn.Linear: "linear", nn.Conv1d: "conv1d",
                                       nn.Conv2d: "conv2d", nn.Conv3d: "conv3d"}
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_STATIC_ACTIVATIONS = ("per_tensor", "per_channel")


# ------------------------------------------------------------------------------------ blocks
def _zero_point(spec: QuantSpec, zero_point: torch.Tensor) -> torch.Tensor | None:
    """The op's zero point argument: None for symmetric and float8 grids (zero point 0)."""
    return None if spec.symmetric or spec.is_float else zero_point


# ------------------------------------------------------------------------------ LSQ gradient
class _LearnedScaleFakeQuantize(torch.autograd.Function):
    """fake_quantize_affine with the STE for ``x`` and the LSQ gradient for ``scale``."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, scale: torch.Tensor,
                zero_point: torch.Tensor | None, block_size: list[int], quant_min: float,
                quant_max: float, dtype: str, grad_factor: float) -> torch.Tensor:
        out = fake_quantize_affine(x, block_size, scale, zero_point, quant_min, quant_max, dtype)
        ctx.save_for_backward(x, scale, out, *(() if zero_point is None else (zero_point,)))
        ctx.block_size, ctx.grad_factor = block_size, grad_factor
        ctx.quant_min, ctx.quant_max, ctx.dtype = quant_min, quant_max, dtype
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        x, scale, out, *rest = ctx.saved_tensors
        zero_point = rest[0] if rest else None
        split: list[int] = []
        for size, block in zip(x.shape, ctx.block_size, strict=True):
            split += [size // block, block]
        broadcast = [d for n in scale.shape for d in (n, 1)]
        s = scale.reshape(broadcast)
        value = x.reshape(split) / s                      # v = x / s
        if ctx.dtype.startswith("float8"):
            grid = value
        else:
            grid = torch.round(x.reshape(split) * torch.reciprocal(s))
            if zero_point is not None:
                grid = grid + zero_point.reshape(broadcast)
        inside = (grid >= ctx.quant_min) & (grid <= ctx.quant_max)
        g = grad.reshape(split)
        grad_x = (g * inside).reshape(x.shape)
        per_element = out.reshape(split) / s - value * inside
        inner = tuple(range(1, 2 * x.dim(), 2))
        grad_scale = (g * per_element).sum(dim=inner).reshape(scale.shape) * ctx.grad_factor
        return grad_x, grad_scale, None, None, None, None, None, None


# ---------------------------------------------------------------------------- FakeQuantize
class FakeQuantize(nn.Module):
    """Fake-quantizes one tensor: a weight, a static or a dynamic activation (module docstring).

    ``qparam_shape`` is the shape of the static qparams (weights with LSQ, static activations).
    State in buffers (``scale``, ``zero_point``, ``min_val``, ``max_val``, ``observed``), or
    ``scale`` as a parameter with LSQ, so ``state_dict`` and ``deepcopy`` carry it.
    """

    def __init__(self, spec: QuantSpec, role: str, qparam_shape: Sequence[int], *,
                 learn_scale: bool = False, averaging_constant: float = 0.01) -> None:
        super().__init__()
        if role not in ("weight", "activation"):
            raise ValueError(f"role is 'weight' or 'activation', got {role!r}")
        if role == "activation" and not spec.dynamic \
                and spec.granularity not in _STATIC_ACTIVATIONS:
            raise ValueError(f"static activation qparams must be per_tensor or per_channel, got "
                             f"{spec.granularity}; use dynamic=True for per_token/per_group "
                             "activations")
        if learn_scale and spec.dynamic:
            raise ValueError("dynamic qparams are computed on every call, so they cannot be "
                             "learned; use a static activation spec with learn_scales=True")
        if not 0 < averaging_constant <= 1:
            raise ValueError(f"averaging_constant must be in (0, 1], got {averaging_constant}")
        self.spec, self.role = spec, role
        self.learn_scale, self.averaging_constant = learn_scale, averaging_constant
        self.fake_quant_enabled = True
        self.observer_enabled = True
        self.calibrating = False
        shape = list(qparam_shape)
        scale = torch.ones(shape)
        if learn_scale:
            self.scale = nn.Parameter(scale)
        else:
            self.register_buffer("scale", scale)
        self.register_buffer("zero_point", torch.zeros(shape, dtype=torch.int32))
        self.register_buffer("observed", torch.tensor(False))
        if role == "activation" and not spec.dynamic:
            self.register_buffer("min_val", torch.zeros(shape))
            self.register_buffer("max_val", torch.zeros(shape))

    @property
    def static(self) -> bool:
        return self.role == "activation" and not self.spec.dynamic

    def block_size(self, shape: Sequence[int]) -> list[int]:
        if self.role == "weight":
            return weight_block_size(self.spec, shape, 0, 1, "this weight")
        return self.spec.block_size(tuple(shape))

    def qparams(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(scale, zero point for the op) that fake-quantize ``x`` now (no gradient to ``x``)."""
        if (self.role == "weight" and not self.learn_scale) or self.spec.dynamic:
            qmin, qmax = self.spec.qrange()
            scale, zero_point = torch.ops.graphpress.choose_qparams_affine(
                x.detach(), self.block_size(x.shape), float(qmin), float(qmax),
                self.spec.symmetric, self.spec.dtype)
            return scale, _zero_point(self.spec, zero_point)
        if not bool(self.observed):
            raise RuntimeError("the activation observer has seen no data, so this input has "
                               "no qparams; run the QAT module in training mode on a batch "
                               "first, or pass calibration_data to prepare_qat")
        scale = self.scale
        if self.learn_scale:  # a learned scale must stay positive
            scale = scale.clamp(min=float(torch.finfo(torch.float32).eps))
        return scale, _zero_point(self.spec, self.zero_point)

    @torch.no_grad()
    def _initialize(self, x: torch.Tensor) -> None:
        qmin, qmax = self.spec.qrange()
        low, high = block_minmax(x, self.block_size(x.shape))
        scale, zero_point = qparams_from_minmax(low, high, qmin, qmax, self.spec.symmetric,
                                                self.spec.dtype)
        self.scale.copy_(scale.reshape(self.scale.shape))
        self.zero_point.copy_(zero_point.reshape(self.zero_point.shape))
        self.observed.fill_(True)

    @torch.no_grad()
    def observe(self, x: torch.Tensor) -> None:
        """Update the range of a static activation with ``x`` (and the qparams from it)."""
        if self.learn_scale and bool(self.observed):
            return  # LSQ: the observer only initialises the learned scale
        low, high = block_minmax(x, self.block_size(x.shape))
        low, high = low.reshape(self.min_val.shape), high.reshape(self.max_val.shape)
        if not bool(self.observed):
            self.min_val.copy_(low)
            self.max_val.copy_(high)
        elif self.calibrating:
            torch.minimum(self.min_val, low, out=self.min_val)
            torch.maximum(self.max_val, high, out=self.max_val)
        else:
            self.min_val.add_(self.averaging_constant * (low - self.min_val))
            self.max_val.add_(self.averaging_constant * (high - self.max_val))
        qmin, qmax = self.spec.qrange()
        scale, zero_point = qparams_from_minmax(self.min_val, self.max_val, qmin, qmax,
                                                self.spec.symmetric, self.spec.dtype)
        if self.learn_scale:
            self.scale.copy_(scale)   # first observation, before any forward used the scale
        else:
            # new tensors, not in-place writes: a module called twice in one step (shared
            # weights) has saved the previous qparams for its backward
            self.scale = scale
        self.zero_point = zero_point
        self.observed.fill_(True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.static and self.observer_enabled and (self.training or self.calibrating):
            self.observe(x)
        if not self.fake_quant_enabled:
            return x
        scale, zero_point = self.qparams(x)
        qmin, qmax = self.spec.qrange()
        block = self.block_size(x.shape)
        if self.learn_scale:
            per_scale = x.numel() // max(scale.numel(), 1)
            grad_factor = 1.0 / math.sqrt(per_scale * qmax)
            return _LearnedScaleFakeQuantize.apply(x, scale, zero_point, block, float(qmin),
                                                   float(qmax), self.spec.dtype, grad_factor)
        return torch.ops.graphpress.fake_quantize_affine(x, block, scale, zero_point,
                                                         float(qmin), float(qmax),
                                                         self.spec.dtype)

    def extra_repr(self) -> str:
        learned = ", learned scale" if self.learn_scale else ""
        return f"{self.role}: {self.spec.describe()}{learned}"


# -------------------------------------------------------------------------------- QATLayer
def _call(layer: nn.Module, x: torch.Tensor, weight: torch.Tensor,
          bias: torch.Tensor | None) -> torch.Tensor:
    if isinstance(layer, nn.Linear):
        return F.linear(x, weight, bias)
    return layer._conv_forward(x, weight, bias)  # type: ignore[operator]


def _channel_view(t: torch.Tensor, ndim: int) -> torch.Tensor:
    """A per-output-channel vector shaped to broadcast over axis 0 of a weight of rank ``ndim``."""
    return t.reshape([-1] + [1] * (ndim - 1))


class QATLayer(nn.Module):
    """A linear or conv layer (with the BatchNorm folded into it, if any) under fake-quant."""

    def __init__(self, layer: nn.Module, bn: nn.Module | None,
                 weight_quant: FakeQuantize | None, input_quant: FakeQuantize | None) -> None:
        super().__init__()
        self.layer, self.bn = layer, bn
        self.weight_quant, self.input_quant = weight_quant, input_quant
        self.bn_frozen = False

    def _fold_factor(self) -> torch.Tensor:
        """f = gamma / sqrt(running_var + eps) per output channel."""
        bn = self.bn
        assert bn is not None and bn.running_var is not None
        inv_std = torch.rsqrt(bn.running_var + bn.eps)
        return inv_std if bn.weight is None else bn.weight * inv_std

    def folded(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(weight, bias) with the BatchNorm folded in with its running statistics."""
        weight, bias = self.layer.weight, self.layer.bias
        if self.bn is None:
            return weight, bias
        bn = self.bn
        f = self._fold_factor()
        shift = -bn.running_mean if bias is None else bias - bn.running_mean
        folded_bias = shift * f if bn.bias is None else bn.bias + shift * f
        return weight * _channel_view(f, weight.dim()), folded_bias

    def _quantize_weight(self, weight: torch.Tensor) -> torch.Tensor:
        return weight if self.weight_quant is None else self.weight_quant(weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_quant is not None:
            x = self.input_quant(x)
        if self.bn is None or not self.training or self.bn_frozen:
            weight, bias = self.folded()
            return _call(self.layer, x, self._quantize_weight(weight), bias)
        f = self._fold_factor()
        weight = self.layer.weight * _channel_view(f, self.layer.weight.dim())
        y = _call(self.layer, x, self._quantize_weight(weight), None)
        shape = [1, -1] + [1] * (y.dim() - 2)
        y = y / f.reshape(shape)
        if self.layer.bias is not None:
            y = y + self.layer.bias.reshape(shape)
        return self.bn(y)

    def frozen(self) -> FrozenLayer:
        """This layer with constant qparams and the BatchNorm folded (running statistics)."""
        with torch.no_grad():
            weight, bias = (t.detach().clone() if t is not None else None
                            for t in self.folded())
            layer = copy.deepcopy(self.layer)
            layer.weight = nn.Parameter(weight, requires_grad=False)
            layer.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
            weight_q = _frozen_qparams(self.weight_quant, weight)
            input_q = _frozen_qparams(self.input_quant, None)
        return FrozenLayer(layer, weight_q, input_q)


@dataclass
class _Frozen:
    spec: QuantSpec
    role: str
    scale: torch.Tensor | None        # None: dynamic (computed in the graph)
    zero_point: torch.Tensor | None


def _frozen_qparams(quant: FakeQuantize | None, weight: torch.Tensor | None) -> _Frozen | None:
    if quant is None or not quant.fake_quant_enabled:
        return None
    spec = quant.spec
    if quant.role == "weight":
        assert weight is not None
        scale, zero_point = quant.qparams(weight)
        return _Frozen(spec, "weight", scale.detach().clone(),
                       None if zero_point is None else zero_point.clone())
    if spec.dynamic:
        return _Frozen(spec, "activation", None, None)
    if not bool(quant.observed):
        raise RuntimeError("an activation observer of the QAT module has seen no data, so its "
                           "qparams are unknown; train (or calibrate) the module on data before "
                           "converting it")
    scale = quant.scale.detach().clamp(min=float(torch.finfo(torch.float32).eps))
    return _Frozen(spec, "activation", scale.clone(),
                   _zero_point(spec, quant.zero_point.clone()))


class FrozenLayer(nn.Module):
    """A layer that fake-quantizes its input and weight with constant qparams (buffers)."""

    def __init__(self, layer: nn.Module, weight_q: _Frozen | None,
                 input_q: _Frozen | None) -> None:
        super().__init__()
        self.layer = layer
        self.weight_spec = weight_q.spec if weight_q else None
        self.input_spec = input_q.spec if input_q else None
        self.weight_block = (weight_block_size(weight_q.spec, layer.weight.shape, 0, 1,
                                               "this weight") if weight_q else None)
        for prefix, q in (("weight", weight_q), ("input", input_q)):
            if q is not None and q.scale is not None:
                self.register_buffer(f"{prefix}_scale", q.scale)
                if q.zero_point is not None:
                    self.register_buffer(f"{prefix}_zero_point", q.zero_point)

    def _fake_quantize(self, x: torch.Tensor, spec: QuantSpec, block: list[int],
                       prefix: str) -> torch.Tensor:
        qmin, qmax = spec.qrange()
        if spec.dynamic:
            scale, zero_point = torch.ops.graphpress.choose_qparams_affine(
                x, block, float(qmin), float(qmax), spec.symmetric, spec.dtype)
            zp = _zero_point(spec, zero_point)
        else:
            scale = getattr(self, f"{prefix}_scale")
            zp = getattr(self, f"{prefix}_zero_point", None)
        return torch.ops.graphpress.fake_quantize_affine(x, block, scale, zp, float(qmin),
                                                         float(qmax), spec.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_spec is not None:
            x = self._fake_quantize(x, self.input_spec,
                                    self.input_spec.block_size(tuple(x.shape)), "input")
        weight = self.layer.weight
        if self.weight_spec is not None:
            assert self.weight_block is not None
            weight = self._fake_quantize(weight, self.weight_spec, self.weight_block, "weight")
        return _call(self.layer, x, weight, self.layer.bias)

    def extra_repr(self) -> str:
        w = self.weight_spec.describe() if self.weight_spec else "float"
        a = self.input_spec.describe() if self.input_spec else "float"
        return f"weights {w}; inputs {a}"


# ------------------------------------------------------------------------------- recording
@dataclass
class _Calls:
    """What one run on the example inputs saw: layer and BatchNorm calls and who read what."""

    order: list[str] = field(default_factory=list)            # layer paths, first call order
    count: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    input_shape: dict[str, tuple[int, ...]] = field(default_factory=dict)
    output_dim: dict[str, int] = field(default_factory=dict)
    output_id: dict[str, int] = field(default_factory=dict)
    bn_input: dict[str, int] = field(default_factory=dict)    # bn path -> id of its input
    readers: dict[int, set[str | None]] = field(default_factory=lambda: defaultdict(set))
    results: set[int] = field(default_factory=set)            # ids of the model's outputs


class _Readers(TorchFunctionMode):
    """Records, for every tensor a torch function reads, the innermost recorded module
    (a layer or a BatchNorm) running at the time, or None outside them."""

    def __init__(self, calls: _Calls) -> None:
        super().__init__()
        self.calls = calls
        self.stack: list[str] = []

    def __torch_function__(self, func: Any, types: Any, args: Any = (),
                           kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        owner = self.stack[-1] if self.stack else None
        for leaf in pytree.tree_leaves((args, kwargs)):
            if isinstance(leaf, torch.Tensor):
                self.calls.readers[id(leaf)].add(owner)
        return func(*args, **kwargs)


def _record(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> _Calls:
    calls = _Calls()
    mode = _Readers(calls)
    alive: list[Any] = []   # keeps every recorded tensor alive so that ids are not reused
    handles = []

    def pre(path: str) -> Any:
        def hook(module: nn.Module, inputs: tuple[Any, ...]) -> None:
            mode.stack.append(path)
            alive.append(inputs)
            if not inputs or not isinstance(inputs[0], torch.Tensor):
                return
            if isinstance(module, _NORMS):
                calls.bn_input[path] = id(inputs[0])
            else:
                calls.input_shape.setdefault(path, tuple(inputs[0].shape))
        return hook

    def post(path: str) -> Any:
        def hook(module: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
            alive.append(output)
            calls.count[path] += 1
            if not isinstance(module, _NORMS) and isinstance(output, torch.Tensor):
                if path not in calls.output_id:
                    calls.order.append(path)
                calls.output_id[path] = id(output)
                calls.output_dim[path] = output.dim()   # a read by the layer itself
            mode.stack.pop()
        return hook

    for path, module in model.named_modules():
        if type(module) in _LAYERS or isinstance(module, _NORMS):
            handles.append(module.register_forward_pre_hook(pre(path)))
            handles.append(module.register_forward_hook(post(path)))
    training = model.training
    try:
        model.eval()
        with torch.no_grad(), mode:
            result = model(*args, **kwargs)
    finally:
        model.train(training)
        for handle in handles:
            handle.remove()
    alive.append(result)
    calls.results = {id(leaf) for leaf in pytree.tree_leaves(result)
                     if isinstance(leaf, torch.Tensor)}
    return calls


def _norm_after(calls: _Calls, path: str, layer: nn.Module,
                norms: dict[str, nn.Module]) -> str | None:
    """The BatchNorm that reads only ``layer``'s output, if there is one to fold."""
    if calls.count[path] != 1:
        return None
    out = calls.output_id[path]
    for bn_path, bn in norms.items():
        if calls.bn_input.get(bn_path) != out or calls.count[bn_path] != 1:
            continue
        channels = layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels
        if (calls.readers[out] - {path} == {bn_path} and out not in calls.results
                and bn.running_mean is not None and bn.num_features == channels
                and (not isinstance(layer, nn.Linear) or calls.output_dim[path] == 2)):
            return bn_path
    return None


# ------------------------------------------------------------------------------ public API
@dataclass
class QATInfo:
    """What prepare_qat did, kept on the module as ``graphpress_qat``."""

    config: QuantConfig
    layers: dict[str, str]                 # path -> "weights ...; inputs ..." (+ folded BN)
    skipped: list[tuple[str, str]]         # (path, reason) of layers left in float
    example_inputs: tuple[Any, ...]
    example_kwargs: dict[str, Any]


def _inputs(example_inputs: Any) -> tuple[Any, ...]:
    if isinstance(example_inputs, tuple):
        return example_inputs
    if isinstance(example_inputs, list):
        return tuple(example_inputs)
    return (example_inputs,)


def _clone(value: Any) -> Any:
    return pytree.tree_map(lambda t: t.detach().clone() if isinstance(t, torch.Tensor) else t,
                           value)


def prepare_qat(model: nn.Module, config: QuantConfig, example_inputs: Any, *,
                example_kwargs: dict[str, Any] | None = None, learn_scales: bool = False,
                averaging_constant: float = 0.01,
                calibration_data: Iterable[Any] | None = None) -> nn.Module:
    """A copy of ``model`` that simulates ``config``'s quantization and trains with any torch
    optimizer (the module docstring gives the math). The user's model is not changed.

    ``example_inputs`` (a tuple of positional inputs, or one tensor) runs the model once to find
    the layers it calls, their input shapes and the BatchNorms to fold. ``learn_scales`` learns
    every static scale (LSQ). ``calibration_data`` (batches like ``example_inputs``) seeds the
    activation ranges with their min and max before training, without touching BatchNorm
    statistics; otherwise the first training batch does. The result is in training mode and
    carries a :class:`QATInfo` as ``graphpress_qat``.
    """
    if not isinstance(config, QuantConfig):
        raise TypeError(f"prepare_qat needs a QuantConfig (gp.quant.int8_static(), "
                        f"gp.quant.scheme(name)...), got {type(config).__name__}")
    if any(isinstance(m, QATLayer | FrozenLayer) for m in model.modules()):
        raise ValueError("this model is already prepared for QAT (it has QATLayer modules); "
                         "pass the float model to prepare_qat")
    if type(model) in _LAYERS:
        raise ValueError(f"the model is a single {type(model).__name__}; wrap it in an "
                         "nn.Sequential to prepare it for QAT")
    args, kwargs = _inputs(example_inputs), dict(example_kwargs or {})
    qat = copy.deepcopy(model)
    calls = _record(qat, args, kwargs)
    modules = dict(qat.named_modules())
    norms = {p: m for p, m in modules.items() if isinstance(m, _NORMS)}
    layers: dict[str, str] = {}
    skipped: list[tuple[str, str]] = [(p, "not called on the example inputs") for p, m in
                                      modules.items() if type(m) in _LAYERS and p not in
                                      calls.output_id]
    ends = {calls.order[0], calls.order[-1]} if config.keep_first_last and calls.order else set()
    for path in calls.order:
        layer = modules[path]
        op = _LAYERS[type(layer)]
        layer_config = config.for_layer(path, op)
        if path in ends:
            skipped.append((path, "first/last layer kept in float (keep_first_last)"))
            continue
        if layer_config is None:
            skipped.append((path, "an override keeps it in float"))
            continue
        signed = [spec.describe() for spec in (layer_config.weight, layer_config.activation)
                  if spec is not None and spec.signed_scale]
        if signed:
            raise ValueError(f"QAT keeps every scale positive, so it cannot train {signed[0]} "
                             f"(signed_scale) at {path or 'the model'}; quantize with "
                             "signed_scale=False")
        bn_path = _norm_after(calls, path, layer, norms)
        bn = norms[bn_path] if bn_path else None
        weight_quant = input_quant = None
        where = f"{path or 'the model'} ({op})"
        if layer_config.weight is not None:
            block = weight_block_size(layer_config.weight, layer.weight.shape, 0, 1, where)
            shape = [s // b for s, b in zip(layer.weight.shape, block, strict=True)]
            weight_quant = FakeQuantize(layer_config.weight, "weight", shape,
                                        learn_scale=learn_scales)
        if layer_config.activation is not None:
            spec = layer_config.activation
            in_shape = calls.input_shape[path]
            shape = ([] if spec.dynamic else
                     [s // b for s, b in zip(in_shape, spec.block_size(in_shape), strict=True)])
            input_quant = FakeQuantize(spec, "activation", shape,
                                       learn_scale=learn_scales and not spec.dynamic,
                                       averaging_constant=averaging_constant)
        if weight_quant is None and input_quant is None:
            skipped.append((path, "its config quantizes neither weights nor activations"))
            continue
        wrapped = QATLayer(layer, bn, weight_quant, input_quant)
        if learn_scales and weight_quant is not None:
            weight_quant._initialize(wrapped.folded()[0])
        qat.set_submodule(path, wrapped)
        if bn_path:
            qat.set_submodule(bn_path, nn.Identity())
        w = weight_quant.spec.describe() if weight_quant else "float"
        a = input_quant.spec.describe() if input_quant else "float"
        layers[path] = f"weights {w}; inputs {a}" + (f"; folds {bn_path}" if bn_path else "")
    qat.graphpress_qat = QATInfo(config, layers, skipped, _clone(args), _clone(kwargs))
    if calibration_data is not None:
        _calibrate(qat, calibration_data)
    return qat.train()


def _calibrate(qat: nn.Module, batches: Iterable[Any]) -> None:
    quants = [m for m in qat.modules() if isinstance(m, FakeQuantize) and m.static]
    training = qat.training
    qat.eval()
    for quant in quants:
        quant.calibrating = True
    try:
        with torch.no_grad():
            for batch in batches:
                if isinstance(batch, dict):
                    qat(**batch)
                else:
                    qat(*_inputs(batch))
    finally:
        for quant in quants:
            quant.calibrating = False
        qat.train(training)


def qat_info(module: nn.Module) -> QATInfo:
    """The :class:`QATInfo` of a module made by prepare_qat (error otherwise)."""
    info = getattr(module, "graphpress_qat", None)
    if not isinstance(info, QATInfo):
        raise TypeError(f"{type(module).__name__} was not made by gp.quant.prepare_qat; "
                        "prepare it first: qat = gp.quant.prepare_qat(model, config, "
                        "example_inputs)")
    return info


def enable_fake_quant(module: nn.Module, enabled: bool = True) -> nn.Module:
    """Turn fake-quant on or off in every FakeQuantize (off: the float computation)."""
    for m in module.modules():
        if isinstance(m, FakeQuantize):
            m.fake_quant_enabled = enabled
    return module


def enable_observers(module: nn.Module, enabled: bool = True) -> nn.Module:
    """Turn the activation observers on or off (off: the ranges, so the qparams, are frozen)."""
    for m in module.modules():
        if isinstance(m, FakeQuantize):
            m.observer_enabled = enabled
    return module


def freeze_bn_stats(module: nn.Module, frozen: bool = True) -> nn.Module:
    """Train folded conv-bn layers with their running statistics, fixed (the eval form)."""
    for m in module.modules():
        if isinstance(m, QATLayer):
            m.bn_frozen = frozen
    return module


def freeze(qat_module: nn.Module) -> nn.Module:
    """A copy of a QAT module in eval mode with every qparam constant and BN folded."""
    info = qat_info(qat_module)
    frozen = copy.deepcopy(qat_module).eval()
    for path in info.layers:
        layer = frozen.get_submodule(path)
        assert isinstance(layer, QATLayer)
        frozen.set_submodule(path, layer.frozen())
    frozen.requires_grad_(False)
    return frozen


def convert(qat_module: nn.Module, *, example_inputs: Any = None,
            example_kwargs: dict[str, Any] | None = None, backend: str = "eager",
            verify: bool = True, passes: Any = (), **compile_options: Any) -> Any:
    """Freeze a QAT module and compile it (``gp.compile``) into a CompiledModel whose program
    has ``graphpress::fake_quantize_affine`` nodes; see
    :func:`graphpress.integrations.qat.convert`."""
    from graphpress.integrations.qat import convert as convert_qat

    return convert_qat(qat_module, example_inputs=example_inputs,
                       example_kwargs=example_kwargs, backend=backend, verify=verify,
                       passes=passes, **compile_options)
