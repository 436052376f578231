"""fold_bn on tiny graphs: every supported pattern and every refusal, structure and numbers."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import graphpress as gp
from graphpress.ir.program import Program
from graphpress.passes import FoldBatchNorm, PassContext, PassManager, PassRecord
from graphpress.testing import assert_equivalent

aten = torch.ops.aten
_BN = (aten.batch_norm.default, aten._native_batch_norm_legit_no_training.default)
_ARITH = (aten.mul.Tensor, aten.div.Tensor, aten.add.Tensor, aten.sub.Tensor)


def _calibrated(model: nn.Module) -> nn.Module:
    """Random BatchNorm statistics and affine parameters, so that BN is never the identity."""
    with torch.no_grad():
        for bn in model.modules():
            if isinstance(bn, nn.modules.batchnorm._BatchNorm) and bn.track_running_stats:
                bn.running_mean.uniform_(-1, 1)
                bn.running_var.uniform_(0.2, 2)
                if bn.affine:
                    bn.weight.uniform_(0.5, 1.5)
                    bn.bias.uniform_(-0.5, 0.5)
    return model.eval()


def _fold(model: nn.Module, *inputs: torch.Tensor, dtype: torch.dtype = torch.float32,
          **options: object) -> tuple[gp.CompiledModel, PassRecord]:
    """Fold with verify=True and compare with the eager model at the dtype's tolerance."""
    model = _calibrated(model).to(dtype)
    inputs = tuple(x.to(dtype) for x in inputs)
    compiled = gp.compile(model, inputs, passes=[FoldBatchNorm(**options)], verify=True)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert_equivalent(compiled, model, inputs, rtol=tol, atol=tol)
    return compiled, compiled.report().records[0]


def _ops(compiled: gp.CompiledModel) -> list[object]:
    return [n.target for n in compiled.program.graph.nodes if n.op == "call_function"]


def _reasons(record: PassRecord) -> str:
    return " | ".join(why for _, why in record.skipped)


class Tokens(nn.Module):
    """Linear on [B, N, C], then BatchNorm1d over channels reached by a view (LeViT)."""

    def __init__(self, mode: str) -> None:
        super().__init__()
        self.mode, self.linear = mode, nn.Linear(6, 8, bias=False)
        self.bn = nn.BatchNorm1d(5 if mode == "tokens_axis" else 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.linear(x)
        if self.mode == "flatten":
            return self.bn(y.flatten(0, 1)).reshape_as(y)
        if self.mode == "transpose":
            return self.bn(y.transpose(1, 2)).transpose(1, 2)
        return self.bn(y)  # "tokens_axis": BN over N, not over the linear's channels


class Arith(nn.Module):
    """An op with the per-channel constant ``c`` (a parameter) after (or before) a layer."""

    def __init__(self, op: Callable[..., torch.Tensor], layer: nn.Module, before: bool = False,
                 channels: int = 8, view: tuple[int, ...] = (8,)) -> None:
        super().__init__()
        self.op, self.layer, self.before = op, layer, before
        self.c = nn.Parameter((torch.rand(channels) + 0.5).reshape(view))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.before:
            return self.layer(self.op(self, x))
        return self.op(self, self.layer(x))


class Seq(nn.Sequential):
    """nn.Sequential whose input is not called ``input`` (Program.copy renames that one)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x)


AFTER = {  # layer + BN, input shape
    "conv1d": (lambda b: Seq(nn.Conv1d(3, 4, 3, bias=b), nn.BatchNorm1d(4)), (2, 3, 9)),
    "conv2d": (lambda b: Seq(nn.Conv2d(3, 4, 3, padding=1, bias=b), nn.BatchNorm2d(4)),
               (2, 3, 6, 6)),
    "conv3d": (lambda b: Seq(nn.Conv3d(3, 4, 2, bias=b), nn.BatchNorm3d(4)), (2, 3, 4, 4, 4)),
    "conv2d_grouped": (lambda b: Seq(nn.Conv2d(4, 6, 3, groups=2, bias=b), nn.BatchNorm2d(6)),
                       (2, 4, 6, 6)),
    "conv2d_depthwise": (lambda b: Seq(nn.Conv2d(4, 4, 3, groups=4, bias=b),
                                        nn.BatchNorm2d(4)), (2, 4, 6, 6)),
    "conv_transpose1d": (lambda b: Seq(nn.ConvTranspose1d(3, 4, 3, stride=2, bias=b),
                                        nn.BatchNorm1d(4)), (2, 3, 5)),
    "conv_transpose2d_grouped": (lambda b: Seq(nn.ConvTranspose2d(4, 6, 3, groups=2, bias=b),
                                                nn.BatchNorm2d(6)), (2, 4, 5, 5)),
    "conv_transpose3d": (lambda b: Seq(nn.ConvTranspose3d(3, 4, 2, bias=b), nn.BatchNorm3d(4)),
                         (2, 3, 3, 3, 3)),
    "linear": (lambda b: Seq(nn.Linear(6, 8, bias=b), nn.BatchNorm1d(8)), (3, 6)),
    "linear_affine_false": (lambda b: Seq(nn.Linear(6, 8, bias=b),
                                           nn.BatchNorm1d(8, affine=False)), (3, 6)),
}


@pytest.mark.parametrize(("bias", "dtype"), [(True, torch.float32), (False, torch.float32),
                                           (False, torch.float64)],
                         ids=["bias-fp32", "no_bias-fp32", "no_bias-fp64"])
@pytest.mark.parametrize("case", list(AFTER))
def test_batchnorm_after_layer_folds(case: str, bias: bool, dtype: torch.dtype) -> None:
    build, shape = AFTER[case]
    compiled, record = _fold(build(bias), torch.randn(shape), dtype=dtype)
    assert not set(_BN) & set(_ops(compiled))
    weights = compiled.program.weights()
    assert sorted(weights) == ["0.bias", "0.weight"]  # BN's buffers gone; a bias was added
    assert weights["0.weight"].dtype == dtype and isinstance(weights["0.bias"], nn.Parameter)
    assert record.stats == {"folded": 1, "folded_batchnorm": 1, "folded_input_side": 0,
                            "not_folded": 0}
    assert str(record.contract).startswith(
        "exact (rtol=1e-12" if dtype == torch.float64 else "exact (rtol=1e-05")


@pytest.mark.parametrize("mode", ["flatten", "transpose"])
def test_batchnorm_after_linear_on_tokens_folds(mode: str) -> None:
    model = _calibrated(Tokens(mode))  # traced with a symbolic batch: B * N is symbolic
    compiled = gp.compile(model, (torch.randn(2, 5, 6),), passes="fold_bn", verify=True,
                          dynamic_batch=True)
    assert compiled.report().records[0].stats["folded"] == 1
    assert not set(_BN) & set(_ops(compiled))
    assert_equivalent(compiled, model, (torch.randn(3, 5, 6),))


@pytest.mark.parametrize(("model", "shape", "reason"), [
    (Tokens("tokens_axis"), (2, 5, 6), "channel axis not provable: it acts on axis 1"),
    (Seq(nn.Conv2d(3, 2, 1), nn.Flatten(), nn.BatchNorm1d(2 * 4 * 4)), (2, 3, 4, 4),
     "merges or splits the channel axis of %conv2d"),
], ids=["bn_over_tokens", "flatten_merges_channels"])
def test_unprovable_channel_axis_is_refused(model: nn.Module, shape: tuple[int, ...],
                                            reason: str) -> None:
    compiled, record = _fold(model, torch.randn(shape))
    assert not record.changed and set(_BN) & set(_ops(compiled))
    assert record.stats["not_folded"] == 1 and reason in _reasons(record)


BEFORE = {  # BN + layer: folds into the layer's input side
    "conv2d": Seq(nn.BatchNorm2d(3), nn.Conv2d(3, 4, 3, stride=2, dilation=2, bias=False)),
    "conv2d_grouped": Seq(nn.BatchNorm2d(4), nn.Conv2d(4, 6, 3, groups=2)),
    "linear": Seq(nn.BatchNorm1d(6), nn.Linear(6, 8)),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("case", list(BEFORE))
def test_batchnorm_before_layer_folds_into_its_input(case: str, dtype: torch.dtype) -> None:
    shape = (3, 6) if case == "linear" else (2, 3 if case == "conv2d" else 4, 7, 7)
    compiled, record = _fold(BEFORE[case], torch.randn(shape), dtype=dtype)
    assert record.stats["folded_input_side"] == 1
    assert sorted(compiled.program.weights()) == ["1.bias", "1.weight"]


@pytest.mark.parametrize(("model", "reason"), [
    (Seq(nn.BatchNorm2d(3), nn.Conv2d(3, 4, 3, padding=1)), "%conv2d zero-pads its input"),
    (Seq(nn.BatchNorm2d(3), nn.ConvTranspose2d(3, 4, 3)), "not a bias of its output"),
], ids=["padded_conv", "transposed_conv"])
def test_shift_before_padded_or_transposed_conv_is_refused(model: nn.Module, reason: str) -> None:
    compiled, record = _fold(model, torch.randn(2, 3, 5, 5))
    assert not record.changed and reason in _reasons(record)
    assert "0.running_mean" in compiled.program.weights()


def test_scale_before_padded_conv_folds() -> None:
    model = Arith(lambda m, x: x * m.c, nn.Conv2d(3, 4, 3, padding=1), before=True,
                  channels=3, view=(3, 1, 1))
    compiled, record = _fold(model, torch.randn(2, 3, 5, 5))
    assert record.stats["folded_input_side"] == 1
    assert sorted(compiled.program.weights()) == ["layer.bias", "layer.weight"]


ARITH = {  # op(module, y) on the layer's output
    "mul": lambda m, y: y * m.c, "rmul": lambda m, y: m.c * y, "div": lambda m, y: y / m.c,
    "add": lambda m, y: y + m.c, "add_alpha": lambda m, y: torch.add(y, m.c, alpha=2.0),
    "sub": lambda m, y: y - m.c, "rsub": lambda m, y: m.c - y,
    "scalars": lambda m, y: (y * 0.5 + 1.0) * m.c,
}


@pytest.mark.parametrize("case", list(ARITH))
def test_constant_per_channel_op_after_linear_folds(case: str) -> None:
    compiled, record = _fold(Arith(ARITH[case], nn.Linear(6, 8)), torch.randn(2, 5, 6))
    assert not set(_ARITH) & set(_ops(compiled))
    assert sorted(compiled.program.weights()) == ["layer.bias", "layer.weight"]
    assert record.stats["folded"] == (3 if case == "scalars" else 1)


def test_constant_bias_add_after_conv_folds_and_creates_bias() -> None:
    model = Arith(lambda m, y: y + m.c, nn.Conv2d(3, 8, 3, bias=False), view=(8, 1, 1))
    compiled, _ = _fold(model, torch.randn(2, 3, 6, 6))
    assert sorted(compiled.program.weights()) == ["layer.bias", "layer.weight"]


class Chain(nn.Module):
    """conv -> BN -> * gamma + beta, and (x * gamma + beta) -> linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn, self.linear = nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Linear(8, 4)
        self.gamma, self.beta = nn.Parameter(torch.rand(8) + 0.5), nn.Parameter(torch.randn(8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(self.conv(x)) * self.gamma.view(8, 1, 1) + self.beta.view(8, 1, 1)
        return self.linear(torch.relu(y).mean((2, 3)) * self.gamma + self.beta)


def test_chains_fold_completely() -> None:
    compiled, record = _fold(Chain(), torch.randn(2, 3, 6, 6))
    assert record.stats["folded"] == 5 and record.stats["folded_input_side"] == 2
    assert not set(_BN + _ARITH) & set(_ops(compiled))
    assert sorted(compiled.program.weights()) == [
        "conv.bias", "conv.weight", "linear.bias", "linear.weight"]


def test_other_users_of_the_layer_output_block_folding() -> None:
    class TwoUsers(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            y = self.conv(x)
            return self.bn(y), y.relu()

    compiled, record = _fold(TwoUsers(), torch.randn(2, 3, 5, 5))
    assert not record.changed and "bn.running_mean" in compiled.program.weights()
    assert "the output of %conv2d is also used by %relu" in _reasons(record)


@pytest.mark.parametrize(("make", "reason"), [
    (lambda: Seq(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).train(), "training mode"),
    (lambda: Seq(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False)).eval(),
     "no running statistics"),
    (lambda: Seq(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.BatchNorm2d(4), nn.ReLU()).eval(),
     "not after a conv/linear (its input comes from %relu)"),
], ids=["training", "no_running_stats", "between_relus"])
def test_batchnorm_that_cannot_fold_is_reported(make: Callable[[], nn.Module],
                                                reason: str) -> None:
    x = torch.randn(2, 3, 5, 5)
    compiled = gp.compile(make(), (x,), passes="fold_bn", verify=True)
    record = compiled.report().records[0]
    assert not record.changed and record.stats["not_folded"] == 1
    assert reason in _reasons(record) and reason in str(compiled.report())


class Shared(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn1, self.bn2 = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4), nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn2(self.conv(torch.relu(self.bn1(self.conv(x)))))


def test_shared_weights_are_refused_unless_cloned() -> None:
    x = torch.randn(2, 4, 5, 5)
    _, record = _fold(Shared(), x, input_side=False)
    assert not record.changed and record.stats["not_folded"] == 2
    assert "'conv.weight' of %conv2d is shared with %conv2d_1" in _reasons(record)
    assert "clone_shared=True" in _reasons(record)
    compiled, record = _fold(Shared(), x, clone_shared=True)
    assert record.stats["folded"] == 2 and not set(_BN) & set(_ops(compiled))
    assert len(compiled.program.weights()) == 4  # two private weights and biases


def test_weight_computed_in_the_graph_is_refused() -> None:
    class Computed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight, self.bn = nn.Parameter(torch.randn(4, 3, 3, 3)), nn.BatchNorm2d(4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.bn(F.conv2d(x, self.weight * 2))

    _, record = _fold(Computed(), torch.randn(2, 3, 5, 5))
    assert "the weight of %conv2d is computed in the graph" in _reasons(record)


def test_unrelated_arithmetic_is_left_alone_quietly() -> None:
    model = Arith(lambda m, y: torch.relu(y) * 2.0 + m.c, nn.Linear(6, 8))
    compiled, record = _fold(model, torch.randn(3, 6))
    assert not record.changed and record.skipped == [] and "c" in compiled.program.weights()


def test_options_turn_off_arithmetic_and_input_side() -> None:
    _, record = _fold(Arith(ARITH["mul"], nn.Linear(6, 8)), torch.randn(3, 6), arithmetic=False)
    assert not record.changed
    _, record = _fold(BEFORE["linear"], torch.randn(3, 6), input_side=False)
    assert not record.changed and "not after a conv/linear" in _reasons(record)
    with pytest.raises(ValueError, match="atol must be >= 0"):
        FoldBatchNorm(atol=-1.0)


def test_decomposed_graph_folds() -> None:
    model, x = _calibrated(Seq(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))), torch.randn(2, 3, 5, 5)
    program = Program(torch.export.export(model, (x,)).run_decompositions())
    targets = [n.target for n in program.graph.nodes]
    assert aten._native_batch_norm_legit_no_training.default in targets
    context = PassContext(example_inputs=(x,))
    (record,) = PassManager([FoldBatchNorm()], verify=True, context=context, hooks=[]).run(
        program).records
    assert record.stats["folded"] == 1 and sorted(program.weights()) == ["0.bias", "0.weight"]
    assert_equivalent(program, model, (x,))


def test_folded_model_saves_loads_and_reexports(tmp_path: Path) -> None:
    model, x = Seq(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4)), torch.randn(2, 3, 5, 5)
    compiled, _ = _fold(model, x)  # the BN output is the graph output: its spec is renamed
    loaded = gp.load(compiled.save(tmp_path / "folded"))
    assert not set(_BN) & {n.target for n in loaded.program.graph.nodes}
    assert sorted(loaded.program.state_dict) == ["0.bias", "0.weight"]
    assert_equivalent(loaded, model, (x,))
    reexported = torch.export.export(loaded.program.module(), (x,))
    assert_equivalent(reexported.module(), model, (x,))


def test_folds_under_torch_compile_with_freeze(monkeypatch: pytest.MonkeyPatch) -> None:
    from graphpress.integrations import torch_compile as dynamo

    made: list[dynamo.DynamoCompiled] = []

    class Recording(dynamo.DynamoCompiled):
        def __init__(self, *args: object, **kwargs: object) -> None:
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(dynamo, "DynamoCompiled", Recording)
    model = _calibrated(Seq(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()))
    torch._dynamo.reset()
    try:
        compiled = torch.compile(model, backend="graphpress", options={
            "passes": ["fold_bn"], "freeze": True, "verify": True})
        assert_equivalent(compiled, model, (torch.randn(2, 3, 6, 6),))
    finally:
        torch._dynamo.reset()
    (graph,) = made
    assert graph.graphpress_report.records[0].stats["folded"] == 1
