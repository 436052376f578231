"""The PassManager: runs a pipeline with checks after every pass.

For each pass: fresh required analyses -> ``run`` -> provenance stamped on the nodes it created
-> ``graph.lint()``, signature and state-dict consistency, fake-tensor re-propagation that must
agree with the metadata the pass left -> (``verify=True``) its numerical contract on the sample
inputs. A pass that reports ``changed=False`` must not have changed the Program; the manager
checks the claim. A pass that declares ``runs_after`` names passes that must come before it
when both are in a pipeline (quantization after pruning); a pipeline in the wrong order is
refused before anything runs. ``Fixpoint`` groups repeat until no member changes anything, at most
``max_iterations`` rounds; a group still changing at the cap is noted in the report.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any, Literal

from graphpress.errors import GraphpressError, MetadataError, PassError, PipelineError
from graphpress.ir.program import Program
from graphpress.ir.shapes import propagate_shapes
from graphpress.pipeline.base import Fixpoint, Pass, PassContext, PassResult
from graphpress.pipeline.fingerprint import Diff, Fingerprint, describe, diff, fingerprint
from graphpress.pipeline.instrumentation import Instrumentation, hooks_from_environment
from graphpress.pipeline.registry import PipelineSpec, build_pipeline
from graphpress.pipeline.report import PassRecord, Report
from graphpress.pipeline.samples import Samples, generate_samples, run_samples
from graphpress.pipeline.verification import check_contract

__all__ = ["GENERATED_SAMPLES", "PassManager", "check_order"]

GENERATED_SAMPLES = 3  # samples generated beside the example inputs when none are given


def _flatten(pipeline: Sequence[Pass | Fixpoint]) -> list[Pass]:
    out: list[Pass] = []
    for item in pipeline:
        out.extend(item.passes if isinstance(item, Fixpoint) else [item])
    return out


def check_order(pipeline: Sequence[Pass | Fixpoint]) -> None:
    """Refuse a pipeline in which a pass comes before one it declares in ``runs_after``."""
    passes = _flatten(pipeline)
    for position, pass_ in enumerate(passes):
        for later in passes[position + 1:]:
            if later.name in pass_.runs_after:
                order = ", ".join(p.name for p in passes)
                raise PipelineError(
                    f"pass {pass_.name!r} must run after {later.name!r} (it declares "
                    f"runs_after={pass_.runs_after}), but the pipeline is: {order}. "
                    f"Fix: move {later.name!r} before {pass_.name!r}.")


class PassManager:
    """Runs a pipeline of passes over a Program."""

    # After a pass that changed the program, re-propagate shapes from the nodes it touched
    # ("incremental", see graphpress.ir.shapes; before the first pass only if the "shapes"
    # analysis is not current) or through every node, before the first pass too ("full", the
    # behaviour before issue 8; benchmarks/compile_overhead.py measures both in one run).
    shape_check: Literal["incremental", "full"] = "incremental"

    def __init__(self, pipeline: PipelineSpec, *, verify: bool = False,
                 samples: Samples | None = None, context: PassContext | None = None,
                 hooks: Sequence[Instrumentation] | None = None) -> None:
        self.pipeline = build_pipeline(pipeline)
        self.verify = verify
        self.context = context or PassContext()
        example = (self.context.example_inputs, self.context.example_kwargs)
        self.samples: Samples = samples or (
            [example, *generate_samples(example, GENERATED_SAMPLES)]
            if self.context.example_inputs or self.context.example_kwargs else [])
        if verify and not self.samples:
            raise PassError("verify=True needs sample inputs: pass example inputs to compile()")
        check_order(self.pipeline)
        self.hooks = list(hooks) if hooks is not None else hooks_from_environment()
        self._history: list[str] = []
        self._outputs: list[Any] | None = None
        self._index = 0

    def describe(self) -> str:
        return ", ".join(item.describe() for item in self.pipeline)

    def run(self, program: Program, report: Report | None = None) -> Report:
        report = report or Report()
        if self.shape_check == "full":
            program.set_analysis("shapes", propagate_shapes(program, who="tracing"))
        else:  # full propagation, unless the shapes were checked at this version already
            program.analysis("shapes")
        if self.verify:
            self._outputs = run_samples(program, self.samples)
            report.extra["verified on"] = f"{len(self.samples)} samples"
        for item in self.pipeline:
            if isinstance(item, Fixpoint):
                self._run_fixpoint(item, program, report)
            else:
                report.records.append(self._run_one(item, program, iteration=1))
        return report

    def _run_fixpoint(self, group: Fixpoint, program: Program, report: Report) -> None:
        for iteration in range(1, group.max_iterations + 1):
            records = [self._run_one(p, program, iteration) for p in group.passes]
            report.records.extend(records)
            if not any(r.changed for r in records):
                return
        report.extra[f"warning ({group.describe()})"] = (
            f"still changing after {group.max_iterations} iterations; raise max_iterations")

    def _run_one(self, pass_: Pass, program: Program, iteration: int) -> PassRecord:
        self._index += 1
        label = pass_.describe()
        for name in pass_.requires:
            program.analysis(name)
        costs_before = program.analysis("costs")
        contract = pass_.contract_for(program)
        before = program.copy() if self.verify else None
        version = program.version
        for hook in self.hooks:
            hook.before_pass(pass_, program, self._index)
        prints = fingerprint(program)
        start = time.perf_counter()
        try:
            result = pass_.run(program, self.context)
        except GraphpressError:
            raise
        except Exception as exc:
            ran = ", ".join(self._history) or "none"
            raise PassError(f"pass {label!r} raised {type(exc).__name__}: {exc}\n"
                            f"passes run before it: {ran}") from exc
        seconds = time.perf_counter() - start
        if not isinstance(result, PassResult):
            raise PassError(f"pass {label!r} returned {type(result).__name__}, not a PassResult")
        edits = diff(prints, fingerprint(program))
        if result.changed:
            self._settle(pass_, program, edits, prints)
        else:
            unreported = edits.changes + edits.meta_changes()
            if unreported or program.version != version:
                what = describe(unreported) or "it called Program.touch()"
                raise MetadataError(
                    f"pass {label!r} reported no change but edited the program: {what}; "
                    "return PassResult(changed=True) when the program changes")
        costs_after = program.analysis("costs")
        max_error, metrics = None, {}
        if self.verify and before is not None:
            if result.changed or self._outputs is None:
                verdict = check_contract(pass_, contract, before, program, result,
                                         self.samples, self._outputs, self._history)
                max_error, metrics, self._outputs = (verdict.max_error, verdict.metrics,
                                                     verdict.outputs)
            else:
                max_error = 0.0
        self._history.append(label)
        program.passes_applied.append(label)
        record = PassRecord(
            name=pass_.name, iteration=iteration, seconds=seconds, changed=result.changed,
            nodes=(costs_before.nodes, costs_after.nodes),
            parameters=(costs_before.parameters, costs_after.parameters),
            macs=(costs_before.macs, costs_after.macs),
            weight_bytes=(costs_before.parameter_bytes + costs_before.buffer_bytes,
                          costs_after.parameter_bytes + costs_after.buffer_bytes),
            contract=str(contract),
            contract_kind=contract.kind, contract_tolerance=(contract.rtol, contract.atol),
            max_error=max_error, metrics=metrics, stats=dict(result.stats),
            skipped=[(s.node, s.reason) for s in result.skipped], details=result.details)
        for hook in self.hooks:
            hook.after_pass(pass_, program, record, self._index)
        return record

    def _settle(self, pass_: Pass, program: Program, edits: Diff, before: Fingerprint) -> None:
        """Stamp provenance, bump the version, re-check structure and metadata (shapes from
        the nodes the pass touched, unless ``shape_check`` is "full")."""
        for node in edits.added:
            node.meta.setdefault("graphpress_pass", pass_.name)
        program.sync_output_specs()
        program.touch()
        program.keep_analyses(pass_.preserves)
        who = f"pass {pass_.describe()!r}"
        program.graph_module.recompile()
        touched = edits.touched if self.shape_check == "incremental" else None
        program.set_analysis("shapes", propagate_shapes(
            program, who=who, touched=touched, previous=before.values()))
        program.validate(who=who)
