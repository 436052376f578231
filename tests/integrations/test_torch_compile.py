"""graphpress as a torch.compile backend (graphpress.integrations.torch_compile)."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from torch import nn
from torch._dynamo.exc import BackendCompilerFailed
from torch.export.graph_signature import InputKind
from torch.utils._pytree import tree_leaves

import graphpress
from graphpress.errors import ContractViolation, PipelineError, TraceError
from graphpress.integrations import torch_compile as dynamo_frontend
from graphpress.integrations.torch_compile import DynamoCompiled, graphpress_backend
from graphpress.passes import Contract, Pass, PassContext, PassResult
from graphpress.pipeline import registry
from graphpress.testing.zoo import zoo_models

TOL = 1e-5


@pytest.fixture(autouse=True)
def _reset_dynamo() -> Iterator[None]:
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture
def compiled_graphs(monkeypatch: pytest.MonkeyPatch) -> list[DynamoCompiled]:
    """Every callable the backend returns during the test, in order."""
    made: list[DynamoCompiled] = []

    class Recording(DynamoCompiled):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(dynamo_frontend, "DynamoCompiled", Recording)
    return made


def max_error(got: Any, want: Any) -> float:
    got_leaves, want_leaves = tree_leaves(got), tree_leaves(want)
    assert len(got_leaves) == len(want_leaves)
    errors = [0.0]
    for g, w in zip(got_leaves, want_leaves, strict=True):
        if isinstance(w, torch.Tensor):
            assert g.shape == w.shape and g.dtype == w.dtype
            errors.append((g.detach() - w.detach()).abs().max().item() if w.numel() else 0.0)
        else:
            assert g == w
    return max(errors)


def errors_in_chain(exc: BaseException) -> list[BaseException]:
    """``exc``, what it wraps (BackendCompilerFailed.inner_exception) and its causes."""
    seen: list[BaseException] = []
    todo: list[BaseException | None] = [exc]
    while todo:
        item = todo.pop()
        if item is None or item in seen:
            continue
        seen.append(item)
        todo += [item.__cause__, item.__context__, getattr(item, "inner_exception", None)]
    return seen


def find_error(exc: BaseException, kind: type[BaseException]) -> BaseException:
    found = [e for e in errors_in_chain(exc) if isinstance(e, kind)]
    assert found, f"no {kind.__name__} in the chain of {exc!r}"
    return found[0]


# ----------------------------------------------------------------------------------- models
class Mlp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.fc1(x))
        return self.fc2(h) + self.fc2(h)  # a common subexpression for cse


class ConvBn(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.head = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn(self.conv(x)))
        return self.head(y.mean((2, 3)))


class WithGraphBreak(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.tanh(self.a(x))
        torch._dynamo.graph_break()
        return self.b(y * 2)


class WithAutocast(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = torch.relu(self.a(x))
        return self.b(y.float())


class WithComputedWeight(nn.Module):
    """``weight.t().sum(0) * 2`` depends only on weights: fold_constants folds it."""

    def __init__(self) -> None:
        super().__init__()
        self.l = nn.Linear(4, 4)
        self.bn = nn.BatchNorm1d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.l(x) + self.l.weight.t().sum(0) * 2)


def calibrated(model: nn.Module, *shape: int) -> nn.Module:
    """Give batch norms non-trivial running statistics, then switch to eval mode."""
    torch.manual_seed(0)
    model.train()
    with torch.no_grad():
        model(torch.randn(*shape) * 3 + 1)
    return model.eval()


# ------------------------------------------------------------------------------------ tests
def test_backend_resolves_by_name() -> None:
    assert "graphpress" in torch._dynamo.list_backends()
    assert torch._dynamo.lookup_backend("graphpress") is graphpress_backend


@pytest.mark.parametrize("make, shape, graphs", [
    (Mlp, (4, 8), 1),
    (lambda: calibrated(ConvBn(), 4, 3, 8, 8), (2, 3, 8, 8), 1),
    (WithGraphBreak, (4, 8), 2),
    (WithAutocast, (4, 8), 1),
], ids=["mlp", "conv_bn", "graph_break", "autocast"])
def test_matches_eager(make: Any, shape: tuple[int, ...], graphs: int,
                       compiled_graphs: list[DynamoCompiled]) -> None:
    torch.manual_seed(0)
    model, x = make(), torch.randn(*shape)
    compiled = torch.compile(model, backend="graphpress", options={"passes": ["cse"]})
    assert max_error(compiled(x), model(x)) <= TOL
    assert len(compiled_graphs) == graphs
    for graph in compiled_graphs:
        assert [r.name for r in graph.graphpress_report.records] == ["cse"]
        assert graph.graphpress_report.frontend == "dynamo"


def test_cse_rewrites_and_weights_stay_runtime_inputs(
        compiled_graphs: list[DynamoCompiled], capfd: pytest.CaptureFixture[str],
        caplog: pytest.LogCaptureFixture) -> None:
    torch.manual_seed(0)
    model, x = Mlp(), torch.randn(4, 8)
    compiled = torch.compile(model, backend="graphpress", options={"passes": "cse"})
    with caplog.at_level(logging.INFO):
        compiled(x)
    assert capfd.readouterr().out == ""  # silent by default
    assert not [r for r in caplog.records if r.name.startswith("graphpress")]
    (graph,) = compiled_graphs
    assert graph.graphpress_report.records[0].changed
    assert not graph.program.weights()  # parameters are user inputs of the Program
    # Without freeze, updates to the weights are seen (no recompile needed).
    with torch.no_grad():
        model.fc2.bias.add_(1.0)
    assert max_error(compiled(x), model(x)) <= TOL
    # And gradients flow to the model's parameters.
    compiled(x).sum().backward()
    assert model.fc1.weight.grad is not None and model.fc1.weight.grad.abs().sum() > 0


def test_recompile_with_dynamic_batch(compiled_graphs: list[DynamoCompiled]) -> None:
    torch.manual_seed(0)
    model = calibrated(ConvBn(), 4, 3, 8, 8)
    compiled = torch.compile(model, backend="graphpress", options={"passes": ["cse"]})
    for batch in (2, 3, 5, 7):
        x = torch.randn(batch, 3, 8, 8)
        assert max_error(compiled(x), model(x)) <= TOL
    # Batch 2 compiles a static graph; batch 3 recompiles with a dynamic batch dimension, which
    # then serves batches 5 and 7 without another compile.
    assert len(compiled_graphs) == 2
    (x_node,) = [n for n in compiled_graphs[1].program.user_inputs() if n.name == "x"]
    assert isinstance(x_node.meta["val"].shape[0], torch.SymInt)


def test_dynamic_true_specializes_python_scalars(compiled_graphs: list[DynamoCompiled]) -> None:
    # Under dynamic=True, Dynamo passes Python floats (bn.eps, a float argument) as tensors;
    # each value gets its own Program.
    model = calibrated(ConvBn(), 4, 3, 8, 8)

    def fn(x: torch.Tensor, scale: float) -> torch.Tensor:
        return model(x) * scale

    compiled = torch.compile(fn, backend="graphpress", dynamic=True,
                             options={"passes": "cse", "freeze": True})
    for batch, scale in ((2, 2.0), (3, 3.0), (5, 2.0)):
        x = torch.randn(batch, 3, 8, 8)
        assert max_error(compiled(x, scale), fn(x, scale)) <= TOL
    graph, variant = compiled_graphs  # the variant for scale=3.0 was built on its first call
    assert list(graph.variants.values()) == [variant]
    assert set(graph.program.state_dict) == set(model.state_dict()) - {"bn.num_batches_tracked"}


def test_weight_rewriting_pass_needs_freeze() -> None:
    model, x = calibrated(WithComputedWeight(), 8, 4), torch.randn(3, 4)
    compiled = torch.compile(model, backend="graphpress",
                             options={"passes": "fold_constants, dce"})
    with pytest.raises(BackendCompilerFailed) as info:
        compiled(x)
    error = find_error(info.value, PipelineError)
    assert "fold_constants" in str(error) and "freeze" in str(error)
    assert "gp.compile" in str(error)


def test_freeze_folds_weights(compiled_graphs: list[DynamoCompiled]) -> None:
    model, x = calibrated(WithComputedWeight(), 8, 4), torch.randn(3, 4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    compiled = torch.compile(model, backend="graphpress", options={
        "passes": "fold_constants, dce, cse", "freeze": True, "verify": True})
    expected = model(x)
    assert max_error(compiled(x), expected) <= TOL
    (graph,) = compiled_graphs
    records = {r.name: r for r in graph.graphpress_report.records}
    assert records["fold_constants"].changed and records["fold_constants"].stats["folded"] > 0
    assert records["fold_constants"].max_error == 0.0  # verified
    program = graph.program
    kinds = {s.target: s.kind for s in program.signature.input_specs if s.target}
    assert kinds["l.bias"] == InputKind.PARAMETER
    assert kinds["bn.running_mean"] == InputKind.BUFFER
    assert [n.name for n in program.user_inputs()] == ["x"]
    # The model is untouched, and the frozen graph ignores later weight updates.
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    with torch.no_grad():
        model.l.bias.add_(1.0)
    assert max_error(compiled(x), expected) <= TOL


class WrongAddToSub(Pass):
    """Deliberately wrong: claims an exact contract but turns additions into subtractions."""

    contract = Contract.exact()

    def run(self, program: graphpress.Program, ctx: PassContext) -> PassResult:
        changed = 0
        for node in program.graph.nodes:
            if node.target == torch.ops.aten.add.Tensor:
                node.target = torch.ops.aten.sub.Tensor
                changed += 1
        return PassResult(changed > 0, {"changed": changed})


@pytest.fixture
def wrong_pass() -> Iterator[str]:
    graphpress.register_pass("test_wrong_dynamo")(WrongAddToSub)
    yield "test_wrong_dynamo"
    registry._REGISTRY.pop("test_wrong_dynamo", None)  # keep the registry as other tests see it


def test_verify_catches_wrong_pass(wrong_pass: str) -> None:
    model, x = calibrated(WithComputedWeight(), 8, 4), torch.randn(3, 4)
    compiled = torch.compile(model, backend="graphpress",
                             options={"passes": ["cse", wrong_pass], "verify": True})
    with pytest.raises(BackendCompilerFailed) as info:
        compiled(x)
    assert wrong_pass in str(find_error(info.value, ContractViolation))
    # Without verify the wrong pass goes through and changes the result.
    torch._dynamo.reset()
    unchecked = torch.compile(model, backend="graphpress", options={"passes": [wrong_pass]})
    assert max_error(unchecked(x), model(x)) > TOL


def test_unknown_option_lists_accepted_keys() -> None:
    gm = torch.fx.symbolic_trace(Mlp())
    with pytest.raises(PipelineError, match="passes, verify, freeze, fallback"):
        graphpress_backend(gm, [torch.randn(2, 8)], options={"pases": "cse"})


def test_export_failure(monkeypatch: pytest.MonkeyPatch,
                        compiled_graphs: list[DynamoCompiled]) -> None:
    def broken_export(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("simulated export failure")

    monkeypatch.setattr(torch.export, "export", broken_export)
    torch.manual_seed(0)
    model, x = Mlp(), torch.randn(4, 8)
    with pytest.raises(BackendCompilerFailed) as info:
        torch.compile(model, backend="graphpress", options={"passes": "cse"})(x)
    assert "simulated export failure" in str(find_error(info.value, TraceError))
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="graphpress",
                             options={"passes": "cse", "fallback": True})
    assert max_error(compiled(x), model(x)) <= TOL
    assert "simulated export failure" in compiled_graphs[-1].graphpress_report.extra["fallback"]


# hf_mobilenet_v2 takes ~17 s (~10 s of it Dynamo's own tracing, as with backend="eager"), too
# long for the default run: it runs with `pytest -m slow`.
_SLOW_ZOO = {"hf_mobilenet_v2"}


@pytest.mark.parametrize("entry", [
    pytest.param(e, marks=pytest.mark.slow) if e.name in _SLOW_ZOO else e
    for e in zoo_models()], ids=lambda e: e.name)
def test_zoo_matches_eager(entry: Any) -> None:
    model, inputs = entry.make()
    start = time.perf_counter()
    with torch.no_grad():
        expected = model(*inputs)
        compiled = torch.compile(model, backend="graphpress", options={"passes": "dce,cse"})
        got = compiled(*inputs)
    assert max_error(got, expected) <= TOL, f"{entry.name} after {time.perf_counter() - start}"
