"""Numerical comparison of model outputs.

Outputs are flattened with pytree (so ``ModelOutput``, dicts and tuples all work) and
compared leaf by leaf. An element passes when ``|actual - expected| <= atol + rtol * |expected|``
(the rule of ``torch.testing.assert_close``); the worst element is the one with the largest
ratio of its error to its allowance, and it is reported with its leaf path and index so a
failure says where it happened, not only that it happened. dtypes must match.

With ``scale_atol=True`` (what verification uses) the absolute tolerance is relative to the
leaf's magnitude: ``atol_leaf = atol * rms(expected)`` (``atol`` itself when the leaf is all
zeros), so an atol of 1e-5 means "1e-5 of the typical value" on outputs near 1e-4 as on
outputs near 1e4, instead of 10% of the former and nothing of the latter.

:func:`output_metrics` measures statistical agreement for contracts that are not elementwise
(quantization): ``sqnr_db`` = 10 log10(sum r^2 / sum (a - r)^2), ``cosine`` similarity of the
flattened outputs, and ``top1_agreement``, the share of rows whose arg-max over the last dim
agrees.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils import _pytree as pytree

__all__ = ["METRICS", "Comparison", "compare_outputs", "output_metrics"]


@dataclass(frozen=True)
class Comparison:
    """Result of comparing two output structures."""

    ok: bool
    max_abs_error: float
    max_rel_error: float
    worst_path: str = ""
    worst_index: tuple[int, ...] = ()
    worst_actual: float = 0.0
    worst_expected: float = 0.0
    problem: str = ""

    def describe(self) -> str:
        if self.problem:
            return self.problem
        where = f"{self.worst_path}[{', '.join(map(str, self.worst_index))}]"
        return (
            f"max abs error {self.max_abs_error:.3g} (max rel {self.max_rel_error:.3g}); "
            f"worst element {where}: got {self.worst_actual:.9g}, "
            f"expected {self.worst_expected:.9g}"
        )


def _leaves(tree: Any) -> list[tuple[str, Any]]:
    flat, _ = pytree.tree_flatten_with_path(tree)
    return [(pytree.keystr(path) or "output", leaf) for path, leaf in flat]


def compare_outputs(actual: Any, expected: Any, *, rtol: float, atol: float,
                    scale_atol: bool = False) -> Comparison:
    """Compare two output structures; never raises on a mismatch, reports it instead."""
    got, want = _leaves(actual), _leaves(expected)
    if len(got) != len(want):
        return Comparison(False, float("inf"), float("inf"),
                          problem=f"output structure differs: {len(got)} leaves vs {len(want)}")
    worst = Comparison(True, 0.0, 0.0)
    worst_ratio = -1.0
    for (path, a), (_, b) in zip(got, want):
        if not isinstance(b, torch.Tensor):
            if a != b:
                return Comparison(False, float("inf"), float("inf"),
                                  problem=f"non-tensor output {path} differs: {a!r} vs {b!r}")
            continue
        if not isinstance(a, torch.Tensor) or a.shape != b.shape:
            shape = tuple(a.shape) if isinstance(a, torch.Tensor) else type(a).__name__
            return Comparison(False, float("inf"), float("inf"),
                              problem=f"output {path} has shape {shape}, expected {tuple(b.shape)}")
        if a.dtype != b.dtype:
            return Comparison(False, float("inf"), float("inf"),
                              problem=f"output {path} has dtype {a.dtype}, expected {b.dtype}")
        if b.numel() == 0:
            continue
        a64, b64 = a.detach().to(torch.float64), b.detach().to(torch.float64)
        leaf_atol = atol
        if scale_atol:
            rms = float(b64.nan_to_num(nan=0.0, posinf=0.0, neginf=0.0).square().mean().sqrt())
            leaf_atol = atol * rms if rms > 0 else atol
        both_nan = torch.isnan(a64) & torch.isnan(b64)
        same_inf = torch.isinf(b64) & (a64 == b64)
        diff = (a64 - b64).abs().masked_fill(both_nan | same_inf, 0.0).nan_to_num(nan=float("inf"))
        allowance = leaf_atol + rtol * b64.abs().nan_to_num(nan=0.0, posinf=0.0)
        ratio = diff / allowance.clamp_min(torch.finfo(torch.float64).tiny)
        flat_index = int(ratio.argmax())
        index = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat_index), b.shape))
        rel = diff / b64.abs().clamp_min(torch.finfo(torch.float64).tiny)
        max_abs = max(worst.max_abs_error, float(diff.max()))
        max_rel = max(worst.max_rel_error, float(rel.masked_fill(diff == 0, 0.0).max()))
        leaf_ratio = float(ratio.reshape(-1)[flat_index])
        if leaf_ratio > worst_ratio:
            worst_ratio = leaf_ratio
            worst = Comparison(
                leaf_ratio <= 1.0, max_abs, max_rel, path, index,
                float(a64.reshape(-1)[flat_index]), float(b64.reshape(-1)[flat_index]),
            )
        else:
            worst = Comparison(worst.ok, max_abs, max_rel, worst.worst_path, worst.worst_index,
                               worst.worst_actual, worst.worst_expected)
    return worst


def _pairs(actual: Any, expected: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    got, want = _leaves(actual), _leaves(expected)
    return [(a.detach().to(torch.float64), b.detach().to(torch.float64))
            for (_, a), (_, b) in zip(got, want)
            if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)
            and a.shape == b.shape and b.is_floating_point() and b.numel()]


def _sqnr_db(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    signal = sum(float(b.square().sum()) for _, b in pairs)
    noise = sum(float((a - b).square().sum()) for a, b in pairs)
    if noise == 0:
        return float("inf")
    return 10 * math.log10(signal / noise) if signal > 0 else float("-inf")


def _cosine(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    a = torch.cat([a.reshape(-1) for a, _ in pairs])
    b = torch.cat([b.reshape(-1) for _, b in pairs])
    denominator = float(a.norm() * b.norm())
    return float(a @ b) / denominator if denominator > 0 else float(torch.equal(a, b))


def _top1_agreement(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    agree = total = 0
    for a, b in pairs:
        if a.dim() == 0:
            continue
        same = a.argmax(dim=-1) == b.argmax(dim=-1)
        agree, total = agree + int(same.sum()), total + same.numel()
    return agree / total if total else 1.0


METRICS: dict[str, Callable[[list[tuple[torch.Tensor, torch.Tensor]]], float]] = {
    "sqnr_db": _sqnr_db,
    "cosine": _cosine,
    "top1_agreement": _top1_agreement,
}


def output_metrics(actual: Any, expected: Any, names: tuple[str, ...]) -> dict[str, float]:
    """The named statistical metrics (keys of :data:`METRICS`) of ``actual`` vs ``expected``,
    over all floating-point output leaves of matching shape."""
    unknown = [n for n in names if n not in METRICS]
    if unknown:
        raise ValueError(f"unknown metric {unknown[0]!r}; known: {', '.join(METRICS)}")
    pairs = _pairs(actual, expected)
    if not pairs:
        return {name: float("nan") for name in names}
    return {name: METRICS[name](pairs) for name in names}
