"""PassManager: checks after each pass, verification that catches a wrong pass, hooks, debug."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

import graphpress as gp
from graphpress.errors import ContractViolation, MetadataError, PassError
from graphpress.ir.program import Program
from graphpress.passes import Contract, Pass, PassContext, PassManager, PassResult
from tests.models import ConvBNLinear, conv_inputs


@dataclass
class ReluToSigmoid(Pass):
    """Replaces relu with sigmoid (deliberately wrong, test only)."""

    name = "test_relu_to_sigmoid"

    def run(self, program: Program, ctx: PassContext) -> PassResult:
        for node in program.graph.nodes:
            if node.target == torch.ops.aten.relu.default:
                node.target = torch.ops.aten.sigmoid.default
                return PassResult(True)
        return PassResult(False)


@dataclass
class SilentEdit(Pass):
    """Edits the graph but claims it did not (test only)."""

    name = "test_silent_edit"

    def run(self, program: Program, ctx: PassContext) -> PassResult:
        relu = next(n for n in program.graph.nodes if n.target == torch.ops.aten.relu.default)
        relu.replace_all_uses_with(relu.args[0])
        program.graph.erase_node(relu)
        return PassResult(False)


@dataclass
class StaleWeight(Pass):
    """Swaps a weight tensor behind the Program's back (test only)."""

    name = "test_stale_weight"

    def run(self, program: Program, ctx: PassContext) -> PassResult:
        program.state_dict["conv.weight"] = torch.nn.Parameter(torch.zeros(8, 3, 3, 3))
        return PassResult(True)


@dataclass
class Raises(Pass):
    """Raises (test only)."""

    name = "test_raises"

    def run(self, program: Program, ctx: PassContext) -> PassResult:
        raise RuntimeError("boom")


def _manager(passes: list[object], verify: bool = True) -> PassManager:
    ctx = PassContext(example_inputs=conv_inputs())
    return PassManager(passes, verify=verify, context=ctx, hooks=[])


def test_wrong_pass_is_caught_and_named(conv_program: Program) -> None:
    with pytest.raises(ContractViolation) as info:
        _manager(["cse", ReluToSigmoid()]).run(conv_program)
    message = str(info.value)
    assert "test_relu_to_sigmoid" in message and "exact" in message
    assert "reads the rewritten %relu" in message
    assert "passes run before it: cse" in message


def test_wrong_pass_unnoticed_without_verify(conv_program: Program) -> None:
    report = _manager([ReluToSigmoid()], verify=False).run(conv_program)
    assert report.records[0].changed and report.records[0].max_error is None


def test_false_no_change_claim_is_caught(conv_program: Program) -> None:
    with pytest.raises(MetadataError, match="reported no change"):
        _manager([SilentEdit()], verify=False).run(conv_program)


def test_stale_weight_is_caught(conv_program: Program) -> None:
    with pytest.raises(MetadataError, match="test_stale_weight.*conv.weight|conv.weight"):
        _manager([StaleWeight()], verify=False).run(conv_program)


def test_raising_pass_is_named(conv_program: Program) -> None:
    with pytest.raises(PassError, match="pass 'test_raises' raised RuntimeError: boom"):
        _manager(["dce", Raises()]).run(conv_program)


def test_reference_contract_uses_pass_reference(conv_program: Program) -> None:
    @dataclass
    class ScaleOutput(Pass):
        """Doubles the output; its reference says so."""

        name = "test_scale_output"
        contract = Contract.against_reference("twice the input program")

        def run(self, program: Program, ctx: PassContext) -> PassResult:
            out = program.output_node()
            value = out.args[0][0]
            with program.graph.inserting_before(out):
                doubled = program.graph.call_function(torch.ops.aten.mul.Tensor, (value, 2.0))
            out.args = ((doubled,),)
            return PassResult(True)

        def reference(self, before: Program, result: PassResult) -> object:
            return lambda *args: before(*args) * 2

    report = _manager([ScaleOutput()]).run(conv_program)
    assert report.records[0].max_error == 0.0
    created = [n for n in conv_program.graph.nodes if n.meta.get("graphpress_pass")]
    assert [n.meta["graphpress_pass"] for n in created] == ["test_scale_output"]


def test_fixpoint_stops_when_nothing_changes(redundant_program: Program) -> None:
    from tests.models import vec_inputs

    ctx = PassContext(example_inputs=vec_inputs())
    report = PassManager("fixpoint(dce, cse, fold_constants)", verify=True, context=ctx,
                         hooks=[]).run(redundant_program)
    last_round = [r for r in report.records if r.iteration == max(x.iteration for x in
                                                                     report.records)]
    assert not any(r.changed for r in last_round)
    assert all(r.max_error == 0.0 for r in report.records)


def test_debug_and_dump_switches(conv_program: Program, tmp_path: object,
                                 monkeypatch: pytest.MonkeyPatch,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("GRAPHPRESS_DEBUG", "2")
    monkeypatch.setenv("GRAPHPRESS_DUMP", str(tmp_path))
    PassManager(["cse", ReluToSigmoid()], context=PassContext(conv_inputs())).run(conv_program)
    err = capsys.readouterr().err
    assert "[graphpress] 01 cse: no change" in err
    assert "[graphpress] 02 test_relu_to_sigmoid: changed" in err
    assert "-  %relu = aten.relu" in err and "+  %relu = aten.sigmoid" in err
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["01_cse.after.txt", "01_cse.before.txt", "02_test_relu_to_sigmoid.after.txt",
                     "02_test_relu_to_sigmoid.before.txt"]


def test_verify_without_inputs_is_refused() -> None:
    with pytest.raises(PassError, match="needs sample inputs"):
        PassManager(["dce"], verify=True, hooks=[])


def test_compile_reports_violation_by_pass_name() -> None:
    with pytest.raises(ContractViolation, match="test_relu_to_sigmoid"):
        gp.compile(ConvBNLinear().eval(), conv_inputs(), passes=[ReluToSigmoid()], verify=True)
