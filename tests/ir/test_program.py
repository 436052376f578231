"""Program: weight editing keeps graph, signature, state dict and metadata consistent."""

from __future__ import annotations

import pytest
import torch

from graphpress.errors import MetadataError
from graphpress.frontends import trace
from graphpress.ir.program import Program
from tests.models import ConvBNLinear, conv_inputs


def test_weights_by_name_and_kind(conv_program: Program) -> None:
    weights = conv_program.weights()
    assert {"conv.weight", "conv.bias", "bn.running_mean", "fc.weight"} <= set(weights)
    node = conv_program.weight_node("conv.weight")
    assert conv_program.weight_name(node) == "conv.weight"
    assert conv_program.is_weight(node)
    assert [n.name for n in conv_program.user_inputs()] == ["x"]
    conv = next(n for n in conv_program.graph.nodes if n.target == torch.ops.aten.conv2d.default)
    assert conv_program.source_module(conv) == "conv"


def test_trace_does_not_alias_user_weights() -> None:
    model = ConvBNLinear().eval()
    program = trace(model, conv_inputs())
    assert program.weight("conv.weight") is not model.conv.weight
    assert program.weight("conv.weight").data_ptr() != model.conv.weight.data_ptr()
    assert torch.equal(program.weight("conv.weight"), model.conv.weight)


def test_replace_weight_updates_meta(conv_program: Program) -> None:
    new = torch.zeros(4, 3, 3, 3)
    conv_program.replace_weight("conv.weight", new)
    assert torch.equal(conv_program.weight("conv.weight"), new)
    assert isinstance(conv_program.weight("conv.weight"), torch.nn.Parameter)
    conv_program.validate()
    out = conv_program(*conv_inputs())
    assert out.shape == (2, 2)


def test_replace_weights_several_at_once(conv_program: Program) -> None:
    version = conv_program.version
    mean = conv_program.weight("bn.running_mean")
    nodes = conv_program.replace_weights({"conv.weight": torch.ones(4, 3, 3, 3),
                                          "bn.running_mean": torch.full_like(mean, 2.0)})
    assert [n.name for n in nodes] == [conv_program.weight_node("conv.weight").name,
                                       conv_program.weight_node("bn.running_mean").name]
    assert isinstance(conv_program.weight("conv.weight"), torch.nn.Parameter)
    assert type(conv_program.weight("bn.running_mean")) is torch.Tensor
    assert torch.equal(conv_program.weight("bn.running_mean"), torch.full_like(mean, 2.0))
    assert conv_program.version == version + 1
    conv_program.validate()
    with pytest.raises(KeyError, match="no weight named 'conv.wieght'"):
        conv_program.replace_weights({"conv.wieght": torch.ones(1)})


def test_add_and_remove_weight_roundtrip(conv_program: Program) -> None:
    version = conv_program.version
    node = conv_program.add_weight("extra.scale", torch.ones(4), kind="buffer")
    assert conv_program.version > version
    assert conv_program.input_kind(node).name == "BUFFER"
    conv_program.validate()
    with pytest.raises(ValueError, match="already exists"):
        conv_program.add_weight("extra.scale", torch.ones(4))
    conv_program.remove_weight("extra.scale")
    assert "extra.scale" not in conv_program.weights()
    conv_program.validate()


def test_remove_used_weight_is_refused(conv_program: Program) -> None:
    with pytest.raises(ValueError, match="still used"):
        conv_program.remove_weight("conv.weight")


def test_validate_catches_stale_state(conv_program: Program) -> None:
    conv_program.state_dict["conv.weight"] = torch.nn.Parameter(torch.zeros(5, 3, 3, 3))
    with pytest.raises(MetadataError, match="stale shape metadata.*conv.weight"):
        conv_program.validate(who="pass 'broken'")


def test_validate_catches_stale_signature(conv_program: Program) -> None:
    conv_program.signature.input_specs.pop(0)
    with pytest.raises(MetadataError, match="stale signature"):
        conv_program.validate()


def test_copy_is_independent(conv_program: Program) -> None:
    clone = conv_program.copy()
    relu = next(n for n in clone.graph.nodes if n.target == torch.ops.aten.relu.default)
    relu.target = torch.ops.aten.sigmoid.default
    clone.touch()
    x = conv_inputs()
    assert not torch.allclose(clone(*x), conv_program(*x))
    assert conv_program.num_nodes() == clone.num_nodes()


def test_analysis_cache_follows_version(conv_program: Program) -> None:
    first = conv_program.analysis("costs")
    assert conv_program.analysis("costs") is first
    conv_program.touch()
    assert conv_program.analysis("costs") is not first
    with pytest.raises(KeyError, match="unknown analysis"):
        conv_program.analysis("nope")


def test_call_applies_buffer_and_input_mutations() -> None:
    class Counter(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("count", torch.zeros(()))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.count.add_(1)
            x.mul_(2)
            return x + self.count

    program = trace(Counter(), (torch.ones(2),))
    x = torch.ones(2)
    assert torch.equal(program(x), torch.full((2,), 3.0))
    assert torch.equal(x, torch.full((2,), 2.0))
    assert torch.equal(program(torch.ones(2)), torch.full((2,), 4.0))
    assert program.weight("count").item() == 2.0
    assert torch.equal(program.module()(torch.ones(2)), torch.full((2,), 5.0))


def test_nodes_by_op(conv_program: Program) -> None:
    calls = list(conv_program.nodes("call_function"))
    assert calls and all(n.op == "call_function" for n in calls)
    assert [n.name for n in conv_program.nodes("placeholder")][-1] == "x"
    assert len(list(conv_program.nodes())) == len(conv_program.graph.nodes)


def test_module_owns_its_weights_so_training_it_changes_no_program() -> None:
    from graphpress.frontends import trace

    model = ConvBNLinear().eval()
    program = trace(model, conv_inputs())
    copy = program.copy()
    before = {k: v.clone() for k, v in program.weights().items()}
    module = program.module()
    optimizer = torch.optim.SGD(module.parameters(), lr=0.1)
    module(*conv_inputs()).square().sum().backward()
    optimizer.step()
    trained = dict(module.named_parameters())
    assert any(not torch.equal(trained[k], before[k]) for k in trained if k in before)
    for p in (program, copy):
        for name, tensor in p.weights().items():
            assert torch.equal(tensor, before[name]), f"{name} changed through module()"
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[name])
