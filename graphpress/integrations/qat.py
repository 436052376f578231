"""``gp.quant.convert``: a module trained with :func:`graphpress.quant.prepare_qat` -> a
CompiledModel.

``convert`` = :func:`graphpress.quant.qat.freeze` (BatchNorm folded with its running
statistics, ``W_f = W * gamma / sqrt(running_var + eps)``, ``b_f = beta + (b - running_mean) *
gamma / sqrt(running_var + eps)``, every scale and zero point a constant buffer) ->
``gp.compile`` (frontend, the ``passes``, ``backend``). The Program calls
``graphpress::fake_quantize_affine`` (and ``choose_qparams_affine`` for dynamic activations)
like one ``insert_fake_quant`` produces, so every later pass and backend takes it, and it saves,
loads and exports to ONNX like any other.

With ``verify=True`` the program is also compared with the QAT module in eval mode on the
example inputs (the same computation, so it must agree at fp32 rounding: a mismatch beyond
rtol=1e-4 / atol=1e-5 * rms is a ``GraphpressError``); the largest difference is in the report
as ``"convert vs QAT eval max abs error"``, next to the quantized and skipped layers.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from graphpress.api import CompiledModel, compile
from graphpress.errors import GraphpressError
from graphpress.numerics import compare_outputs
from graphpress.quant.qat import freeze, qat_info

__all__ = ["convert"]

_RTOL, _ATOL = 1e-4, 1e-5


def convert(qat_module: nn.Module, *, example_inputs: Any = None,
            example_kwargs: dict[str, Any] | None = None, backend: str = "eager",
            verify: bool = True, passes: Any = (), **compile_options: Any) -> CompiledModel:
    """Freeze ``qat_module`` (qparams, BatchNorm) and compile it with ``gp.compile``.

    ``example_inputs`` default to the ones given to prepare_qat. ``passes`` run after the
    freeze (BatchNorm is already folded; quantization is already in the graph, so
    ``insert_fake_quant`` is not needed). ``compile_options`` go to ``gp.compile``
    (``dynamic_batch``, ``backend_options``...). The QAT module is not changed.
    """
    info = qat_info(qat_module)
    args = info.example_inputs if example_inputs is None else example_inputs
    args = args if isinstance(args, tuple) else tuple(args) if isinstance(args, list) else (args,)
    kwargs = info.example_kwargs if example_kwargs is None else example_kwargs
    frozen = freeze(qat_module)
    compiled = compile(frozen, args, example_kwargs=kwargs, passes=passes, backend=backend,
                       verify=verify, **compile_options)
    extra = compiled.report().extra
    extra["qat layers"] = len(info.layers)
    if info.skipped:
        extra["qat layers kept in float"] = "; ".join(f"{p}: {why}" for p, why in info.skipped)
    if verify:
        error = _check(qat_module, compiled, args, kwargs)
        extra["convert vs QAT eval max abs error"] = f"{error:.2e}"
    return compiled


def _check(qat_module: nn.Module, compiled: CompiledModel, args: tuple[Any, ...],
           kwargs: dict[str, Any]) -> float:
    """Max abs difference between the compiled program and the QAT module in eval mode."""
    modes = {m: m.training for m in qat_module.modules()}
    try:
        qat_module.eval()
        with torch.no_grad():
            expected = qat_module(*args, **kwargs)
            found = compare_outputs(compiled.program(*args, **kwargs), expected, rtol=_RTOL,
                                    atol=_ATOL, scale_atol=True)
    finally:
        for module, training in modes.items():
            module.train(training)
    if not found.ok:
        raise GraphpressError(f"the converted program differs from the QAT module in eval mode "
                              f"beyond rtol={_RTOL:g}, atol={_ATOL:g}*rms: {found.describe()}. "
                              "This is a bug in gp.quant.convert; please report it with the "
                              "model")
    return found.max_abs_error
