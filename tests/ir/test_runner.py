"""The calibration runner: per-node hooks, no state change, batches from compile()."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from torch import nn

import graphpress as gp
from graphpress.errors import InputError
from graphpress.frontends import trace
from graphpress.frontends.inputs import normalize_batches
from graphpress.ir.program import Program
from graphpress.ir.runner import ProgramRunner, run_batches
from graphpress.pipeline import Pass, PassContext, PassResult


class Counter(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("count", torch.zeros(1))
        self.linear = nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.count.add_(1)
        return torch.relu(self.linear(x)) + self.count


def test_hooks_see_the_selected_nodes_and_the_state_is_untouched() -> None:
    model = Counter().eval()
    program = trace(model, (torch.randn(2, 3),))
    seen: dict[str, torch.Tensor] = {}
    relu = next(n.name for n in program.graph.nodes if "relu" in str(n.target))
    runner = ProgramRunner(program, lambda n, v: seen.__setitem__(n.name, v), nodes=[relu])
    x = torch.randn(2, 3)
    out = runner(x)
    assert list(seen) == [relu]
    with torch.no_grad():
        torch.testing.assert_close(seen[relu], torch.relu(model.linear(x)))
        torch.testing.assert_close(out, Counter.forward(model, x))
    assert float(program.weight("count")) == 0.0, "calibration never advances the state"


@dataclass
class CollectRanges(Pass):
    """Records the max |activation| of every relu over the calibration data (test only)."""

    name = "test_collect_ranges"

    def run(self, program: Program, ctx: PassContext) -> PassResult:
        ranges: dict[str, float] = {}

        def hook(node: torch.fx.Node, value: torch.Tensor) -> None:
            if "relu" in str(node.target):
                ranges[node.name] = max(ranges.get(node.name, 0.0), float(value.abs().max()))

        count = run_batches(program, ctx.calibration_data, hook, progress=False)
        return PassResult(False, {"batches": count}, details={"ranges": ranges})


def test_calibration_data_reaches_passes_in_every_form() -> None:
    model = nn.Sequential(nn.Linear(3, 3), nn.ReLU()).eval()
    batches = [(torch.randn(4, 3),), torch.randn(2, 3), [torch.randn(1, 3)]]
    compiled = gp.compile(model, (torch.randn(2, 3),), passes=[CollectRanges()],
                          calibration_data=batches, dynamic_batch=True)
    record = compiled.report().records[0]
    assert record.stats["batches"] == 3
    (value,) = record.details["ranges"].values()
    with torch.no_grad():
        expected = max(float(model(b if isinstance(b, torch.Tensor) else b[0]).max())
                       for b in batches)
    assert value == expected


def test_calibration_batches_are_normalized_or_refused() -> None:
    t = torch.ones(2)
    assert normalize_batches([{"ids": t}, (t, 3)]) == [((), {"ids": t}), ((t, 3), {})]
    assert normalize_batches(None) == []
    with pytest.raises(InputError, match="iterable of batches"):
        normalize_batches(t)
    with pytest.raises(InputError, match="calibration batch 1"):
        normalize_batches([(t,), ("text only",)])


def test_the_progress_bar_is_quiet_off_a_terminal_and_when_asked(
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    model = nn.Sequential(nn.Linear(3, 3), nn.ReLU()).eval()
    program = trace(model, (torch.randn(2, 3),))
    batches = [((torch.randn(2, 3),), {}) for _ in range(8)]
    run_batches(program, batches)  # 8 batches, but pytest's capture is not a terminal
    assert "calibrating" not in capsys.readouterr().err
    run_batches(program, batches, progress=True)  # asked for: shown anyway
    assert "calibrating" in capsys.readouterr().err
    monkeypatch.setenv("GRAPHPRESS_PROGRESS", "0")
    run_batches(program, batches, progress=True)
    assert "calibrating" not in capsys.readouterr().err
