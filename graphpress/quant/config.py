"""Quantization schemes: a :class:`QuantConfig` is a weight spec, an activation spec and
per-module overrides; presets build the common ones.

Overrides are matched in order against a layer: a glob on its module path (``"lm_head"``,
``"*.classifier"``, ``"encoder.layer.0.*"``), an op type (``"op:conv2d"``), or a predicate
``(module_path, op_name) -> bool``. The first match wins; its value is a QuantConfig for that
layer, or None (keep the layer in float). ``skip=[...]`` is shorthand for overrides to None.
``keep_first_last=True`` keeps the first and the last quantizable layer in float, a common
recipe for CNNs.

Two placements beyond the layers' inputs, off by default (``QuantConfig(...)`` fields, or
``insert_fake_quant(..., attention=True, shared_qparams=("cat", "add"))``):

* ``attention``: both operands of every matmul / bmm between activations (q @ k^T, p @ v) and
  the query, key and value of ``scaled_dot_product_attention`` get the activation spec, so the
  attention runs on quantized values too;
* ``shared_qparams``: ops whose integer kernels need one scale for all their inputs get it:
  ``"cat"`` (every input of a concatenation, and its output where a layer reads it) and
  ``"add"`` (both inputs of an add of two activations of one shape, the residual add). The
  values of a group are calibrated by one observer that sees all of them. Static per-tensor
  activation specs only: a shared scale computed per call or per token is not one scale.

Presets (``scheme`` names in pipeline strings):

| scheme | weights | activations |
|---|---|---|
| ``int8_weight_only`` | int8 per channel, symmetric | float |
| ``int8_dynamic`` | int8 per channel, symmetric | int8 per token, dynamic, asymmetric |
| ``int8_static`` | int8 per channel, symmetric | int8 per tensor, calibrated, asymmetric |
| ``int4_weight_only(group_size)`` | int4 per group along K, asymmetric | float |
| ``int3_weight_only(group_size)`` | int3 ([-4, 3]) per group along K, asymmetric | float |
| ``fp8(dynamic)`` | float8_e4m3fn per channel | float8_e4m3fn per token (dynamic) or tensor |
| ``w4a8(group_size)`` | int4 per group along K, symmetric | int8 per token, dynamic |

``int4_weight_only`` and ``int3_weight_only`` take ``symmetric=True``, and with it
``signed_scale=True``: each group's largest-magnitude weight lands on ``qmin`` exactly (the
scale carries its sign), so the group spans ``[-amax, amax]`` in steps of ``amax / |qmin|``
instead of ``amax / ((qmax - qmin) / 2)`` with ``amax`` itself rounded onto ``qmax`` (llama.cpp's
Q4_0 grid, NNCF's INT4_SYM and INT3_SYM).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from graphpress.quant.spec import QuantSpec

__all__ = ["PRESETS", "SHARED_QPARAM_OPS", "QuantConfig", "fp8", "int3_weight_only",
           "int4_weight_only", "int8_dynamic",
           "int8_static", "int8_weight_only", "scheme", "w4a8"]

Matcher = str | Callable[[str, str], bool]
SHARED_QPARAM_OPS = ("cat", "add")


@dataclass(frozen=True)
class QuantConfig:
    """What to quantize and how; see the module docstring."""

    weight: QuantSpec | None = None
    activation: QuantSpec | None = None
    overrides: tuple[tuple[Matcher, QuantConfig | None], ...] = ()
    keep_first_last: bool = False
    embeddings: bool = False       # quantize embedding tables (weights only)
    attention: bool = False        # quantize activation-activation matmuls and SDPA inputs
    shared_qparams: tuple[str, ...] = ()  # ops whose inputs share one scale: "cat", "add"
    name: str = "custom"
    options: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)

    def __post_init__(self) -> None:
        if self.weight is None and self.activation is None and not self.overrides:
            raise ValueError("a QuantConfig needs a weight spec, an activation spec or overrides")
        if self.weight is not None and self.weight.dynamic:
            raise ValueError("weights are constants: their spec cannot be dynamic")
        if self.weight is not None and self.weight.granularity == "per_token":
            raise ValueError("per_token is for activations; weights use per_channel/per_group")
        shared = self.shared_qparams
        object.__setattr__(self, "shared_qparams",
                           (shared,) if isinstance(shared, str) else tuple(shared))
        unknown = set(self.shared_qparams) - set(SHARED_QPARAM_OPS)
        if unknown:
            raise ValueError(f"shared_qparams takes {', '.join(map(repr, SHARED_QPARAM_OPS))}; "
                             f"got {', '.join(map(repr, sorted(unknown)))}")
        spec = self.activation
        if self.shared_qparams and (spec is None or spec.dynamic
                                    or spec.granularity != "per_tensor"):
            raise ValueError(
                "shared_qparams needs a static per-tensor activation spec (one scale for all "
                f"the inputs of {', '.join(self.shared_qparams)}), not "
                f"{spec.describe() if spec else 'float activations'}; use int8_static or "
                "fp8(dynamic=False)")
        if self.attention and spec is None:
            raise ValueError("attention=True quantizes activations: the config needs an "
                             "activation spec (int8_static, int8_dynamic, fp8, w4a8)")

    def with_overrides(self, *items: tuple[Matcher, QuantConfig | None],
                       skip: Sequence[str] = ()) -> QuantConfig:
        extra = tuple(items) + tuple((pattern, None) for pattern in skip)
        return replace(self, overrides=self.overrides + extra)

    def for_layer(self, module_path: str, op_name: str) -> QuantConfig | None:
        """The config of one layer (an override's, this one, or None to keep it float)."""
        for matcher, config in self.overrides:
            if _matches(matcher, module_path, op_name):
                return config
        return self

    def describe(self) -> str:
        w = self.weight.describe() if self.weight else "float"
        a = self.activation.describe() if self.activation else "float"
        extra = ("; attention quantized" if self.attention else "") + (
            f"; shared qparams for {', '.join(self.shared_qparams)}" if self.shared_qparams
            else "")
        return f"{self.name} (weights {w}; activations {a}{extra})"


def _matches(matcher: Matcher, module_path: str, op_name: str) -> bool:
    if callable(matcher):
        return bool(matcher(module_path, op_name))
    if matcher.startswith("op:"):
        return op_name == matcher[3:]
    return fnmatch.fnmatchcase(module_path, matcher)


def _finish(config: QuantConfig, skip: Sequence[str], keep_first_last: bool) -> QuantConfig:
    config = replace(config, keep_first_last=keep_first_last)
    return config.with_overrides(skip=skip) if skip else config


def int8_weight_only(*, skip: Sequence[str] = (), keep_first_last: bool = False) -> QuantConfig:
    return _finish(QuantConfig(weight=QuantSpec("int8", "per_channel"),
                               name="int8_weight_only"), skip, keep_first_last)


def int8_dynamic(*, skip: Sequence[str] = (), keep_first_last: bool = False) -> QuantConfig:
    return _finish(QuantConfig(
        weight=QuantSpec("int8", "per_channel"),
        activation=QuantSpec("int8", "per_token", symmetric=False, dynamic=True),
        name="int8_dynamic"), skip, keep_first_last)


def int8_static(*, observer: str = "minmax", per_channel_weights: bool = True,
                skip: Sequence[str] = (), keep_first_last: bool = False,
                **observer_args: Any) -> QuantConfig:
    weight = QuantSpec("int8", "per_channel" if per_channel_weights else "per_tensor")
    activation = QuantSpec("int8", "per_tensor", symmetric=False, observer=observer,
                           observer_args=observer_args)
    return _finish(QuantConfig(weight=weight, activation=activation, name="int8_static"),
                   skip, keep_first_last)


def int4_weight_only(group_size: int = 128, *, symmetric: bool = False,
                     signed_scale: bool = False, skip: Sequence[str] = (),
                     keep_first_last: bool = False) -> QuantConfig:
    return _finish(QuantConfig(
        weight=QuantSpec("int4", "per_group", group_size=group_size, symmetric=symmetric,
                         signed_scale=signed_scale),
        name=f"int4_weight_only(group_size={group_size}"
             f"{', signed_scale=True' if signed_scale else ''})"), skip, keep_first_last)


def int3_weight_only(group_size: int = 128, *, symmetric: bool = False,
                     signed_scale: bool = False, skip: Sequence[str] = (),
                     keep_first_last: bool = False) -> QuantConfig:
    """3-bit weights (8 levels a group, W3 in the GPTQ / AWQ papers); fake-quant only: the
    packed-weight ops and the ONNX backend take 4- and 8-bit types."""
    return _finish(QuantConfig(
        weight=QuantSpec("int3", "per_group", group_size=group_size, symmetric=symmetric,
                         signed_scale=signed_scale),
        name=f"int3_weight_only(group_size={group_size}"
             f"{', signed_scale=True' if signed_scale else ''})"), skip, keep_first_last)


def fp8(*, dynamic: bool = True, dtype: str = "float8_e4m3fn", observer: str = "minmax",
        skip: Sequence[str] = (), keep_first_last: bool = False) -> QuantConfig:
    activation = (QuantSpec(dtype, "per_token", dynamic=True) if dynamic
                  else QuantSpec(dtype, "per_tensor", observer=observer))
    return _finish(QuantConfig(weight=QuantSpec(dtype, "per_channel"), activation=activation,
                               name=f"fp8({'dynamic' if dynamic else 'static'})"),
                   skip, keep_first_last)


def w4a8(group_size: int = 128, *, skip: Sequence[str] = (),
         keep_first_last: bool = False) -> QuantConfig:
    return _finish(QuantConfig(
        weight=QuantSpec("int4", "per_group", group_size=group_size, symmetric=True),
        activation=QuantSpec("int8", "per_token", symmetric=False, dynamic=True),
        name=f"w4a8(group_size={group_size})"), skip, keep_first_last)


PRESETS: dict[str, Callable[..., QuantConfig]] = {
    "int8_weight_only": int8_weight_only,
    "int8_dynamic": int8_dynamic,
    "int8_static": int8_static,
    "int4_weight_only": int4_weight_only,
    "int3_weight_only": int3_weight_only,
    "fp8": fp8,
    "w4a8": w4a8,
}


def scheme(name: str, **kwargs: Any) -> QuantConfig:
    """A preset by name (``scheme("int4_weight_only", group_size=64)``)."""
    if name not in PRESETS:
        raise ValueError(f"unknown quantization scheme {name!r}; known: {', '.join(PRESETS)}")
    try:
        return PRESETS[name](**kwargs)
    except TypeError as exc:
        import inspect

        accepted = ", ".join(inspect.signature(PRESETS[name]).parameters)
        raise ValueError(f"scheme {name!r} does not take {sorted(kwargs)}: {exc}; it accepts: "
                         f"{accepted}") from exc
