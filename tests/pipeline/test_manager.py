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


# --------------------------------------------------- fingerprint: changed=False must be true
@dataclass
class LyingReluToSigmoid(Pass):
    """Replaces relu with sigmoid and claims it changed nothing (test only)."""

    name = "test_lying_relu_to_sigmoid"

    def run(self, program: Program, ctx: PassContext) -> PassResult:
        relu = next(n for n in program.graph.nodes if n.target == torch.ops.aten.relu.default)
        relu.target = torch.ops.aten.sigmoid.default
        return PassResult(False)


@dataclass
class LyingWeightSwap(Pass):
    """Stores a new tensor of the same shape for a weight and claims no change (test only)."""

    name = "test_lying_weight_swap"

    def run(self, program: Program, ctx: PassContext) -> PassResult:
        old = program.state_dict["conv.weight"]
        program.state_dict["conv.weight"] = torch.nn.Parameter(torch.zeros_like(old))
        return PassResult(False)


@dataclass
class LyingMeta(Pass):
    """Leaves a wrong meta['val'] on relu and claims no change (test only)."""

    name = "test_lying_meta"

    def run(self, program: Program, ctx: PassContext) -> PassResult:
        relu = next(n for n in program.graph.nodes if n.target == torch.ops.aten.relu.default)
        relu.meta["val"] = relu.meta["val"].new_empty((1, 1))
        return PassResult(False)


@dataclass
class HonestNoOp(Pass):
    """Reads everything, re-propagates shapes (new meta objects, same values), changes
    nothing (test only)."""

    name = "test_honest_no_op"

    def run(self, program: Program, ctx: PassContext) -> PassResult:
        from graphpress.ir.shapes import propagate_shapes

        propagate_shapes(program)
        assert all(isinstance(t, torch.Tensor) for t in program.weights().values())
        return PassResult(False, stats={"nodes seen": program.num_nodes()})


def test_lying_target_rewrite_is_caught_and_described(conv_program: Program) -> None:
    with pytest.raises(MetadataError) as info:
        _manager(["cse", LyingReluToSigmoid()], verify=False).run(conv_program)
    message = str(info.value)
    assert "pass 'test_lying_relu_to_sigmoid' reported no change" in message
    assert "node %relu target aten.relu.default -> aten.sigmoid.default" in message


def test_lying_weight_swap_is_caught(conv_program: Program) -> None:
    with pytest.raises(MetadataError,
                       match="test_lying_weight_swap.*weight 'conv.weight' tensor replaced"):
        _manager([LyingWeightSwap()], verify=False).run(conv_program)


def test_lying_meta_is_caught(conv_program: Program) -> None:
    with pytest.raises(MetadataError, match=r"test_lying_meta.*node %relu meta\['val'\]"):
        _manager([LyingMeta()], verify=False).run(conv_program)


def test_honest_no_op_passes(conv_program: Program) -> None:
    code, version = conv_program.graph_module.code, conv_program.version
    report = _manager([HonestNoOp(), "cse"]).run(conv_program)
    assert [r.changed for r in report.records] == [False, False]
    assert conv_program.version == version and conv_program.graph_module.code == code


def test_program_runs_the_rewritten_code_after_a_pass(conv_program: Program) -> None:
    x = conv_inputs()[0]
    before = conv_program(x)
    _manager([ReluToSigmoid()], verify=False).run(conv_program)
    assert "sigmoid" in conv_program.graph_module.code
    assert not torch.equal(conv_program(x), before)


# ------------------------------------------- shapes re-propagated from the touched nodes only
class _Small(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (torch.relu(x) * 2).sin()


def _small_program() -> Program:
    from graphpress.frontends import trace

    return trace(_Small(), (torch.randn(2, 3),))


@dataclass
class UnsqueezeBeforeRelu(Pass):
    """Feeds relu an unsqueezed input and sets the new shape on the new node and on relu, but
    leaves the nodes after relu with their old shape (test only)."""

    name = "test_unsqueeze"

    def run(self, program: Program, ctx: PassContext) -> PassResult:
        relu = next(n for n in program.graph.nodes if n.target == torch.ops.aten.relu.default)
        (x,) = relu.args
        with program.graph.inserting_before(relu):
            unsqueeze = program.graph.call_function(torch.ops.aten.unsqueeze.default, (x, 0))
        relu.args = (unsqueeze,)
        unsqueeze.meta["val"] = x.meta["val"].unsqueeze(0)
        relu.meta["val"] = relu.meta["val"].unsqueeze(0)
        return PassResult(True)


@pytest.mark.parametrize("shape_check", ["incremental", "full"])
def test_stale_meta_downstream_of_a_touched_node_is_caught(shape_check: str) -> None:
    program = _small_program()
    manager = PassManager([UnsqueezeBeforeRelu()], hooks=[])
    manager.shape_check = shape_check  # type: ignore[assignment]
    with pytest.raises(MetadataError, match=r"stale shape metadata after pass 'test_unsqueeze'"
                                            r".*node 'mul'.*had .*'2', '3'.* computes "
                                            r".*'1', '2', '3'"):
        manager.run(program)


def test_wrong_meta_on_a_touched_node_is_caught(conv_program: Program) -> None:
    @dataclass
    class WrongMeta(Pass):
        """Replaces relu with sigmoid and leaves a wrong shape on it (test only)."""

        name = "test_wrong_meta"

        def run(self, program: Program, ctx: PassContext) -> PassResult:
            relu = next(n for n in program.graph.nodes
                        if n.target == torch.ops.aten.relu.default)
            relu.target = torch.ops.aten.sigmoid.default
            relu.meta["val"] = relu.meta["val"].new_empty((2, 4))
            return PassResult(True)

    with pytest.raises(MetadataError, match="stale shape metadata after pass 'test_wrong_meta'"
                                            ".*node 'relu'"):
        _manager([WrongMeta()], verify=False).run(conv_program)


def test_only_touched_nodes_and_changed_values_are_repropagated(conv_program: Program) -> None:
    class Snapshot:
        """Records each node's meta['val'] object just before the pass."""

        def __init__(self) -> None:
            self.vals: dict[str, object] = {}

        def before_pass(self, pass_: Pass, program: Program, index: int) -> None:
            self.vals = {n.name: n.meta["val"] for n in program.graph.nodes if "val" in n.meta}

        def after_pass(self, *args: object) -> None:
            pass

    snapshot = Snapshot()
    PassManager([ReluToSigmoid()], hooks=[snapshot]).run(conv_program)
    kept = {n.name for n in conv_program.graph.nodes
            if n.meta.get("val") is snapshot.vals.get(n.name)}
    # the rewired node is re-run; its value has the same shape, so nothing after it is re-run,
    # and nothing before it either
    assert "relu" in snapshot.vals and kept == set(snapshot.vals) - {"relu"}


@pytest.mark.parametrize("pipeline", ["fixpoint(dce, cse, fold_constants)", "fold_bn"])
def test_incremental_and_full_checks_leave_the_same_metadata(pipeline: str) -> None:
    from graphpress.ir.shapes import value_signature
    from tests.models import Redundant, vec_inputs

    def run(shape_check: str) -> dict[str, object]:
        model, inputs = ((Redundant().eval(), vec_inputs()) if "fixpoint" in pipeline
                         else (ConvBNLinear().eval(), conv_inputs()))
        program = gp.frontends.trace(model, inputs)
        manager = PassManager(pipeline, hooks=[])
        manager.shape_check = shape_check  # type: ignore[assignment]
        report = manager.run(program)
        assert any(r.changed for r in report.records)
        return {n.name: (n.target, value_signature(n.meta.get("val")))
                for n in program.graph.nodes}

    assert run("incremental") == run("full")


def test_first_propagation_runs_only_when_shapes_are_not_current(conv_program: Program) -> None:
    def vals() -> dict[str, object]:
        return {n.name: n.meta.get("val") for n in conv_program.graph.nodes}

    conv_program.analysis("shapes")          # checked at this version
    checked = vals()
    _manager(["cse"], verify=False).run(conv_program)
    assert vals() == checked and all(vals()[k] is v for k, v in checked.items())
    conv_program.touch()                     # a change outside the manager: check again
    _manager(["cse"], verify=False).run(conv_program)
    assert not any(vals()[k] is v for k, v in checked.items() if k != "output")


def test_users_rewired_to_an_equal_valued_node_are_not_touched() -> None:
    from graphpress.pipeline.fingerprint import diff, fingerprint
    from tests.models import Redundant, vec_inputs

    program = gp.frontends.trace(Redundant().eval(), vec_inputs())
    before = fingerprint(program)
    gp.passes.CommonSubexpressionElimination().run(program, PassContext())
    found = diff(before, fingerprint(program))
    assert found.substituted, "cse rewired the users of the merged relu"
    assert not set(found.substituted) & set(found.touched)
    assert found.edited  # still an edit: changed=False would be refused

    # a rewiring to a node of another shape is touched
    program = gp.frontends.trace(Redundant().eval(), vec_inputs())
    before = fingerprint(program)
    relu = next(n for n in program.graph.nodes if n.target == torch.ops.aten.relu.default)
    fc = next(n for n in program.graph.nodes if n.target == torch.ops.aten.t.default)
    user = next(iter(relu.users))
    user.replace_input_with(relu, fc)
    found = diff(before, fingerprint(program))
    assert user in found.touched and user not in found.substituted
