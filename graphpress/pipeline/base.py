"""The Pass base class, its numerical Contract, and what a pass returns.

A pass rewrites a Program in place and returns a :class:`PassResult`. Its :class:`Contract`
states what must hold between the program before and after, and ``verify=True`` checks it on
sample inputs::

    after(x) == reference(x)   elementwise, |a - r| <= atol + rtol * |r|

where ``reference`` is the program before the pass for an ``exact`` contract, or what
:meth:`Pass.reference` builds from it otherwise (the masked original for pruning). Absolute
tolerances are relative to each output's magnitude (``atol * rms(reference)``, see
:mod:`graphpress.numerics`). A ``statistical`` contract checks agreement metrics instead of
elements (``sqnr_db``, ``cosine``, ``top1_agreement`` against :meth:`Pass.reference`, each with
its minimum), for rewrites that change values on purpose. A pass with no checkable contract
says so with ``Contract.unchecked(...)`` and the report shows it.

The four kinds, by the names used everywhere (``Contract.kind``, the report, the docs):
``exact``, ``reference``, ``statistical``, ``unchecked``.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from graphpress.ir.program import Program

__all__ = ["Contract", "Fixpoint", "Pass", "PassContext", "PassResult", "Skip"]


@dataclass(frozen=True)
class Contract:
    """What must hold between a pass's input and output programs."""

    kind: str  # "exact" (vs the input), "reference" / "statistical" (vs Pass.reference),
    #            or "unchecked"
    rtol: float = 1e-5
    atol: float = 1e-5
    description: str = ""
    minimums: tuple[tuple[str, float], ...] = ()  # statistical: (metric, smallest allowed)
    # metrics of the output against the *input* program, reported but not judged (a reference
    # contract that changes values on purpose shows how far it moved from float)
    report_vs_input: tuple[str, ...] = ()

    @classmethod
    def exact(cls, rtol: float = 1e-5, atol: float = 1e-5) -> Contract:
        return cls("exact", rtol, atol, "same outputs as the input program")

    @classmethod
    def against_reference(cls, description: str, rtol: float = 1e-5, atol: float = 1e-5,
                          report_vs_input: tuple[str, ...] = ()) -> Contract:
        return cls("reference", rtol, atol, description, report_vs_input=report_vs_input)

    @classmethod
    def statistical(cls, description: str, **minimums: float) -> Contract:
        """Agreement with :meth:`Pass.reference` by metric: ``statistical("...",
        sqnr_db=30, cosine=0.999)``; each metric must be at least its minimum."""
        from graphpress.numerics import METRICS

        unknown = [m for m in minimums if m not in METRICS]
        if unknown or not minimums:
            raise ValueError(f"statistical contracts take minimums of {', '.join(METRICS)}; "
                             f"got {', '.join(unknown) or 'none'}")
        return cls("statistical", 0.0, 0.0, description, tuple(sorted(minimums.items())))

    @classmethod
    def unchecked(cls, why: str) -> Contract:
        return cls("unchecked", 0.0, 0.0, why)

    def __str__(self) -> str:
        if self.kind == "unchecked":
            return f"unchecked ({self.description})"
        if self.kind == "statistical":
            limits = ", ".join(f"{m} >= {v:g}" for m, v in self.minimums)
            return f"statistical ({limits}): {self.description}"
        return f"{self.kind} (rtol={self.rtol:g}, atol={self.atol:g}): {self.description}"


@dataclass(frozen=True)
class Skip:
    """A place where a pass did not apply, and why (shown in the report and debug output)."""

    node: str
    reason: str


@dataclass
class PassResult:
    """What a pass did: ``stats`` (counts for the report's table), ``skipped`` (where it did
    not apply, and why), ``details`` (anything else; a ``"summary"`` list of lines is printed
    in the report, e.g. pruning's channels per group)."""

    changed: bool
    stats: dict[str, int] = field(default_factory=dict)
    skipped: list[Skip] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)


@dataclass
class PassContext:
    """What a pass may use besides the Program: sample data, calibration batches (each an
    ``(args, kwargs)`` pair, as ``gp.compile(calibration_data=...)`` normalizes them; run them
    with :func:`graphpress.ir.runner.run_batches`) and the compile settings."""

    example_inputs: tuple[Any, ...] = ()
    example_kwargs: dict[str, Any] = field(default_factory=dict)
    frontend: str = "export"
    options: dict[str, Any] = field(default_factory=dict)
    calibration_data: list[tuple[tuple[Any, ...], dict[str, Any]]] = field(default_factory=list)


class Pass(abc.ABC):
    """Base class of every pass. Subclasses set ``name`` (or use ``@register_pass``)."""

    name: ClassVar[str] = ""
    contract: ClassVar[Contract] = Contract.exact()
    requires: ClassVar[tuple[str, ...]] = ("shapes",)   # analyses that must be fresh first
    preserves: ClassVar[tuple[str, ...]] = ()           # analyses still valid after a change
    rewrites_weights: ClassVar[bool] = False            # reads or writes weight values
    runs_after: ClassVar[tuple[str, ...]] = ()          # passes that must come first if present

    @abc.abstractmethod
    def run(self, program: Program, ctx: PassContext) -> PassResult:
        """Rewrite ``program`` in place."""

    def contract_for(self, program: Program) -> Contract:
        """The contract for this input program (override when it depends on it, e.g. a
        tolerance by dtype); the manager asks before running the pass."""
        return self.contract

    def reference(self, before: Program, result: PassResult) -> Callable[..., Any]:
        """What the rewritten program must equal, for a ``reference`` contract."""
        return before

    def describe(self) -> str:
        """The pass as it would be written in a pipeline string: ``name(arg=value)``."""
        if dataclasses.is_dataclass(self):  # arguments that differ from their defaults
            items = [(f.name, getattr(self, f.name)) for f in dataclasses.fields(self)
                     if f.default is dataclasses.MISSING or getattr(self, f.name) != f.default]
        else:
            items = [(k, v) for k, v in vars(self).items() if not k.startswith("_")]
        args = ", ".join(f"{k}={v!r}" for k, v in items)
        return f"{self.name}({args})" if args else self.name

    def __repr__(self) -> str:
        return self.describe()


@dataclass
class Fixpoint:
    """Run a group of passes repeatedly until none changes the program (at most N rounds)."""

    passes: list[Pass]
    max_iterations: int = 10

    def describe(self) -> str:
        inner = ", ".join(p.describe() for p in self.passes)
        return f"fixpoint({inner}, max_iterations={self.max_iterations})"
