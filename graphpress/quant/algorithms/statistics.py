"""Activation statistics for data-aware quantization, gathered with the calibration runner.

:func:`collect` runs the calibration batches through a Program once
(``graphpress.ir.runner.run_batches``, with its progress bar) and feeds the value of each named
node to its collectors:

* :class:`AbsMax` — ``max |x|`` per channel (SmoothQuant's activation range);
* :class:`AbsMean` — ``mean |x|`` per channel (AWQ's salience);
* :class:`Mean` — ``E[x]`` over the batch dim, kept at the value's per-sample shape (bias
  correction: a layer linear in ``x`` shifts its mean output by ``layer(E[x])``);
* :class:`Gram` — ``H = sum_rows x x^T`` over the rows of the last dim and their count
  (GPTQ's Hessian ``2 X^T X``, EoRA's eigenspace), optionally per fold of the batches;
* :class:`Rows` — up to ``limit`` rows of the last dim, evenly strided over the batches (AWQ's
  search replays them);
* :class:`Values` — the whole values of the first ``limit`` batches (AWQ's block objective
  re-runs a region of the graph on them).

Statistics are float64 accumulations (float32 for the sampled rows), so the order of the
batches changes them only by rounding.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch.fx import Node

from graphpress.errors import InputError
from graphpress.ir.program import Program
from graphpress.ir.runner import run_batches

__all__ = ["AbsMax", "AbsMean", "Gram", "Mean", "Rows", "Values", "collect"]


class _Collector:
    def update(self, value: torch.Tensor) -> None:
        raise NotImplementedError


def _per_channel(value: torch.Tensor, dim: int) -> torch.Tensor:
    return value.detach().movedim(dim, -1).reshape(-1, value.shape[dim]).to(torch.float64)


class AbsMax(_Collector):
    def __init__(self, dim: int = -1) -> None:
        self.dim, self.value = dim, None

    def update(self, value: torch.Tensor) -> None:
        amax = _per_channel(value, self.dim).abs().amax(dim=0)
        self.value = amax if self.value is None else torch.maximum(self.value, amax)


class AbsMean(_Collector):
    def __init__(self, dim: int = -1) -> None:
        self.dim, self.total, self.count = dim, None, 0

    def update(self, value: torch.Tensor) -> None:
        rows = _per_channel(value, self.dim).abs()
        total = rows.sum(dim=0)
        self.total = total if self.total is None else self.total + total
        self.count += rows.shape[0]

    @property
    def value(self) -> torch.Tensor:
        return self.total / max(self.count, 1)


class Mean(_Collector):
    def __init__(self) -> None:
        self.total, self.count = None, 0

    def update(self, value: torch.Tensor) -> None:
        total = value.detach().to(torch.float64).sum(dim=0)
        self.total = total if self.total is None else self.total + total
        self.count += value.shape[0]

    @property
    def value(self) -> torch.Tensor:
        return self.total / max(self.count, 1)


class Gram(_Collector):
    """``total`` over every batch; with ``folds = F > 1`` also ``fold_totals``, batch ``b``
    counted in fold ``b mod F`` (GPTQ's damping search cross-validates over them)."""

    def __init__(self, folds: int = 1) -> None:
        self.total, self.count, self.batches = None, 0, 0
        self.fold_totals: list[torch.Tensor | None] = [None] * folds if folds > 1 else []

    def update(self, value: torch.Tensor) -> None:
        rows = value.detach().reshape(-1, value.shape[-1]).to(torch.float64)
        gram = rows.T @ rows
        self.total = gram if self.total is None else self.total + gram
        self.count += rows.shape[0]
        if self.fold_totals:
            fold = self.batches % len(self.fold_totals)
            previous = self.fold_totals[fold]
            self.fold_totals[fold] = gram if previous is None else previous + gram
        self.batches += 1


class Rows(_Collector):
    def __init__(self, limit: int = 4096) -> None:
        self.limit, self.parts, self.seen = limit, [], 0

    def update(self, value: torch.Tensor) -> None:
        rows = value.detach().reshape(-1, value.shape[-1]).to(torch.float32)
        self.parts.append(rows)
        self.seen += rows.shape[0]

    @property
    def value(self) -> torch.Tensor:
        rows = torch.cat(self.parts)
        if rows.shape[0] <= self.limit:
            return rows
        index = torch.linspace(0, rows.shape[0] - 1, self.limit).round().long()
        return rows[index]


class Values(_Collector):
    def __init__(self, limit: int = 8) -> None:
        self.limit, self.value = limit, []

    def update(self, value: Any) -> None:
        if len(self.value) < self.limit:
            self.value.append(value.detach() if isinstance(value, torch.Tensor) else value)


def collect(program: Program, batches: Sequence[tuple[tuple[Any, ...], dict[str, Any]]],
            collectors: Mapping[str, Iterable[_Collector]], *, what: str) -> None:
    """Run ``batches`` through ``program`` once, feeding each named node's value to its
    collectors; ``what`` names the algorithm in the error raised without batches."""
    table = {name: list(group) for name, group in collectors.items()}
    if not table:
        return
    if not batches:
        raise InputError(f"{what} needs calibration data: pass gp.compile(..., "
                         "calibration_data=[(x,), ...]) with a few representative batches")

    def hook(node: Node, value: Any) -> None:
        for collector in table.get(node.name, ()):
            collector.update(value)

    run_batches(program, batches, hook, nodes=set(table), description=what)
