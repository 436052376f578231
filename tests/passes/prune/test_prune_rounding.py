"""choose_round_to: the pruned layer shapes it times per candidate, and the choice it makes from
the timer's answers (a deterministic timer here; the real one only for its structure)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from graphpress.analysis.channels.solver import ChannelGroup, ChannelSlice
from graphpress.frontends import trace
from graphpress.passes import PassContext, PruneChannels
from graphpress.passes.prune.rounding import Layer, choose_round_to, eager_seconds, rounded_keep


class ConvNet(nn.Module):
    """conv 3 -> 12 (prunable), depthwise 12, conv 12 -> 20 (prunable), linear 20 -> 5."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 12, 3, padding=1)
        self.dw = nn.Conv2d(12, 12, 3, padding=1, groups=12)
        self.conv2 = nn.Conv2d(12, 20, 3, stride=2)
        self.fc = nn.Linear(20, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.conv2(F.relu(self.dw(F.relu(self.conv1(x))))))
        return self.fc(h.mean((2, 3)))


def _program():
    torch.manual_seed(0)
    return trace(ConvNet().eval(), (torch.randn(1, 3, 8, 8),))


def _fast_multiples_of_8(layer: Layer, repeats: int) -> float:
    """MACs, three times as slow when a pruned channel count (not the fixed 3 inputs or 5
    logits) is not a multiple of 8."""
    channels = (layer.weight[0], layer.input[1] if layer.op != "linear" else layer.input[-1])
    return layer.macs * (1 if all(c % 8 == 0 or c in (3, 5) for c in channels) else 3)


def test_shapes_per_candidate_follow_the_pass_rounding():
    seen: list[Layer] = []

    def record(layer: Layer, repeats: int) -> float:
        seen.append(layer)
        return 1.0

    choice = choose_round_to(_program(), PruneChannels(ratio=0.5), candidates=(1, 8),
                             timer=record)
    assert choice.layers == 4
    # ratio 0.5: 12 -> 6 and 20 -> 10 channels; round_to 8: 8 and 16
    conv1 = [layer.weight for layer in seen if layer.weight[1:] == (3, 3, 3)]
    assert conv1 == [(6, 3, 3, 3), (8, 3, 3, 3)]
    depthwise = [(layer.weight, layer.groups) for layer in seen if layer.weight[1] == 1]
    assert depthwise == [((6, 1, 3, 3), 6), ((8, 1, 3, 3), 8)]
    fc = [layer.weight for layer in seen if layer.op == "linear"]
    assert fc == [(5, 10), (5, 16)]
    assert choice.macs[8] > choice.macs[1]
    # identical shapes are timed once: every candidate here has its own shapes
    assert len(seen) == 8


def test_chooses_the_fastest_candidate_and_the_pass_keeps_its_multiples():
    program = _program()
    choice = choose_round_to(program, PruneChannels(ratio=0.5), candidates=(1, 4, 8),
                             timer=_fast_multiples_of_8)
    assert choice.best == 8
    assert choice.seconds[8] < choice.seconds[1]
    result = PruneChannels(ratio=0.5, round_to=choice.best).run(program, PassContext())
    assert all(len(g.keep) % 8 == 0 for g in result.details["plan"].groups)


def test_tie_goes_to_the_smaller_multiple():
    choice = choose_round_to(_program(), PruneChannels(ratio=0.5), candidates=(1, 8),
                             timer=lambda layer, repeats: 1.0)
    assert choice.best == 1
    assert "| 8 |" in choice.table()


def test_eager_timer_runs_each_layer():
    layer = Layer("conv2d", (1, 4, 8, 8), (6, 4, 3, 3), (1, 1), (1, 1), (1, 1), 1,
                  macs=6 * 4 * 9 * 64)
    seconds = eager_seconds(layer, 3)
    assert 0 < seconds < 1
    out = layer.call()()
    assert out.shape == (1, 6, 8, 8)
    choice = choose_round_to(_program(), PruneChannels(ratio=0.3), candidates=(1, 4),
                             repeats=2)
    assert set(choice.seconds) == {1, 4} and all(s > 0 for s in choice.seconds.values())
    assert choice.macs[1] == min(choice.macs.values())
    assert math.isfinite(choice.seconds[choice.best])


def test_refusals():
    program = _program()
    with pytest.raises(ValueError, match="global_ranking"):
        choose_round_to(program, PruneChannels(ratio=0.5, global_ranking=True))
    with pytest.raises(ValueError, match="candidates"):
        choose_round_to(program, PruneChannels(ratio=0.5), candidates=(0, 8))


def test_rounded_keep_counts_elements_per_slice():
    def group(*reps: int, size: int = 12) -> ChannelGroup:
        return ChannelGroup(0, size, [ChannelSlice(f"w{i}", 0, 0, r) for i, r in enumerate(reps)])

    assert rounded_keep(group(1, 1), 6, 8) == 8            # plain channels: a multiple of 8
    assert rounded_keep(group(64, 64), 5, 8) == 5          # heads of head_dim 64: as they are
    assert rounded_keep(group(1, 64), 5, 8) == 8           # one plain slice decides
    assert rounded_keep(group(4, 4), 5, 8) == 6            # 4 elements each: an even count
    assert rounded_keep(group(1), 11, 8) == 12             # at most the group
    assert rounded_keep(group(64), 0, 128) == 2            # at least one step
