"""``assert_equivalent``: compare any two callables on the same inputs.

Both are called on each input set under ``torch.no_grad()``; outputs are compared leaf by leaf
(see :mod:`graphpress.numerics`) and a failure reports the worst element: which output leaf,
which index, both values and the errors.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from graphpress.numerics import Comparison, compare_outputs

__all__ = ["assert_equivalent"]


def assert_equivalent(actual: Callable[..., Any], expected: Callable[..., Any],
                      inputs: Sequence[Any] | torch.Tensor, *, rtol: float = 1e-5,
                      atol: float = 1e-5, kwargs: dict[str, Any] | None = None,
                      msg: str = "") -> Comparison:
    """Assert ``actual(*inputs) ≈ expected(*inputs)``; returns the comparison for reporting.

    ``inputs`` is one tuple of positional arguments (a single tensor is accepted), or a list
    of such tuples to compare on several input sets.
    """
    if isinstance(inputs, torch.Tensor):
        input_sets: list[tuple[Any, ...]] = [(inputs,)]
    elif isinstance(inputs, list) and inputs and all(isinstance(i, tuple) for i in inputs):
        input_sets = list(inputs)
    else:
        input_sets = [tuple(inputs)]
    worst: Comparison | None = None
    for index, args in enumerate(input_sets):
        with torch.no_grad():
            got = actual(*args, **(kwargs or {}))
            want = expected(*args, **(kwargs or {}))
        found = compare_outputs(got, want, rtol=rtol, atol=atol)
        if not found.ok:
            prefix = f"{msg}: " if msg else ""
            raise AssertionError(
                f"{prefix}outputs differ on input set {index} (rtol={rtol:g}, atol={atol:g}): "
                f"{found.describe()}")
        if worst is None or found.max_abs_error > worst.max_abs_error:
            worst = found
    assert worst is not None, "assert_equivalent needs at least one input set"
    return worst
