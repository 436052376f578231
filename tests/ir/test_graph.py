"""ir/graph: one argument accessor, one input listing, views followed, unused nodes erased."""

from __future__ import annotations

import operator

import pytest
import torch
from torch import nn

from graphpress.frontends import trace
from graphpress.ir.graph import (
    erase_unused,
    follow_axis,
    get_arg,
    inputs_of,
    is_view,
    reads_only_metadata,
    set_arg,
    view_source,
)
from graphpress.ir.program import Program

aten = torch.ops.aten


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 4)
        self.register_buffer("scale", torch.full((4,), 2.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc(x)                       # [2, 3, 4]
        z = y.permute(0, 2, 1).reshape(2, 12)
        w = torch.add(z, z, alpha=3)
        return w.reshape_as(w) * self.scale.sum()


@pytest.fixture
def program() -> Program:
    return trace(_Net().eval(), (torch.randn(2, 3, 6),))


def _node(program: Program, target: object) -> torch.fx.Node:
    return next(n for n in program.graph.nodes if n.target == target)


def test_get_arg_positional_keyword_default(program: Program) -> None:
    add = _node(program, aten.add.Tensor)
    assert get_arg(add, "alpha") == 3 == get_arg(add, 2)
    assert get_arg(add, "self") is add.args[0] is get_arg(add, 0)
    linear = _node(program, aten.linear.default)
    assert get_arg(linear, "bias").name == "p_fc_bias"
    permute = _node(program, aten.permute.default)
    assert get_arg(permute, "dims") == [0, 2, 1]
    with pytest.raises(KeyError, match="no argument 'beta'.*alpha"):
        get_arg(add, "beta")
    with pytest.raises(IndexError, match="no position 7"):
        get_arg(add, 7)


def test_get_arg_reads_schema_defaults() -> None:
    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    add = graph.call_function(aten.add.Tensor, (x, x))
    assert get_arg(add, "alpha") == 1  # not passed: the schema default


def test_get_arg_rejects_targets_without_schema(program: Program) -> None:
    graph = torch.fx.Graph()
    item = graph.call_function(operator.getitem, (graph.placeholder("t"), 0))
    with pytest.raises(TypeError, match="no schema"):
        get_arg(item, 0)


def test_set_arg_where_it_was_passed() -> None:
    graph = torch.fx.Graph()
    x, y = graph.placeholder("x"), graph.placeholder("y")
    add = graph.call_function(aten.add.Tensor, (x, x))
    set_arg(add, "other", y)              # positional
    assert add.args == (x, y)
    set_arg(add, "alpha", 2)              # the next positional slot: appended
    assert add.args == (x, y, 2)
    conv = graph.call_function(aten.conv2d.default, (x, y))
    set_arg(conv, "groups", 4)            # not the next slot: a keyword
    assert conv.kwargs == {"groups": 4} and get_arg(conv, "groups") == 4
    set_arg(conv, "groups", 2)
    assert conv.kwargs == {"groups": 2}


def test_inputs_of_lists_each_node_once_in_order(program: Program) -> None:
    add = _node(program, aten.add.Tensor)
    z = add.args[0]
    assert inputs_of(add) == [z]  # add(z, z): one input node
    linear = _node(program, aten.linear.default)
    assert [n.name for n in inputs_of(linear)] == ["x", "p_fc_weight", "p_fc_bias"]
    graph = torch.fx.Graph()
    a, b = graph.placeholder("a"), graph.placeholder("b")
    cat = graph.call_function(aten.cat.default, ([b, a, b],), {"dim": 0})
    assert inputs_of(cat) == [b, a]  # nested lists, first occurrence order


def test_views_are_followed_to_their_source(program: Program) -> None:
    reshape = _node(program, aten.reshape.default)
    permute, linear = reshape.args[0], _node(program, aten.linear.default)
    assert is_view(reshape) and is_view(permute) and not is_view(linear)
    assert view_source(reshape) == [linear, permute, reshape]
    assert view_source(linear) == [linear]
    assert follow_axis(permute, 2) == 1   # [2, 3, 4] -> [2, 4, 3]: channel axis moves to 1
    assert follow_axis(reshape, 0) == 0   # batch survives [2, 4, 3] -> [2, 12]
    assert follow_axis(reshape, 1) is None  # 4 and 3 merged


def test_identity_is_a_view_only_if_it_keeps_dtype_and_shape() -> None:
    class Casts(nn.Module):
        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return x.to(torch.float64), x.clone()

    program = trace(Casts(), (torch.randn(3),))
    cast = next(n for n in program.graph.nodes if n.target in (aten.to.dtype,
                                                                aten._to_copy.default))
    clone = _node(program, aten.clone.default)
    assert not is_view(cast) and is_view(clone)


def test_reads_only_metadata(program: Program) -> None:
    reshape_as = _node(program, aten.reshape_as.default)
    add = reshape_as.args[0]
    assert reshape_as.args == (add, add)
    assert not reads_only_metadata(reshape_as, add)  # reads the values too
    graph = torch.fx.Graph()
    a, b = graph.placeholder("a"), graph.placeholder("b")
    template = graph.call_function(aten.reshape_as.default, (a, b))
    size = graph.call_function(aten.sym_size.int, (a, 0))
    assert reads_only_metadata(template, b) and not reads_only_metadata(template, a)
    assert reads_only_metadata(size, a)


def test_erase_unused_removes_dead_chains_and_their_weights(program: Program) -> None:
    mul = _node(program, aten.mul.Tensor)
    total = mul.args[1]                   # scale.sum()
    assert total.target == aten.sum.default
    scale = total.args[0]
    mul.replace_input_with(total, 2.0)
    erased = erase_unused(program, [total])
    assert erased == {total, scale}
    assert "scale" not in program.weights()
    program.validate()


def test_erase_unused_keeps_used_and_impure_nodes(program: Program) -> None:
    linear = _node(program, aten.linear.default)
    assert erase_unused(program, [linear]) == set()  # still used
    graph = program.graph
    with graph.inserting_after(linear):
        effect = graph.call_function(aten._assert_scalar.default, (True, "never"))
    assert erase_unused(program, [effect]) == set()
    assert effect in graph.nodes


def test_get_arg_missing_is_for_overloads_without_the_argument() -> None:
    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    whole = graph.call_function(torch.ops.aten.max.default, (x,))
    along = graph.call_function(torch.ops.aten.max.dim, (x, 1))
    assert get_arg(whole, "dim", missing=None) is None
    assert get_arg(along, "dim", missing=None) == 1
    assert get_arg(along, "keepdim", missing=None) is False  # the schema default
    with pytest.raises(KeyError, match="no argument 'dim'"):
        get_arg(whole, "dim")
