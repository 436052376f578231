"""equalize on tiny programs (the closed-form scales, ranges equal after), chains through
depthwise convolutions and flatten, its refusals, and on the zoo's conv nets with int8 static
quantization after it, each with verify=True."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import graphpress as gp
from graphpress.pipeline.samples import generate_samples
from graphpress.testing.zoo import ZooModel, zoo_models


class Pair(nn.Module):
    def __init__(self, activation: nn.Module) -> None:
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(5, 6), activation, nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Separable(nn.Module):
    """conv -> relu -> depthwise -> relu -> pointwise -> relu -> pool -> flatten -> linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.dw = nn.Conv2d(4, 4, 3, padding=1, groups=4)
        self.pw = nn.Conv2d(4, 6, 1)
        self.fc = nn.Linear(6 * 2 * 2, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.dw(torch.relu(self.conv(x))))
        h = nn.functional.max_pool2d(torch.relu(self.pw(h)), 2)
        return self.fc(h.flatten(1))


def _pair(activation: nn.Module | None = None) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = Pair(activation or nn.ReLU()).eval()
    with torch.no_grad():
        model.fc1.weight[2] *= 30.0        # one channel's filter range far above the rest
        model.fc2.weight[:, 4] *= 0.01     # and one reading column far below
    return model, torch.randn(4, 5)


def test_scales_follow_the_closed_form_and_equalize_the_ranges() -> None:
    model, x = _pair()
    r1 = model.fc1.weight.detach().abs().amax(1).double()
    r2 = model.fc2.weight.detach().abs().amax(0).double()
    scale = torch.sqrt(r1 / r2)
    compiled = gp.compile(model, (x,), verify=True, passes="equalize(power_of_two=False)")
    weights = compiled.program.weights()
    torch.testing.assert_close(weights["fc1.weight"].double(),
                               model.fc1.weight.detach().double() / scale[:, None],
                               rtol=1e-6, atol=0)
    torch.testing.assert_close(weights["fc1.bias"].double(),
                               model.fc1.bias.detach().double() / scale, rtol=1e-6, atol=0)
    new_r1 = weights["fc1.weight"].abs().amax(1).double()
    new_r2 = weights["fc2.weight"].abs().amax(0).double()
    torch.testing.assert_close(new_r1, new_r2, rtol=1e-6, atol=0)
    torch.testing.assert_close(new_r1, torch.sqrt(r1 * r2), rtol=1e-6, atol=0)
    record = compiled.report().records[0]
    assert record.stats["pairs"] == 1 and record.contract_kind == "exact"


def test_power_of_two_scales_are_bit_exact_and_within_a_factor_two() -> None:
    model, x = _pair(nn.LeakyReLU(0.1))
    compiled = gp.compile(model, (x,), verify=True, passes="equalize")
    assert compiled.report().records[0].max_error == 0.0
    with torch.no_grad():
        assert torch.equal(compiled(x), model(x))
    weights = compiled.program.weights()
    ratio = (weights["fc1.weight"].abs().amax(1) / weights["fc2.weight"].abs().amax(0)).detach()
    assert float(ratio.max()) <= 2.0 + 1e-6 and float(ratio.min()) >= 0.5 - 1e-6


def test_chain_through_depthwise_pool_and_flatten() -> None:
    torch.manual_seed(0)
    model, x = Separable().eval(), torch.randn(2, 2, 4, 4)
    compiled = gp.compile(model, (x,), verify=True, passes="equalize(power_of_two=False)")
    record = compiled.report().records[0]
    # conv -> dw, dw -> pw, pw -> fc (through max_pool and flatten: 4 fc inputs per channel)
    assert record.stats["pairs"] == 3 and record.stats["sweeps"] > 1
    assert record.max_error <= 1e-5
    weights = compiled.program.weights()
    # after the sweeps, each depthwise filter's range matches the pointwise column reading it
    dw = weights["dw.weight"].abs().reshape(4, -1).amax(1)
    pw = weights["pw.weight"].abs().reshape(6, 4).amax(0)
    torch.testing.assert_close(dw, pw, rtol=1e-3, atol=0)


@pytest.mark.parametrize(("activation", "op"), [(nn.ReLU6(), "hardtanh"), (nn.GELU(), "gelu")])
def test_activations_that_are_not_positive_homogeneous_are_refused(activation: nn.Module,
                                                                   op: str) -> None:
    model, x = _pair(activation)
    compiled = gp.compile(model, (x,), passes="equalize")
    record = compiled.report().records[0]
    assert not record.changed and record.stats["pairs"] == 0
    assert any(op in why and "does not commute" in why for _, why in record.skipped)


def test_batchnorm_in_between_asks_for_fold_bn() -> None:
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
                          nn.Conv2d(4, 3, 3)).eval()
    x = torch.randn(1, 2, 8, 8)
    record = gp.compile(model, (x,), passes="equalize").report().records[0]
    assert any("run fold_bn first" in why for _, why in record.skipped)
    record = gp.compile(model, (x,), passes="fold_bn, equalize").report().records[-1]
    assert record.stats["pairs"] == 1


def _conv_models() -> list[pytest.param]:
    return [pytest.param(e, id=e.name) for e in zoo_models(include=("conv",))]


@pytest.mark.parametrize("entry", _conv_models())
def test_equalize_then_int8_static_with_bias_correction_on_the_zoo(entry: ZooModel) -> None:
    model, inputs = entry.make()
    batches = [args for args, _ in generate_samples((inputs, {}), 4, seed=1)]
    passes = [*(["fold_bn"] if "batchnorm" in entry.tags else []), "equalize",
              "insert_fake_quant(scheme='int8_static', bias_correction=True)"]
    compiled = gp.compile(model, inputs, calibration_data=batches, verify=True, passes=passes)
    equalize, quant = compiled.report().records[-2:]
    assert equalize.max_error == 0.0, equalize.max_error
    assert quant.max_error is not None and quant.max_error <= 1e-5
