"""Compile overhead: trace time and pass-pipeline time, on the zoo and on long synthetic chains.

Usage::

    python benchmarks/compile_overhead.py [--large] [--sizes 1000,10000,50000]
                                          [--weights 250,500,1000] [--repeats 3] [--threads 1]

"pipeline" is ``PassManager(PIPELINE).run`` without verification: the passes plus the
manager's checks (fingerprints, recompile, graph lint, signature, fake-tensor shape
propagation). Each run gets a fresh copy of the program (copying is not timed). Two code paths
of the manager are timed in the same rounds, their order alternating from round to round:

* ``full``: ``PassManager.shape_check = "full"``, the checks as before issue 8: every node is
  re-propagated before the first pass and after each pass that changed the program;
* ``incremental`` (the default): shapes re-propagated from the nodes each pass touched; before
  the first pass the full propagation runs unless the program's ``shapes`` analysis is current.
  A traced program's is (the frontend re-checks only the nodes its functionalization created,
  since torch.export's metadata is its own fake propagation) and a copy keeps it, so in (a),
  on traced zoo models, this is what ``gp.compile`` does. The chains of (b) are built by hand
  (see below), so there this path pays the first full propagation.

(b) also times ``incremental, shapes current``: the same, on a copy whose ``shapes`` analysis
was computed before the clock starts: what a program straight from the frontend gets.
"propagation s" is the time spent in ``propagate_shapes`` (the first check included), measured
by wrapping it.

(a) For each zoo model (the default set; ``--large`` adds the large ones): the ``torch.export``
trace time, the pipeline time of both paths, and the node counts before and after. Medians
over ``--repeats`` rounds.

(b) Synthetic chains of N nodes, to show how the pipeline cost grows with graph size: the
pipeline time per node (µs/node) should stay flat if the cost is linear. One block of the chain
is ``a = sin(h); b = sin(h); cos(h); h = a + b * 0.5``: a duplicate (``cse`` merges it) and a dead
node (``dce`` removes it) per five nodes. Medians over ``--repeats`` rounds (1 round above 10k
nodes).

How the chains are built: ``torch.export`` traces about 6 ms per node of this chain on a 2-core
CPU (10k nodes took 58 s; 50k would take about 5 minutes). So the chain module is exported with
one block, and that exported block is repeated with ``Graph.node_copy`` (meta, including the fake
tensors, copied) until the graph has N nodes. At the smallest size the full module is also
exported and the two graphs are checked to have the same op sequence, so the constructed graphs
are what ``torch.export`` would have produced.

(c) Chains with weights: ``h = h * (w_i * 2)`` for K parameters ``w_i`` (traced with
``torch.export``, 2 nodes per weight), so ``fold_constants`` folds K weight expressions and the
graph has K weight placeholders. This shows the cost per node as the number of weights grows,
with the time of the passes that handle weights (``fold_constants``, ``dce``); one run of the
default (incremental) path per count.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from common import markdown_table
from torch import nn
from torch.export.graph_signature import TensorArgument

import graphpress.pipeline.manager as manager_module
from graphpress.frontends import trace
from graphpress.ir.analyses import ANALYSES
from graphpress.ir.program import Program
from graphpress.pipeline.manager import PassManager
from graphpress.pipeline.report import Report
from graphpress.testing.zoo import zoo_models

PIPELINE = "fixpoint(dce, cse, fold_constants)"
BLOCK_NODES = 5


class Chain(nn.Module):
    """``blocks`` repetitions of: a duplicate sin, a dead cos, a mul and an add."""

    def __init__(self, blocks: int) -> None:
        super().__init__()
        self.blocks = blocks

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        for _ in range(self.blocks):
            a = torch.sin(h)
            b = torch.sin(h)
            torch.cos(h)
            h = a + b * 0.5
        return h


def _median_time(fn: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    """Median seconds of ``repeats`` calls, and the result of the last call."""
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


@dataclass
class Run:
    """One timed pipeline run: total, inside the passes, inside ``propagate_shapes``."""

    seconds: float
    in_passes: float
    propagation: float
    after: Program
    report: Report


class _PropagationTimer:
    """Adds up the time spent in ``propagate_shapes`` while active: wraps the two references
    the pipeline calls it by (the manager's import and the ``shapes`` analysis)."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self._original = manager_module.propagate_shapes

    def _timed(self, *args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return self._original(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - start

    def __enter__(self) -> _PropagationTimer:
        manager_module.propagate_shapes = self._timed
        ANALYSES["shapes"] = self._timed
        return self

    def __exit__(self, *exc: object) -> None:
        manager_module.propagate_shapes = self._original
        ANALYSES["shapes"] = self._original


def _run(program: Program, shape_check: str, shapes_current: bool = False) -> Run:
    """One pipeline run on a fresh copy of ``program`` (copying is not timed)."""
    copy = program.copy()
    if shapes_current:
        copy.analysis("shapes")
    manager = PassManager(PIPELINE, hooks=[])
    manager.shape_check = shape_check  # type: ignore[assignment]
    with _PropagationTimer() as timer:
        start = time.perf_counter()
        report = manager.run(copy)
        seconds = time.perf_counter() - start
    return Run(seconds, sum(r.seconds for r in report.records), timer.seconds, copy, report)


def _rounds(program: Program, variants: dict[str, tuple[str, bool]], repeats: int
            ) -> dict[str, Run]:
    """The median run of each variant over ``repeats`` rounds; within a round the variants
    run one after the other, in an order rotated by one from round to round."""
    runs: dict[str, list[Run]] = {name: [] for name in variants}
    names = list(variants)
    for round_ in range(repeats):
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:
            runs[name].append(_run(program, *variants[name]))
    return {name: sorted(r, key=lambda run: run.seconds)[(len(r) - 1) // 2]
            for name, r in runs.items()}


OLD_NEW = {"full": ("full", False), "incremental": ("incremental", False)}


def zoo_table(large: bool, repeats: int) -> str:
    rows = []
    entries = zoo_models(exclude=()) if large else zoo_models()
    for entry in entries:
        model, inputs = entry.make()
        trace_s, program = _median_time(lambda m=model, x=inputs: trace(m, x), repeats)
        runs = _rounds(program, OLD_NEW, repeats)
        old, new = runs["full"], runs["incremental"]
        rows.append((entry.name, f"{trace_s * 1e3:.0f}", f"{old.seconds * 1e3:.1f}",
                     f"{new.seconds * 1e3:.1f}", f"{old.seconds / new.seconds:.2f}",
                     str(program.num_nodes()), str(new.after.num_nodes())))
        print(f"  {entry.name}: done", flush=True)
    return markdown_table(("model", "trace ms", "pipeline ms (full)",
                           "pipeline ms (incremental)", "full / incremental", "nodes before",
                           "nodes after"), rows)


def chain_program(nodes: int) -> Program:
    """A Program of the chain with ``nodes`` op nodes, from one exported block (see above)."""
    program = trace(Chain(1), (torch.randn(8),))
    graph = program.graph
    block = list(program.nodes("call_function"))
    assert len(block) == BLOCK_NODES, [n.target for n in block]
    (x,) = program.user_inputs()
    output = program.output_node()
    h = block[-1]
    with graph.inserting_before(output):
        for _ in range(nodes // BLOCK_NODES - 1):
            mapping = {x: h}
            for node in block:
                mapping[node] = graph.node_copy(node, lambda a, m=mapping: m[a])
            h = mapping[block[-1]]
    output.args = ((h,),)
    program.signature.output_specs[0].arg = TensorArgument(name=h.name)
    program.graph_module.recompile()
    program.touch()
    program.validate(who="chain_program")
    return program


class ScaledChain(nn.Module):
    """``h = h * (w_i * 2)`` for ``weights`` parameters: ``w_i * 2`` folds into a new weight."""

    def __init__(self, weights: int) -> None:
        super().__init__()
        self.w = nn.ParameterList(nn.Parameter(torch.randn(8)) for _ in range(weights))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        for w in self.w:
            h = h * (w * 2)
        return h


def _check_against_export(nodes: int) -> None:
    built = [n.target for n in chain_program(nodes).nodes("call_function")]
    exported = [n.target for n in trace(Chain(nodes // BLOCK_NODES), (torch.randn(8),))
                .nodes("call_function")]
    if built != exported:
        raise SystemExit(f"the constructed {nodes}-node chain differs from torch.export's")


CHAIN_VARIANTS = {**OLD_NEW, "incremental, shapes current": ("incremental", True)}


def chain_table(sizes: list[int], repeats: int) -> str:
    rows = []
    base: dict[str, float] = {}
    for size in sizes:
        start = time.perf_counter()
        program = chain_program(size)
        build_s = time.perf_counter() - start
        rounds = repeats if size <= 10_000 else 1
        runs = _rounds(program, CHAIN_VARIANTS, rounds)
        full = runs["full"].seconds
        for name, run in runs.items():
            per_node = run.seconds / program.num_nodes() * 1e6
            base.setdefault(name, per_node)
            rows.append((str(program.num_nodes()), name, str(run.after.num_nodes()),
                         f"{build_s:.1f}", str(rounds), f"{run.seconds:.2f}",
                         f"{run.in_passes:.2f}", f"{run.propagation:.2f}",
                         f"{run.propagation / run.seconds:.0%}", f"{per_node:.1f}",
                         f"{per_node / base[name]:.2f}", f"{full / run.seconds:.2f}"))
        print(f"  {size} nodes: done", flush=True)
    return markdown_table(("nodes before", "manager path", "nodes after", "build s", "rounds",
                           "pipeline s", "in passes s", "propagation s", "propagation share",
                           "µs/node", "vs first size", "full / this"), rows)


def weights_table(counts: list[int]) -> str:
    rows, base = [], None
    for count in counts:
        program = trace(ScaledChain(count), (torch.randn(8),))
        run = _run(program, "incremental")
        by_pass = {name: sum(r.seconds for r in run.report.records if r.name == name)
                   for name in ("fold_constants", "dce", "cse")}
        per_node = run.seconds / program.num_nodes() * 1e6
        base = base or per_node
        rows.append((str(count), str(program.num_nodes()), str(run.after.num_nodes()),
                     f"{run.seconds:.2f}", f"{by_pass['fold_constants']:.2f}",
                     f"{by_pass['dce']:.2f}", f"{by_pass['cse']:.2f}", f"{per_node:.0f}",
                     f"{per_node / base:.2f}"))
        print(f"  {count} weights: done", flush=True)
    return markdown_table(("weights", "nodes before", "nodes after", "pipeline s",
                           "fold_constants s", "dce s", "cse s", "µs/node", "vs first"), rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--large", action="store_true", help="add the large zoo models")
    parser.add_argument("--sizes", default="1000,10000,50000",
                        help="synthetic chain sizes in nodes (default: 1000,10000,50000)")
    parser.add_argument("--weights", default="250,500,1000",
                        help="weight counts of the chains with weights (default: 250,500,1000)")
    parser.add_argument("--repeats", type=int, default=3, help="rounds per median (default: 3)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default: 1)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    sizes = sorted(int(s) for s in args.sizes.split(","))
    trace(Chain(1), (torch.randn(8),))  # warm up torch.export before timing anything

    print(f"pipeline: {PIPELINE}; torch {torch.__version__}; {torch.get_num_threads()} "
          f"threads; {platform.machine()}; {datetime.date.today()}\n")
    print("(a) zoo models: trace and pipeline time (no verification)")
    zoo = zoo_table(args.large, args.repeats)
    print(f"\n{zoo}\n")
    start = time.perf_counter()
    _check_against_export(sizes[0])
    print(f"checked: the constructed {sizes[0]}-node chain has the op sequence torch.export "
          f"gives ({time.perf_counter() - start:.1f} s incl. exporting it)\n")
    print("(b) synthetic chains: pipeline time per node, manager paths in the same rounds")
    chains = chain_table(sizes, args.repeats)
    print(f"\n{chains}\n")
    print("(c) chains with weights: pipeline time per node as the weight count grows "
          "(incremental path, 1 run)")
    weights = weights_table(sorted(int(s) for s in args.weights.split(",")))
    print(f"\n{weights}")


if __name__ == "__main__":
    main()
