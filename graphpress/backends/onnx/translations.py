"""ONNX translations graphpress ships for ops the exporter does not fully cover.

A translation is an onnxscript function in trace-only style: it receives the node's tensor
arguments as symbolic values and its Python arguments (ints, floats) as attributes, and builds
ONNX nodes by calling ``op.<OnnxOp>(...)``. ``graphpress.backends.onnx.TRANSLATIONS`` starts from
:data:`BUILTIN_TRANSLATIONS`; ``graphpress.backends.onnx.translation_table()`` adds the
translations of the op registry's entries (``graphpress.ops``) and is what ``torch.onnx.export``
gets as its ``custom_translation_table``.

Fake quantization. torch computes ``(clamp(round(x / s) + z, qmin, qmax) - z) * s`` (round half
to even); ONNX computes the same with ``DequantizeLinear(QuantizeLinear(x, s, z), s, z)``, where
QuantizeLinear saturates to its storage type. The exporter's own translations accept only the
three 8-bit ranges (0, 255), (-128, 127) and (0, 127) and raise for any other, but graphpress's
quantization also produces narrow ranges: int4 (-8, 7), uint4 (0, 15), symmetric int8
(-127, 127). So the table routes the fake-quant ops here: an 8-bit range goes to the exporter's
translation unchanged, any range that fits an 8-bit type is stored in that type and clipped
between QuantizeLinear and DequantizeLinear, ``Clip(Q(x), qmin, qmax)``, which equals torch's
clamp because the rounding happens before both.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from onnxscript import ir
from onnxscript import opset18 as op
from onnxscript.function_libs.torch_lib.ops import core as torchlib
from onnxscript.onnx_types import TensorType

__all__ = ["BUILTIN_TRANSLATIONS", "storage_type"]

# The (quant_min, quant_max) ranges the exporter's own fake-quant translations support.
_EXPORTER_RANGES = {(0, 255), (-128, 127), (0, 127)}
_STORAGE = ((ir.DataType.UINT8, 0, 255), (ir.DataType.INT8, -128, 127))


def storage_type(quant_min: int, quant_max: int) -> ir.DataType:
    """The 8-bit ONNX type that holds every integer of ``[quant_min, quant_max]``."""
    for dtype, low, high in _STORAGE:
        if low <= quant_min <= quant_max <= high:
            return dtype
    raise NotImplementedError(
        f"fake-quant range ({quant_min}, {quant_max}) does not fit in 8 bits; the ONNX backend "
        "translates ranges inside (-128, 127) or (0, 255). Use backend='eager', or register a "
        "wider translation with graphpress.backends.onnx.register_translation")


def _clipped_qdq(x: TensorType, scale: TensorType, zero_point: TensorType, quant_min: int,
                 quant_max: int, axis: int | None) -> TensorType:
    dtype = storage_type(quant_min, quant_max)
    source = x.type.dtype
    if source != ir.DataType.FLOAT:
        x = op.Cast(x, to=ir.DataType.FLOAT)
    scale = op.Cast(scale, to=ir.DataType.FLOAT)
    zero_point = op.Cast(zero_point, to=dtype)
    axis_attrs = {} if axis is None else {"axis": axis}
    quantized = op.QuantizeLinear(x, scale, zero_point, **axis_attrs)
    quantized = op.Clip(quantized, op.Cast(quant_min, to=dtype), op.Cast(quant_max, to=dtype))
    output = op.DequantizeLinear(quantized, scale, zero_point, **axis_attrs)
    return output if source == ir.DataType.FLOAT else op.Cast(output, to=source)


def fake_quantize_per_tensor(x: TensorType, scale: float, zero_point: int, quant_min: int,
                             quant_max: int) -> TensorType:
    """aten.fake_quantize_per_tensor_affine.default (Python scale and zero point)."""
    if (quant_min, quant_max) in _EXPORTER_RANGES:
        return torchlib.aten_fake_quantize_per_tensor_affine(
            x, scale, zero_point, quant_min, quant_max)
    return _clipped_qdq(x, scale, zero_point, quant_min, quant_max, axis=None)


def fake_quantize_per_tensor_qparams(x: TensorType, scale: TensorType, zero_point: TensorType,
                                     quant_min: int, quant_max: int) -> TensorType:
    """aten.fake_quantize_per_tensor_affine.tensor_qparams (tensor scale and zero point)."""
    if (quant_min, quant_max) in _EXPORTER_RANGES:
        return torchlib.aten_fake_quantize_per_tensor_affine_tensor_qparams(
            x, scale, zero_point, quant_min, quant_max)
    scalar = op.Constant(value=ir.tensor([], dtype=ir.DataType.INT64))
    return _clipped_qdq(x, op.Reshape(scale, scalar), op.Reshape(zero_point, scalar),
                        quant_min, quant_max, axis=None)


def fake_quantize_per_channel(x: TensorType, scale: TensorType, zero_point: TensorType,
                              axis: int, quant_min: int, quant_max: int) -> TensorType:
    """aten.fake_quantize_per_channel_affine.default (int32 zero points, one per channel)."""
    if (quant_min, quant_max) in _EXPORTER_RANGES:
        return torchlib.aten_fake_quantize_per_channel_affine(
            x, scale, zero_point, axis, quant_min, quant_max)
    if zero_point.type.dtype != ir.DataType.INT32:
        raise NotImplementedError(
            "fake_quantize_per_channel_affine with floating-point zero points (the learnable "
            "fake-quant formula) has no ONNX equivalent; use int32 zero points")
    return _clipped_qdq(x, scale, zero_point, quant_min, quant_max, axis=axis)


BUILTIN_TRANSLATIONS: dict[torch._ops.OpOverload, Callable[..., Any]] = {
    torch.ops.aten.fake_quantize_per_tensor_affine.default: fake_quantize_per_tensor,
    torch.ops.aten.fake_quantize_per_tensor_affine.tensor_qparams:
        fake_quantize_per_tensor_qparams,
    torch.ops.aten.fake_quantize_per_channel_affine.default: fake_quantize_per_channel,
}
"""Translations registered in ``graphpress.backends.onnx.TRANSLATIONS`` at import."""
