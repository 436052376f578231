"""Shape metadata after pruning (``passes/prune/metadata.py``): values built without fake
dispatch equal, sizes and strides, what the incremental fake-tensor propagation computes."""

from __future__ import annotations

import random
from typing import Any

import pytest
import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx import Node
from torch.fx.passes.fake_tensor_prop import FakeTensorProp

import graphpress.passes.prune.plan as plan_module
from graphpress.frontends import trace
from graphpress.ir.shapes import fake_over_meta, propagate_shapes, value_key
from graphpress.passes import PassContext, PruneChannels
from graphpress.passes.prune.metadata import meta_view_strides_agree
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


def _random_view(rng: random.Random) -> tuple[Any, list[int], list[int], tuple]:
    """A view op, an input's sizes and strides (dense in a random order, maybe sliced, size-1
    dimensions with arbitrary strides) and arguments giving a result, most often with a size-1
    dimension."""
    rank = rng.randint(1, 4)
    shape = [rng.choice([1, 2, 3, 4]) for _ in range(rank)]
    order = list(range(rank))
    rng.shuffle(order)
    strides, step = [0] * rank, 1
    for d in reversed(order):
        strides[d] = step
        step *= shape[d]
    if rank > 1 and rng.random() < 0.2:        # a slice of the outermost dimension
        strides = [s * 2 if d == order[0] else s for d, s in enumerate(strides)]
    strides = [rng.choice([1, 7, s]) if n == 1 else s for n, s in zip(shape, strides)]
    kind = rng.choice(["view", "reshape", "_unsafe_view", "unsqueeze", "unflatten", "squeeze",
                       "flatten", "expand", "permute", "transpose", "slice", "contiguous"])
    target_shape = list(shape)
    if rng.random() < 0.7:
        target_shape.insert(rng.randint(0, rank), 1)
    if rng.random() < 0.5 and len(target_shape) > 1:
        i = rng.randrange(len(target_shape) - 1)
        target_shape[i:i + 2] = [target_shape[i] * target_shape[i + 1]]
    aten = torch.ops.aten
    if kind in ("view", "reshape", "_unsafe_view"):
        return getattr(aten, kind).default, shape, strides, (target_shape,)
    d = rng.randrange(rank)
    target, args = {
        "unsqueeze": (aten.unsqueeze.default, (rng.randint(0, rank),)),
        "unflatten": (aten.unflatten.int, (d, rng.choice([[1, shape[d]], [shape[d], 1]]))),
        "squeeze": (aten.squeeze.dim, (d,)),
        "flatten": (aten.flatten.using_ints, (d, rng.randrange(d, rank))),
        "expand": (aten.expand.default, ([1, *shape],)),
        "permute": (aten.permute.default, (list(reversed(range(rank))),)),
        "transpose": (aten.transpose.int, (0, rank - 1)),
        "slice": (aten.slice.Tensor, (d, 0, 1)),
        "contiguous": (aten.contiguous.default, ()),
    }[kind]
    return target, shape, strides, args


def test_views_built_on_meta_tensors_have_the_fake_kernels_strides() -> None:
    """Where ``meta_view_strides_agree`` says so, a view's meta kernel and its fake kernel give
    the same sizes and strides (3000 random views, inputs with and without size-1 dims)."""
    mode = FakeTensorMode()
    rng = random.Random(0)
    checked = disagree = 0
    for _ in range(3000):
        target, shape, strides, args = _random_view(rng)
        meta = torch.empty_strided(shape, strides, device="meta")
        try:
            out = target(meta, *args)
        except RuntimeError:            # a view the strides do not allow
            continue
        fake = fake_over_meta(mode, torch.empty_strided(shape, strides, device="meta"),
                              torch.device("cpu"))
        with mode:
            expected = target(fake, *args)
        same = out.shape == expected.shape and out.stride() == expected.stride()
        disagree += not same
        if meta_view_strides_agree(target, [meta], [out]):
            checked += 1
            assert same, (target, shape, strides, args, out.stride(), expected.stride())
    assert checked > 1500 and disagree > 50, "both kinds of case are drawn"


def test_always_contiguous_ops_are_contiguous_whatever_their_inputs() -> None:
    """What ``_ALWAYS_CONTIGUOUS`` relies on: the fake kernels of repeat_interleave, embedding
    and gather give contiguous strides for inputs in any order, sliced, with size-1 dimensions
    (500 random cases each)."""
    mode = FakeTensorMode()
    rng = random.Random(1)

    def fake(shape: list[int], strides: list[int], dtype: torch.dtype) -> torch.Tensor:
        meta = torch.empty_strided(shape, strides, dtype=dtype, device="meta")
        return fake_over_meta(mode, meta, torch.device("cpu"))

    aten = torch.ops.aten
    for _ in range(500):
        _, shape, strides, _ = _random_view(rng)
        table_columns = _random_view(rng)[1][-1]
        x = fake(shape, strides, torch.float32)
        index = fake(shape, strides, torch.long)
        source = fake([s + 1 for s in shape], torch.empty([s + 1 for s in shape]).stride(),
                      torch.float32)
        table = fake([5, table_columns], [1, 5] if rng.random() < 0.5 else [table_columns, 1],
                     torch.float32)
        dim = rng.choice([None, *range(-len(shape), len(shape))])
        with mode:
            outs = [aten.repeat_interleave.self_int(x, rng.choice([1, 2, 3]), dim),
                    aten.embedding.default(table, index),
                    aten.gather.default(source, rng.randrange(len(shape)), index)]
        for out in outs:
            assert out.stride() == torch.empty(out.shape).stride(), (shape, strides, dim)


def test_permutes_and_contiguous_reshapes_built_without_running_them() -> None:
    """``moved_value``'s rules against the fake kernels on random views: a permute, transpose
    or t reorders the input's sizes and strides; view / reshape / _unsafe_view / flatten of an
    input with exactly the contiguous strides has exactly the contiguous strides of its sizes."""
    from types import SimpleNamespace

    from graphpress.passes.prune.metadata import (
        _CONTIGUOUS_VIEWS,
        _contiguous,
        _contiguous_strides,
        _moved_order,
    )

    mode = FakeTensorMode()
    rng = random.Random(1)
    moved = reshaped = flattened = 0
    for _ in range(3000):
        target, shape, strides, args = _random_view(rng)
        if rng.random() < 0.5:
            strides = _contiguous_strides(list(shape))
        fake = fake_over_meta(mode, torch.empty_strided(shape, strides, device="meta"),
                              torch.device("cpu"))
        try:
            with mode:
                expected = target(fake, *args)
        except (RuntimeError, ValueError):     # a view the strides do not allow
            continue
        order = _moved_order(SimpleNamespace(target=target, args=(None, *args)), len(shape))
        if order is not None:
            moved += 1
            assert list(expected.shape) == [shape[d] for d in order]
            assert list(expected.stride()) == [strides[d] for d in order]
        elif target in _CONTIGUOUS_VIEWS and _contiguous(fake):
            reshaped += 1
            flattened += target is torch.ops.aten.flatten.using_ints
            assert list(expected.stride()) == _contiguous_strides(list(expected.shape))
    assert moved > 300 and reshaped > 300 and flattened > 50
