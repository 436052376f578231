"""Quantized zoo models through the ONNX backend, checked by gp.compile(verify=True) against
eager: within one int8 step of each output, or, past it, no further from the program's float64
evaluation than eager itself (the float64 referee).

``quantization="exact"`` exports the fake-quant formula itself and follows eager to float
rounding. The default ``"qdq"`` stores the weights quantized (bit-identical to eager) and
quantizes activations with QuantizeLinear, which rounds ``x / s`` where eager rounds
``x * (1 / s)``; onnxruntime's int8 convolutions add their own rounding. MiniLM (real weights,
outlier dimensions) is chaotic under float rounding: eager run in float64 lands ~10 output
steps from eager in fp32, and onnxruntime as far; the referee accepts it (slow test)."""

from __future__ import annotations

import pytest

import graphpress as gp
from graphpress.errors import BackendError
from graphpress.pipeline.samples import generate_samples
from graphpress.testing.zoo import ZooModel, get_model, zoo_models

_STATIC = "insert_fake_quant(scheme='int8_static')"
_DYNAMIC = "insert_fake_quant(scheme='int8_dynamic')"


def _compile(name: str, quant: str, mode: str) -> gp.CompiledModel:
    model, inputs = get_model(name).make()
    batches = [args for args, _ in generate_samples((inputs, {}), 8, seed=1)]
    passes: list[object] = [quant]
    if name in ("digits_cnn", "concat_net", "hf_resnet"):
        passes.insert(0, "fold_bn")
    return gp.compile(model, inputs, passes=passes, calibration_data=batches, verify=True,
                      backend="onnx", backend_options={"quantization": mode})


def _deviation(compiled: gp.CompiledModel) -> float:
    line = compiled.report().extra["onnx vs eager max abs error"]
    assert "one int8 step of the output" in line
    return float(line.split()[0])


@pytest.mark.parametrize(("name", "quant"), [
    ("digits_cnn", _STATIC), ("concat_net", _STATIC), ("hf_resnet", _STATIC),
    ("hf_bert", _STATIC), ("hf_llama", _STATIC), ("attention_net", _STATIC),
    ("hf_bert", _DYNAMIC), ("hf_llama", _DYNAMIC), ("attention_net", _DYNAMIC),
])
def test_exact_export_follows_eager(name: str, quant: str) -> None:
    assert _deviation(_compile(name, quant, "exact")) <= 1e-3


@pytest.mark.parametrize(("name", "quant"), [
    ("digits_cnn", _STATIC), ("concat_net", _STATIC), ("hf_resnet", _STATIC),
    ("hf_bert", _STATIC), ("hf_llama", _STATIC), ("attention_net", _STATIC),
    ("hf_llama", _DYNAMIC), ("attention_net", _DYNAMIC),
])
def test_qdq_export_stays_within_one_step(name: str, quant: str) -> None:
    compiled = _compile(name, quant, "qdq")
    line = compiled.report().extra["onnx vs eager max abs error"]
    assert "float rounding only" not in line, line


@pytest.mark.slow
def test_qdq_export_of_a_chaotic_model_is_ruled_float_rounding() -> None:
    compiled = _compile("minilm", _STATIC, "qdq")
    line = compiled.report().extra["onnx vs eager max abs error"]
    assert "float rounding only" in line and "against eager run in float64" in line, line


_ZOO_SCHEMES = {
    "int8_dynamic": _DYNAMIC,
    "int4_weight_only": "insert_fake_quant(scheme='int4_weight_only', group_size=16)",
    "fp8": "insert_fake_quant(scheme='fp8')",
}


def _through_onnx(entry: ZooModel, quant: str) -> None:
    """The issue's acceptance run: fold_bn where it applies, the scheme calibrated on 8
    batches, verify=True (every contract, end to end, and onnxruntime against eager)."""
    model, inputs = entry.make()
    batches = [args for args, _ in generate_samples((inputs, {}), 8, seed=1)]
    passes = (["fold_bn"] if "batchnorm" in entry.tags else []) + [quant]
    compiled = gp.compile(model, inputs, passes=passes, calibration_data=batches, verify=True,
                          backend="onnx")
    assert "onnx vs eager max abs error" in compiled.report().extra


def _zoo(include: tuple[str, ...] = ()) -> list[object]:
    return [pytest.param(e, id=e.name) for e in zoo_models(include=include)]


@pytest.mark.slow
@pytest.mark.parametrize("entry", _zoo())
def test_int8_static_through_onnx_on_every_zoo_model(entry: ZooModel) -> None:
    _through_onnx(entry, _STATIC)


@pytest.mark.slow
@pytest.mark.parametrize("scheme", list(_ZOO_SCHEMES))
@pytest.mark.parametrize("entry", _zoo(("transformer",)))
def test_transformer_schemes_through_onnx(entry: ZooModel, scheme: str) -> None:
    _through_onnx(entry, _ZOO_SCHEMES[scheme])


def test_unknown_quantization_mode_is_refused() -> None:
    model, inputs = get_model("digits_cnn").make()
    with pytest.raises(BackendError, match="quantization must be one of"):
        gp.compile(model, inputs, backend="onnx", backend_options={"quantization": "int8"})
