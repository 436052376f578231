"""The end-to-end check of ``compile(verify=True)``: the final program against the user's model.

Each pass is checked against the program before it; this check closes the chain against the
original ``nn.Module``, on the same samples (each run from the model's own state, which is
restored afterwards). What it must meet is the composition of the contracts that ran:

* every pass that changed the program has an ``exact`` contract: the final program equals the
  model within the sum of their tolerances (errors of a chain add up) plus the trace's own
  allowance ``TRACE_TOLERANCE`` (the exported graph runs the same ATen kernels, but a
  decomposed op may round differently); a violation the float64 referee does not rule float
  rounding (:mod:`graphpress.pipeline.rounding`, the model run in float64 as the truth)
  raises ``ContractViolation``;
* otherwise (pruning, quantization, unchecked plugins change values on purpose) the deviation
  is measured and reported, not judged: max abs error, SQNR and cosine similarity against the
  model, in the report under "end-to-end vs model".

Both runs show a progress bar on a terminal when they take over a second
(:mod:`graphpress.ir.progress`).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import TYPE_CHECKING

from graphpress.errors import ContractViolation
from graphpress.numerics import compare_outputs, output_metrics
from graphpress.pipeline.rounding import float64_referee, module_in_float64
from graphpress.pipeline.samples import Samples, run_samples

if TYPE_CHECKING:
    import torch

    from graphpress.ir.program import Program
    from graphpress.pipeline.report import PassRecord, Report

__all__ = ["TRACE_TOLERANCE", "check_end_to_end"]

TRACE_TOLERANCE = 1e-6


def _exact_tolerance(records: Sequence[PassRecord]) -> tuple[float, float] | None:
    """(rtol, atol) of the composed exact contracts, or None if a changing pass is not exact."""
    rtol = atol = TRACE_TOLERANCE
    for record in records:
        if not record.changed:
            continue
        if record.contract_kind != "exact":
            return None
        rtol += record.contract_tolerance[0]
        atol += record.contract_tolerance[1]
    return rtol, atol


def check_end_to_end(model: torch.nn.Module, program: Program, samples: Samples,
                     report: Report) -> None:
    """Compare ``program`` with ``model`` on ``samples`` (see the module docstring)."""
    if getattr(model, "training", False):
        report.extra["end-to-end vs model"] = (
            "not checked: the model is in training mode (call model.eval() for a check)")
        return
    expected = run_samples(model, samples, description="end-to-end: the model")
    actual = run_samples(program, samples, description="end-to-end: the program")
    tolerance = _exact_tolerance(report.records)
    if tolerance is None:
        worst = compare_outputs(actual, expected, rtol=0.0, atol=float("inf"))
        metrics = output_metrics(actual, expected, ("sqnr_db", "cosine"))
        report.extra["end-to-end vs model"] = (
            f"max abs error {worst.max_abs_error:.3g}, SQNR {metrics['sqnr_db']:.1f} dB, "
            f"cosine {metrics['cosine']:.6f} (the pipeline changes values on purpose)")
        return
    rtol, atol = tolerance
    worst_error = 0.0
    rounding: list[str] = []
    reference64 = functools.cache(lambda: module_in_float64(model))  # built on need, once
    for i, (got, want) in enumerate(zip(actual, expected)):
        found = compare_outputs(got, want, rtol=rtol, atol=atol, scale_atol=True)
        if not found.ok:
            why = float64_referee(reference64, samples[i], got, want, atol,
                                  names=("the compiled program", "the model"))
            if why is not None:
                rounding.append(f"sample {i}: {why}")
                worst_error = max(worst_error, found.max_abs_error)
                continue
            ran = ", ".join(r.name for r in report.records if r.changed) or "none"
            raise ContractViolation(
                f"end to end, the compiled program differs from the model beyond the composed "
                f"exact contracts (rtol={rtol:g}, atol={atol:g}): {found.describe()} "
                f"(sample {i}); passes that changed the program: {ran}")
        worst_error = max(worst_error, found.max_abs_error)
    report.extra["end-to-end vs model"] = (
        f"max abs error {worst_error:.3g} (the composed exact contracts, rtol={rtol:g}, "
        f"atol={atol:g}, hold" + (f"; float rounding only beyond them on {'; '.join(rounding)}"
                                  if rounding else "") + ")")
