"""Numerical verification of pass contracts.

``check_contract`` runs the rewritten program on the sample inputs and compares with the
contract's reference: the outputs of the program before the pass (``exact``, reused from the
previous check so each pass costs one run) or :meth:`Pass.reference` (``reference``).

On a violation of an exact contract, ``first_divergence`` finds where it appeared: it runs both
graphs node by node and returns the first node of the rewritten graph (in execution order)
whose value differs from the node of the same name in the original graph. Passes keep the names
of nodes they do not touch, so this points at the rewrite that went wrong.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from graphpress.errors import ContractViolation
from graphpress.numerics import Comparison, compare_outputs

if TYPE_CHECKING:
    from graphpress.ir.program import Program
    from graphpress.pipeline.base import Contract, Pass, PassResult

__all__ = ["Samples", "check_contract", "first_divergence", "run_samples"]

Samples = list[tuple[tuple[Any, ...], dict[str, Any]]]


def run_samples(fn: Any, samples: Samples) -> list[Any]:
    with torch.no_grad():
        return [fn(*args, **kwargs) for args, kwargs in samples]


class _Recorder(torch.fx.Interpreter):
    def __init__(self, gm: torch.fx.GraphModule) -> None:
        super().__init__(gm)
        self.values: dict[str, Any] = {}

    def run_node(self, n: torch.fx.Node) -> Any:
        value = super().run_node(n)
        self.values[n.name] = value
        return value


def _record(program: Program, args: tuple[Any, ...], kwargs: dict[str, Any]) -> _Recorder:
    recorder = _Recorder(program.graph_module)
    with torch.no_grad():
        recorder.run(*program.flat_inputs(args, kwargs))
    return recorder


def first_divergence(before: Program, after: Program, args: tuple[Any, ...],
                     kwargs: dict[str, Any], rtol: float, atol: float) -> str:
    """Describe the first node of ``after`` whose value differs from ``before``'s same node."""
    try:
        old, new = _record(before, args, kwargs), _record(after, args, kwargs)
    except Exception as exc:  # the localisation is a diagnostic; never mask the violation
        return f"(could not localise: {type(exc).__name__}: {exc})"
    for node in after.graph.nodes:
        if node.op in ("placeholder", "output") or node.name not in old.values:
            continue
        found = compare_outputs(new.values[node.name], old.values[node.name], rtol=rtol, atol=atol)
        if not found.ok:
            source = after.source_module(node)
            return (f"first differing node: %{node.name} ({node.target})"
                    + (f" in module {source!r}" if source else "") + f": {found.describe()}")
    return "no shared node differs; the difference comes from nodes the pass created"


def check_contract(pass_: Pass, contract: Contract, before: Program, after: Program,
                   result: PassResult, samples: Samples, expected: list[Any] | None,
                   history: list[str]) -> tuple[float, list[Any]]:
    """Check ``contract`` (``pass_``'s, for ``before``); return (max abs error, outputs of
    ``after``)."""
    actual = run_samples(after, samples)
    if contract.kind == "unchecked":
        return float("nan"), actual
    if contract.kind == "exact" and expected is not None:
        reference = expected
    else:
        reference = run_samples(pass_.reference(before, result), samples)
    worst: Comparison | None = None
    worst_sample = 0
    for i, (got, want) in enumerate(zip(actual, reference)):
        found = compare_outputs(got, want, rtol=contract.rtol, atol=contract.atol)
        if worst is None or (worst.ok and (not found.ok
                                           or found.max_abs_error > worst.max_abs_error)):
            worst, worst_sample = found, i
    assert worst is not None
    if not worst.ok:
        args, kwargs = samples[worst_sample]
        where = (first_divergence(before, after, args, kwargs, contract.rtol, contract.atol)
                 if contract.kind == "exact" else "")
        ran = ", ".join(history) or "none"
        raise ContractViolation(
            f"pass {pass_.describe()!r} broke its contract {contract}: {worst.describe()} "
            f"(sample {worst_sample}). {where}\npasses run before it: {ran}")
    return worst.max_abs_error, actual
