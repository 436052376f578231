"""Purity and foldability: separate per-op properties keyed by the qualified op name."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import graphpress as gp
from graphpress.ir.purity import is_foldable, is_pure, qualified_name, register_op_properties


class FakeQuantWeight(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(4, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = torch.fake_quantize_per_tensor_affine(self.weight, 0.05, 0, -128, 127)
        return x @ w.t()


class WeightStandardizedConv(nn.Module):
    """The weight standardized by a batch_norm in training mode without running statistics."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(4, 3, 3, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = torch.nn.functional.batch_norm(self.weight.reshape(1, 4, -1), None, None,
                                           training=True, momentum=0.0, eps=1e-5)
        return torch.nn.functional.conv2d(x, w.reshape_as(self.weight))


def _targets(compiled: gp.CompiledModel) -> list[str]:
    return [str(n.target) for n in compiled.program.graph.nodes if n.op == "call_function"]


def test_fake_quant_of_a_weight_is_pure_but_never_folded() -> None:
    x = torch.randn(2, 4)
    compiled = gp.compile(FakeQuantWeight().eval(), (x,),
                          passes="fixpoint(fold_constants, cse, dce)", verify=True)
    assert "aten.fake_quantize_per_tensor_affine.default" in _targets(compiled)
    (node,) = [n for n in compiled.program.graph.nodes if "fake_quantize" in str(n.target)]
    assert is_pure(node) and not is_foldable(node)
    skips = [why for r in compiled.report().records for _, why in r.skipped]
    assert any("pure but not foldable" in why for why in skips)


def test_weight_standardization_folds_away() -> None:
    x = torch.randn(2, 3, 8, 8)
    model = WeightStandardizedConv().eval()
    compiled = gp.compile(model, (x,), passes="fixpoint(fold_constants, dce)", verify=True)
    assert _targets(compiled) == ["aten.conv2d.default"]
    assert compiled.report().records[0].max_error == 0.0
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=0, atol=0)


def test_an_unregistered_custom_op_is_pure_by_schema_but_not_foldable() -> None:
    @torch.library.custom_op("gptest_purity::double", mutates_args=())
    def double(x: torch.Tensor) -> torch.Tensor:
        return x * 2

    @double.register_fake
    def _(x: torch.Tensor) -> torch.Tensor:
        return torch.empty_like(x)

    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    node = graph.call_function(torch.ops.gptest_purity.double.default, (x,))
    assert qualified_name(node.target) == "gptest_purity::double"
    assert is_pure(node) and not is_foldable(node)
    register_op_properties("gptest_purity::double", pure=True, foldable=True)
    assert is_foldable(node)


def test_registration_is_by_qualified_name_and_checked() -> None:
    with pytest.raises(ValueError, match="namespace-qualified"):
        register_op_properties("linear", pure=True, foldable=True)
    with pytest.raises(ValueError, match="cannot be foldable"):
        register_op_properties("gptest_purity::bad", pure=False, foldable=True)
