"""Shape metadata after pruning (``passes/prune/metadata.py``): values built without fake
dispatch equal, sizes and strides, what the incremental fake-tensor propagation computes."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn
from torch.fx import Node
from torch.fx.passes.fake_tensor_prop import FakeTensorProp

import graphpress.passes.prune.plan as plan_module
from graphpress.frontends import trace
from graphpress.ir.shapes import propagate_shapes, value_key
from graphpress.passes import PassContext, PruneChannels
from graphpress.testing.zoo import get_model, zoo_models


def _on_fake_only(program: Any, layouts: Any, kept: Any, touched: set[Node],
                  previous: dict[Node, Any]) -> list[str]:
    return propagate_shapes(program, check=False, touched=touched, previous=previous)


def _pruned_both_ways(program: Any, monkeypatch: pytest.MonkeyPatch,
                      prune: PruneChannels | None = None) -> tuple[Any, Any]:
    """``program`` pruned in place, and a copy pruned the same way with its metadata from the
    incremental fake-tensor propagation."""
    prune = prune or PruneChannels(ratio=0.5)
    reference = program.copy()
    prune.run(program, PassContext())
    with monkeypatch.context() as patch:
        patch.setattr(plan_module, "refresh_pruned_shapes", _on_fake_only)
        prune.run(reference, PassContext())
    return program, reference


def _differences(program: Any, reference: Any) -> list[tuple[str, Any, Any]]:
    expected = {n.name: value_key(n.meta.get("val")) for n in reference.graph.nodes}
    return [(n.name, value_key(n.meta.get("val")), expected[n.name])
            for n in program.graph.nodes if value_key(n.meta.get("val")) != expected[n.name]]


@pytest.mark.parametrize("name", [z.name for z in zoo_models()])
def test_values_match_the_fake_tensor_propagation_on_the_zoo(
        name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    model, inputs = get_model(name).make()
    program, reference = _pruned_both_ways(trace(model, inputs), monkeypatch)
    assert _differences(program, reference) == []
    propagate_shapes(program, check=True)   # sizes also agree with the full propagation


@pytest.mark.slow
@pytest.mark.parametrize("name", [z.name for z in zoo_models(include=["large"], exclude=())])
def test_values_match_the_fake_tensor_propagation_on_large_models(
        name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    test_values_match_the_fake_tensor_propagation_on_the_zoo(name, monkeypatch)


def _fake_runs(program: Any, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    ran: list[str] = []
    original = FakeTensorProp.run_node

    def counting(self: FakeTensorProp, node: Node) -> Any:
        ran.append(node.name)
        return original(self, node)
    with monkeypatch.context() as patch:
        patch.setattr(FakeTensorProp, "run_node", counting)
        PruneChannels(ratio=0.5).run(program, PassContext())
    return ran


def test_a_residual_conv_net_needs_no_fake_dispatch(monkeypatch: pytest.MonkeyPatch) -> None:
    model, inputs = get_model("residual_chain").make()
    program = trace(model, inputs)
    before = {n.name: value_key(n.meta.get("val")) for n in program.graph.nodes}
    assert _fake_runs(program, monkeypatch) == []
    changed = [n for n in program.graph.nodes if value_key(n.meta.get("val")) != before[n.name]]
    assert len(changed) > 10, "convolutions, norms, activations and adds all shrank"


class _Heads(nn.Module):
    """Four heads of 2 and a permute."""

    def __init__(self) -> None:
        super().__init__()
        self.q = nn.Linear(8, 8)
        self.o = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        heads = self.q(x).view(b, s, 4, 2).permute(0, 2, 1, 3)
        mixed = torch.softmax(heads, dim=-1) * heads
        return self.o(mixed.permute(0, 2, 1, 3).reshape(b, s, 8))


def test_views_and_permutes_are_built_directly(monkeypatch: pytest.MonkeyPatch) -> None:
    program = trace(_Heads().eval(), (torch.randn(3, 5, 8),))
    ran = _fake_runs(program.copy(), monkeypatch)
    assert not any(name.startswith(("view", "permute", "linear")) for name in ran), ran
    pruned, reference = _pruned_both_ways(program, monkeypatch)
    assert _differences(pruned, reference) == []


def test_a_dynamic_batch_takes_the_fake_path_and_stays_symbolic(
        monkeypatch: pytest.MonkeyPatch) -> None:
    program = trace(_Heads().eval(), (torch.randn(3, 5, 8),), dynamic_batch=True)
    pruned, reference = _pruned_both_ways(program, monkeypatch)
    assert _differences(pruned, reference) == []
    out = next(n for n in pruned.graph.nodes if n.name == "linear_1").meta["val"]
    assert isinstance(out.shape[0], torch.SymInt)


def test_meta_device_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    with torch.device("meta"):
        program = trace(_Heads().eval(), (torch.empty(3, 5, 8),))
    plan, _ = PruneChannels(ratio=0.5, importance="random").make_plan(program)
    program, reference = _pruned_both_ways(program, monkeypatch, PruneChannels(plan=plan))
    assert program.weights()["q.weight"].shape == (4, 8)
    assert program.weights()["q.weight"].device.type == "meta"
    assert _differences(program, reference) == []
