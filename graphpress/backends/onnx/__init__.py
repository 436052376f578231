"""ONNX backend: export the Program with ``torch.onnx.export`` and run it with onnxruntime.

How a Program becomes ONNX::

    Program.exported_program
      -> torch.onnx.export(ep, dynamo=True, custom_translation_table=translation_table())
           ATen ops: the exporter's own onnxscript translations (torchlib)
           ops in the table: graphpress's translations (aten fake-quant, the
           graphpress::*_affine quantization ops: docs/ops/quant.md) and the
           ``onnx_translation`` of every op defined through ``graphpress.ops.define_op``
      -> onnx.checker (with shape inference)   -> onnxruntime.InferenceSession

The table is keyed by the ``OpOverload`` that appears as a node target in the Program
(``torch.ops.mylib.scaled_relu.default``): an op's namespace is part of its key, so
``mylib::linear`` never gets ``aten::linear``'s translation. Values are onnxscript functions that
build the op's ONNX nodes (see :mod:`.translations` for the conventions and examples). An op of
the op registry brings its translation with its entry; any other op registers one with::

    from onnxscript import opset18 as op

    @register_translation(torch.ops.mylib.scaled_relu.default)
    def scaled_relu(x, scale: float):
        return op.Mul(op.Relu(x), op.Constant(value_float=scale))

Options (keywords of :func:`onnx_backend`, defaults in :class:`OnnxOptions`): ``opset``,
``optimize``, ``providers``, ``graph_optimization_level``, ``intra_op_threads``,
``external_data_threshold``, ``atol``/``rtol`` (verification), ``metadata`` (provenance written
into model.onnx and the manifest).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, TypeVar

import torch

from graphpress.backends.onnx.artifact import OnnxArtifact
from graphpress.backends.onnx.export import OnnxOptions, export_onnx
from graphpress.backends.onnx.layouts import contiguous_attention_outputs
from graphpress.backends.onnx.stored_weights import store_quantized_weights
from graphpress.backends.onnx.translations import BUILTIN_TRANSLATIONS, fake_quantize_affine_exact
from graphpress.ir.program import Program
from graphpress.ops.registry import entries

__all__ = ["OnnxArtifact", "OnnxOptions", "TRANSLATIONS", "onnx_backend",
           "register_translation", "translation_table"]

F = TypeVar("F", bound=Callable[..., Any])

TRANSLATIONS: dict[torch._ops.OpOverload, Callable[..., Any]] = dict(BUILTIN_TRANSLATIONS)
"""op -> onnxscript translation registered with :func:`register_translation` (and the built-ins);
the exporter gets :func:`translation_table`, which adds the op registry's translations."""


def _registry_translations() -> dict[torch._ops.OpOverload, Callable[..., Any]]:
    return {entry.op: entry.onnx_translation for entry in entries().values()
            if entry.onnx_translation is not None}


def translation_table() -> dict[torch._ops.OpOverload, Callable[..., Any]]:
    """What ``torch.onnx.export`` gets: the op registry's ``onnx_translation`` of every op
    defined so far, and :data:`TRANSLATIONS` (which wins where both have an op, as only
    ``register_translation(..., replace=True)`` can make it)."""
    return {**_registry_translations(), **TRANSLATIONS}


def register_translation(op: torch._ops.OpOverload, *,
                         replace: bool = False) -> Callable[[F], F]:
    """Decorator: make ``fn`` the ONNX translation of ``op`` in :data:`TRANSLATIONS`.

    ``op`` is an overload (``torch.ops.ns.name.default``), as in graph node targets. A second
    translation for the same op (including the one an op registry entry brings) is an error
    unless ``replace=True``.
    """
    if not isinstance(op, torch._ops.OpOverload):
        hint = " (pick an overload, e.g. op.default)" if isinstance(
            op, torch._ops.OpOverloadPacket) else ""
        raise TypeError(f"register_translation takes an OpOverload, got {op!r}{hint}")

    def decorate(fn: F) -> F:
        existing = TRANSLATIONS.get(op, _registry_translations().get(op))
        if existing is not None and existing is not fn and not replace:
            raise ValueError(f"{op} already has the ONNX translation {existing.__qualname__}; "
                             "pass replace=True to override it")
        TRANSLATIONS[op] = fn
        return fn
    return decorate


def onnx_backend(program: Program, **options: Any) -> OnnxArtifact:
    """The ``"onnx"`` backend factory: export, check, and open an onnxruntime session.

    Raises BackendError for an unknown option, an op without translation (naming the op, the
    node and its source module), a model onnx.checker rejects, or an unavailable provider.
    """
    settings = OnnxOptions.from_kwargs(options)
    start = time.perf_counter()
    table = translation_table()
    exported = contiguous_attention_outputs(program)  # a copy where it changes anything
    if settings.quantization == "exact":
        table[torch.ops.graphpress.fake_quantize_affine.default] = fake_quantize_affine_exact
    else:  # weights as integers + DequantizeLinear: bit-identical to eager, 4x smaller
        exported = store_quantized_weights(exported)
    onnx_program = export_onnx(exported, settings, table)
    return OnnxArtifact(program, onnx_program, settings, time.perf_counter() - start)
