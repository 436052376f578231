"""Export and fx frontends: normalized IR, model outputs, errors that suggest a fix."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from graphpress.errors import InputError, TraceError
from graphpress.frontends import trace
from graphpress.ir.printer import format_program
from graphpress.testing import assert_equivalent
from tests.models import ConvBNLinear, conv_inputs


def test_export_and_fx_give_the_same_ir() -> None:
    model = ConvBNLinear().eval()
    exported = trace(model, conv_inputs(), frontend="export")
    traced = trace(model, conv_inputs(), frontend="fx")
    assert traced.frontend == "fx"
    assert set(exported.weights()) == set(traced.weights())
    targets = [n.target for n in exported.graph.nodes if n.op == "call_function"]
    assert targets == [n.target for n in traced.graph.nodes if n.op == "call_function"]
    assert_equivalent(traced, model, conv_inputs(), rtol=0, atol=0)
    assert "aten.conv2d" in format_program(traced)


def test_fx_concrete_args_fix_python_branches() -> None:
    class Flag(nn.Module):
        def forward(self, x: torch.Tensor, double: bool = False) -> torch.Tensor:
            return x * 2 if double else x + 1

    x = torch.randn(3)
    program = trace(Flag(), (x,), frontend="fx", concrete_args={"double": True})
    assert torch.equal(program(x), x * 2)


def test_fx_accepts_existing_graph_module() -> None:
    gm = torch.fx.symbolic_trace(ConvBNLinear().eval())
    program = trace(gm, conv_inputs(), frontend="fx")
    assert_equivalent(program, gm, conv_inputs(), rtol=0, atol=0)


def test_fx_failure_suggests_concrete_args() -> None:
    class DataDependent(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * 2 if x.sum() > 0 else x

    with pytest.raises(TraceError, match="concrete_args"):
        trace(DataDependent(), (torch.randn(3),), frontend="fx")


def test_non_module_is_rejected() -> None:
    with pytest.raises(InputError, match="nn.Module"):
        trace(lambda x: x, (torch.randn(3),))


def test_dynamic_batch_specialized_by_model() -> None:
    class Specializes(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.reshape(4, -1)

    with pytest.raises(TraceError, match="dynamic"):
        trace(Specializes(), (torch.randn(4, 3),), dynamic_batch=True)
