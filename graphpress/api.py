"""The user-facing API: ``compile``, ``CompiledModel`` and ``load``.

``compile`` = frontend (trace) -> PassManager (rewrite, check) -> backend (lower). The user's
model is never modified: the frontend clones its weights unless ``inplace=True``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from graphpress.backends import Artifact, build_backend
from graphpress.errors import BackendError
from graphpress.frontends import trace
from graphpress.frontends.inputs import normalize_inputs
from graphpress.ir.printer import format_program
from graphpress.ir.program import Program
from graphpress.numerics import compare_outputs
from graphpress.pipeline.base import PassContext
from graphpress.pipeline.manager import PassManager
from graphpress.pipeline.registry import PipelineSpec
from graphpress.pipeline.report import Report

__all__ = ["CompiledModel", "compile", "load"]

FORMAT_VERSION = 1


class CompiledModel:
    """A compiled model: call it like the original; inspect ``program`` and ``report()``."""

    def __init__(self, program: Program, artifact: Artifact, report: Report,
                 pipeline: str) -> None:
        self.program = program
        self.artifact = artifact
        self.pipeline = pipeline
        self._report = report

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.artifact(*args, **kwargs)

    @property
    def backend(self) -> str:
        return self.artifact.name

    def report(self) -> Report:
        return self._report

    def save(self, folder: str | Path) -> Path:
        """Write the artifact, the IR text, the report and a manifest into ``folder``."""
        from graphpress._version import __version__

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        files = self.artifact.save(folder)
        if self.backend != "eager":  # the eager program is what gp.load restores
            torch.export.save(self.program.exported_program, folder / "program.pt2")
            files.append("program.pt2")
        (folder / "program.txt").write_text(format_program(self.program))
        (folder / "report.txt").write_text(str(self._report) + "\n")
        manifest = {"format": FORMAT_VERSION, "graphpress": __version__,
                    "backend": self.backend, "pipeline": self.pipeline,
                    "files": [*sorted(set(files)), "program.txt", "report.txt"],
                    "report": self._report.to_dict()}
        (folder / "manifest.json").write_text(json.dumps(manifest, indent=2, default=str))
        return folder

    def __repr__(self) -> str:
        return (f"CompiledModel(backend={self.backend!r}, pipeline={self.pipeline!r}, "
                f"nodes={self.program.num_nodes()})")


def compile(model: torch.nn.Module, example_inputs: Any = None, *,
            passes: PipelineSpec = (), backend: str = "eager", verify: bool = False,
            frontend: str = "export", example_kwargs: dict[str, Any] | None = None,
            dynamic_batch: bool = False, dynamic_shapes: Any = None,
            verify_inputs: list[tuple[Any, ...]] | None = None, inplace: bool = False,
            options: dict[str, Any] | None = None,
            backend_options: dict[str, Any] | None = None) -> CompiledModel:
    """Trace ``model``, run the pass pipeline, lower it with ``backend``.

    ``passes`` is a list of Pass objects or names, or a string such as
    ``"fold_bn, prune_channels(ratio=0.5)"``. With ``verify=True`` every pass's numerical
    contract is checked on the example inputs (and ``verify_inputs``, extra positional-arg
    tuples); a violation raises ContractViolation naming the pass, and a backend other than
    eager is compared with eager on the same inputs. ``options`` reach passes through
    ``PassContext.options``; ``backend_options`` go to the backend factory.
    """
    args, kwargs = normalize_inputs(example_inputs, example_kwargs)
    start = time.perf_counter()
    trace_options: dict[str, Any] = {"dynamic_batch": dynamic_batch,
                                     "dynamic_shapes": dynamic_shapes, "inplace": inplace}
    program = trace(model, args, kwargs, frontend=frontend, **trace_options)
    trace_seconds = time.perf_counter() - start
    samples = [(args, kwargs)] + [(normalize_inputs(extra)[0], kwargs)
                                  for extra in verify_inputs or []]
    context = PassContext(example_inputs=args, example_kwargs=kwargs, frontend=frontend,
                          options=dict(options or {}))
    manager = PassManager(passes, verify=verify, samples=samples, context=context)
    report = Report(frontend=frontend, backend=backend, trace_seconds=trace_seconds)
    manager.run(program, report)
    artifact = build_backend(backend, program, **(backend_options or {}))
    if verify and backend != "eager":
        _check_backend(artifact, program, samples, report)
    report.extra.update(getattr(artifact, "info", dict)())
    return CompiledModel(program, artifact, report, manager.describe())


def _check_backend(artifact: Artifact, program: Program,
                   samples: list[tuple[tuple[Any, ...], dict[str, Any]]], report: Report) -> None:
    """Compare a backend with the eager program on the samples; raise BackendError if off."""
    rtol, atol = getattr(artifact, "tolerance", (1e-4, 1e-4))
    worst = 0.0
    for args, kwargs in samples:
        with torch.no_grad():
            found = compare_outputs(artifact(*args, **kwargs), program(*args, **kwargs),
                                    rtol=rtol, atol=atol)
        if not found.ok:
            raise BackendError(f"backend {artifact.name!r} differs from eager beyond "
                               f"rtol={rtol:g}, atol={atol:g}: {found.describe()}")
        worst = max(worst, found.max_abs_error)
    report.extra[f"{artifact.name} vs eager max abs error"] = f"{worst:.2e}"


def load(folder: str | Path) -> CompiledModel:
    """Load a folder written by ``CompiledModel.save`` (runs with the eager backend)."""
    folder = Path(folder)
    manifest_path = folder / "manifest.json"
    if not manifest_path.exists():
        raise FileNotFoundError(
            f"{folder} has no manifest.json; is it a folder written by CompiledModel.save?")
    manifest = json.loads(manifest_path.read_text())
    program = Program(torch.export.load(folder / "program.pt2"),
                      frontend=manifest["report"].get("frontend", "export"))
    report = Report.from_dict(manifest["report"])
    return CompiledModel(program, build_backend("eager", program), report, manifest["pipeline"])
