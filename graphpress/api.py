"""The user-facing API: ``compile``, ``CompiledModel`` and ``load``.

``compile`` = frontend (trace) -> PassManager (rewrite, check) -> backend (lower). The user's
model is never modified: the frontend clones its weights unless ``inplace=True``. Each long
step shows a progress bar on a terminal (:mod:`graphpress.ir.progress`; ``GRAPHPRESS_PROGRESS=0``
turns them off).
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch.utils import _pytree as pytree

from graphpress.backends import Artifact, build_backend
from graphpress.errors import BackendError
from graphpress.frontends import trace
from graphpress.frontends.inputs import normalize_batches, normalize_inputs
from graphpress.ir.printer import format_program
from graphpress.ir.program import Program
from graphpress.ir.progress import progress_bar, progress_status
from graphpress.numerics import compare_outputs
from graphpress.ops.quant import QUANTIZING_OPS, has_op
from graphpress.pipeline.base import PassContext
from graphpress.pipeline.end_to_end import check_end_to_end
from graphpress.pipeline.instrumentation import hooks_from_environment
from graphpress.pipeline.manager import PassManager
from graphpress.pipeline.registry import PipelineSpec
from graphpress.pipeline.report import Report
from graphpress.pipeline.report_graph import ReportCollector
from graphpress.pipeline.rounding import float64_referee, program_in_float64
from graphpress.pipeline.samples import generate_samples

__all__ = ["CompiledModel", "compile", "load", "load_report", "rebuild_report"]

FORMAT_VERSION = 2
"""manifest.json format: 2 records each file's size and sha256 and the op libraries."""


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
        """Write the artifact, the IR text, the report and a manifest into ``folder``.

        The report is written three ways: ``report.txt`` (the table), ``report.html`` (the
        self-contained page of :meth:`Report.save_html`) and ``report.json`` (everything the
        page draws, from which ``graphpress report FOLDER`` rebuilds it).

        The manifest, written last, records each file's size and sha256, the op libraries the
        program calls besides aten/prims (namespace, ops, defining modules) and the graphpress
        and torch versions; ``load`` checks them before reading anything else.
        """
        from graphpress._version import __version__
        from graphpress.ir.artifacts import file_records, op_libraries

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        # an interrupted save leaves no manifest, rather than a stale one
        (folder / "manifest.json").unlink(missing_ok=True)
        files = self.artifact.save(folder)
        if self.backend != "eager":  # the eager program is what gp.load restores
            torch.export.save(self.program.exported_program, folder / "program.pt2")
            files.append("program.pt2")
        (folder / "program.txt").write_text(format_program(self.program))
        (folder / "report.txt").write_text(str(self._report) + "\n")
        (folder / "report.json").write_text(self._report.to_json())
        self._report.save_html(folder / "report.html")
        manifest = {"format": FORMAT_VERSION, "graphpress": __version__,
                    "torch": torch.__version__, "backend": self.backend,
                    "pipeline": self.pipeline,
                    "files": file_records(folder, [*files, "program.txt", "report.txt",
                                                     "report.json", "report.html"]),
                    "op_libraries": op_libraries(self.program.exported_program.graph_module),
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
            backend_options: dict[str, Any] | None = None,
            calibration_data: Iterable[Any] | None = None,
            generated_samples: int = 3) -> CompiledModel:
    """Trace ``model``, run the pass pipeline, lower it with ``backend``.

    ``passes`` is a list of Pass objects or names, or a string such as
    ``"fold_bn, prune_channels(ratio=0.5)"``. With ``verify=True`` every pass's numerical
    contract is checked on the samples: the example inputs, ``generated_samples`` more of the
    same shapes and dtypes (see :mod:`graphpress.pipeline.samples`) and ``verify_inputs``
    (extra positional-arg tuples); a violation raises ContractViolation naming the pass. At the
    end the final program is checked against ``model`` under the composed contracts
    (:mod:`graphpress.pipeline.end_to_end`), and a backend other than eager is compared with
    eager. Verification never changes the model's or the program's state.
    ``calibration_data`` is an iterable of batches (tuples of positional inputs, a dict of
    keyword inputs, or a single tensor) that reaches passes as ``PassContext.calibration_data``.
    ``options`` reach passes through ``PassContext.options``; ``backend_options`` go to the
    backend factory.
    """
    args, kwargs = normalize_inputs(example_inputs, example_kwargs)
    start = time.perf_counter()
    trace_options: dict[str, Any] = {"dynamic_batch": dynamic_batch,
                                     "dynamic_shapes": dynamic_shapes, "inplace": inplace}
    program = trace(model, args, kwargs, frontend=frontend, **trace_options)
    trace_seconds = time.perf_counter() - start
    samples = ([(args, kwargs)] + generate_samples((args, kwargs), generated_samples)
               + [(normalize_inputs(extra)[0], kwargs) for extra in verify_inputs or []])
    context = PassContext(example_inputs=args, example_kwargs=kwargs, frontend=frontend,
                          options=dict(options or {}),
                          calibration_data=normalize_batches(calibration_data))
    report = Report(frontend=frontend, backend=backend, trace_seconds=trace_seconds)
    collector = ReportCollector(report, (args, kwargs))  # graphs and charts of the HTML report
    manager = PassManager(passes, verify=verify, samples=samples, context=context,
                          hooks=[*hooks_from_environment(), collector])
    try:
        manager.run(program, report)
    finally:
        collector.close()
    if verify:
        check_end_to_end(model, program, samples, report)
    with progress_status(f"lowering to {backend}"):  # an ONNX export can take minutes
        artifact = build_backend(backend, program, **(backend_options or {}))
    if verify and backend != "eager":
        _check_backend(artifact, program, samples, report)
    report.extra.update(getattr(artifact, "info", dict)())
    return CompiledModel(program, artifact, report, manager.describe())


def _output_step(value: Any) -> float:
    """One int8 quantization step of an output leaf of a quantized program,
    ``(max - min) / 255``: a backend whose quantize kernel rounds a tie or a boundary value the
    other way moves an output by about that much, and no further."""
    if not isinstance(value, torch.Tensor) or not value.is_floating_point():
        return 0.0
    finite = value.detach()[torch.isfinite(value.detach())]
    return float(finite.max() - finite.min()) / 255 if finite.numel() else 0.0


def _check_backend(artifact: Artifact, program: Program,
                   samples: list[tuple[tuple[Any, ...], dict[str, Any]]], report: Report) -> None:
    """Compare a backend with the eager program on the samples; raise BackendError if off.

    The tolerance is the artifact's, or for a quantized program one int8 step of each output
    (see :func:`_output_step`), whichever is larger. A quantized program past that goes to the
    float64 referee (:mod:`graphpress.pipeline.rounding`): a deep quantized model can be
    chaotic under float rounding (one rounding decision flipped by a last-bit difference moves
    every later layer), and the eager program run in float64 shows how far eager itself is from
    its own arithmetic done exactly; a backend no further than ``ROUNDING_SLACK`` times that
    passes, and the report says so. The report shows the deviation either way."""
    rtol, atol = getattr(artifact, "tolerance", (1e-4, 1e-4))
    quantized = has_op(program.graph, QUANTIZING_OPS)
    worst, allowed = 0.0, atol
    chaotic: list[str] = []
    reference64 = functools.cache(lambda: program_in_float64(program))  # on need, once
    checking = progress_bar(samples, desc=f"checking {artifact.name} vs eager", unit="sample")
    for index, (args, kwargs) in enumerate(checking):
        with torch.no_grad():
            got, want = artifact(*args, **kwargs), program(*args, **kwargs)
        got_leaves, want_leaves = pytree.tree_leaves(got), pytree.tree_leaves(want)
        if len(got_leaves) != len(want_leaves):
            raise BackendError(f"backend {artifact.name!r} returns {len(got_leaves)} outputs, "
                               f"eager {len(want_leaves)}")
        ruled = False
        for i, (a, b) in enumerate(zip(got_leaves, want_leaves)):
            leaf_atol = max(atol, _output_step(b)) if quantized else atol
            found = compare_outputs(a, b, rtol=rtol, atol=leaf_atol)
            if not found.ok and quantized and not ruled:
                why = float64_referee(reference64, (args, kwargs),
                                      got, want, atol=0.0,
                                      names=(f"the {artifact.name} backend", "eager"))
                if why is not None:
                    ruled = True
                    chaotic.append(f"sample {index}: {why}")
            if not found.ok and not ruled:
                hint = (" The program is quantized: backend_options={'quantization': 'exact'} "
                        "exports the fake-quant formula itself, which follows eager to float "
                        "rounding (without onnxruntime's int8 kernels)."
                        if artifact.name == "onnx" and leaf_atol > atol else "")
                level = getattr(getattr(artifact, "options", None), "accuracy_level", 0)
                if artifact.name == "onnx" and level > 1:
                    hint += (f" accuracy_level={level} computes MatMulNBits' activations in a "
                             "narrower type than the program's float32; accuracy_level 0 or 1 "
                             "keeps float32.")
                unexplained = ("; the eager program's own float rounding (run in float64) "
                               "does not explain it" if quantized else "")
                raise BackendError(f"backend {artifact.name!r} differs from eager beyond "
                                   f"rtol={rtol:g}, atol={leaf_atol:g} on output {i}: "
                                   f"{found.describe()}{unexplained}.{hint}")
            worst, allowed = max(worst, found.max_abs_error), max(allowed, leaf_atol)
    note = f" (allowed {allowed:.2e}: one int8 step of the output)" if allowed > atol else ""
    if chaotic:
        note += "; beyond it by float rounding only: " + "; ".join(chaotic)
    report.extra[f"{artifact.name} vs eager max abs error"] = f"{worst:.2e}{note}"


def load(folder: str | Path) -> CompiledModel:
    """Load a folder written by ``CompiledModel.save`` (runs with the eager backend).

    Before torch reads it, every file is checked against the manifest's size and sha256, and
    the op libraries the program needs are imported (``graphpress.ops`` and the modules recorded
    at save). A missing, truncated or edited file, a missing, unparsable or newer manifest and
    an op that is still unknown each raise one ``ArtifactError`` naming the file and the fix.
    """
    from graphpress.errors import ArtifactError
    from graphpress.ir.artifacts import (
        import_op_libraries,
        load_exported_program,
        read_manifest,
        verify_files,
    )

    folder = Path(folder)
    manifest = read_manifest(folder, "manifest.json", format_version=FORMAT_VERSION,
                             resave="CompiledModel.save")
    verify_files(folder, manifest, "manifest.json", resave="CompiledModel.save",
                 required=["program.pt2"])
    try:
        frontend = manifest["report"].get("frontend", "export")
        report = _saved_report(folder, manifest)
        pipeline = str(manifest["pipeline"])
    except (AttributeError, KeyError, TypeError, ValueError) as exc:
        raise ArtifactError(f"{folder / 'manifest.json'} lacks a readable report or pipeline "
                            f"({type(exc).__name__}: {exc}). Fix: save the model again with "
                            "CompiledModel.save") from None
    program_file = folder / "program.pt2"
    import_op_libraries(manifest.get("op_libraries", {}), program_file,
                        preload=["graphpress.ops"])
    program = Program(load_exported_program(program_file, manifest.get("torch")),
                      frontend=frontend)
    return CompiledModel(program, build_backend("eager", program), report, pipeline)


def _saved_report(folder: Path, manifest: dict[str, Any]) -> Report:
    """The full report (``report.json``) of a checked folder, or the manifest's summary for a
    folder saved before report.json existed (then without graphs and charts)."""
    if "report.json" in manifest["files"]:
        return Report.from_json((folder / "report.json").read_text())
    report = Report.from_dict(manifest["report"])
    report.extra["graph view"] = "not in this folder (saved before report.json existed)"
    return report


def load_report(folder: str | Path) -> Report:
    """The report of a folder written by ``CompiledModel.save``, without loading the model.

    The manifest is checked as ``load`` checks it, and of the files only ``report.json`` (its
    size and sha256), so a deleted or edited ``report.html`` can be rebuilt:
    ``load_report(folder).save_html(path)`` (``graphpress report``).
    """
    from graphpress.errors import ArtifactError
    from graphpress.ir.artifacts import read_manifest, verify_files

    folder = Path(folder)
    manifest = read_manifest(folder, "manifest.json", format_version=FORMAT_VERSION,
                             resave="CompiledModel.save")
    files = manifest["files"]
    if isinstance(files, dict) and "report.json" in files:
        verify_files(folder, {**manifest, "files": {"report.json": files["report.json"]}},
                     "manifest.json", resave="CompiledModel.save")
    try:
        return _saved_report(folder, manifest)
    except (AttributeError, KeyError, TypeError, ValueError) as exc:
        raise ArtifactError(f"{folder} holds no readable report ({type(exc).__name__}: {exc}). "
                            "Fix: save the model again with CompiledModel.save") from None


def rebuild_report(folder: str | Path, output: str | Path | None = None) -> Path:
    """Write the HTML report of a saved folder again (default: its ``report.html``, whose
    manifest record is then updated so that ``load`` still accepts the folder)."""
    from graphpress.ir.artifacts import file_records

    folder = Path(folder)
    report = load_report(folder)
    target = Path(output) if output is not None else folder / "report.html"
    report.save_html(target)
    if target.resolve() == (folder / "report.html").resolve():
        manifest_path = folder / "manifest.json"
        manifest = json.loads(manifest_path.read_text())
        if isinstance(manifest["files"], dict) and "report.html" in manifest["files"]:
            manifest["files"].update(file_records(folder, ["report.html"]))
            manifest_path.write_text(json.dumps(manifest, indent=2, default=str))
    return target
