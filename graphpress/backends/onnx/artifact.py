"""The ONNX artifact: an onnxruntime session called like the model, saved as ``model.onnx``.

Calls keep the model's convention: the arguments are flattened with the program's input pytree
spec, the tensors are fed to the ONNX inputs in order (non-tensor arguments were baked into the
graph at export and must keep their example values), and the ONNX outputs are put back into the
program's output spec, so a Hugging Face model still returns its ``ModelOutput``.

The model is checked with ``onnx.checker`` once, in the form it is saved in: serialized bytes,
or, when its weights exceed ``external_data_threshold``, files with external data in a private
temporary folder (a protobuf cannot exceed 2 GB).

A saved folder's ``onnx_manifest.json`` records the size and sha256 of model.onnx (and
model.onnx.data); :func:`check_saved_model` checks them before a runtime reads the model, so a
truncated, edited or missing file is one ``ArtifactError`` naming it.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import onnxruntime as ort
import torch
from onnxruntime.capi.onnxruntime_pybind11_state import InvalidArgument
from torch.export.graph_signature import ConstantArgument, InputKind, OutputKind, TensorArgument
from torch.utils import _pytree as pytree

from graphpress.backends.onnx.export import OnnxOptions, check_onnx_model
from graphpress.errors import BackendError, InputError
from graphpress.ir.artifacts import file_records, read_manifest, verify_files
from graphpress.ir.program import Program
from graphpress.ops.quant import AFFINE_QUANT_OPS, has_op

__all__ = ["OnnxArtifact", "check_saved_model", "session_config"]

MANIFEST = "onnx_manifest.json"
FORMAT_VERSION = 1
"""onnx_manifest.json format: 1 records the size and sha256 of the model files."""
_LEVELS = {"disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
           "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
           "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
           "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}


def _size(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def _leaf_paths(spec: pytree.TreeSpec) -> list[tuple[Any, ...]]:
    tree = pytree.tree_unflatten(list(range(spec.num_leaves)), spec)
    return [path for path, _ in pytree.tree_flatten_with_path(tree)[0]]


def _bound(value: Any) -> int | None:
    text = str(value)
    return int(text) if text.lstrip("-").isdigit() else None


# onnxruntime fuses DequantizeLinear -> MatMul into MatMulNBits (8- and 4-bit weights); at its
# default accuracy level 4 that kernel also quantizes the activations to int8, which the program
# does not do (1.5 int8 output steps off on the zoo's Llama under int8_dynamic); level 1 computes
# in float32 on the dequantized weights, as the program. The backend's accuracy_level option
# sets it for those nodes as for the MatMulNBits graphpress writes (0 and 1: this faithful 1);
# an explicit session_config entry wins.
QDQ_ACCURACY_LEVEL = "session.qdq_matmulnbits_accuracy_level"
FAITHFUL_SESSION_CONFIG = {QDQ_ACCURACY_LEVEL: "1"}


def session_config(options: OnnxOptions) -> dict[str, str]:
    """The onnxruntime session config entries of ``options`` (with the faithful defaults)."""
    level = {QDQ_ACCURACY_LEVEL: str(max(options.accuracy_level, 1))}
    return {**FAITHFUL_SESSION_CONFIG, **level, **options.session_config}


class OnnxArtifact:
    """An exported ONNX model run by onnxruntime; ``save`` writes model.onnx and a manifest."""

    name = "onnx"

    def __init__(self, program: Program, onnx_program: torch.onnx.ONNXProgram,
                 options: OnnxOptions, export_seconds: float) -> None:
        self.program = program
        self.onnx_program = onnx_program
        self.options = options
        self.export_seconds = export_seconds
        graph = onnx_program.model.graph
        weight_bytes = sum(v.const_value.nbytes for v in graph.initializers.values()
                           if v.const_value is not None)
        self.external_data = weight_bytes > options.external_data_threshold
        # the temporary folder lives as long as the artifact (the session may map its files)
        self._tempdir: tempfile.TemporaryDirectory[str] | None = None
        if self.external_data:
            self._tempdir = tempfile.TemporaryDirectory(prefix="graphpress-onnx-")
            path = Path(self._tempdir.name) / "model.onnx"
            onnx_program.save(path, external_data=True)
            check_onnx_model(path, program)
            self.size_bytes = sum(p.stat().st_size for p in path.parent.iterdir())
            source: str | bytes = str(path)
        else:
            proto = onnx_program.model_proto
            check_onnx_model(proto, program)
            source = proto.SerializeToString()
            self.size_bytes = len(source)
        # onnxruntime's MatMulAddFusion turns a 3-D MatMul + Add into Reshape, Gemm, Reshape
        # before its QDQ fusions run, which then find DequantizeLinear -> Reshape instead of
        # DequantizeLinear -> MatMul and keep the float kernel (dequantizing every weight on
        # every call); without it, those matmuls run as MatMulIntegerToFloat (int8)
        self.disabled_optimizers = (
            ["MatMulAddFusion"] if self.options.quantization == "qdq"
            and has_op(program.graph, AFFINE_QUANT_OPS) else [])
        self.session = self._session(source)
        self._map_signature()

    # ------------------------------------------------------------------ setup
    def _session(self, source: str | bytes) -> ort.InferenceSession:
        session_options = ort.SessionOptions()
        session_options.graph_optimization_level = _LEVELS[self.options.graph_optimization_level]
        session_options.intra_op_num_threads = self.options.intra_op_threads
        for key, value in session_config(self.options).items():
            session_options.add_session_config_entry(key, value)
        try:
            return ort.InferenceSession(source, session_options,
                                        providers=list(self.options.providers),
                                        disabled_optimizers=self.disabled_optimizers)
        except Exception as exc:  # onnxruntime raises its own exception types per failure
            raise BackendError(f"onnxruntime could not load the exported model: {exc}") from exc

    def _map_signature(self) -> None:
        """Pair the program's user inputs/outputs with the ONNX graph's inputs/outputs."""
        ep = self.program.exported_program
        self._in_spec, self._out_spec = ep.call_spec.in_spec, ep.call_spec.out_spec
        self._arg_paths = [("args" if path[0].idx == 0 else "kwargs") + pytree.keystr(path[1:])
                           for path in _leaf_paths(self._in_spec)]
        self._out_paths = [pytree.keystr(path) or "output" for path in _leaf_paths(self._out_spec)]
        user_inputs = [spec.arg for spec in ep.graph_signature.input_specs
                       if spec.kind == InputKind.USER_INPUT]
        for arg in user_inputs:
            if not isinstance(arg, TensorArgument | ConstantArgument):
                raise BackendError(f"the ONNX backend does not support input {arg} "
                                   f"({type(arg).__name__}); use backend='eager'")
        onnx_inputs = [i.name for i in self.session.get_inputs()]
        tensor_inputs = sum(isinstance(arg, TensorArgument) for arg in user_inputs)
        tensor_outputs = sum(spec.kind == OutputKind.USER_OUTPUT
                             for spec in ep.graph_signature.output_specs)
        if (tensor_inputs, tensor_outputs) != (len(onnx_inputs), len(self.session.get_outputs())):
            raise BackendError(
                "the exported ONNX graph's inputs/outputs do not match the program's tensor "
                f"inputs/outputs ({onnx_inputs} -> "
                f"{[o.name for o in self.session.get_outputs()]}); please report this")
        names = iter(onnx_inputs)
        # per flattened argument: the ONNX input it feeds, or the constant it was baked as
        self._input_slots: list[tuple[str | None, Any]] = [
            (next(names), None) if isinstance(arg, TensorArgument) else (None, arg.value)
            for arg in user_inputs]

    # ---------------------------------------------------------------- running
    def _feeds(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
        expected_kwargs = self._in_spec.child(1).context
        if set(kwargs) == set(expected_kwargs):
            kwargs = {key: kwargs[key] for key in expected_kwargs}
        flat, spec = pytree.tree_flatten((args, kwargs))
        if spec != self._in_spec:
            raise InputError(f"the ONNX model was exported for arguments structured as "
                             f"{self._in_spec}; got {spec}")
        feeds: dict[str, Any] = {}
        for value, (name, constant), path in zip(flat, self._input_slots, self._arg_paths):
            if name is None:
                if value != constant:
                    raise InputError(f"argument {path} was fixed to {constant!r} when the ONNX "
                                     f"model was exported; got {value!r}")
            elif not isinstance(value, torch.Tensor):
                raise InputError(f"argument {path} must be a torch.Tensor, got "
                                 f"{type(value).__name__}")
            else:
                feeds[name] = value.detach().cpu().contiguous().numpy()
        return feeds

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        feeds = self._feeds(args, kwargs)
        try:
            results = self.session.run(None, feeds)
        except InvalidArgument as exc:
            raise InputError(
                f"onnxruntime rejected the inputs: {exc}. Axes not declared dynamic at compile "
                "time are fixed to the example's sizes; compile with dynamic_batch=True or "
                "dynamic_shapes=... to vary them") from exc
        return pytree.tree_unflatten([torch.from_numpy(r) for r in results], self._out_spec)

    # ------------------------------------------------------------- reporting
    @property
    def opset(self) -> int:
        return self.onnx_program.model.opset_imports[""]

    @property
    def tolerance(self) -> tuple[float, float]:
        """(rtol, atol) for gp.compile's comparison with eager when ``verify=True``."""
        return self.options.rtol, self.options.atol

    def info(self) -> dict[str, str]:
        """Facts for the compile report: opset, size on disk, export time, providers."""
        external = " (external data)" if self.external_data else ""
        return {"onnx opset": str(self.opset),
                "onnx size on disk": _size(self.size_bytes) + external,
                "onnx export time": f"{self.export_seconds:.2f} s",
                "onnx providers": ", ".join(self.options.providers)} | (
                    {"onnx MatMulNBits accuracy level": str(self.options.accuracy_level)}
                    if any(node.op_type == "MatMulNBits"
                           for node in self.onnx_program.model.graph) else {}) | (
                    {"onnx disabled optimizers": ", ".join(self.disabled_optimizers)}
                    if self.disabled_optimizers else {})

    def manifest(self) -> dict[str, Any]:
        """What a consumer of model.onnx needs without graphpress: names, axes, opset."""
        from graphpress._version import __version__

        graph = self.onnx_program.model.graph

        def describe(values: Iterable[Any], paths: list[str]) -> list[dict[str, Any]]:
            return [{"name": v.name, "dtype": str(v.dtype.numpy()), "path": path,
                     "shape": [d if isinstance(d, int) else str(d) for d in v.shape]}
                    for v, path in zip(values, paths)]

        in_paths = [path for path, (name, _) in zip(self._arg_paths, self._input_slots)
                    if name is not None]
        entries = describe(graph.inputs, in_paths) + describe(graph.outputs, self._out_paths)
        dynamic = {e["name"]: {str(axis): dim for axis, dim in enumerate(e["shape"])
                               if isinstance(dim, str)} for e in entries}
        ranges = self.program.exported_program.range_constraints
        return {
            "format": FORMAT_VERSION, "graphpress": __version__, "model": "model.onnx",
            "external_data": "model.onnx.data" if self.external_data else None,
            "opset": self.opset, "ir_version": self.onnx_program.model.ir_version,
            "producer": f"{self.onnx_program.model.producer_name} "
                        f"{self.onnx_program.model.producer_version}",
            "inputs": entries[:len(graph.inputs)], "outputs": entries[len(graph.inputs):],
            "dynamic_axes": {name: axes for name, axes in dynamic.items() if axes},
            "dims": {str(s): {"min": _bound(r.lower), "max": _bound(r.upper)}
                     for s, r in ranges.items()},
            "pipeline": ", ".join(self.program.passes_applied),
            # pass these to onnxruntime.InferenceSession(disabled_optimizers=...) for its int8
            # kernels (see OnnxArtifact.__init__)
            "disabled_optimizers": list(self.disabled_optimizers),
            # MatMulNBits' compute type in model.onnx, and what the session was given for the
            # MatMulNBits onnxruntime fuses from Q/DQ (pass it as a session config entry)
            "accuracy_level": self.options.accuracy_level,
            "session_config": session_config(self.options),
            "metadata": dict(self.options.metadata),
        }

    def save(self, folder: Path) -> list[str]:
        """Write model.onnx (and model.onnx.data for large weights) and onnx_manifest.json,
        which records the files' sizes and sha256 (checked by :func:`check_saved_model`)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / MANIFEST).unlink(missing_ok=True)  # an interrupted save leaves none
        self.onnx_program.save(folder / "model.onnx", external_data=self.external_data)
        files = ["model.onnx", "model.onnx.data"] if self.external_data else ["model.onnx"]
        manifest = self.manifest() | {"files": file_records(folder, files)}
        (folder / MANIFEST).write_text(json.dumps(manifest, indent=2))
        return [*files, MANIFEST]


def check_saved_model(folder: str | Path) -> Path:
    """The path of a saved model.onnx, after checking its files against onnx_manifest.json.

    Raises ArtifactError naming the file and the fix if the manifest is missing, unparsable or
    of a newer format, or a model file is missing, truncated or edited.
    """
    folder = Path(folder)
    resave = "CompiledModel.save (backend='onnx')"
    manifest = read_manifest(folder, MANIFEST, format_version=FORMAT_VERSION, resave=resave)
    verify_files(folder, manifest, MANIFEST, resave=resave, required=["model.onnx"])
    return folder / "model.onnx"
