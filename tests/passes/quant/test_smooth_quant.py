"""smooth_quant on tiny programs (the closed-form scales), through attention, its refusals, and
over the zoo's transformers with insert_fake_quant after it, each with verify=True."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import graphpress as gp
from graphpress.errors import InputError, PipelineError
from graphpress.pipeline.samples import generate_samples
from graphpress.testing.zoo import ZooModel, zoo_models


class TwoLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 8), nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.fc1(x))


class NormThenLinears(nn.Module):
    """A pre-norm block: the norm feeds q and k only (smoothable); a norm whose output also
    reaches a residual add is not."""

    def __init__(self) -> None:
        super().__init__()
        self.norm, self.q, self.k = nn.LayerNorm(8), nn.Linear(8, 8), nn.Linear(8, 8)
        self.post, self.out = nn.LayerNorm(8), nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        y = self.q(h) * self.k(h)
        z = self.post(y)
        return self.out(z) + z


def _batches(shape: tuple[int, ...], n: int = 4, scale: float = 1.0) -> list[tuple[torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    return [(torch.randn(shape, generator=generator) * scale,) for _ in range(n)]


def _two_linear() -> tuple[nn.Module, list[tuple[torch.Tensor]]]:
    torch.manual_seed(0)
    model = TwoLinear().eval()
    with torch.no_grad():
        model.fc1.weight[3] *= 100   # channel 3 of the activation is an outlier
        model.fc1.bias[3] = 20.0
    return model, _batches((5, 6))


@pytest.mark.parametrize("alpha", [0.0, 0.5, 0.75, 1.0])
def test_scales_follow_the_closed_form(alpha: float) -> None:
    model, batches = _two_linear()
    with torch.no_grad():
        act = torch.stack([model.fc1(b[0]).abs().amax(0) for b in batches]).amax(0).double()
    weight = model.fc2.weight.detach().abs().amax(0).double()
    scale = act ** alpha / weight ** (1 - alpha)
    compiled = gp.compile(model, batches[0], calibration_data=batches, verify=True,
                          passes=f"smooth_quant(alpha={alpha}, power_of_two=False)")
    weights = compiled.program.weights()
    w1, w2 = model.fc1.weight.detach().double(), model.fc2.weight.detach().double()
    torch.testing.assert_close(weights["fc1.weight"].double(), w1 / scale[:, None],
                               rtol=1e-6, atol=0)
    torch.testing.assert_close(weights["fc2.weight"].double(), w2 * scale, rtol=1e-6, atol=0)
    record = compiled.report().records[0]
    assert record.stats["smoothed"] == 1 and record.contract_kind == "exact"
    assert record.max_error <= 1e-5
    if alpha == 1.0:  # every channel of the smoothed activation peaks at 1
        smoothed = torch.stack([torch.nn.functional.linear(b[0], weights["fc1.weight"],
                                                           weights["fc1.bias"]).abs().amax(0)
                                for b in batches]).amax(0)
        torch.testing.assert_close(smoothed, torch.ones(8), rtol=1e-5, atol=0)


def test_power_of_two_scales_are_bit_exact() -> None:
    model, batches = _two_linear()
    compiled = gp.compile(model, batches[0], calibration_data=batches, verify=True,
                          passes="smooth_quant(alpha=0.5)")
    w2 = compiled.program.weights()["fc2.weight"] / model.fc2.weight.detach()
    assert torch.equal(w2, torch.exp2(torch.round(torch.log2(w2))))
    assert compiled.report().records[0].max_error == 0.0
    for batch in batches:
        with torch.no_grad():
            assert torch.equal(compiled(*batch), model(*batch))


def test_smoothing_helps_int8_activations_with_an_outlier() -> None:
    model, batches = _two_linear()

    def error(passes: str) -> float:
        compiled = gp.compile(model, batches[0], calibration_data=batches, passes=passes,
                              verify=True)
        with torch.no_grad():
            return sum(float((compiled(*b) - model(*b)).pow(2).sum()) for b in batches)
    plain = error("insert_fake_quant(scheme='int8_static')")
    smoothed = error("smooth_quant(alpha=0.5), insert_fake_quant(scheme='int8_static')")
    assert smoothed < 0.5 * plain


def test_norm_producers_and_refusals_name_the_op() -> None:
    torch.manual_seed(0)
    model = NormThenLinears().eval()
    batches = _batches((3, 8))
    compiled = gp.compile(model, batches[0], calibration_data=batches, verify=True,
                          passes="smooth_quant")
    record = compiled.report().records[0]
    assert record.stats["smoothed"] == 1 and record.stats["layers"] == 2
    assert not torch.equal(compiled.program.weights()["norm.weight"], model.norm.weight)
    reasons = dict(record.skipped)
    assert "add" in reasons["layer_norm_1"] and "does not commute" in reasons["layer_norm_1"]
    # a producer is a linear only with producers=('layer',) or the default
    compiled = gp.compile(model, batches[0], calibration_data=batches,
                          passes="smooth_quant(producers=('norm',))")
    assert compiled.report().records[0].stats["smoothed"] == 1


def test_through_attention_value_to_output_projection() -> None:
    """v's output channels reach o_proj through view, transpose, SDPA and the merge of the
    heads: the channel ids say which o_proj input each v channel becomes."""
    entry = next(e for e in zoo_models(include=("transformer",)) if e.name == "hf_bert")
    model, inputs = entry.make()
    batches = [args for args, _ in generate_samples((inputs, {}), 4, seed=1)]
    compiled = gp.compile(model, inputs, calibration_data=batches, verify=True,
                          passes="smooth_quant(power_of_two=False)")
    record = compiled.report().records[0]
    assert record.stats["smoothed"] >= 2 and record.max_error <= 1e-5
    assert any("value" in line or "linear" in line for line in record.details["summary"])


def test_errors() -> None:
    model, batches = _two_linear()
    with pytest.raises(InputError, match="smooth_quant needs calibration data"):
        gp.compile(model, batches[0], passes="smooth_quant")
    with pytest.raises(PipelineError, match="alpha must be in"):
        gp.compile(model, batches[0], passes="smooth_quant(alpha=1.5)")
    with pytest.raises(PipelineError, match="producers takes"):
        gp.compile(model, batches[0], passes="smooth_quant(producers=('conv',))")


def _transformers() -> list[pytest.param]:
    return [pytest.param(e, id=e.name, marks=[pytest.mark.slow] if e.name == "minilm" else [])
            for e in zoo_models(include=("transformer",))]


@pytest.mark.parametrize("entry", _transformers())
def test_smooth_quant_then_int8_dynamic_on_the_zoo(entry: ZooModel) -> None:
    model, inputs = entry.make()
    batches = [args for args, _ in generate_samples((inputs, {}), 4, seed=1)]
    compiled = gp.compile(model, inputs, calibration_data=batches, verify=True,
                          passes="smooth_quant, insert_fake_quant(scheme='int8_dynamic')")
    smooth, quant = compiled.report().records
    assert smooth.max_error == 0.0, smooth.max_error     # power-of-two scales: bit-exact
    assert quant.max_error is not None and quant.max_error <= 1e-5
