"""Run a Program node by node, with hooks that see every value: the calibration runner.

:class:`ProgramRunner` is a ``torch.fx.Interpreter`` over the Program's graph, called like the
Program (weights first, then the flattened user inputs); after each node it calls
``hook(node, value)`` for the nodes selected (all when ``nodes`` is None). Observers collect
activation ranges this way, data-aware passes collect statistics, and verification records
every value to find where two programs diverge.

The runner never changes the Program: buffer and input mutations the graph returns are
computed but not stored (calibration must not advance a model's state), and every run is
under ``torch.no_grad()``.

:func:`run_batches` runs a runner over an iterable of batches (``(args, kwargs)`` pairs) and
shows a tqdm progress bar when there are many (at least ``progress_from``) or when asked.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable
from typing import TYPE_CHECKING, Any

import torch
from torch.export.graph_signature import OutputKind
from torch.fx import Node
from torch.utils import _pytree as pytree

if TYPE_CHECKING:
    from graphpress.ir.program import Program

__all__ = ["NodeHook", "ProgramRunner", "run_batches"]

NodeHook = Callable[[Node, Any], None]


class ProgramRunner(torch.fx.Interpreter):
    """Runs ``program`` node by node and calls ``hook(node, value)`` after each chosen node."""

    def __init__(self, program: Program, hook: NodeHook | None = None, *,
                 nodes: Collection[str] | None = None) -> None:
        program.graph_module.recompile()
        super().__init__(program.graph_module)
        self.program = program
        self.hook = hook
        self.selected = set(nodes) if nodes is not None else None

    def run_node(self, n: Node) -> Any:
        value = self.evaluate(n)
        if self.hook is not None and (self.selected is None or n.name in self.selected):
            self.hook(n, value)
        return value

    def evaluate(self, n: Node) -> Any:
        """One node's value (what a subclass changes to run a node differently)."""
        return super().run_node(n)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """The user outputs of one run, in the model's output structure."""
        with torch.no_grad():
            outputs = self.run(*self.program.flat_inputs(args, kwargs))
        specs = self.program.signature.output_specs
        results = [v for s, v in zip(specs, outputs) if s.kind == OutputKind.USER_OUTPUT]
        return pytree.tree_unflatten(results, self.program.exported_program.call_spec.out_spec)


def run_batches(program: Program, batches: Iterable[tuple[tuple[Any, ...], dict[str, Any]]],
                hook: NodeHook | None = None, *, nodes: Collection[str] | None = None,
                progress: bool | None = None, progress_from: int = 8,
                description: str = "calibrating") -> int:
    """Run every batch through ``program`` with ``hook``; returns the number of batches.

    The bar is considered for ``progress_from`` batches or more (or when ``progress`` is
    True) and follows :mod:`graphpress.ir.progress` (on a terminal only; never when
    ``progress`` is False or ``GRAPHPRESS_PROGRESS=0``)."""
    from graphpress.ir.progress import progress_bar

    runner = ProgramRunner(program, hook, nodes=nodes)
    batches = list(batches)
    iterator: Iterable[Any] = batches
    if progress is not False and (progress or len(batches) >= progress_from):
        iterator = progress_bar(batches, desc=description, unit="batch", progress=progress,
                                delay=0.0)
    for args, kwargs in iterator:
        runner(*args, **kwargs)
    return len(batches)
