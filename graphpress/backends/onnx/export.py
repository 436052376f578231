"""Lowering a Program to ONNX: options, ``torch.onnx.export``, ``onnx.checker``, and errors.

The Program's ExportedProgram goes to ``torch.onnx.export(..., dynamo=True)`` as it is (the
exporter uses an ExportedProgram without tracing again), with graphpress's translation table as
``custom_translation_table``; dynamic dimensions come from the program's range constraints. The
exporter's failures, and ``onnx.checker``'s, are re-raised as :class:`BackendError` naming the op,
the node and the source module, with what to do about it.
"""

from __future__ import annotations

import contextlib
import difflib
import logging
import re
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import onnx
import onnxruntime as ort
import torch
from torch.export.graph_signature import ConstantArgument, OutputKind

from graphpress.errors import BackendError
from graphpress.ir.program import Program
from graphpress.ir.purity import qualified_name
from graphpress.ops.dequant_matmul import matmul_nbits_options
from graphpress.ops.quant import AFFINE_QUANT_OPS, Q_DQ_OPS, has_op

__all__ = ["ACCURACY_LEVELS", "GRAPH_OPTIMIZATION_LEVELS", "QUANTIZATION_MODES", "OnnxOptions",
           "check_onnx_model", "export_onnx"]

GRAPH_OPTIMIZATION_LEVELS = ("disable", "basic", "extended", "all")
QUANTIZATION_MODES = ("qdq", "exact")
ACCURACY_LEVELS = {0: "float32 (unset)", 1: "float32", 2: "float16", 3: "bfloat16", 4: "int8"}
"""MatMulNBits' ``accuracy_level``: the type its CPU kernel computes the activations in."""
_DOCS = "docs/backends/onnx.md"



def _needs_opset21(program: Program) -> bool:
    """Whether an affine quant op lowers to opset-21 Q/DQ: a 4-bit type, or a blocked layout
    (neither one scale for the tensor nor one per index of a single axis), except integer
    fake-quant with a scale computed in the graph, which lowers to plain float ops. The other
    layouts use opset-19 nodes, which the exporter's default opset takes (and opset 21 makes its
    optimizer rewrite 8-bit Q/DQ around Gemm into nodes onnxruntime refuses)."""
    for node in program.graph.nodes:
        if qualified_name(node.target) not in Q_DQ_OPS:
            continue
        block_size, scale, dtype = node.args[1], node.args[2], node.args[6]
        if dtype in ("int4", "uint4", "int3", "uint3"):
            return True
        shape = node.args[0].meta["val"].shape
        counts = [1 if isinstance(b, torch.fx.Node) else s // b  # a node: the whole dim
                  for s, b in zip(shape, block_size, strict=True)]
        split = [i for i, c in enumerate(counts) if c != 1]
        per_axis = len(split) == 1 and block_size[split[0]] == 1
        dynamic_integer = not program.is_weight(scale) and not str(dtype).startswith("float8")
        if split and not per_axis and not dynamic_integer:
            return True
    return False


@dataclass(frozen=True)
class OnnxOptions:
    """Options of the ONNX backend (``gp.compile(..., backend="onnx")``); all have defaults."""

    opset: int | None = None  # ONNX opset; None: torch.onnx's default, 21 where Q/DQ need it
    optimize: bool = True  # the exporter's onnxscript optimizer (constant folding, fusions)
    providers: tuple[str, ...] = ("CPUExecutionProvider",)  # onnxruntime, in priority order
    graph_optimization_level: str = "all"  # onnxruntime: disable | basic | extended | all
    # fake-quant: "qdq" (QuantizeLinear/DequantizeLinear, which onnxruntime may run with its int8
    # kernels, rounding some values differently) or "exact" (the ops' formula in float ops)
    quantization: str = "qdq"
    # com.microsoft::MatMulNBits (packed weights of fuse_dequant_matmul, and the ones onnxruntime
    # fuses from DequantizeLinear -> MatMul): 0 or 1 compute in float32 as the program does;
    # 2 float16, 3 bfloat16, 4 int8 activations (onnxruntime's fastest CPU kernel, not within
    # float32 tolerance of the program)
    accuracy_level: int = 0
    intra_op_threads: int = 0  # onnxruntime threads; 0: its default (one per physical core)
    session_config: Mapping[str, str] = field(default_factory=dict)  # onnxruntime config entries
    external_data_threshold: int = 1 << 30  # more weight bytes: model.onnx.data (max 1 GiB)
    atol: float = 1e-4  # verification tolerance against eager: |a - e| <= atol + rtol * |e|
    rtol: float = 1e-4
    metadata: Mapping[str, str] = field(default_factory=dict)  # provenance, e.g. the pipeline

    @classmethod
    def from_kwargs(cls, options: Mapping[str, Any]) -> OnnxOptions:
        """Build from keyword options; unknown names and bad values raise BackendError."""
        known = [f.name for f in fields(cls)]
        for name in options:
            if name not in known:
                close = difflib.get_close_matches(name, known, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise BackendError(f"unknown onnx backend option {name!r}{hint}; options: "
                                   f"{', '.join(known)}")
        values = dict(options)
        if isinstance(values.get("providers"), str):
            values["providers"] = (values["providers"],)
        if "providers" in values:
            values["providers"] = tuple(values["providers"])
        for name in ("metadata", "session_config"):
            values[name] = {str(k): str(v) for k, v in values.get(name, {}).items()}
        result = cls(**values)
        if result.quantization not in QUANTIZATION_MODES:
            raise BackendError(f"quantization must be one of {QUANTIZATION_MODES}, got "
                               f"{result.quantization!r}")
        level = result.accuracy_level
        if isinstance(level, bool) or not isinstance(level, int) or level not in ACCURACY_LEVELS:
            raise BackendError(
                f"accuracy_level must be one of {list(ACCURACY_LEVELS)} (MatMulNBits' compute "
                f"type: {', '.join(f'{k} {v}' for k, v in ACCURACY_LEVELS.items())}), got "
                f"{level!r}")
        if result.graph_optimization_level not in GRAPH_OPTIMIZATION_LEVELS:
            raise BackendError(
                f"graph_optimization_level must be one of {GRAPH_OPTIMIZATION_LEVELS}, got "
                f"{result.graph_optimization_level!r}")
        if not 0 <= result.external_data_threshold <= 1 << 30:
            raise BackendError("external_data_threshold must be between 0 and 1 GiB (2**30 "
                               "bytes): a model.onnx with more weights nears protobuf's 2 GB "
                               f"limit; got {result.external_data_threshold}")
        available = ort.get_available_providers()
        missing = [p for p in result.providers if p not in available]
        if missing or not result.providers:
            raise BackendError(f"onnxruntime provider(s) {missing} not available here (name at "
                               f"least one of: {', '.join(available)})")
        return result


def _refuse_constant_outputs(program: Program) -> None:
    for spec in program.signature.output_specs:
        if spec.kind == OutputKind.USER_OUTPUT and isinstance(spec.arg, ConstantArgument):
            raise BackendError(
                f"the model returns the constant {spec.arg.value!r}; ONNX graphs return only "
                "tensors. Return it as a tensor, drop it from the outputs, or use "
                "backend='eager'")


def _refuse_state(onnx_program: torch.onnx.ONNXProgram) -> None:
    """The exporter drops buffer updates (an ONNX model is stateless); refuse such programs.

    They show only after functionalization (training IR keeps ``add_`` and training-mode
    batch norm in place), so this reads the exporter's decomposed program.
    """
    for spec in onnx_program.exported_program.graph_signature.output_specs:
        if spec.kind in (OutputKind.BUFFER_MUTATION, OutputKind.USER_INPUT_MUTATION):
            raise BackendError(
                f"the program mutates {spec.target!r} ({spec.kind.name.lower()}); an ONNX model "
                "is stateless and would silently drop the update. Compile the model in eval "
                "mode (model.eval()), or use backend='eager'")


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Hide the exporter's noise on every call: log warnings about optional packages
    (torchvision ops) and a deprecation warning torch raises when it copies pytree specs."""
    registry_logger = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registry_logger.level
    registry_logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
            yield
    finally:
        registry_logger.setLevel(level)


def export_onnx(program: Program, options: OnnxOptions,
                translations: Mapping[torch._ops.OpOverload, Callable[..., Any]]
                ) -> torch.onnx.ONNXProgram:
    """``torch.onnx.export`` the program; raise a BackendError that names the cause."""
    _refuse_constant_outputs(program)
    quantized = has_op(program.graph, AFFINE_QUANT_OPS)
    opset = options.opset if options.opset is not None else (
        21 if _needs_opset21(program) else None)
    try:
        with _quiet_exporter(), matmul_nbits_options(accuracy_level=options.accuracy_level):
            onnx_program = torch.onnx.export(
                program.exported_program, (), dynamo=True, verbose=False,
                opset_version=opset, optimize=options.optimize,
                custom_translation_table=dict(translations))
    except Exception as exc:  # the exporter raises many types; all are described the same way
        if quantized and "node version: 21" in str(exc):
            raise BackendError(
                f"the program uses 4-bit or blocked quantization, which needs ONNX opset 21 "
                f"(QuantizeLinear/DequantizeLinear with block_size and INT4 types), but "
                f"opset={options.opset} was asked for: pass backend_options={{'opset': 21}} or "
                "leave opset unset") from exc
        raise BackendError(_describe_export_failure(exc, program)) from exc
    assert onnx_program is not None  # dynamo=True always returns the program
    _refuse_state(onnx_program)
    provenance = {"pipeline": ", ".join(program.passes_applied), **options.metadata}
    onnx_program.model.metadata_props.update(
        {f"graphpress.{key}": value for key, value in provenance.items()})
    return onnx_program


def _chain(exc: BaseException) -> list[BaseException]:
    chain = [exc]
    while (nxt := chain[-1].__cause__ or chain[-1].__context__) is not None and nxt not in chain:
        chain.append(nxt)
    return chain


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"


def _where(program: Program, node_name: str) -> str:
    """``node 'x' in module 'a.b'`` for a node of the program, or a note that it is not one."""
    node = next((n for n in program.graph.nodes if n.name == node_name), None)
    if node is None:
        return f"node {node_name!r} (made by the exporter's decompositions, not in the program)"
    module = program.source_module(node)
    return f"node {node_name!r} in module {module or '<top level>'!r}"


def _describe_export_failure(exc: BaseException, program: Program) -> str:
    chain = _chain(exc)
    text = "\n".join(str(e) for e in chain)
    cause = _first_line(chain[-1])
    missing = re.search(r"No ONNX function found for <OpOverload\(op='([^']+)', "
                        r"overload='([^']+)'\)>", text)
    node = re.search(r"Error when translating node %(\S+) : .*?target=torch\.ops\.([\w.]+)", text)
    if missing:
        op = f"{missing[1]}.{missing[2]}"
        where = _where(program, node[1]) if node else "a node of the program"
        return (f"backend 'onnx' has no ONNX translation for op {op} ({where}). Fixes: use "
                f"another backend (backend='eager'), or register a translation: decorate an "
                f"onnxscript function that builds the ONNX nodes with "
                f"@graphpress.backends.onnx.register_translation(torch.ops.{op}) (see {_DOCS})")
    if node:
        return (f"the ONNX translation of op {node[2]} failed at {_where(program, node[1])}: "
                f"{cause}. Fixes: change the model or the pass that made this node, register a "
                f"translation that handles it (see {_DOCS}), or use backend='eager'")
    return f"torch.onnx.export failed: {cause}. Use backend='eager' meanwhile"


def check_onnx_model(model: onnx.ModelProto | Path, program: Program) -> None:
    """``onnx.checker`` with shape inference; a failure names the ONNX node, its op and origin."""
    try:
        onnx.checker.check_model(model if isinstance(model, onnx.ModelProto) else str(model),
                                 full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        graph = model if isinstance(model, onnx.ModelProto) else onnx.load(
            str(model), load_external_data=False)
        raise BackendError(_describe_checker_failure(exc, graph, program)) from exc


def _describe_checker_failure(exc: Exception, model: onnx.ModelProto, program: Program) -> str:
    text = str(exc)
    found = re.search(r"Name: (\S+) OpType", text) or re.search(r"node name: ([^)\s]+)", text)
    message = " ".join(line.strip() for line in text.splitlines()
                       if line.strip() and "==> Context" not in line)
    node = next((n for n in model.graph.node if found and n.name == found[1]), None)
    if node is None:
        return f"onnx.checker rejected the exported model: {message}"
    props = {p.key: p.value for p in node.metadata_props}
    fx_node = re.match(r"%(\S+)", props.get("pkg.torch.onnx.fx_node", ""))
    origin = (f", translated from {_where(program, fx_node[1])}" if fx_node else "")
    return (f"onnx.checker rejected ONNX node {node.name!r} (op {node.op_type}){origin}: "
            f"{message}. If a translation registered in graphpress.backends.onnx.TRANSLATIONS "
            "made this node, fix that translation; otherwise use backend='eager' and report "
            "the model to torch.onnx")
