"""ONNX translations of ``graphpress::dequant_matmul`` and ``graphpress::dynamic_quant_matmul``
(onnxscript, trace-only; imported by the ONNX exporter through the op registry).

``dequant_matmul``: when the group size is a power of two >= 16 (what MatMulNBits accepts), one
``com.microsoft::MatMulNBits(x, B, scales, zero_points)`` (then an Add of the bias) with ``K``,
``N``, ``bits``, ``block_size = group_size`` and ``accuracy_level``: ``B`` is ``qweight``
reshaped to ``[N, K / block, block * bits / 8]`` (the packed format is MatMulNBits' layout, low
nibble first), ``zero_points`` are ``zeros`` as stored (absent: MatMulNBits' default
``2 ** (bits - 1)`` is the format's), scales are cast to ``x``'s type. Other group sizes: the
dequantization ``(u - zeros) * scales`` in standard ops (BitwiseAnd / BitShift split the
nibbles), then MatMul; onnxruntime folds that into one float weight when it loads the model.

``dynamic_quant_matmul``: per row, ReduceMin / ReduceMax and the qparams formula of
``choose_qparams_affine``, ``clip(round(x * (1 / s)) + z)``, then ``(q - z) @ W_int8^T`` as a
float MatMul scaled by ``s_x * s_w``.
"""

from __future__ import annotations

import onnx
from onnxscript import ir
from onnxscript import opset18 as op
from onnxscript.onnx_types import TensorType
from onnxscript.values import Op, Opset

__all__ = ["dequant_matmul_onnx", "dynamic_quant_matmul_onnx"]



def _matmul_nbits_schema() -> onnx.defs.OpSchema:
    """The part of onnxruntime's MatMulNBits schema the translation uses (onnx itself has no
    schema of onnxruntime's contrib ops, and onnxscript needs one to build the node)."""
    schema, param = onnx.defs.OpSchema, onnx.defs.OpSchema.FormalParameter
    optional = schema.FormalParameterOption.Optional
    attribute = schema.AttrType.INT
    return schema(
        "MatMulNBits", "com.microsoft", 1,
        inputs=[param("A", "T1"), param("B", "T2"), param("scales", "T1"),
                param("zero_points", "T3", param_option=optional)],
        outputs=[param("Y", "T1")],
        type_constraints=[("T1", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"], ""),
                          ("T2", ["tensor(uint8)"], ""), ("T3", ["tensor(uint8)"], "")],
        attributes=[schema.Attribute(name, attribute, "", required=required) for name, required
                    in (("K", True), ("N", True), ("bits", True), ("block_size", True),
                        ("accuracy_level", False))])


_MATMUL_NBITS = Op(Opset("com.microsoft", 1), "MatMulNBits", _matmul_nbits_schema())
_EPS = 1.1920928955078125e-07  # float32 eps, choose_qparams_affine's default


def _int64(values: list[int]) -> TensorType:
    return op.Constant(value=ir.tensor(values, dtype=ir.DataType.INT64))


def _codes(packed: TensorType, bits: int, rows: int, count: int) -> TensorType:
    """uint8 codes [rows, count] of a packed uint8 tensor."""
    if bits == 8:
        return packed
    low = op.BitwiseAnd(packed, op.Constant(value=ir.tensor(15, dtype=ir.DataType.UINT8)))
    high = op.BitShift(packed, op.Constant(value=ir.tensor(4, dtype=ir.DataType.UINT8)),
                       direction="RIGHT")
    pairs = op.Concat(op.Unsqueeze(low, _int64([-1])), op.Unsqueeze(high, _int64([-1])),
                      axis=-1)
    codes = op.Reshape(pairs, _int64([rows, -1]))
    return op.Slice(codes, _int64([0]), _int64([count]), _int64([1]))


def dequant_matmul_onnx(x: TensorType, qweight: TensorType, scales: TensorType,
                        zeros: TensorType | None, bias: TensorType | None, bits: int,
                        group_size: int, *, accuracy_level: int = 0) -> TensorType:
    n = qweight.shape[0]
    k = qweight.shape[1] * 8 // bits
    groups = k // group_size
    dtype = x.type.dtype
    scales = op.Cast(scales, to=dtype)
    if group_size >= 16 and group_size & (group_size - 1) == 0:
        blob = group_size * bits // 8
        b = op.Reshape(qweight, _int64([n, groups, blob]))
        inputs = [x, b, op.Reshape(scales, _int64([n * groups]))]
        if zeros is not None:
            inputs.append(op.Reshape(zeros, _int64([-1])))
        out = _MATMUL_NBITS(*inputs, K=k, N=n, bits=bits, block_size=group_size,
                            accuracy_level=accuracy_level)
        return out if bias is None else op.Add(out, op.Cast(bias, to=dtype))
    codes = op.Cast(_codes(qweight, bits, n, k), to=ir.DataType.FLOAT)
    grouped = op.Reshape(codes, _int64([n, groups, group_size]))
    if zeros is None:
        zero = op.Constant(value=ir.tensor(float(1 << (bits - 1)), dtype=ir.DataType.FLOAT))
    else:
        zero = op.Unsqueeze(op.Cast(_codes(zeros, bits, n, groups), to=ir.DataType.FLOAT),
                            _int64([-1]))
    weight = op.Mul(op.Sub(grouped, zero),
                    op.Unsqueeze(op.Cast(scales, to=ir.DataType.FLOAT), _int64([-1])))
    weight = op.Transpose(op.Reshape(weight, _int64([n, k])), perm=[1, 0])
    out = op.MatMul(op.Cast(x, to=ir.DataType.FLOAT), weight)
    if bias is not None:
        out = op.Add(out, op.Cast(bias, to=ir.DataType.FLOAT))
    return out if dtype == ir.DataType.FLOAT else op.Cast(out, to=dtype)


def dynamic_quant_matmul_onnx(x: TensorType, qweight: TensorType, scales: TensorType,
                              bias: TensorType | None, act_symmetric: bool) -> TensorType:
    dtype = x.type.dtype
    xf = op.Cast(x, to=ir.DataType.FLOAT)
    zero = op.Constant(value_float=0.0)
    min_neg = op.Min(op.ReduceMin(xf, _int64([-1]), keepdims=1), zero)
    max_pos = op.Max(op.ReduceMax(xf, _int64([-1]), keepdims=1), zero)
    eps = op.Constant(value_float=_EPS)
    low, high = op.Constant(value_float=-128.0), op.Constant(value_float=127.0)
    if act_symmetric:
        amax = op.Max(op.Neg(min_neg), max_pos)
        scale = op.Max(op.Div(amax, op.Constant(value_float=127.5)), eps)
        point = zero
    else:
        scale = op.Max(op.Div(op.Sub(max_pos, min_neg), op.Constant(value_float=255.0)), eps)
        point = op.Clip(op.Sub(low, op.Round(op.Div(min_neg, scale))), low, high)
    grid = op.Add(op.Round(op.Mul(xf, op.Reciprocal(scale))), point)
    centered = op.Sub(op.Clip(grid, low, high), point)
    weight = op.Transpose(op.Cast(qweight, to=ir.DataType.FLOAT), perm=[1, 0])
    w_scale = op.Reshape(op.Cast(scales, to=ir.DataType.FLOAT), _int64([-1]))
    out = op.Mul(op.Mul(op.MatMul(centered, weight), scale), w_scale)
    if bias is not None:
        out = op.Add(out, op.Cast(bias, to=ir.DataType.FLOAT))
    return out if dtype == ir.DataType.FLOAT else op.Cast(out, to=dtype)
