"""Element-wise ops as Triton expressions.

Arithmetic follows ATen's: every value keeps its node's dtype, each op computes in its "op
math" type (float32 for float16 / bfloat16 results, as ATen's CPU and CUDA kernels do; the
promoted type of the operands for comparisons) and rounds its result to the node's dtype, so a
float16 chain rounds where eager rounds. Integer division and remainder follow Python's floor
semantics, built from Triton's truncating ``//`` and ``%`` (C's).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch.fx import Node

from graphpress.errors import BackendError

__all__ = ["CASTS", "POINTWISE", "TRITON_DTYPES", "literal", "operand_dtype", "pointwise_expr"]

aten = torch.ops.aten

TRITON_DTYPES = {
    torch.float32: "tl.float32", torch.float16: "tl.float16", torch.bfloat16: "tl.bfloat16",
    torch.float64: "tl.float64", torch.int64: "tl.int64", torch.int32: "tl.int32",
    torch.int16: "tl.int16", torch.int8: "tl.int8", torch.uint8: "tl.uint8",
    torch.bool: "tl.int1",
}
_BINARY = {
    aten.add.Tensor: "+", aten.add.Scalar: "+", aten.sub.Tensor: "-", aten.sub.Scalar: "-",
    aten.mul.Tensor: "*", aten.mul.Scalar: "*", aten.div.Tensor: "/", aten.div.Scalar: "/",
}
_COMPARE = {
    aten.eq.Tensor: "==", aten.eq.Scalar: "==", aten.ne.Tensor: "!=", aten.ne.Scalar: "!=",
    aten.lt.Tensor: "<", aten.lt.Scalar: "<", aten.le.Tensor: "<=", aten.le.Scalar: "<=",
    aten.gt.Tensor: ">", aten.gt.Scalar: ">", aten.ge.Tensor: ">=", aten.ge.Scalar: ">=",
}
_LOGICAL = {
    aten.logical_and.default: "&", aten.logical_or.default: "|", aten.logical_xor.default: "^",
    aten.__and__.Tensor: "&", aten.__or__.Tensor: "|", aten.__xor__.Tensor: "^",
    aten.bitwise_and.Tensor: "&", aten.bitwise_or.Tensor: "|", aten.bitwise_xor.Tensor: "^",
}
_UNARY: dict[Any, Callable[[str], str]] = {
    aten.neg.default: lambda x: f"(-{x})",
    aten.abs.default: lambda x: f"tl.abs({x})",
    aten.exp.default: lambda x: f"tl.exp({x})",
    aten.log.default: lambda x: f"tl.log({x})",
    aten.sqrt.default: lambda x: f"tl.sqrt({x})",
    aten.rsqrt.default: lambda x: f"(1.0 / tl.sqrt({x}))",
    aten.reciprocal.default: lambda x: f"(1.0 / {x})",
    aten.sin.default: lambda x: f"tl.sin({x})",
    aten.cos.default: lambda x: f"tl.cos({x})",
    aten.erf.default: lambda x: f"tl.erf({x})",
    aten.floor.default: lambda x: f"tl.floor({x})",
    aten.ceil.default: lambda x: f"tl.ceil({x})",
    aten.square.default: lambda x: f"({x} * {x})",
    aten.relu.default: lambda x: f"tl.maximum({x}, 0)",
    aten.relu6.default: lambda x: f"tl.minimum(tl.maximum({x}, 0.0), 6.0)",
    aten.exp2.default: lambda x: f"tl.exp2({x})",
    aten.log2.default: lambda x: f"tl.log2({x})",
    aten.sign.default: lambda x: f"tl.where({x} > 0, 1, tl.where({x} < 0, -1, 0))",
    aten.trunc.default: lambda x: f"tl.where({x} < 0, tl.ceil({x}), tl.floor({x}))",
    aten.sigmoid.default: lambda x: f"(1.0 / (1.0 + tl.exp(-{x})))",
    aten.silu.default: lambda x: f"({x} / (1.0 + tl.exp(-{x})))",
    # tanh(x) = sign(x) (1 - e) / (1 + e), e = exp(-2|x|): no overflow for any x
    aten.tanh.default: lambda x: (f"tl.where({x} < 0, -1.0, 1.0) * (1.0 - tl.exp(-2.0 * "
                                  f"tl.abs({x}))) / (1.0 + tl.exp(-2.0 * tl.abs({x})))"),
    aten.hardswish.default: lambda x: f"({x} * tl.minimum(tl.maximum({x} + 3.0, 0.0), 6.0) / 6.0)",
    aten.hardsigmoid.default: lambda x: f"(tl.minimum(tl.maximum({x} + 3.0, 0.0), 6.0) / 6.0)",
}
CASTS = {aten._to_copy.default, aten.to.dtype, aten.to.dtype_layout, aten.to.device,
          aten.type_as.default}
_CLAMPS = {aten.hardtanh.default, aten.clamp.default, aten.clamp_min.default,
           aten.clamp_max.default}
_OTHER_POINTWISE = {
    aten.rsub.Scalar, aten.rsub.Tensor, aten.pow.Tensor_Scalar, aten.gelu.default,
    aten.where.self, aten.where.ScalarOther, aten.where.ScalarSelf, aten.where.Scalar,
    aten.maximum.default, aten.minimum.default, aten.logical_not.default,
    aten.bitwise_not.default, aten.masked_fill.Scalar, aten.leaky_relu.default,
    aten.div.Tensor_mode, aten.batch_norm.default, aten.floor_divide.default,
    aten.floor_divide.Scalar, aten.remainder.Tensor, aten.remainder.Scalar,
}
POINTWISE = (set(_BINARY) | set(_COMPARE) | set(_LOGICAL) | set(_UNARY) | CASTS
             | _OTHER_POINTWISE | _CLAMPS)


def _val(arg: Any) -> Any:
    return arg.meta.get("val") if isinstance(arg, Node) else arg


def operand_dtype(node: Node) -> torch.dtype:
    """The dtype a pointwise op computes in, before rounding to the node's dtype."""
    target, out = node.target, _val(node).dtype
    if target in _COMPARE or target in (aten.where.self,):
        operands = [_val(a) for a in node.args[:2]] if target in _COMPARE else [
            _val(a) for a in node.args[1:3]]
        if target == aten.where.self:
            return out
        dtype = _common_dtype(operands)
        return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    if target in _LOGICAL or target in (aten.logical_not.default, aten.bitwise_not.default):
        return out
    return torch.float32 if out in (torch.float16, torch.bfloat16) else out


def _common_dtype(operands: list[Any]) -> torch.dtype:
    """ATen's type promotion of the operands (tensors of any rank and Python scalars)."""
    probes = [torch.empty((1,) * max(v.dim(), 0), dtype=v.dtype) if isinstance(v, torch.Tensor)
              else v for v in operands]
    result = probes[0]
    for other in probes[1:]:
        dims = max(getattr(result, "ndim", 0), getattr(other, "ndim", 0))
        result = torch.empty((1,) * dims, dtype=torch.result_type(result, other))
    return result.dtype if isinstance(result, torch.Tensor) else torch.tensor(result).dtype


def literal(value: Any) -> str:
    """A Python scalar as Triton source."""
    if isinstance(value, bool):
        return "True" if value else "False"
    if isinstance(value, float):
        if math.isinf(value):
            return 'float("inf")' if value > 0 else 'float("-inf")'
        if math.isnan(value):
            return 'float("nan")'
        return repr(value)
    if isinstance(value, int):
        return str(value)
    raise BackendError(f"the triton backend cannot use the constant {value!r} in a kernel")


Operand = Callable[[Any, torch.dtype], str]


def _clamp_bounds(node: Node) -> tuple[Any, Any]:
    """(low, high) of a clamp-like node; None where unbounded."""
    args, kwargs, target = node.args, node.kwargs, node.target
    if target == aten.clamp_min.default:
        return args[1], None
    if target == aten.clamp_max.default:
        return None, args[1]
    names, default = (("min_val", "max_val"), (-1.0, 1.0)) if target == aten.hardtanh.default \
        else (("min", "max"), (None, None))
    low = args[1] if len(args) > 1 else kwargs.get(names[0], default[0])
    high = args[2] if len(args) > 2 else kwargs.get(names[1], default[1])
    return low, high


def _rounds_toward_zero(a: str, b: str) -> str:
    """Where C's truncating ``a // b`` (Triton's) is one above the floor: a nonzero remainder
    whose sign differs from the divisor's."""
    return f"(({a} % {b} != 0) & (({a} % {b} < 0) != ({b} < 0)))"


def _floor_div(a: str, b: str, dtype: torch.dtype) -> str:
    return f"({a} // {b} - {_rounds_toward_zero(a, b)}.to({TRITON_DTYPES[dtype]}))"


def _pow(base: str, exponent: Any) -> str:
    if isinstance(exponent, int | float) and float(exponent).is_integer() and abs(exponent) <= 4:
        power = int(exponent)
        product = " * ".join([base] * abs(power)) if power else "1.0"
        return f"(1.0 / ({product}))" if power < 0 else f"({product})"
    if exponent == 0.5:
        return f"tl.sqrt({base})"
    if exponent == -0.5:
        return f"(1.0 / tl.sqrt({base}))"
    return f"tl.exp({literal(float(exponent))} * tl.log({base}))"


def pointwise_expr(node: Node, operand: Operand) -> str:
    """The Triton expression of a pointwise node in its compute dtype
    (:func:`operand_dtype`); ``operand(arg, dtype)`` renders an argument cast to ``dtype``."""
    target, args, kwargs = node.target, node.args, node.kwargs
    compute = operand_dtype(node)

    def op(i: int) -> str:
        return operand(args[i], compute)

    if target in _BINARY:
        other = op(1)
        alpha = kwargs.get("alpha", 1)
        if alpha != 1:
            other = f"({other} * {literal(alpha)})"
        if target in (aten.div.Tensor, aten.div.Scalar) and not compute.is_floating_point:
            raise BackendError(f"node {node.name}: integer true division has a float result")
        return f"({op(0)} {_BINARY[target]} {other})"
    if target == aten.div.Tensor_mode and not compute.is_floating_point:
        mode = kwargs.get("rounding_mode")
        if mode == "trunc":
            return f"({op(0)} // {op(1)})"  # Triton's integer division truncates, as C
        if mode == "floor":
            return _floor_div(op(0), op(1), compute)
    if target == aten.div.Tensor_mode:
        real = torch.float64 if compute == torch.float64 else torch.float32
        quotient = f"({operand(args[0], real)} / {operand(args[1], real)})"
        mode = kwargs.get("rounding_mode")
        if mode == "floor":
            return f"tl.floor({quotient})"
        if mode == "trunc":
            return f"tl.where({quotient} < 0, tl.ceil({quotient}), tl.floor({quotient}))"
        return quotient
    if target in (aten.floor_divide.default, aten.floor_divide.Scalar):
        if compute.is_floating_point:
            return f"tl.floor({op(0)} / {op(1)})"
        return _floor_div(op(0), op(1), compute)
    if target in (aten.remainder.Tensor, aten.remainder.Scalar):
        a, b = op(0), op(1)
        if compute.is_floating_point:
            return f"({a} - tl.floor({a} / {b}) * {b})"
        return f"tl.where({_rounds_toward_zero(a, b)}, {a} % {b} + {b}, {a} % {b})"
    if target in (aten.rsub.Scalar, aten.rsub.Tensor):
        alpha = kwargs.get("alpha", 1)
        scaled = op(0) if alpha == 1 else f"({op(0)} * {literal(alpha)})"
        return f"({op(1)} - {scaled})"
    if target in _COMPARE:
        return f"({op(0)} {_COMPARE[target]} {op(1)})"
    if target in _LOGICAL:
        return f"({operand(args[0], compute)} {_LOGICAL[target]} {operand(args[1], compute)})"
    if target == aten.logical_not.default:
        return f"({operand(args[0], torch.bool)} == 0)"
    if target == aten.bitwise_not.default:
        return f"(~{op(0)})" if compute != torch.bool else f"({op(0)} == 0)"
    if target in _UNARY:
        return _UNARY[target](op(0))
    if target in CASTS:
        return op(0)
    if target == aten.pow.Tensor_Scalar:
        return _pow(op(0), args[1])
    if target == aten.gelu.default:
        x = op(0)
        if kwargs.get("approximate", "none") == "tanh":
            # 0.5 x (1 + tanh(u)) = x / (1 + exp(-2u)): no cancellation where tanh(u) -> -1
            inner = f"(1.5957691216057308 * ({x} + 0.044715 * {x} * {x} * {x}))"
            return f"({x} / (1.0 + tl.exp(-{inner})))"
        return f"(0.5 * {x} * (1.0 + tl.erf({x} * 0.7071067811865476)))"
    if target in _CLAMPS:
        low, high = _clamp_bounds(node)
        value = op(0)
        if low is not None:
            value = f"tl.maximum({value}, {operand(low, compute)})"
        if high is not None:
            value = f"tl.minimum({value}, {operand(high, compute)})"
        return value
    if target == aten.leaky_relu.default:
        slope = args[1] if len(args) > 1 else 0.01
        return f"tl.where({op(0)} > 0, {op(0)}, {op(0)} * {literal(slope)})"
    if target in (aten.maximum.default, aten.minimum.default):
        name = "maximum" if target == aten.maximum.default else "minimum"
        return f"tl.{name}({op(0)}, {op(1)})"
    if target in (aten.where.self, aten.where.ScalarOther, aten.where.ScalarSelf,
                  aten.where.Scalar):
        return (f"tl.where({operand(args[0], torch.bool)}, {operand(args[1], compute)}, "
                f"{operand(args[2], compute)})")
    if target == aten.batch_norm.default:
        # eval mode, as ATen: x * a + (bias - mean * a), a = weight / sqrt(var + eps), per
        # channel (dim 1)
        x, weight, bias, mean, var = (operand(a, compute) if a is not None else None
                                      for a in args[:5])
        scale = f"(1.0 / tl.sqrt({var} + {literal(float(args[7]))}))"
        scale = f"({scale} * {weight})" if weight is not None else scale
        shift = f"({bias} - {mean} * {scale})" if bias is not None else f"(-{mean} * {scale})"
        return f"({x} * {scale} + {shift})"
    if target == aten.masked_fill.Scalar:
        return f"tl.where({operand(args[1], torch.bool)}, {operand(args[2], compute)}, {op(0)})"
    raise BackendError(f"node {node.name}: no Triton lowering for {target}")
