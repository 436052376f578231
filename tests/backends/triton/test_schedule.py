"""The Triton scheduler on tiny graphs: what fuses, what is stored, what never fuses."""

from __future__ import annotations

import torch
from torch import nn

from graphpress.backends.triton.schedule import Group, schedule
from graphpress.frontends import trace

aten = torch.ops.aten


def _plan(fn, *inputs):
    class Wrapped(nn.Module):
        def forward(self, *args):
            return fn(*args)

    program = trace(Wrapped().eval(), inputs)
    return program, schedule(program.graph)


def _targets(group: Group) -> list:
    return [n.target for n in group.nodes]


def test_pointwise_chain_is_one_kernel_with_one_output():
    _, plan = _plan(lambda x, y: torch.relu(x * 2 + y).sigmoid(), torch.randn(3, 5),
                    torch.randn(5))
    (group,) = plan.groups
    assert group.kind == "pointwise"
    assert _targets(group) == [aten.mul.Tensor, aten.add.Tensor, aten.relu.default,
                               aten.sigmoid.default]
    assert [n.target for n in group.outputs()] == [aten.sigmoid.default]


def test_value_used_outside_the_group_is_stored():
    def twice(x):
        y = x * 2
        return y, y.exp() + 1

    _, plan = _plan(twice, torch.randn(4))
    (group,) = plan.groups
    assert {n.target for n in group.outputs()} == {aten.mul.Tensor, aten.add.Tensor}


def test_decomposed_softmax_and_its_prologue_are_one_row_kernel():
    def softmax(x, y):
        z = x + y
        e = (z - z.amax(-1, keepdim=True)).exp()
        return e / e.sum(-1, keepdim=True)

    _, plan = _plan(softmax, torch.randn(2, 3, 7), torch.randn(2, 3, 7))
    (group,) = plan.groups
    assert group.kind == "row" and group.shape == (2, 3, 7)
    assert len(group.outputs()) == 1


def test_reduction_without_keepdim_is_stored_not_read_inside():
    # s has shape [4]: broadcast against [4, 4] it aligns with the columns, not the rows
    _, plan = _plan(lambda x: x * x.sum(-1), torch.randn(4, 4))
    row, pointwise = plan.groups
    assert row.kind == "row" and _targets(row) == [aten.sum.dim_IntList]
    assert pointwise.kind == "pointwise" and _targets(pointwise) == [aten.mul.Tensor]


def test_linear_epilogue_fuses_bias_activation_and_residual():
    linear = nn.Linear(8, 8)
    _, plan = _plan(lambda x: torch.nn.functional.gelu(linear(x)) + x, torch.randn(2, 3, 8))
    (group,) = plan.groups
    assert group.kind == "matmul"
    assert _targets(group) == [aten.linear.default, aten.gelu.default, aten.add.Tensor]


def test_a_group_never_feeds_itself_through_a_node_outside():
    conv = nn.Conv2d(2, 2, 3, padding=1)

    def diamond(x):
        a = x * 2                 # group 0
        b = conv(a)               # ATen fallback reading group 0
        return a + b              # same shape as a, but joining group 0 would be a cycle

    _, plan = _plan(diamond, torch.randn(1, 2, 4, 4))
    first, second = plan.groups
    assert _targets(first) == [aten.mul.Tensor] and _targets(second) == [aten.add.Tensor]
    order = [u if isinstance(u, Group) else u.target for u in plan.units]
    assert order == [first, aten.conv2d.default, second]


def test_every_node_is_in_at_most_one_group_and_units_respect_dependencies():
    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True).eval()
    program, plan = _plan(lambda x: layer(x), torch.randn(2, 5, 16))
    members = [n for g in plan.groups for n in g.nodes]
    assert len(members) == len(set(members))
    done: set = {n for n in program.graph.nodes if n.op == "placeholder"}
    for unit in plan.units:
        nodes = unit.nodes if isinstance(unit, Group) else [unit]
        inside = set(nodes)
        for node in nodes:
            assert all(a in done or a in inside for a in node.all_input_nodes), node
        done |= inside


def test_identity_never_starts_a_kernel_but_joins_one():
    _, plan = _plan(lambda x: (x.t().contiguous(), (x + 1).clone()), torch.randn(3, 4))
    (group,) = plan.groups
    assert _targets(group) == [aten.add.Tensor, aten.clone.default]
    assert any(not isinstance(u, Group) and u.target == aten.contiguous.default
               for u in plan.units)
