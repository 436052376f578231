"""Contract kinds beyond exact: statistical contracts and their metrics, pass ordering, the
end-to-end check against the model, and tolerances relative to the output's magnitude."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from torch import nn

import graphpress as gp
from graphpress.errors import ContractViolation, PipelineError
from graphpress.frontends import trace
from graphpress.ir.program import Program
from graphpress.numerics import compare_outputs, output_metrics
from graphpress.pipeline import Contract, Pass, PassContext, PassManager, PassResult, Report
from graphpress.pipeline.end_to_end import check_end_to_end


def _scale_weights(program: Program, factor: float) -> None:
    for name, tensor in program.weights().items():
        if tensor.is_floating_point():
            program.replace_weight(name, tensor * factor)


@dataclass
class PerturbWeights(Pass):
    """Scales every weight by (1 + noise) (test only)."""

    noise: float = 1e-3
    name = "test_perturb"
    contract = Contract.statistical("weights perturbed on purpose", sqnr_db=30.0, cosine=0.999)
    rewrites_weights = True

    def run(self, program: Program, ctx: PassContext) -> PassResult:
        _scale_weights(program, 1.0 + self.noise)
        return PassResult(True)


@dataclass
class Late(Pass):
    """Must run after test_perturb (test only)."""

    name = "test_late"
    runs_after = ("test_perturb",)

    def run(self, program: Program, ctx: PassContext) -> PassResult:
        return PassResult(False)


def _mlp() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4)).eval(), torch.randn(5, 8)


def test_statistical_contract_passes_and_reports_its_metrics() -> None:
    model, x = _mlp()
    compiled = gp.compile(model, (x,), passes=[PerturbWeights(1e-3)], verify=True)
    (record,) = compiled.report().records
    assert record.metrics["sqnr_db"] > 30 and record.metrics["cosine"] > 0.999
    assert "sqnr_db" in str(compiled.report()) and "statistical" in record.contract
    assert "SQNR" in compiled.report().extra["end-to-end vs model"]


def test_statistical_contract_violation_names_the_metric() -> None:
    model, x = _mlp()
    with pytest.raises(ContractViolation, match=r"sqnr_db = .* < 30"):
        gp.compile(model, (x,), passes=[PerturbWeights(0.5)], verify=True)


def test_statistical_contracts_need_known_metrics() -> None:
    with pytest.raises(ValueError, match="sqnr_db"):
        Contract.statistical("x", snr=3.0)


def test_a_pass_before_one_it_must_follow_is_refused_with_the_fix() -> None:
    with pytest.raises(PipelineError, match="move 'test_perturb' before 'test_late'"):
        PassManager([Late(), PerturbWeights()])
    with pytest.raises(PipelineError, match="must run after"):
        PassManager(["dce", gp.pipeline.Fixpoint([Late(), PerturbWeights()])])
    PassManager([PerturbWeights(), Late()])  # the right order is accepted
    PassManager([Late()])                    # and so is the pass alone


def test_end_to_end_catches_a_program_that_is_not_the_model() -> None:
    model, x = _mlp()
    program = trace(model, (x,))
    report = PassManager(["cse"]).run(program, Report())
    check_end_to_end(model, program, [((x,), {})], report)
    assert "the composed exact contracts, rtol=1e-06, atol=1e-06, hold" in report.extra[
        "end-to-end vs model"]
    _scale_weights(program, 1.01)  # a silent change no pass reported
    with pytest.raises(ContractViolation, match="end to end"):
        check_end_to_end(model, program, [((x,), {})], report)


def test_absolute_tolerance_scales_with_the_output() -> None:
    small = torch.full((4,), 1e-4)
    off = small * 1.05                     # 5% off: an atol of 1e-5 would accept it
    assert compare_outputs(off, small, rtol=0.0, atol=1e-5).ok
    assert not compare_outputs(off, small, rtol=0.0, atol=1e-5, scale_atol=True).ok
    big = torch.full((4,), 1e4)
    assert compare_outputs(big + 1e-2, big, rtol=0.0, atol=1e-5, scale_atol=True).ok
    assert not compare_outputs(small.double(), small, rtol=1.0, atol=1.0).ok, "dtypes differ"


def test_output_metrics() -> None:
    ref = torch.tensor([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]])
    metrics = output_metrics(ref * 1.01, ref, ("sqnr_db", "cosine", "top1_agreement"))
    assert metrics["sqnr_db"] == pytest.approx(40.0, abs=1e-4)
    assert metrics["cosine"] == pytest.approx(1.0)
    assert metrics["top1_agreement"] == 1.0
    flipped = output_metrics(ref.flip(-1), ref, ("top1_agreement",))
    assert flipped["top1_agreement"] == 0.0
