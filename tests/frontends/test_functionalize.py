"""The functional IR: no in-place op after the frontend, state changes as mutation outputs,
and the cleanup passes stay right on models that mutate clones, buffers and inputs."""

from __future__ import annotations

import torch
from torch import nn
from torch.export.graph_signature import OutputKind

import graphpress as gp
from graphpress.frontends import trace
from graphpress.frontends.functionalize import is_mutating
from tests.models import Counter


class CloneMutations(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = x.clone()
        a.add_(1)
        b = x.clone()
        b.mul_(3)
        return a + b


class MutatedClonedBuffer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("buf", torch.ones(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.buf.clone()
        t.mul_(2)
        return x * t


class ReadsStateBeforeWrite(nn.Module):
    """``count * 2`` reads a buffer the program writes: state, never a constant to fold."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("count", torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x * (self.count * 2)
        self.count.add_(1)
        return y


class InputMutation(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.relu()
        x.mul_(2)
        return y + x


class WriteThroughView(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = x.clone()
        a[0].add_(5)        # a write into a view of a: only torch's functionalization is right
        return a * 2


class InplaceActivations(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu_(self.linear(x))
        h += x
        return h.clamp_(max=1.0)


def _calls(fn: object, x: torch.Tensor, n: int = 3) -> list[torch.Tensor]:
    return [fn(x.clone()) for _ in range(n)]  # type: ignore[operator]


def _assert_same_calls(model_cls: type[nn.Module], x: torch.Tensor, passes: str) -> None:
    torch.manual_seed(0)
    compiled = gp.compile(model_cls(), (x,), passes=passes, verify=True)
    torch.manual_seed(0)
    eager = model_cls()
    for got, want in zip(_calls(compiled, x), _calls(eager, x), strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_no_inplace_op_is_left_and_state_is_a_mutation_output() -> None:
    for model, x in [(CloneMutations(), torch.ones(4)), (Counter(), torch.ones(1)),
                     (InputMutation(), torch.ones(3)), (InplaceActivations(), torch.ones(2, 4)),
                     (WriteThroughView(), torch.ones(2, 3))]:
        program = trace(model, (x,))
        left = [n.name for n in program.graph.nodes if is_mutating(n)]
        assert not left, f"{type(model).__name__}: in-place ops left: {left}"
    kinds = [s.kind for s in trace(Counter(), (torch.ones(1),)).signature.output_specs]
    assert kinds == [OutputKind.BUFFER_MUTATION, OutputKind.USER_OUTPUT]
    kinds = [s.kind for s in trace(InputMutation(), (torch.ones(3),)).signature.output_specs]
    assert kinds == [OutputKind.USER_INPUT_MUTATION, OutputKind.USER_OUTPUT]


def test_cse_does_not_merge_clones_mutated_differently() -> None:
    _assert_same_calls(CloneMutations, torch.ones(4), "cse, dce")
    compiled = gp.compile(CloneMutations(), (torch.ones(4),), passes="cse")
    assert float(compiled(torch.ones(4))[0]) == 5


def test_fold_constants_does_not_freeze_a_mutated_clone() -> None:
    _assert_same_calls(MutatedClonedBuffer, torch.ones(4), "fold_constants, dce")


def test_a_buffer_the_program_writes_is_never_folded() -> None:
    _assert_same_calls(ReadsStateBeforeWrite, torch.ones(2), "fixpoint(fold_constants, cse, dce)")
    program = gp.compile(ReadsStateBeforeWrite(), (torch.ones(2),),
                         passes="fold_constants").program
    assert any(str(n.target) == "aten.mul.Tensor" and n.args[1] == 2
               for n in program.graph.nodes if n.op == "call_function")


def test_counter_state_matches_eager_over_calls_after_verification() -> None:
    model = Counter()
    compiled = gp.compile(model, (torch.ones(1),), passes="dce, cse, fold_constants",
                          verify=True)
    assert [float(compiled(torch.ones(1))) for _ in range(3)] == [2.0, 3.0, 4.0]
    assert float(model.count) == 0.0, "compiling must not advance the user's model"


def test_input_mutation_is_applied_to_the_callers_tensor_as_in_eager() -> None:
    compiled = gp.compile(InputMutation(), (torch.ones(3),), passes="dce, cse", verify=True)
    x_ours, x_eager = torch.tensor([1.0, -2.0, 3.0]), torch.tensor([1.0, -2.0, 3.0])
    got, want = compiled(x_ours), InputMutation()(x_eager)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(x_ours, x_eager, rtol=0, atol=0)


def test_verification_leaves_the_example_inputs_alone() -> None:
    x = torch.tensor([1.0, -2.0, 3.0])
    gp.compile(InputMutation(), (x,), passes="cse", verify=True)
    torch.testing.assert_close(x, torch.tensor([1.0, -2.0, 3.0]), rtol=0, atol=0)


def test_write_through_a_view_uses_torchs_functionalization() -> None:
    _assert_same_calls(WriteThroughView, torch.ones(2, 3), "fixpoint(dce, cse, fold_constants)")


def test_inplace_activations_keep_the_ops_passes_match() -> None:
    program = trace(InplaceActivations().eval(), (torch.ones(2, 4),))
    targets = [str(n.target) for n in program.graph.nodes if n.op == "call_function"]
    assert targets == ["aten.linear.default", "aten.relu.default", "aten.add.Tensor",
                       "aten.clamp.default"]
    _assert_same_calls(InplaceActivations, torch.randn(2, 4), "fixpoint(dce, cse)")


class WriteIntoADeadBasesView(nn.Module):
    """``flatten(x).dropout_()`` (MobileNetV2's classifier): x is not read after the write."""

    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(4)
        self.dropout = nn.Dropout(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = self.bn(x).mean(-1, keepdim=True)
        flat = torch.flatten(pooled, 1)
        return self.dropout(flat) * 2


def test_a_write_into_a_view_of_a_dead_base_is_rewritten_directly() -> None:
    program = trace(WriteIntoADeadBasesView().eval(), (torch.randn(2, 4, 3),))
    targets = [str(n.target) for n in program.graph.nodes if n.op == "call_function"]
    assert "aten.batch_norm.default" in targets, "no fallback to torch's decomposition"
    assert "aten.dropout.default" in targets and not any(t.endswith("_.default") for t in targets)
    model, x = WriteIntoADeadBasesView().eval(), torch.randn(2, 4, 3)
    compiled = gp.compile(model, (x,), passes="fixpoint(dce, cse)", verify=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=0, atol=0)
