"""The reference of insert_fake_quant's contract when a weight algorithm ran (AWQ, GPTQ, bias
correction).

The algorithms change weights before quantizing them, so the reference is the input program
with the same final weights, quantized independently:

1. **exact part** (AWQ's scales, folded into the producers and the reading weights): the input
   program with the folded weights must equal the input program at the contract's tolerance;
   otherwise the check fails naming the folding, whatever the quantization does;
2. **quantized part**: the input program with every weight the algorithms changed (the folded
   ones, GPTQ's quantized weights) run through
   :class:`~graphpress.passes.quant.reference.QuantizedReference` (the independent
   quantize-dequantize on every recorded operand with the recorded qparams); corrected biases
   are among those weights, and a layer that had no bias gets the one the pass created, so the
   reference computes every layer with the same operands as the pass's program; EoRA's
   branches are added to their layers' outputs with the same ops, reading the layers'
   unquantized inputs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch.fx import Node

from graphpress.errors import ContractViolation
from graphpress.ir.program import Program
from graphpress.numerics import compare_outputs
from graphpress.passes.quant.reference import QuantizedReference

__all__ = ["AlgorithmReference"]


def _with_weights(program: Program, weights: Mapping[str, torch.Tensor]) -> Program:
    copy = program.copy()
    for name, tensor in weights.items():
        copy.replace_weight(name, tensor)
    return copy


class _WithBiases(QuantizedReference):
    """QuantizedReference where layers that had no bias get the one bias correction created,
    and EoRA's branches ``linear(linear(x, A), B)`` are added to their layers' outputs."""

    def __init__(self, before: Program, records: Sequence[Any],
                 biases: Mapping[str, torch.Tensor],
                 low_rank: Mapping[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        super().__init__(before, records)
        self.biases, self.low_rank = biases, low_rank

    def evaluate(self, n: Node) -> Any:
        value = super().evaluate(n)
        if n.name not in self.low_rank:
            return value
        a, b = self.low_rank[n.name]
        x = self.env[n.args[0]]
        linear = torch.ops.aten.linear.default
        return torch.ops.aten.add.Tensor(value, linear(linear(x, a), b))

    def fetch_args_kwargs_from_env(self, n: Node) -> tuple[tuple[Any, ...], dict[str, Any]]:
        args, kwargs = super().fetch_args_kwargs_from_env(n)
        bias = self.biases.get(n.name)
        if bias is None:
            return args, kwargs
        if len(args) > 2:
            return (*args[:2], bias, *args[3:]), kwargs
        if len(args) == 2 and "bias" not in kwargs:
            return (*args, bias), kwargs
        return args, {**kwargs, "bias": bias}


class AlgorithmReference:
    """Checks the exact part, then returns the quantized reference's outputs."""

    def __init__(self, before: Program, records: Sequence[Any], plan: Any, rtol: float,
                 atol: float) -> None:
        self.before, self.rtol, self.atol = before, rtol, atol
        self.folded = _with_weights(before, plan.folded) if plan.folded else None
        self.quantized = _WithBiases(_with_weights(before, plan.adjusted), records,
                                     plan.new_biases, plan.low_rank)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.folded is not None:
            found = compare_outputs(self.folded(*args, **kwargs), self.before(*args, **kwargs),
                                    rtol=self.rtol, atol=self.atol, scale_atol=True)
            if not found.ok:
                raise ContractViolation(
                    "insert_fake_quant: the exact part of its contract failed: the program "
                    "with AWQ's scales folded (before quantization) differs from the input "
                    f"program: {found.describe()}")
        return self.quantized(*args, **kwargs)
