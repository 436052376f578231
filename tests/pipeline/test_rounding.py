"""The float64 referee: fp32 rounding passes an exact contract, a real change does not."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from torch import nn

import graphpress as gp
from graphpress.errors import ContractViolation
from graphpress.ir.program import Program
from graphpress.pipeline import Contract, Pass, PassContext, PassResult
from graphpress.pipeline.rounding import float64_referee

_TIGHT = 1e-9  # far below fp32 rounding of an 8-layer MLP (~1e-7 of its output)


@dataclass
class Rescale(Pass):
    """Replaces every weight ``w`` by ``(w * factor) / factor``, computed in fp32 when
    ``factor`` is 3 (re-rounds each weight by up to an ulp: the same function), or scales it
    by ``factor`` outright when ``real`` (test only)."""

    factor: float = 3.0
    real: bool = False
    name = "test_rescale"
    contract = Contract.exact(rtol=_TIGHT, atol=_TIGHT)
    rewrites_weights = True

    def run(self, program: Program, ctx: PassContext) -> PassResult:
        for name, tensor in program.weights().items():
            rewritten = tensor * self.factor if self.real else tensor * self.factor / self.factor
            program.replace_weight(name, rewritten)
        return PassResult(True)


def _deep_mlp() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(8):
        layers += [nn.Linear(32, 32), nn.Tanh()]
    return nn.Sequential(*layers).eval(), torch.randn(4, 32)


def test_rounding_only_passes_and_is_reported() -> None:
    model, x = _deep_mlp()
    compiled = gp.compile(model, (x,), passes=[Rescale()], verify=True)
    (record,) = compiled.report().records
    assert record.max_error is not None and record.max_error > _TIGHT, "the check was needed"
    assert any("float rounding only" in line for line in record.details["summary"])


def test_a_real_change_fails_even_when_tiny() -> None:
    model, x = _deep_mlp()
    with pytest.raises(ContractViolation, match="test_rescale"):
        gp.compile(model, (x,), passes=[Rescale(factor=1 + 1e-5, real=True)], verify=True)
    assert torch.equal(model[0].weight, _deep_mlp()[0][0].weight), "the model is untouched"


def test_no_ruling_without_float64() -> None:
    x = torch.randn(3)
    pinned = lambda: lambda t: t.float()  # noqa: E731  an op that pins float32
    assert float64_referee(pinned, ((x,), {}), x, x + 1e-7, atol=1e-9) is None

    def unavailable() -> object:
        raise RuntimeError("no float64 kernel")

    assert float64_referee(unavailable, ((x,), {}), x, x + 1e-7, atol=1e-9) is None


def test_ruling_compares_with_the_reference_own_error() -> None:
    truth = torch.linspace(-1, 1, 11, dtype=torch.float64)
    reference = lambda: lambda t: t  # noqa: E731  the float64 truth is the input itself
    own = truth.float() + 1e-6
    sample = ((truth.float(),), {})
    assert float64_referee(reference, sample, truth.float() + 7e-6, own, atol=1e-9)
    assert float64_referee(reference, sample, truth.float() + 9e-6, own, atol=1e-9) is None
