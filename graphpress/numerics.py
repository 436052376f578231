"""Numerical comparison of model outputs.

Outputs are flattened with pytree (so ``ModelOutput``, dicts and tuples all work) and
compared leaf by leaf. An element passes when ``|actual - expected| <= atol + rtol * |expected|``
(the rule of ``torch.testing.assert_close``); the worst element is the one with the largest
ratio of its error to its allowance, and it is reported with its leaf path and index so a
failure says where it happened, not only that it happened.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch.utils import _pytree as pytree

__all__ = ["Comparison", "compare_outputs"]


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


def compare_outputs(actual: Any, expected: Any, *, rtol: float, atol: float) -> Comparison:
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
        if b.numel() == 0:
            continue
        a64, b64 = a.detach().to(torch.float64), b.detach().to(torch.float64)
        both_nan = torch.isnan(a64) & torch.isnan(b64)
        same_inf = torch.isinf(b64) & (a64 == b64)
        diff = (a64 - b64).abs().masked_fill(both_nan | same_inf, 0.0).nan_to_num(nan=float("inf"))
        allowance = atol + rtol * b64.abs().nan_to_num(nan=0.0, posinf=0.0)
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
