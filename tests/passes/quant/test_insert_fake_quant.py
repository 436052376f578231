"""insert_fake_quant on tiny programs: structure, numbers against the independent reference,
the report, and the errors a user can run into."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import graphpress as gp
from graphpress.errors import InputError, PassError, PipelineError

FQ = torch.ops.graphpress.fake_quantize_affine.default
CHOOSE = torch.ops.graphpress.choose_qparams_affine.default


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU())
        self.classifier = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.body(x))


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.bn(self.conv(x))).mean((2, 3)))


class SharedInput(nn.Module):
    """q, k and v read the same activation: one fake-quant serves the three."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v = nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.q(x) * self.k(x) + self.v(x)


def _mlp() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    return MLP().eval(), torch.randn(4, 64)


def _count(compiled: gp.CompiledModel, target: object) -> int:
    return sum(1 for n in compiled.program.graph.nodes if n.target == target)


def _batches(shape: tuple[int, ...], n: int = 4) -> list[tuple[torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    return [(torch.randn(shape, generator=generator),) for _ in range(n)]


def test_int4_weight_only_quantizes_every_linear_weight() -> None:
    model, x = _mlp()
    compiled = gp.compile(model, (x,), verify=True,
                          passes="insert_fake_quant(scheme='int4_weight_only', group_size=32)")
    assert _count(compiled, FQ) == 3
    (record,) = compiled.report().records
    assert record.stats["weights"] == 3 and record.stats["activations"] == 0
    assert record.max_error is not None and record.max_error <= 1e-5
    assert 0.9 < record.metrics["cosine vs input"] <= 1.0
    assert any("int4 per_group g32" in line and "SQNR" in line
               for line in record.details["summary"])
    with torch.no_grad():
        assert not torch.equal(compiled(x), model(x)), "int4 changes the outputs"
    assert "end-to-end vs model" in compiled.report().extra


def test_int8_static_calibrates_and_matches_the_reference() -> None:
    torch.manual_seed(0)
    model, x = ConvNet().eval(), torch.randn(2, 3, 8, 8)
    compiled = gp.compile(model, (x,), passes="fold_bn, insert_fake_quant(scheme='int8_static')",
                          calibration_data=_batches((2, 3, 8, 8)), verify=True)
    record = compiled.report().records[-1]
    assert record.stats["weights"] == 2 and record.stats["activations"] == 2
    assert record.stats["calibration_batches"] == 4
    assert _count(compiled, FQ) == 4 and _count(compiled, CHOOSE) == 0
    assert record.metrics["sqnr_db vs input"] > 20


def test_dynamic_activations_choose_qparams_in_the_graph() -> None:
    model, x = _mlp()
    compiled = gp.compile(model, (x,), passes="insert_fake_quant(scheme='int8_dynamic')",
                          verify=True)
    assert _count(compiled, CHOOSE) == 3 and _count(compiled, FQ) == 6
    other = torch.randn(4, 64) * 10  # qparams follow each call's values
    with torch.no_grad():
        cosine = torch.nn.functional.cosine_similarity(compiled(other).flatten(),
                                                       model(other).flatten(), dim=0)
    assert float(cosine) > 0.99


def test_one_fake_quant_per_shared_activation() -> None:
    torch.manual_seed(0)
    model, x = SharedInput().eval(), torch.randn(3, 16)
    compiled = gp.compile(model, (x,), passes="insert_fake_quant(scheme='int8_static')",
                          calibration_data=_batches((3, 16)), verify=True)
    assert _count(compiled, FQ) == 4  # three weights, one shared activation


def test_skip_keeps_layers_in_float_and_says_so() -> None:
    model, x = _mlp()
    compiled = gp.compile(model, (x,), verify=True, passes=[gp.passes.InsertFakeQuant(
        gp.quant.int8_weight_only(skip=["classifier"]))])
    (record,) = compiled.report().records
    assert record.stats["weights"] == 2
    assert any("kept in float by an override" in why for _, why in record.skipped)


def test_the_users_model_is_untouched() -> None:
    model, x = _mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    gp.compile(model, (x,), passes="insert_fake_quant(scheme='int4_weight_only', group_size=32)")
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[name])


def test_group_size_that_does_not_divide_k_names_the_layer() -> None:
    model, x = _mlp()
    with pytest.raises(PassError, match=r"group_size=48 does not divide K=64 of linear"):
        gp.compile(model, (x,), passes="insert_fake_quant(scheme='int4_weight_only', "
                                       "group_size=48)")


def test_static_activations_without_calibration_data_are_refused() -> None:
    model, x = _mlp()
    with pytest.raises(InputError, match="needs calibration data.*int8_dynamic"):
        gp.compile(model, (x,), passes="insert_fake_quant(scheme='int8_static')")


def test_quantization_before_folding_is_an_ordering_error() -> None:
    model, x = _mlp()
    with pytest.raises(PipelineError, match="move 'fold_bn' before 'insert_fake_quant'"):
        gp.compile(model, (x,), passes="insert_fake_quant(scheme='int8_dynamic'), fold_bn")


def test_unknown_scheme_and_misplaced_arguments() -> None:
    with pytest.raises(PipelineError, match="unknown quantization scheme 'int2'"):
        gp.compile(*_mlp_args(), passes="insert_fake_quant(scheme='int2')")
    with pytest.raises(PipelineError, match="group_size= applies to"):
        gp.compile(*_mlp_args(), passes="insert_fake_quant(scheme='int8_dynamic', group_size=8)")


def _mlp_args() -> tuple[nn.Module, tuple[torch.Tensor]]:
    model, x = _mlp()
    return model, (x,)


class TransposedWeight(nn.Module):
    """One weight read through a transpose by addmm and by matmul."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(16, 32))
        self.bias = nn.Parameter(torch.randn(16))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return torch.addmm(self.bias, h, self.weight.t()) + h @ self.weight.t()


@pytest.mark.parametrize("scheme", ["int8_weight_only", "int4_weight_only"])
def test_a_weight_read_through_a_transpose_is_quantized_before_it(scheme: str) -> None:
    extra = ", group_size=16" if scheme.startswith("int4") else ""
    compiled = gp.compile(TransposedWeight().eval(), (torch.randn(4, 32),),
                          passes=f"insert_fake_quant(scheme='{scheme}'{extra})", verify=True)
    transposes = [n for n in compiled.program.graph.nodes
                  if n.target in (torch.ops.aten.t.default, torch.ops.aten.permute.default,
                                  torch.ops.aten.transpose.int)]
    assert transposes and all(t.args[0].target is FQ for t in transposes)
    (record,) = compiled.report().records
    assert record.max_error is not None and record.max_error <= 1e-5
