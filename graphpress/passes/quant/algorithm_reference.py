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
   quantize-dequantize on every recorded operand with the recorded qparams), and each bias
   correction added to its layer's output, per channel.
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


class _Shifted(QuantizedReference):
    def __init__(self, before: Program, records: Sequence[Any],
                 shifts: Mapping[str, tuple[torch.Tensor, int]]) -> None:
        super().__init__(before, records)
        self.shifts = shifts

    def evaluate(self, n: Node) -> Any:
        value = super().evaluate(n)
        if n.name not in self.shifts:
            return value
        shift, dim = self.shifts[n.name]
        view = [1] * value.dim()
        view[dim] = shift.numel()
        return value + shift.view(view).to(value.dtype)


class AlgorithmReference:
    """Checks the exact part, then returns the quantized reference's outputs."""

    def __init__(self, before: Program, records: Sequence[Any], plan: Any, rtol: float,
                 atol: float) -> None:
        self.before, self.rtol, self.atol = before, rtol, atol
        self.folded = _with_weights(before, plan.folded) if plan.folded else None
        self.quantized = _Shifted(_with_weights(before, plan.adjusted), records, plan.shifts)

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
