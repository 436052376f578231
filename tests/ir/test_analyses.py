"""Shape propagation, symbolic dimensions and the cost model."""

from __future__ import annotations

import pytest
import sympy
import torch
from torch import nn

from graphpress.errors import MetadataError
from graphpress.frontends import trace
from graphpress.ir.costs import count_costs
from graphpress.ir.program import Program
from graphpress.ir.shapes import needs_full_propagation, propagate_shapes, symbolic_shapes


def test_propagation_fills_missing_and_catches_stale(conv_program: Program) -> None:
    relu = next(n for n in conv_program.graph.nodes if n.target == torch.ops.aten.relu.default)
    del relu.meta["val"]
    assert propagate_shapes(conv_program) == [relu.name]
    assert tuple(relu.meta["val"].shape) == (2, 4, 6, 6)
    relu.meta["val"] = relu.meta["val"].new_empty((1, 1))
    with pytest.raises(MetadataError, match="stale shape metadata.*relu"):
        propagate_shapes(conv_program, who="pass 'x'")
    propagate_shapes(conv_program, check=False)
    assert tuple(relu.meta["val"].shape) == (2, 4, 6, 6)


def test_symbolic_batch_dimension() -> None:
    program = trace(nn.Linear(4, 3), (torch.randn(5, 4),), dynamic_batch=True)
    shapes = symbolic_shapes(program)
    batch = shapes[program.user_inputs()[0].name][0]
    assert isinstance(batch, sympy.Symbol)
    assert shapes["linear"] == (batch, 3)


def test_macs_and_parameters() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, groups=1)
            self.dw = nn.Conv2d(8, 8, 3, groups=8, bias=False)
            self.up = nn.ConvTranspose2d(8, 4, 2, stride=2)
            self.fc = nn.Linear(4, 5)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.up(self.dw(self.conv(x)))
            return self.fc(y.mean((2, 3)))

    net = Net()
    costs = count_costs(trace(net, (torch.randn(1, 3, 10, 10),)))
    conv = 8 * 8 * 8 * 3 * 9          # out numel * C_in * k*k
    dw = 8 * 6 * 6 * 1 * 9            # groups=8: one input channel per output
    up = (8 * 6 * 6) * 4 * 4          # transposed: in numel * C_out/groups * k*k
    fc = 5 * 4
    assert costs.macs == conv + dw + up + fc
    assert costs.parameters == sum(p.numel() for p in net.parameters())
    assert costs.parameter_bytes == 4 * costs.parameters


def test_sdpa_macs() -> None:
    class Attn(nn.Module):
        def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            return nn.functional.scaled_dot_product_attention(q, k, v)

    q, k, v = torch.randn(2, 4, 8, 16), torch.randn(2, 4, 6, 16), torch.randn(2, 4, 6, 16)
    assert count_costs(trace(Attn(), (q, k, v))).macs == 2 * 4 * 8 * 6 * (16 + 16)


def _rewrite_relu(program: Program, target: object) -> tuple[torch.fx.Node, dict]:
    previous = {n: n.meta.get("val") for n in program.graph.nodes}
    relu = next(n for n in program.graph.nodes if n.target == torch.ops.aten.relu.default)
    relu.target = target
    return relu, previous


def test_propagation_from_touched_nodes_reruns_only_them(conv_program: Program) -> None:
    relu, previous = _rewrite_relu(conv_program, torch.ops.aten.sigmoid.default)
    assert propagate_shapes(conv_program, touched=[relu], previous=previous) == []
    rerun = [n.name for n in conv_program.graph.nodes if n.meta.get("val") is not previous[n]]
    assert rerun == ["relu"]   # same shape as before: its users are not re-run


def test_propagation_from_touched_nodes_checks_them(conv_program: Program) -> None:
    relu, previous = _rewrite_relu(conv_program, torch.ops.aten.sigmoid.default)
    relu.meta["val"] = relu.meta["val"].new_empty((1, 1))
    with pytest.raises(MetadataError, match="stale shape metadata after pass 'x'.*relu"):
        propagate_shapes(conv_program, who="pass 'x'", touched=[relu], previous=previous)


def test_graph_with_a_mutating_op_gets_the_full_propagation(conv_program: Program) -> None:
    # an in-place op makes values depend on mutations that are not arguments: no shortcut
    relu, previous = _rewrite_relu(conv_program, torch.ops.aten.relu_.default)
    assert needs_full_propagation(conv_program)
    propagate_shapes(conv_program, touched=[relu], previous=previous)
    assert all(n.meta["val"] is not previous[n] for n in conv_program.graph.nodes
               if n.op == "call_function")
