"""The independent reference of insert_fake_quant's contract.

It runs the program *before* the pass node by node (the calibration runner) and, at every
layer the pass quantized, passes the quantized operands through
``graphpress.testing.quant_reference`` (plain PyTorch, written apart from the ``graphpress::``
ops) with the qparams the pass stored; dynamic operands get their qparams from the reference's
own per-block min/max. Nothing else differs, so the pass's output must equal it at fp32
tolerance.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch.fx import Node

from graphpress.ir.program import Program
from graphpress.ir.runner import ProgramRunner

__all__ = ["QuantizedReference"]


class QuantizedReference(ProgramRunner):
    """``before`` with reference quantize-dequantize on the operands of ``records``."""

    def __init__(self, before: Program, records: Sequence[Any]) -> None:
        super().__init__(before)
        self.by_layer: dict[str, list[Any]] = {}
        for record in records:
            self.by_layer.setdefault(record.layer, []).append(record)

    def evaluate(self, n: Node) -> Any:
        records = self.by_layer.get(n.name)
        if not records:
            return super().evaluate(n)
        from graphpress.testing.quant_reference import reference_fake_quantize, reference_qparams

        args, kwargs = self.fetch_args_kwargs_from_env(n)
        args = list(args)
        for record in records:
            spec = record.spec
            qmin, qmax = spec.qrange()
            x = (args[record.index] if record.position is None
                 else args[record.index][record.position])
            block = [b if b is not None else x.shape[dim]  # a symbolic (dynamic) dim
                     for dim, b in enumerate(record.block_size)]
            if spec.dynamic:
                scale, zero_point = reference_qparams(x, block, qmin, qmax, spec.symmetric,
                                                      spec.dtype)
                zero_point = None if spec.symmetric else zero_point
            else:
                scale, zero_point = record.scale, record.zero_point
            quantized = reference_fake_quantize(x, block, scale, zero_point, qmin, qmax,
                                                spec.dtype)
            if record.position is None:
                args[record.index] = quantized
            else:
                items = list(args[record.index])
                items[record.position] = quantized
                args[record.index] = items
        return getattr(self, n.op)(n.target, tuple(args), kwargs)
