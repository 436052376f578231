"""Static activation qparams for insert_fake_quant: one observer per quantized value, run over
the calibration batches on the float program (before any fake-quant is inserted)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from graphpress.errors import InputError
from graphpress.ir.program import Program
from graphpress.quant.spec import QuantSpec

__all__ = ["activation_qparams"]


def activation_qparams(program: Program, operands: Sequence[Any],
                       batches: Sequence[tuple[tuple[Any, ...], dict[str, Any]]]
                       ) -> dict[tuple[str, QuantSpec], tuple[torch.Tensor, Any]]:
    """``(value name, spec) -> (scale, zero_point)`` for every static activation operand."""
    from graphpress.quant.calibration import calibrate
    from graphpress.quant.observers import make_observer

    if not batches:
        names = ", ".join(sorted({op.value.name for op in operands})[:4])
        raise InputError(
            f"static activation quantization needs calibration data (values {names}, ...): "
            "pass gp.compile(..., calibration_data=[(x,), ...]) with a few representative "
            "batches, or use a dynamic scheme such as 'int8_dynamic'")
    observers: dict[str, Any] = {}
    keys: dict[tuple[str, QuantSpec], str] = {}
    for operand in operands:
        key = (operand.value.name, operand.spec)
        if key in keys:
            continue
        label = f"{operand.value.name}#{len(keys)}"
        keys[key] = label
        shape = tuple(operand.value.meta["val"].shape)
        observers[label] = (operand.value.name, make_observer(operand.spec, shape))
    # one observer per node and calibration run (two specs on one value need two runs)
    rounds: list[dict[str, Any]] = []
    for node_name, observer in observers.values():
        target = next((r for r in rounds if node_name not in r), None)
        if target is None:
            target = {}
            rounds.append(target)
        target[node_name] = observer
    for observing in rounds:
        calibrate(program, observing, batches)
    return {key: observers[label][1].qparams() for key, label in keys.items()}
