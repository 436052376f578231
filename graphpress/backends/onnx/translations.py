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

The ``graphpress::*_affine`` ops (:mod:`graphpress.ops.quant`, docs/ops/quant.md) become
opset-21 QuantizeLinear / DequantizeLinear. Their ``block_size`` picks the ONNX layout: one
block is per-tensor (scalar scale), blocks of length 1 along one axis are per-axis (``axis``,
1-D scale), and blocks along one axis of length ``b > 1`` are ONNX blocked quantization
(``axis`` and ``block_size=b``, a scale of the input's rank; dimensions that are one whole
block are expanded to the input's size, as the ONNX layout requires one scale per index there).
The storage type is the ONNX type of the quantized dtype (INT8, UINT8, INT4, UINT4,
FLOAT8E4M3FN, FLOAT8E5M2) when the range is that type's full range, so saturation is the clamp;
any narrower integer range is stored in 8 bits and clipped, as above (onnxruntime 1.32 runs
Q/DQ, per-axis and blocked, for all six types). The nodes use the oldest opset that has them:
19 (float8 types) for per-tensor and per-axis 8-bit layouts, which the exporter's default
opset takes; 21 for INT4 / UINT4 and blocked layouts, so those need
``backend_options={"opset": 21}`` (with an older target the exporter's version converter refuses
the model). QuantizeLinear computes ``x / scale`` where
torch's kernels compute ``x * (1 / scale)``: the two differ in the last bit, so a value within
one ulp of a .5 tie can land on the neighbouring grid point (one quantization step, rare).
``choose_qparams_affine`` is ReduceMin / ReduceMax over each block and the elementwise formula
of :func:`graphpress.ops.quant.qparams_from_minmax`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from onnxscript import ir
from onnxscript import opset18 as op
from onnxscript import opset19 as op19
from onnxscript import opset21 as op21
from onnxscript.function_libs.torch_lib.ops import core as torchlib
from onnxscript.onnx_types import TensorType

from graphpress.ops.quant import FLOAT8

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


# quantized dtype -> (ONNX type, the type's full range)
_AFFINE_TYPES: dict[str, tuple[ir.DataType, float, float]] = {
    "int8": (ir.DataType.INT8, -128, 127),
    "uint8": (ir.DataType.UINT8, 0, 255),
    "int4": (ir.DataType.INT4, -8, 7),
    "uint4": (ir.DataType.UINT4, 0, 15),
    # 3-bit grids have no ONNX type: 4-bit Q/DQ with the narrower range clipped
    "int3": (ir.DataType.INT4, -8, 7),
    "uint3": (ir.DataType.UINT4, 0, 15),
    "float8_e4m3fn": (ir.DataType.FLOAT8E4M3FN, -448.0, 448.0),
    "float8_e5m2": (ir.DataType.FLOAT8E5M2, -57344.0, 57344.0),
}

_FLOAT_TYPES = {torch.float32: ir.DataType.FLOAT, torch.float16: ir.DataType.FLOAT16,
                torch.bfloat16: ir.DataType.BFLOAT16, torch.float64: ir.DataType.DOUBLE}


def _static_dims(x: TensorType, what: str) -> list[int]:
    dims = list(x.shape)
    if not all(isinstance(d, int) for d in dims):
        raise NotImplementedError(
            f"{what}: the ONNX translation needs a static size on every dimension that is split "
            f"into blocks, got shape {x.shape}; keep those dimensions static in the export")
    return dims


def _affine_layout(x: TensorType, block_size: list[int], scale: TensorType
                   ) -> tuple[TensorType, Callable[[TensorType], TensorType], dict[str, int]]:
    """(scale in the ONNX layout, the same reshaping for the zero point, Q/DQ attributes)."""
    rank = len(block_size)
    counts = [scale.shape[i] for i in range(rank)]
    split = [i for i in range(rank) if counts[i] != 1]
    if not split:  # one block: per-tensor
        scalar = op.Constant(value=ir.tensor([], dtype=ir.DataType.INT64))
        return op.Reshape(scale, scalar), lambda t: op.Reshape(t, scalar), {}
    if len(split) == 1 and block_size[split[0]] == 1:  # per-axis
        axis = split[0]
        vector = op.Constant(value=ir.tensor([-1], dtype=ir.DataType.INT64))
        return op.Reshape(scale, vector), lambda t: op.Reshape(t, vector), {"axis": axis}
    # blocked: along the last dimension whose blocks are longer than 1 and more than one
    inner = [i for i in split if block_size[i] != 1]
    if len(inner) > 1:
        raise NotImplementedError(
            f"graphpress::*_affine with block_size {block_size}: ONNX blocked quantization "
            "splits one axis into blocks, this layout splits several; use blocks along one "
            "dimension (per-group along the last)")
    whole = [i for i in range(rank) if i not in split and block_size[i] != 1]
    if inner:
        axis = inner[0]
    else:  # per-token style: every split dimension has blocks of 1; block along a whole one
        if not whole:
            raise NotImplementedError(
                f"graphpress::*_affine with block_size {block_size}: one scale per element has "
                "no ONNX blocked layout; use a coarser block_size")
        axis = whole.pop()
    target = None
    if whole:  # dimensions that are one block: the ONNX layout has one scale per index there
        dims = _static_dims(x, f"graphpress::*_affine with block_size {block_size}")
        target = op.Constant(value=ir.tensor([dims[i] if i in whole else 1 for i in range(rank)],
                                             dtype=ir.DataType.INT64))

    def layout(t: TensorType) -> TensorType:
        return t if target is None else op.Expand(t, target)

    return layout(scale), layout, {"axis": axis, "block_size": block_size[axis]}


def _qdq_opset(storage: ir.DataType, attrs: dict[str, int]) -> Any:
    """The oldest opset with these Q/DQ: 21 for 4-bit types and blocks, else 19 (float8)."""
    return op21 if storage in (ir.DataType.INT4, ir.DataType.UINT4) or "block_size" in attrs \
        else op19


def _affine_q(x: TensorType, block_size: list[int], scale: TensorType,
              zero_point: TensorType | None, quant_min: float, quant_max: float,
              dtype: str) -> tuple[TensorType, TensorType, TensorType, dict[str, int], Any]:
    """QuantizeLinear of the ``graphpress::*_affine`` convention: (q, scale and zero point in
    the ONNX layout, Q/DQ attributes, the opset module of the matching DequantizeLinear)."""
    onnx_type, low, high = _AFFINE_TYPES[dtype]
    if dtype in FLOAT8 and (quant_min, quant_max) != (low, high):
        raise NotImplementedError(
            f"{dtype} with range ({quant_min}, {quant_max}): ONNX float8 quantization saturates "
            f"to the type's range ({low}, {high}) only; use that range")
    clip = (quant_min, quant_max) != (low, high)
    if clip:
        onnx_type = storage_type(int(quant_min), int(quant_max))
    onnx_scale, layout, attrs = _affine_layout(x, block_size, scale)
    onnx_scale = op.Cast(onnx_scale, to=ir.DataType.FLOAT)
    if zero_point is None:
        onnx_zero = op.Cast(op.Mul(onnx_scale, op.Constant(value_float=0.0)), to=onnx_type)
    else:
        onnx_zero = op.Cast(layout(zero_point), to=onnx_type)
    if x.type.dtype != ir.DataType.FLOAT:
        x = op.Cast(x, to=ir.DataType.FLOAT)
    opset = _qdq_opset(onnx_type, attrs)
    q = opset.QuantizeLinear(x, onnx_scale, onnx_zero, **attrs)
    if clip:
        q = op.Clip(q, op.Cast(int(quant_min), to=onnx_type), op.Cast(int(quant_max), to=onnx_type))
    return q, onnx_scale, onnx_zero, attrs, opset


def _computed_broadcastable(x: TensorType, block_size: list[int], scale: TensorType) -> bool:
    """A scale computed in the graph (dynamic quantization) whose blocks are whole dims or
    single elements, so that it broadcasts against ``x`` as it is."""
    producer = getattr(scale, "producer", None)
    if not callable(producer) or producer() is None:
        return False
    return all(b == 1 or b == s for b, s in zip(block_size, x.shape, strict=True))


def _exact_integer_fake_quant(x: TensorType, scale: TensorType, zero_point: TensorType | None,
                              quant_min: float, quant_max: float) -> TensorType:
    """``(clamp(round(x * (1 / scale)) + zp) - zp) * scale``, the ops' own formula, in float
    ONNX ops (scale and zero point broadcast against ``x``). QuantizeLinear divides by the scale
    instead, which rounds some values the other way; for a scale computed in the graph nothing
    is lost by spelling the formula out (onnxruntime fuses Q/DQ only with constant scales)."""
    values = op.Cast(x, to=ir.DataType.FLOAT)  # a no-op for float32 inputs
    scale = op.Cast(scale, to=ir.DataType.FLOAT)
    grid = op.Round(op.Mul(values, op.Reciprocal(scale)))
    zero = None if zero_point is None else op.Cast(zero_point, to=ir.DataType.FLOAT)
    if zero is not None:
        grid = op.Add(grid, zero)
    grid = op.Clip(grid, op.Constant(value_float=quant_min), op.Constant(value_float=quant_max))
    if zero is not None:
        grid = op.Sub(grid, zero)
    return op.Mul(grid, scale)


def _blockwise(x: TensorType, block_size: list[int], scale: TensorType,
               zero_point: TensorType | None, quant_min: float, quant_max: float) -> TensorType:
    """The exact formula on ``x`` viewed as blocks ``[n0, b0, n1, b1, ...]`` with the qparams
    as ``[n0, 1, n1, 1, ...]`` (so any block layout broadcasts), viewed back."""
    dims = _static_dims(x, f"graphpress::fake_quantize_affine with block_size {block_size}")
    blocks, params = [], []
    for size, block in zip(dims, block_size, strict=True):
        blocks += [size // block, block]
        params += [size // block, 1]

    def shaped(t: TensorType, shape: list[int]) -> TensorType:
        return op.Reshape(t, op.Constant(value=ir.tensor(shape, dtype=ir.DataType.INT64)))

    out = _exact_integer_fake_quant(
        shaped(x, blocks), shaped(scale, params),
        None if zero_point is None else shaped(zero_point, params), quant_min, quant_max)
    return shaped(out, dims)


def fake_quantize_affine_exact(x: TensorType, block_size: list[int], scale: TensorType,
                               zero_point: TensorType | None, quant_min: float,
                               quant_max: float, dtype: str) -> TensorType:
    """graphpress::fake_quantize_affine as the ops' exact formula in float ONNX ops, for every
    integer layout (the ONNX backend's ``quantization="exact"``): the exported model computes
    what eager computes, bit for bit up to float kernels, at the cost of onnxruntime's int8
    kernels (no QuantizeLinear/DequantizeLinear to fuse). float8 keeps its Q/DQ, which
    onnxruntime already computes exactly."""
    if dtype in FLOAT8:
        return fake_quantize_affine(x, block_size, scale, zero_point, quant_min, quant_max,
                                    dtype)
    source = x.type.dtype
    if _computed_broadcastable(x, block_size, scale) or all(
            b == 1 or b == d for b, d in zip(block_size, x.shape, strict=True)):
        output = _exact_integer_fake_quant(x, scale, zero_point, quant_min, quant_max)
    else:
        output = _blockwise(x, block_size, scale, zero_point, quant_min, quant_max)
    return output if source == ir.DataType.FLOAT else op.Cast(output, to=source)


def fake_quantize_affine(x: TensorType, block_size: list[int], scale: TensorType,
                         zero_point: TensorType | None, quant_min: float, quant_max: float,
                         dtype: str) -> TensorType:
    """graphpress::fake_quantize_affine: DequantizeLinear(QuantizeLinear(x)); with a computed
    (dynamic) integer scale, the ops' exact formula (see :func:`_exact_integer_fake_quant`)."""
    source = x.type.dtype
    if dtype not in FLOAT8 and _computed_broadcastable(x, block_size, scale):
        output = _exact_integer_fake_quant(x, scale, zero_point, quant_min, quant_max)
        return output if source == ir.DataType.FLOAT else op.Cast(output, to=source)
    q, onnx_scale, onnx_zero, attrs, opset = _affine_q(x, block_size, scale, zero_point,
                                                       quant_min, quant_max, dtype)
    output = opset.DequantizeLinear(q, onnx_scale, onnx_zero, **attrs)
    return output if source == ir.DataType.FLOAT else op.Cast(output, to=source)


def quantize_affine(x: TensorType, block_size: list[int], scale: TensorType,
                    zero_point: TensorType | None, quant_min: float, quant_max: float,
                    dtype: str) -> TensorType:
    """graphpress::quantize_affine: QuantizeLinear; 4- and 3-bit grids come out in 8-bit
    storage (the op's storage dtype)."""
    q, _, _, _, _ = _affine_q(x, block_size, scale, zero_point, quant_min, quant_max, dtype)
    storage = {"int4": ir.DataType.INT8, "uint4": ir.DataType.UINT8, "int3": ir.DataType.INT8,
               "uint3": ir.DataType.UINT8}.get(dtype)
    return q if storage is None else op.Cast(q, to=storage)


def dequantize_affine(q: TensorType, block_size: list[int], scale: TensorType,
                      zero_point: TensorType | None, quant_min: float, quant_max: float,
                      dtype: str, output_dtype: torch.dtype = torch.float32) -> TensorType:
    """graphpress::dequantize_affine: DequantizeLinear of the 8-bit (or float8) storage."""
    onnx_scale, layout, attrs = _affine_layout(q, block_size, scale)
    onnx_scale = op.Cast(onnx_scale, to=ir.DataType.FLOAT)
    args = [q, onnx_scale]
    if zero_point is not None:
        args.append(op.Cast(layout(zero_point), to=q.type.dtype))
    output = _qdq_opset(q.type.dtype, attrs).DequantizeLinear(*args, **attrs)
    target = _FLOAT_TYPES[output_dtype]
    return output if target == ir.DataType.FLOAT else op.Cast(output, to=target)


def choose_qparams_affine(x: TensorType, block_size: list[int], quant_min: float,
                          quant_max: float, symmetric: bool, dtype: str,
                          eps: float = float(torch.finfo(torch.float32).eps)
                          ) -> tuple[TensorType, TensorType]:
    """graphpress::choose_qparams_affine: ReduceMin / ReduceMax over each block, then the
    formula of qparams_from_minmax."""
    rank = len(block_size)
    split: list[Any] = []
    for i, block in enumerate(block_size):
        size = x.shape[i]
        if block == 1:
            split.append(op.Shape(x, start=i, end=i + 1))
            split.append(op.Constant(value=ir.tensor([1], dtype=ir.DataType.INT64)))
        else:
            if not isinstance(size, int):
                raise NotImplementedError(
                    f"graphpress::choose_qparams_affine: dimension {i} is dynamic and split into "
                    f"blocks of {block}; only dimensions with blocks of 1 may be dynamic in ONNX")
            split.append(op.Constant(value=ir.tensor([size // block], dtype=ir.DataType.INT64)))
            split.append(op.Constant(value=ir.tensor([block], dtype=ir.DataType.INT64)))
    values = op.Cast(x, to=ir.DataType.FLOAT) if x.type.dtype != ir.DataType.FLOAT else x
    blocks = op.Reshape(values, op.Concat(*split, axis=0))
    offsets = op.Constant(value=ir.tensor([2 * i + 1 for i in range(rank)],
                                          dtype=ir.DataType.INT64))
    zero = op.Constant(value_float=0.0)
    min_neg = op.Min(op.ReduceMin(blocks, offsets, keepdims=0), zero)
    max_pos = op.Max(op.ReduceMax(blocks, offsets, keepdims=0), zero)
    floor = op.Constant(value_float=eps)
    zeros = op.Cast(op.Mul(min_neg, zero), to=ir.DataType.INT32)
    if dtype in FLOAT8 or symmetric:
        amax = op.Max(op.Neg(min_neg), max_pos)
        levels = quant_max if dtype in FLOAT8 else (quant_max - quant_min) / 2
        return op.Max(op.Div(amax, op.Constant(value_float=levels)), floor), zeros
    scale = op.Max(op.Div(op.Sub(max_pos, min_neg),
                          op.Constant(value_float=quant_max - quant_min)), floor)
    shifted = op.Sub(op.Constant(value_float=quant_min), op.Round(op.Div(min_neg, scale)))
    zero_point = op.Clip(shifted, op.Constant(value_float=quant_min),
                         op.Constant(value_float=quant_max))
    return scale, op.Cast(zero_point, to=ir.DataType.INT32)


BUILTIN_TRANSLATIONS: dict[torch._ops.OpOverload, Callable[..., Any]] = {
    torch.ops.graphpress.quantize_affine.default: quantize_affine,
    torch.ops.graphpress.dequantize_affine.default: dequantize_affine,
    torch.ops.graphpress.fake_quantize_affine.default: fake_quantize_affine,
    torch.ops.graphpress.choose_qparams_affine.default: choose_qparams_affine,
    torch.ops.aten.fake_quantize_per_tensor_affine.default: fake_quantize_per_tensor,
    torch.ops.aten.fake_quantize_per_tensor_affine.tensor_qparams:
        fake_quantize_per_tensor_qparams,
    torch.ops.aten.fake_quantize_per_channel_affine.default: fake_quantize_per_channel,
}
"""Translations registered in ``graphpress.backends.onnx.TRANSLATIONS`` at import."""
