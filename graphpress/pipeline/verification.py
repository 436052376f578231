"""Numerical verification of pass contracts.

``check_contract`` runs the rewritten program on the samples (:mod:`graphpress.pipeline.samples`:
the example inputs plus generated ones, each run from the same state and leaving none) and
compares with the contract's reference: the outputs of the program before the pass (``exact``,
reused from the previous check so each pass costs one run), or :meth:`Pass.reference`
(``reference``: elementwise; ``statistical``: agreement metrics with their minimums). Absolute
tolerances scale with each output's magnitude and dtypes must match.

On a violation of an exact contract, ``first_divergence`` finds where it appeared. It runs both
graphs node by node and compares the nodes the pass left untouched (same name, same target,
same arguments, same weight tensors) with their counterparts before: the first one (in
execution order) whose value differs is downstream of the rewrite that went wrong, and the
rewritten nodes it depends on are named. Nodes the pass created or rewrote are never blamed,
since their values may differ on purpose (fold_bn's conv now computes the old batch norm).

An exact violation is first put to the float64 referee (:mod:`graphpress.pipeline.rounding`):
a difference that is only fp32 rounding, no larger than the input program's own, does not fail
the contract; the report says which samples needed the referee.

Runs over the samples show a progress bar on a terminal when they take over a second
(:mod:`graphpress.ir.progress`).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch.fx import Node

from graphpress.errors import ContractViolation
from graphpress.ir.runner import ProgramRunner
from graphpress.numerics import Comparison, compare_outputs, output_metrics
from graphpress.pipeline.rounding import float64_referee, program_in_float64
from graphpress.pipeline.samples import Samples, run_samples

if TYPE_CHECKING:
    from graphpress.ir.program import Program
    from graphpress.pipeline.base import Contract, Pass, PassResult

__all__ = ["Verdict", "check_contract", "first_divergence", "touched_nodes"]


@dataclass
class Verdict:
    """What a contract check measured: the worst error (elementwise kinds), the metrics
    (statistical kinds), and the outputs of the checked program for the next check."""

    max_error: float
    outputs: list[Any]
    metrics: dict[str, float] = field(default_factory=dict)


def _signature(program: Program, node: Node) -> tuple[Any, ...]:
    def name(value: Any) -> Any:
        return ("node", value.name) if isinstance(value, Node) else repr(value)

    weight = program.weight(node) if program.is_weight(node) else None
    return (node.op, str(node.target), torch.fx.node.map_aggregate(node.args, name),
            torch.fx.node.map_aggregate(node.kwargs, name), id(weight))


def touched_nodes(before: Program, after: Program) -> set[str]:
    """Names of ``after``'s nodes a pass created or rewrote (target, arguments or weight)."""
    old = {n.name: n for n in before.graph.nodes}
    touched = set()
    for node in after.graph.nodes:
        counterpart = old.get(node.name)
        if counterpart is None or _signature(after, node) != _signature(before, counterpart):
            touched.add(node.name)
    return touched


def _record(program: Program, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    ProgramRunner(program, lambda node, value: values.__setitem__(node.name, value))(
        *args, **kwargs)
    return values


def first_divergence(before: Program, after: Program, args: tuple[Any, ...],
                     kwargs: dict[str, Any], rtol: float, atol: float) -> str:
    """Describe the first untouched node of ``after`` whose value differs from ``before``'s."""
    try:
        old, new = _record(before, args, kwargs), _record(after, args, kwargs)
    except Exception as exc:  # the localisation is a diagnostic; never mask the violation
        return f"(could not localise: {type(exc).__name__}: {exc})"
    touched = touched_nodes(before, after)
    for node in after.graph.nodes:
        if (node.op in ("placeholder", "output") or node.name in touched
                or node.name not in old):
            continue
        found = compare_outputs(new[node.name], old[node.name], rtol=rtol, atol=atol,
                                scale_atol=True)
        if not found.ok:
            source = after.source_module(node)
            causes = _touched_ancestors(node, touched)
            return (f"first differing node the pass did not rewrite: %{node.name} "
                    f"({node.target})" + (f" in module {source!r}" if source else "")
                    + f": {found.describe()}"
                    + (f"; it reads the rewritten {', '.join('%' + c for c in causes)}"
                       if causes else ""))
    rewritten = ", ".join(sorted(touched)[:8])
    return f"no node the pass left untouched differs; the rewritten nodes are: {rewritten}"


def _touched_ancestors(node: Node, touched: set[str], limit: int = 4) -> list[str]:
    found: list[str] = []
    stack, seen = list(node.all_input_nodes), set()
    while stack and len(found) < limit:
        current = stack.pop()
        if current in seen:
            continue
        seen.add(current)
        if current.name in touched:
            found.append(current.name)
        else:
            stack.extend(current.all_input_nodes)
    return found


def check_contract(pass_: Pass, contract: Contract, before: Program, after: Program,
                   result: PassResult, samples: Samples, expected: list[Any] | None,
                   history: list[str]) -> Verdict:
    """Check ``contract`` (``pass_``'s, for ``before``) on every sample."""
    actual = run_samples(after, samples, description=f"verifying {pass_.name}")
    if contract.kind == "unchecked":
        return Verdict(float("nan"), actual)
    if contract.kind == "exact" and expected is not None:
        reference = expected
    else:
        reference = run_samples(pass_.reference(before, result), samples,
                                description=f"{pass_.name}: reference")
    ran = ", ".join(history) or "none"
    if contract.kind == "statistical":
        metrics = output_metrics(actual, reference, tuple(m for m, _ in contract.minimums))
        failed = [f"{m} = {metrics[m]:.4g} < {low:g}" for m, low in contract.minimums
                  if not metrics[m] >= low]
        if failed:
            raise ContractViolation(
                f"pass {pass_.describe()!r} broke its contract {contract}: "
                f"{'; '.join(failed)} over {len(samples)} samples\npasses run before it: {ran}")
        worst = compare_outputs(actual, reference, rtol=0.0, atol=float("inf"))
        return Verdict(worst.max_abs_error, actual, metrics)
    worst: Comparison | None = None
    worst_sample = 0
    rounding: list[str] = []
    reference64 = functools.cache(lambda: program_in_float64(before))  # built on need, once
    for i, (got, want) in enumerate(zip(actual, reference)):
        found = compare_outputs(got, want, rtol=contract.rtol, atol=contract.atol,
                                scale_atol=True)
        if not found.ok and contract.kind == "exact":
            why = float64_referee(reference64, samples[i], got, want,
                                  contract.atol)
            if why is not None:
                rounding.append(f"sample {i}: {why}")
                continue
        if worst is None or (worst.ok and (not found.ok
                                           or found.max_abs_error > worst.max_abs_error)):
            worst, worst_sample = found, i
    if worst is None:  # every sample differed by float rounding only
        worst = compare_outputs(actual, reference, rtol=0.0, atol=float("inf"))
    if not worst.ok:
        args, kwargs = samples[worst_sample]
        where = (first_divergence(before, after, args, kwargs, contract.rtol, contract.atol)
                 if contract.kind == "exact" else "")
        raise ContractViolation(
            f"pass {pass_.describe()!r} broke its contract {contract}: {worst.describe()} "
            f"(sample {worst_sample} of {len(samples)}). {where}\npasses run before it: {ran}")
    if rounding:
        result.details.setdefault("summary", []).extend(
            f"verification: float rounding only beyond rtol/atol on {line}" for line in rounding)
        worst = compare_outputs(actual, reference, rtol=0.0, atol=float("inf"))
    metrics = {}
    if contract.report_vs_input and expected is not None:
        metrics = {f"{name} vs input": value for name, value in
                   output_metrics(actual, expected, contract.report_vs_input).items()}
    return Verdict(worst.max_abs_error, actual, metrics)
