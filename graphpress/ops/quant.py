"""Affine quantization ops: ``graphpress::{quantize,dequantize,fake_quantize}_affine`` and
``graphpress::choose_qparams_affine``.

One op family covers every granularity through ``block_size``, a list with the input's rank:
one ``(scale, zero_point)`` pair per block, so ``scale`` and ``zero_point`` have shape
``[s // b for s, b in zip(input.shape, block_size)]`` (per-tensor: ``block_size = shape``,
qparams of shape ``[1, ..., 1]``; per-channel on axis 0: ``[1, K]``, qparams ``[N, 1]``;
per-group: ``[1, g]``, qparams ``[N, K // g]``; per-token: ``[1, ..., 1, K]``). A 0-d input has
``block_size = []`` and 0-d qparams. ``zero_point`` None means 0 (symmetric and fp8).

Integer types (``int8``, ``uint8``, ``int4``, ``uint4``, ``int3``, ``uint3``; the 3- and 4-bit
types stored in int8/uint8)::

    q     = clamp(round(x * (1 / scale)) + zero_point, quant_min, quant_max)
    x_hat = (q - zero_point) * scale

``round`` is round-half-to-even; ``1 / scale``, the product and the sum are float32 (float64 for
a float64 input; half and bfloat16 inputs are computed in float32 and the result cast back). This
is the formula of torch's CPU fake-quant kernels (``inv_scale = 1.0f / scale``,
``nearbyint(x * inv_scale)``), so ``fake_quantize_affine`` is bit-identical to
``torch.fake_quantize_per_tensor_affine`` / ``torch.fake_quantize_per_channel_affine`` for
finite inputs: ``x / scale`` differs from ``x * (1 / scale)`` in the last bit, which moves
values that sit next to a .5 tie to the other grid point, and so does a float64 product. One
exception: torch's per-channel kernel casts to int64 before clamping, so where
``|x / scale| >= 2**63`` (and for inf) it lands on quant_min; these ops saturate to the nearer
limit there, as torch's per-tensor kernel does. nan stays nan.

Float8 types (``float8_e4m3fn``, ``float8_e5m2``; scale-only, no zero point)::

    q     = clamp(x / scale, quant_min, quant_max) cast to the float8 type (round to nearest even)
    x_hat = q * scale

Quantization parameters (:func:`qparams_from_minmax`, the one formula observers and
``choose_qparams_affine`` share), from a block's ``min_val`` and ``max_val``:

* asymmetric: the range is widened to contain 0, ``min_neg = min(min_val, 0)``,
  ``max_pos = max(max_val, 0)``; ``scale = max((max_pos - min_neg) / (qmax - qmin), eps)``,
  ``zero_point = clamp(qmin - round(min_neg / scale), qmin, qmax)`` (int32);
* symmetric integers: ``scale = max(max(-min_neg, max_pos) / ((qmax - qmin) / 2), eps)``,
  zero point 0 (torch's MinMaxObserver for qint8); with ``signed_scale`` the block's
  largest-magnitude value ``e`` lands on ``qmin`` exactly: ``scale = e / qmin`` (negative when
  ``e > 0``; ``|scale| >= eps``), so all ``qmax - qmin + 1`` levels span ``[-|e|, |e|]`` in
  steps of ``|e| / |qmin|`` (llama.cpp's Q4_0, NNCF's INT4_SYM / INT3_SYM), the other side
  clipped at ``qmax |scale|``;
* float8: ``scale = max(max(|min_val|, |max_val|) / quant_max, eps)``, zero point 0.

All four ops are pure (dce and cse apply) and not foldable: fold_constants never precomputes
the fake-quantized weight, so the quantization stays visible to later passes and backends.
``fake_quantize_affine`` has a straight-through gradient for ``input`` (1 where the value lands
inside ``[quant_min, quant_max]`` before clamping, 0 outside, as torch's fake-quant ops);
``scale`` and ``zero_point`` get no gradient (learned scales build their own).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from graphpress.ir.purity import ATEN_QUANT_OPS, qualified_name
from graphpress.ops.registry import define_op

__all__ = ["AFFINE_QUANT_OPS", "CHOOSE_QPARAMS_AFFINE", "DEQUANTIZE_AFFINE",
           "FAKE_QUANTIZE_AFFINE", "FLOAT8", "QUANTIZE_AFFINE", "QUANTIZING_OPS",
           "STORAGE_DTYPES", "Q_DQ_OPS", "has_op", "qparam_shape", "qparams_from_minmax"]

STORAGE_DTYPES: dict[str, torch.dtype] = {
    "int8": torch.int8,
    "uint8": torch.uint8,
    "int4": torch.int8,
    "uint4": torch.uint8,
    "int3": torch.int8,
    "uint3": torch.uint8,
    "float8_e4m3fn": torch.float8_e4m3fn,
    "float8_e5m2": torch.float8_e5m2,
}
"""Quantized dtype name -> the torch dtype ``quantize_affine`` returns."""
FLOAT8 = frozenset({"float8_e4m3fn", "float8_e5m2"})
_EPS = float(torch.finfo(torch.float32).eps)

_QUANT_ARGS = ("Tensor input, SymInt[] block_size, Tensor scale, Tensor? zero_point, "
               "float quant_min, float quant_max, str dtype")


def qparam_shape(shape: Sequence[Any], block_size: Sequence[Any]) -> list[Any]:
    """The shape of ``scale`` / ``zero_point`` for a tensor of ``shape``: one entry per block."""
    return [s // b for s, b in zip(shape, block_size, strict=True)]


def _check_dtype(dtype: str, op: str) -> None:
    if dtype not in STORAGE_DTYPES:
        raise ValueError(f"graphpress::{op}: unknown quantized dtype {dtype!r}; pass one of "
                         f"{', '.join(STORAGE_DTYPES)}")


def _check_blocks(input: torch.Tensor, block_size: Sequence[Any], op: str) -> list[Any]:
    """Validate ``block_size`` against the input; return the qparam shape."""
    shape = list(input.shape)
    if len(block_size) != len(shape):
        raise ValueError(f"graphpress::{op}: block_size {list(block_size)} has {len(block_size)} "
                         f"entries but the input has rank {len(shape)} (shape {tuple(shape)}); "
                         "give one block length per dimension (the dimension's size for an "
                         "unblocked one)")
    for dim, (size, block) in enumerate(zip(shape, block_size, strict=True)):
        if isinstance(size, int) and isinstance(block, int) and (
                block < 1 or size % block):
            raise ValueError(f"graphpress::{op}: block_size[{dim}]={block} does not divide the "
                             f"input's dimension {dim} of size {size} (shape {tuple(shape)}); "
                             "use a block length that divides it")
    return qparam_shape(shape, block_size)


def _check_qparams(input: torch.Tensor, block_size: Sequence[Any], scale: torch.Tensor,
                   zero_point: torch.Tensor | None, dtype: str, op: str) -> None:
    _check_dtype(dtype, op)
    expected = _check_blocks(input, block_size, op)
    for name, tensor in (("scale", scale), ("zero_point", zero_point)):
        if tensor is not None and list(tensor.shape) != expected:
            raise ValueError(f"graphpress::{op}: {name} has shape {tuple(tensor.shape)} but "
                             f"block_size {list(block_size)} on an input of shape "
                             f"{tuple(input.shape)} needs {tuple(expected)} (one per block)")
    if dtype in FLOAT8 and zero_point is not None:
        raise ValueError(f"graphpress::{op}: {dtype} is scale-only; pass zero_point=None")


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _per_element(qparam: torch.Tensor, block_size: Sequence[Any]) -> torch.Tensor:
    """Broadcastable per-element view of a per-block tensor: each entry repeated over its block
    (a dimension with one block stays of size 1 and broadcasts)."""
    for dim, block in enumerate(block_size):
        if qparam.shape[dim] != 1 and block != 1:
            qparam = qparam.repeat_interleave(block, dim=dim)
    return qparam


def _integer_grid(input: torch.Tensor, block_size: Sequence[Any], scale: torch.Tensor,
                  zero_point: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(round(x * (1 / scale)) + zero_point, per-element zero point or None), unclamped, in the
    compute dtype."""
    compute = _compute_dtype(input.dtype)
    inv_scale = _per_element(torch.reciprocal(scale.to(compute)), block_size)
    grid = torch.round(input.to(compute) * inv_scale)
    if zero_point is None:
        return grid, None
    zp = _per_element(zero_point.to(compute), block_size)
    return grid + zp, zp


def _quantize(input: torch.Tensor, block_size: Sequence[Any], scale: torch.Tensor,
              zero_point: torch.Tensor | None, quant_min: float, quant_max: float,
              dtype: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The quantized values in the compute dtype (exact integers, or float8-rounded values)
    and the per-element zero point (None for float8)."""
    if dtype in FLOAT8:
        compute = _compute_dtype(input.dtype)
        ratio = input.to(compute) / _per_element(scale.to(compute), block_size)
        clamped = torch.clamp(ratio, quant_min, quant_max)
        return clamped.to(STORAGE_DTYPES[dtype]).to(compute), None
    grid, zp = _integer_grid(input, block_size, scale, zero_point)
    return torch.clamp(grid, quant_min, quant_max), zp


def quantize_affine(input: torch.Tensor, block_size: Sequence[int], scale: torch.Tensor,
                    zero_point: torch.Tensor | None, quant_min: float, quant_max: float,
                    dtype: str) -> torch.Tensor:
    """q = clamp(round(x * (1 / scale)) + zero_point, quant_min, quant_max) per block, stored
    in the dtype's storage type (float8: clamp(x / scale) cast)."""
    _check_qparams(input, block_size, scale, zero_point, dtype, "quantize_affine")
    q, _ = _quantize(input, block_size, scale, zero_point, quant_min, quant_max, dtype)
    return q.to(STORAGE_DTYPES[dtype])


def _quantize_fake(input: torch.Tensor, block_size: Sequence[int], scale: torch.Tensor,
                   zero_point: torch.Tensor | None, quant_min: float, quant_max: float,
                   dtype: str) -> torch.Tensor:
    _check_qparams(input, block_size, scale, zero_point, dtype, "quantize_affine")
    return torch.empty_like(input, dtype=STORAGE_DTYPES[dtype])


def dequantize_affine(input: torch.Tensor, block_size: Sequence[int], scale: torch.Tensor,
                      zero_point: torch.Tensor | None, quant_min: float, quant_max: float,
                      dtype: str, output_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """x_hat = (q - zero_point) * scale per block, in ``output_dtype``."""
    _check_qparams(input, block_size, scale, zero_point, dtype, "dequantize_affine")
    compute = _compute_dtype(output_dtype)
    values = input.to(compute)
    if zero_point is not None:
        values = values - _per_element(zero_point.to(compute), block_size)
    return (values * _per_element(scale.to(compute), block_size)).to(output_dtype)


def _dequantize_fake(input: torch.Tensor, block_size: Sequence[int], scale: torch.Tensor,
                     zero_point: torch.Tensor | None, quant_min: float, quant_max: float,
                     dtype: str, output_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    _check_qparams(input, block_size, scale, zero_point, dtype, "dequantize_affine")
    return torch.empty_like(input, dtype=output_dtype)


def fake_quantize_affine(input: torch.Tensor, block_size: Sequence[int], scale: torch.Tensor,
                         zero_point: torch.Tensor | None, quant_min: float, quant_max: float,
                         dtype: str) -> torch.Tensor:
    """dequantize_affine(quantize_affine(x)) in the input's dtype, without the storage tensor."""
    _check_qparams(input, block_size, scale, zero_point, dtype, "fake_quantize_affine")
    q, zp = _quantize(input, block_size, scale, zero_point, quant_min, quant_max, dtype)
    if zp is not None:
        q = q - zp
    compute = _compute_dtype(input.dtype)
    return (q * _per_element(scale.to(compute), block_size)).to(input.dtype)


def _fake_quantize_fake(input: torch.Tensor, block_size: Sequence[int], scale: torch.Tensor,
                        zero_point: torch.Tensor | None, quant_min: float, quant_max: float,
                        dtype: str) -> torch.Tensor:
    _check_qparams(input, block_size, scale, zero_point, dtype, "fake_quantize_affine")
    return torch.empty_like(input)


def qparams_from_minmax(min_val: torch.Tensor, max_val: torch.Tensor, quant_min: float,
                        quant_max: float, symmetric: bool, dtype: str,
                        eps: float = _EPS, signed_scale: bool = False
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale float32, zero_point int32) of blocks whose values span [min_val, max_val]
    (tensors of the qparam shape); the formulas are in the module docstring."""
    _check_dtype(dtype, "qparams_from_minmax")
    min_neg = torch.clamp(min_val.to(torch.float32), max=0.0)
    max_pos = torch.clamp(max_val.to(torch.float32), min=0.0)
    zeros = torch.zeros_like(min_neg, dtype=torch.int32)
    if dtype in FLOAT8:
        amax = torch.maximum(-min_neg, max_pos)
        return torch.clamp(amax / quant_max, min=eps), zeros
    if symmetric:
        if quant_min >= 0:
            raise ValueError(f"symmetric quantization needs a signed range, got [{quant_min}, "
                             f"{quant_max}] ({dtype}); use a signed dtype or symmetric=False")
        amax = torch.maximum(-min_neg, max_pos)
        if signed_scale:
            magnitude = torch.clamp(amax / -quant_min, min=eps)
            return torch.where(max_pos > -min_neg, -magnitude, magnitude), zeros
        return torch.clamp(amax / ((quant_max - quant_min) / 2), min=eps), zeros
    scale = torch.clamp((max_pos - min_neg) / (quant_max - quant_min), min=eps)
    zero_point = torch.clamp(quant_min - torch.round(min_neg / scale), quant_min, quant_max)
    return scale, zero_point.to(torch.int32)


def _block_view(input: torch.Tensor, block_size: Sequence[Any]) -> torch.Tensor:
    """``input`` as ``[n0, b0, n1, b1, ...]`` (block index, offset inside the block)."""
    split: list[Any] = []
    for size, block in zip(input.shape, block_size, strict=True):
        split += [size // block, block]
    return input.reshape(split)


def choose_qparams_affine(input: torch.Tensor, block_size: Sequence[int], quant_min: float,
                          quant_max: float, symmetric: bool, dtype: str,
                          eps: float = _EPS) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero_point) from each block's min and max, computed in the graph (dynamic
    quantization); zero_point is zeros for symmetric and float8."""
    _check_dtype(dtype, "choose_qparams_affine")
    shape = _check_blocks(input, block_size, "choose_qparams_affine")
    if input.numel() == 0:
        raise ValueError("graphpress::choose_qparams_affine: the input is empty, so it has no "
                         "range; quantize a non-empty tensor")
    blocks = _block_view(input.to(torch.float32), block_size)
    offsets = tuple(range(1, blocks.dim(), 2))
    min_val = torch.amin(blocks, dim=offsets).reshape(shape)
    max_val = torch.amax(blocks, dim=offsets).reshape(shape)
    return qparams_from_minmax(min_val, max_val, quant_min, quant_max, symmetric, dtype, eps)


def _choose_qparams_fake(input: torch.Tensor, block_size: Sequence[int], quant_min: float,
                         quant_max: float, symmetric: bool, dtype: str,
                         eps: float = _EPS) -> tuple[torch.Tensor, torch.Tensor]:
    _check_dtype(dtype, "choose_qparams_affine")
    shape = _check_blocks(input, block_size, "choose_qparams_affine")
    return (input.new_empty(shape, dtype=torch.float32),
            input.new_empty(shape, dtype=torch.int32))


def _fake_quantize_setup(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
    input, block_size, scale, zero_point, quant_min, quant_max, dtype = inputs
    ctx.block_size, ctx.quant_min, ctx.quant_max, ctx.dtype = (
        block_size, quant_min, quant_max, dtype)
    ctx.has_zero_point = zero_point is not None
    ctx.save_for_backward(input, scale, *(() if zero_point is None else (zero_point,)))


def _fake_quantize_backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
    """Straight-through estimator: the gradient passes where the value was not clamped."""
    input, scale, *rest = ctx.saved_tensors
    zero_point = rest[0] if ctx.has_zero_point else None
    if ctx.dtype in FLOAT8:
        compute = _compute_dtype(input.dtype)
        value = input.to(compute) / _per_element(scale.to(compute), ctx.block_size)
    else:
        value, _ = _integer_grid(input, ctx.block_size, scale, zero_point)
    inside = (value >= ctx.quant_min) & (value <= ctx.quant_max)
    return grad * inside, None, None, None, None, None, None


QUANTIZE_AFFINE = define_op(
    "graphpress::quantize_affine", quantize_affine, fake=_quantize_fake,
    schema=f"({_QUANT_ARGS}) -> Tensor", foldable=False)
DEQUANTIZE_AFFINE = define_op(
    "graphpress::dequantize_affine", dequantize_affine, fake=_dequantize_fake,
    schema=f"({_QUANT_ARGS}, ScalarType output_dtype=float32) -> Tensor", foldable=False)
FAKE_QUANTIZE_AFFINE = define_op(
    "graphpress::fake_quantize_affine", fake_quantize_affine, fake=_fake_quantize_fake,
    schema=f"({_QUANT_ARGS}) -> Tensor", foldable=False)
CHOOSE_QPARAMS_AFFINE = define_op(
    "graphpress::choose_qparams_affine", choose_qparams_affine, fake=_choose_qparams_fake,
    schema=("(Tensor input, SymInt[] block_size, float quant_min, float quant_max, "
            f"bool symmetric, str dtype, float eps={_EPS!r}) -> (Tensor scale, "
            "Tensor zero_point)"),
    foldable=False)
# The one table of quant op names the other layers consult (by qualified name: ``ns::name``):
# the graphpress:: family; those of it that are Q/DQ nodes in ONNX; and every op, graphpress's
# or ATen's, that rounds values onto a quantization grid (a backend may round a tie otherwise).
AFFINE_QUANT_OPS = frozenset(op.name for op in (
    QUANTIZE_AFFINE, DEQUANTIZE_AFFINE, FAKE_QUANTIZE_AFFINE, CHOOSE_QPARAMS_AFFINE))
Q_DQ_OPS = AFFINE_QUANT_OPS - {CHOOSE_QPARAMS_AFFINE.name}
QUANTIZING_OPS = frozenset({QUANTIZE_AFFINE.name, FAKE_QUANTIZE_AFFINE.name} | {
    name for name in ATEN_QUANT_OPS if "dequantize" not in name})


def has_op(graph: torch.fx.Graph, names: frozenset[str]) -> bool:
    """Whether any node of ``graph`` calls an op whose qualified name is in ``names``."""
    return any(qualified_name(node.target) in names for node in graph.nodes)


torch.library.register_autograd(FAKE_QUANTIZE_AFFINE.op, _fake_quantize_backward,
                                setup_context=_fake_quantize_setup)
