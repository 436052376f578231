"""Static activation qparams for insert_fake_quant: one observer per quantized value (or per
shared-qparams group, fed every value of the group), run over the calibration batches on the
float program (before any fake-quant is inserted)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch.fx.experimental.symbolic_shapes import optimization_hint

from graphpress.errors import InputError
from graphpress.ir.program import Program
from graphpress.quant.spec import QuantSpec

__all__ = ["activation_qparams"]


def activation_qparams(program: Program, operands: Sequence[Any],
                       batches: Sequence[tuple[tuple[Any, ...], dict[str, Any]]],
                       groups: Mapping[str, int] | None = None
                       ) -> dict[tuple[str, QuantSpec], tuple[torch.Tensor, Any]]:
    """``(value name, spec) -> (scale, zero_point)`` for every static activation operand; the
    values of one shared-qparams group (``groups``: value name -> group id) with one spec share
    one observer, which sees all of them."""
    from graphpress.quant.calibration import calibrate
    from graphpress.quant.observers import make_observer

    groups = groups or {}
    if not batches:
        names = ", ".join(sorted({op.value.name for op in operands})[:4])
        raise InputError(
            f"static activation quantization needs calibration data (values {names}, ...): "
            "pass gp.compile(..., calibration_data=[(x,), ...]) with a few representative "
            "batches, or use a dynamic scheme such as 'int8_dynamic'")
    observers: dict[Any, tuple[set[str], Any]] = {}
    keys: dict[tuple[str, QuantSpec], Any] = {}
    for operand in operands:
        key = (operand.value.name, operand.spec)
        if key in keys:
            continue
        group = groups.get(operand.value.name)
        label = ("group", group, operand.spec) if group is not None else ("value", key)
        keys[key] = label
        if label not in observers:
            # a symbolic (dynamic) dim observes at its traced size; per-tensor and per-token
            # observers take any size of it on every batch
            shape = tuple(optimization_hint(s) for s in operand.value.meta["val"].shape)
            observers[label] = (set(), make_observer(operand.spec, shape))
        observers[label][0].add(operand.value.name)
    # a node feeds one observer per calibration run (two specs on one value need two runs)
    rounds: list[dict[str, Any]] = []
    for names, observer in observers.values():
        target = next((r for r in rounds if not names & r.keys()), None)
        if target is None:
            target = {}
            rounds.append(target)
        target.update(dict.fromkeys(names, observer))
    for observing in rounds:
        calibrate(program, observing, batches)
    return {key: observers[label][1].qparams() for key, label in keys.items()}
