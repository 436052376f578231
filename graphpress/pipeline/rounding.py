"""The float64 referee: is a difference between two fp32 results only float rounding?

An exact contract means "the same function, up to float rounding", and rounding grows with
depth: folding the 52 BatchNorms of a MobileNetV2 moves its fp32 logits by more than 1e-5 of
their scale, as does re-rounding its weights by one ulp. So an elementwise check that fails
goes to this referee before it is raised. The reference computation (the input program, or the
user's model end to end), run in float64 on the failing sample, is the truth ``t``; with ``a``
the rewritten fp32 result and ``e`` the reference's own fp32 result, the difference is rounding
when

    max|a - t| <= max(ROUNDING_SLACK * max|e - t|, atol * rms(t))

that is, the rewrite may carry several times the rounding noise its input already had, and
nothing more (with no noise in the input, only the contract's own tolerance). A math error
larger than that noise (a wrong epsilon in a 10-layer net shows at 1e-6 relative, fp32 noise at
1e-7) still fails. A computation that cannot run in float64 (an op pinning float32) gets no
ruling, and the violation stands.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch.utils import _pytree as pytree

from graphpress.numerics import compare_outputs
from graphpress.pipeline.samples import run_samples

if TYPE_CHECKING:
    from graphpress.ir.program import Program

__all__ = ["ROUNDING_SLACK", "float64_referee", "module_in_float64", "program_in_float64"]

# How much noisier than the reference a rounding-only difference may be. The largest error over
# a few outputs is a noisy statistic: folding MobileNetV2's BatchNorms (one thread), the ratio of
# the folded program's error to the unfolded one's, both fp32 against float64, was 0.7, 0.8, 0.6
# and 4.4 on four samples of its 20 logits.
ROUNDING_SLACK = 8.0


def _double(value: Any) -> Any:
    if isinstance(value, torch.Tensor) and value.dtype == torch.float32:
        return value.double()
    return value


def program_in_float64(program: Program) -> Program:
    """A copy of ``program`` whose fp32 weights and constants are float64."""
    clone = program.copy()
    for store in (clone.state_dict, clone.constants):
        for name, value in store.items():
            store[name] = _double(value)
    return clone


def module_in_float64(model: torch.nn.Module) -> torch.nn.Module:
    """A float64 copy of ``model`` (the user's model is never touched)."""
    return copy.deepcopy(model).double()


def _max_abs(actual: Any, expected: Any) -> float:
    return compare_outputs(actual, expected, rtol=0.0, atol=float("inf")).max_abs_error


def _rms(tree: Any) -> float:
    leaves = [t for t in pytree.tree_leaves(tree)
              if isinstance(t, torch.Tensor) and t.is_floating_point() and t.numel()]
    return max((float(t.pow(2).mean().sqrt()) for t in leaves), default=0.0)


def float64_referee(make_reference64: Callable[[], Any], sample: Any, actual: Any,
                    expected: Any, atol: float,
                    names: tuple[str, str] = ("the rewritten program", "the input program")
                    ) -> str | None:
    """Why ``actual`` differs from ``expected`` (the reference's fp32 result on ``sample``) by
    float rounding only, or None when it does not, or when float64 cannot tell. ``names``
    (of ``actual``'s and ``expected``'s computations) word the ruling."""
    try:
        truth = run_samples(make_reference64(), [pytree.tree_map(_double, sample)])[0]
    except Exception:  # an op that needs float32 operands: the referee has no say
        return None
    if not all(t.dtype == torch.float64 for t in pytree.tree_leaves(truth)
               if isinstance(t, torch.Tensor) and t.is_floating_point()):
        return None
    new_error = _max_abs(pytree.tree_map(_double, actual), truth)
    own_error = _max_abs(pytree.tree_map(_double, expected), truth)
    if new_error > max(ROUNDING_SLACK * own_error, atol * _rms(truth)):
        return None
    return (f"against {names[1]} run in float64, {names[0]} is {new_error:.3g} off and "
            f"{names[1]} itself (fp32) {own_error:.3g}")
