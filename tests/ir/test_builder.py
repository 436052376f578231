"""GraphBuilder: new nodes carry meta['val'] (graph's fake mode), module stack and provenance."""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
from torch import nn

import graphpress as gp
from graphpress.errors import MetadataError
from graphpress.frontends import trace
from graphpress.ir.builder import GraphBuilder
from graphpress.ir.program import Program
from graphpress.pipeline.base import Contract, Pass, PassContext, PassResult

aten = torch.ops.aten


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.fc(x))


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block = _Block()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x) + 1


def _program(dynamic_batch: bool = False) -> Program:
    return trace(_Net().eval(), (torch.randn(2, 4),), dynamic_batch=dynamic_batch)


def _relu(program: Program) -> torch.fx.Node:
    return next(n for n in program.graph.nodes if n.target == aten.relu.default)


def test_call_sets_val_module_stack_and_provenance() -> None:
    program = _program()
    relu = _relu(program)
    with GraphBuilder(program, anchor=relu, pass_name="test_pass", after=True) as build:
        neg = build.call(aten.neg.default, relu)
    val = neg.meta["val"]
    assert isinstance(val, torch._subclasses.FakeTensor)
    assert val.fake_mode is program.fake_mode()  # the graph's own mode, not a second one
    assert tuple(val.shape) == (2, 3) and val.dtype == torch.float32
    assert neg.meta["nn_module_stack"] == relu.meta["nn_module_stack"]
    assert program.source_module(neg) == "block"
    assert neg.meta["graphpress_pass"] == "test_pass"
    assert list(program.graph.nodes).index(neg) == list(program.graph.nodes).index(relu) + 1


def test_a_subgraph_is_inserted_in_creation_order() -> None:
    program = _program()
    relu = _relu(program)
    with GraphBuilder(program, anchor=relu, pass_name="t", after=True) as build:
        doubled = build.call(aten.mul.Tensor, relu, 2.0)
        parts = build.call(aten.split.Tensor, doubled, 1, 1)
        first = build.call(operator.getitem, parts, 0)
    assert isinstance(parts.meta["val"], list | tuple) and len(parts.meta["val"]) == 3
    assert tuple(first.meta["val"].shape) == (2, 1)
    order = list(program.graph.nodes)
    assert order.index(relu) < order.index(doubled) < order.index(parts) < order.index(first)
    program.graph.lint()


def test_before_anchor_by_default() -> None:
    program = _program()
    relu = _relu(program)
    source = relu.args[0]
    with GraphBuilder(program, anchor=relu, pass_name="t") as build:
        scaled = build.call(aten.mul.Tensor, source, 0.5)
        shifted = build.call(aten.add.Tensor, scaled, 1.0)
    relu.replace_input_with(source, shifted)
    order = list(program.graph.nodes)
    assert order.index(scaled) < order.index(shifted) < order.index(relu)
    program.graph.lint()


def test_symbolic_sizes_come_from_the_graphs_shape_env() -> None:
    program = _program(dynamic_batch=True)
    relu = _relu(program)
    with GraphBuilder(program, anchor=relu, pass_name="t", after=True) as build:
        flat = build.call(aten.reshape.default, relu, [-1])
    batch = relu.meta["val"].shape[0]
    assert isinstance(batch, torch.SymInt)
    assert str(flat.meta["val"].shape[0]) == str(batch * 3)  # same symbol: same shape env


def test_weight_stamps_the_placeholder() -> None:
    program = _program()
    relu = _relu(program)
    with GraphBuilder(program, anchor=relu, pass_name="t", after=True) as build:
        scale = build.weight("block.scale", torch.full((3,), 2.0), kind="buffer")
        out = build.call(aten.mul.Tensor, relu, scale)
    assert program.input_kind(scale).name == "BUFFER"
    assert scale.meta["graphpress_pass"] == "t" and program.source_module(scale) == "block"
    assert tuple(scale.meta["val"].shape) == (3,)
    assert list(program.graph.nodes).index(out) == list(program.graph.nodes).index(relu) + 1
    program.validate()


def test_input_without_meta_is_an_error_naming_it() -> None:
    program = _program()
    relu = _relu(program)
    with program.graph.inserting_after(relu):
        raw = program.graph.call_function(aten.neg.default, (relu,))
    with GraphBuilder(program, anchor=raw, pass_name="t", after=True) as build, \
            pytest.raises(MetadataError, match=f"input {raw.name!r} has none"):
        build.call(aten.neg.default, raw)


def test_call_outside_the_context_is_refused() -> None:
    program = _program()
    build = GraphBuilder(program, anchor=_relu(program), pass_name="t")
    with pytest.raises(RuntimeError, match="use the builder as a context"):
        build.call(aten.neg.default, _relu(program))
    with pytest.raises(ValueError, match="pass_name"):
        GraphBuilder(program, anchor=_relu(program), pass_name="")


@dataclass
class _NegateAndMeasure(Pass):
    """Replaces relu(x) with -(-relu(x)), then counts its own negations by shape."""

    builder: bool = True

    name: ClassVar[str] = "negate_and_measure"
    contract: ClassVar[Contract] = Contract.exact(rtol=0.0, atol=0.0)

    def run(self, program: Program, ctx: PassContext) -> PassResult:
        for relu in [n for n in program.graph.nodes if n.target == aten.relu.default]:
            users = list(relu.users)
            if self.builder:
                with GraphBuilder(program, anchor=relu, pass_name=self.name,
                                  after=True) as build:
                    twice = build.call(aten.neg.default, build.call(aten.neg.default, relu))
            else:
                with program.graph.inserting_after(relu):
                    once = program.graph.call_function(aten.neg.default, (relu,))
                with program.graph.inserting_after(once):
                    twice = program.graph.call_function(aten.neg.default, (once,))
            for user in users:
                user.replace_input_with(relu, twice)
        # second phase of the same run: match the pass's own output by its shape
        seen = sum(1 for n in program.graph.nodes if n.target == aten.neg.default
                   and "val" in n.meta and n.meta["val"].shape[-1] == 3)
        return PassResult(True, {"matched_own_output": seen})


def test_a_pass_sees_the_meta_of_its_own_output_in_the_same_run() -> None:
    model, x = _Net().eval(), torch.randn(2, 4)
    with_builder = gp.compile(model, (x,), passes=[_NegateAndMeasure()], verify=True)
    raw = gp.compile(model, (x,), passes=[_NegateAndMeasure(builder=False)], verify=True)
    assert with_builder.report().records[0].stats == {"matched_own_output": 2}
    assert raw.report().records[0].stats == {"matched_own_output": 0}  # the trap
    negs = [n for n in with_builder.program.graph.nodes if n.target == aten.neg.default]
    assert [n.meta["graphpress_pass"] for n in negs] == ["negate_and_measure"] * 2
    assert all(with_builder.program.source_module(n) == "block" for n in negs)
    torch.testing.assert_close(with_builder(x), model(x), rtol=0, atol=0)
