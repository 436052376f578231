"""prune_channels on the op patterns of architectures outside the first zoo: structure of the
groups, the rewritten graph, and numbers against the masked original, one tiny graph each."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import graphpress as gp
from graphpress.analysis.channels.solver import ChannelAnalysis, ChannelGroup
from graphpress.frontends import trace
from graphpress.ir.program import Program
from graphpress.passes import PassContext, PruneChannels
from graphpress.testing import assert_equivalent
from graphpress.testing.zoo import _FusedQKVBlock, _WeightStandardizedConv2d


def _prune(model: nn.Module, *inputs: torch.Tensor, **options: object
           ) -> tuple[Program, Program, Program]:
    """(pruned, masked original, original); the pruned program equals the masked original."""
    torch.manual_seed(0)
    program = trace(model.eval(), inputs)
    before = program.copy()
    p = PruneChannels(**{"ratio": 0.5, **options})
    masked = p.reference(before, p.run(program, PassContext()))
    assert_equivalent(program, masked, inputs, rtol=1e-5, atol=1e-5)
    assert (program(*inputs) - before(*inputs)).abs().max() > 1e-4   # something was removed
    return program, masked, before


def _group(analysis: ChannelAnalysis, weight: str, axis: int) -> ChannelGroup:
    found = [g for g in analysis.groups
             if any(s.weight == weight and s.axis == axis for s in g.slices)]
    assert len(found) == 1, (weight, axis, found)
    return found[0]


def _nodes(program: Program, op: str) -> list[torch.fx.Node]:
    return [n for n in program.graph.nodes if n.op == "call_function" and op in str(n.target)]


class Conv1D(nn.Module):
    """GPT-2's linear layer: weight stored [in, out], applied as addmm(bias, x, W)."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_in, n_out) * 0.3)
        self.bias = nn.Parameter(torch.randn(n_out) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.addmm(self.bias, x.view(-1, x.shape[-1]), self.weight)
        return out.view(*x.shape[:-1], -1)


class Conv1DMlp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc, self.proj = Conv1D(6, 16), Conv1D(16, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(x)))


def test_addmm_with_a_transposed_weight_prunes_like_a_linear() -> None:
    x = torch.randn(2, 5, 6)
    analysis = gp.analysis.channel_groups(trace(Conv1DMlp().eval(), (x,)))
    g = _group(analysis, "fc.weight", 1)
    assert g.prunable and {(s.weight, s.axis) for s in g.slices} == {
        ("fc.weight", 1), ("fc.bias", 0), ("proj.weight", 0)}
    pruned, _, _ = _prune(Conv1DMlp(), x)
    w = pruned.weights()
    assert w["fc.weight"].shape == (6, 8) and w["proj.weight"].shape == (8, 6)


class AsViews(nn.Module):
    """LeViT's BatchNorm after a linear (``bn(h.flatten(0, 1)).reshape_as(h)``), ``view_as``
    and ``expand_as`` of a learned scale."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.bn, self.b = nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Linear(8, 3)
        self.scale = nn.Parameter(torch.rand(8) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        h = self.bn(h.flatten(0, 1)).reshape_as(h)
        h = h.relu().view_as(h) * self.scale.view(1, 1, -1).expand_as(h)
        return self.b(h)


def test_reshape_as_view_as_and_expand_as_follow_the_other_tensor() -> None:
    model, x = AsViews(), torch.randn(2, 5, 6)
    with torch.no_grad():
        model.bn.running_mean.uniform_(-1, 1)
        model.bn.bias.uniform_(-1, 1)
    g = _group(gp.analysis.channel_groups(trace(model.eval(), (x,))), "a.weight", 0)
    assert g.prunable
    assert {"bn.weight", "bn.running_var", "scale", "b.weight"} <= set(g.weights)
    pruned, _, _ = _prune(model, x)
    assert pruned.weights()["scale"].shape == (4,)


def test_relative_position_bias_table_couples_with_the_heads() -> None:
    class RelativeBias(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.qkv, self.out = nn.Linear(8, 24), nn.Linear(8, 8)
            self.table = nn.Parameter(torch.randn(7, 4))          # [2N - 1, heads]
            pos = torch.arange(4)
            self.register_buffer("index", pos[:, None] - pos[None, :] + 3, persistent=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            b, n, _ = x.shape
            q, k, v = self.qkv(x).view(b, n, 3, 4, 2).permute(2, 0, 3, 1, 4)
            bias = self.table[self.index.view(-1)].view(n, n, 4).permute(2, 0, 1)
            attn = (q @ k.transpose(-2, -1) + bias.unsqueeze(0)).softmax(-1)
            return self.out((attn @ v).transpose(1, 2).reshape(b, n, 8))

    x = torch.randn(2, 4, 8)
    analysis = gp.analysis.channel_groups(trace(RelativeBias().eval(), (x,)))
    heads = _group(analysis, "table", 1)
    assert heads.prunable and heads.heads and heads.size == 4
    assert ("qkv.weight", 0) in {(s.weight, s.axis) for s in heads.slices}
    rows = _group(analysis, "table", 0)
    assert any(r.startswith("index (node") for r in rows.reasons)
    pruned, _, _ = _prune(RelativeBias(), x)
    assert pruned.weights()["table"].shape == (7, 2)
    assert pruned.weights()["qkv.weight"].shape == (12, 8)


def test_fused_qkv_split_into_unequal_parts_is_rewritten_per_part() -> None:
    x = torch.randn(2, 6, 32)
    pruned, _, _ = _prune(_FusedQKVBlock(32), x)
    w = pruned.weights()
    assert w["qkv.weight"].shape == (32, 32)      # q 32 -> 16, k and v 16 -> 8: whole heads
    assert w["kv.weight"].shape == (16, 32)
    sizes = [n.args[1] for n in _nodes(pruned, "split_with_sizes")]
    assert [16, 8, 8] in sizes and [8, 8] in sizes


class GroupNormNet(nn.Module):
    def __init__(self, groups: int = 4) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 16, 3), nn.Conv2d(16, 4, 1)
        self.norm = nn.GroupNorm(groups, 16)
        with torch.no_grad():
            self.norm.weight.uniform_(0.5, 1.5)
            self.norm.bias.uniform_(-1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(F.relu(self.norm(self.a(x))))


def test_group_norm_loses_whole_groups_and_its_num_groups_follows() -> None:
    x = torch.randn(2, 3, 8, 8)
    g = _group(gp.analysis.channel_groups(trace(GroupNormNet().eval(), (x,))), "a.weight", 0)
    assert g.prunable and g.size == 4 and {s.rep for s in g.slices} == {4}
    pruned, _, _ = _prune(GroupNormNet(), x)
    assert pruned.weights()["norm.weight"].shape == (8,)
    assert _nodes(pruned, "group_norm")[0].args[1] == 2


def test_group_norm_refusals_name_the_constraint() -> None:
    x = torch.randn(2, 3, 8, 8)
    one = _group(gp.analysis.channel_groups(trace(GroupNormNet(1).eval(), (x,))), "a.weight", 0)
    assert not one.prunable and any("num_groups=1" in r for r in one.reasons)

    class Straddles(nn.Module):            # channels 0..5 | 6..15 cut a group of 4 at 6
        def __init__(self) -> None:
            super().__init__()
            self.a, self.c = nn.Conv2d(3, 6, 1), nn.Conv2d(3, 10, 1)
            self.norm, self.b = nn.GroupNorm(4, 16), nn.Conv2d(16, 4, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b(self.norm(torch.cat([self.a(x), self.c(x)], 1)))

    g = _group(gp.analysis.channel_groups(trace(Straddles().eval(), (x,))), "a.weight", 0)
    assert not g.prunable
    assert any("group_norm (node" in r and "straddle a group boundary" in r for r in g.reasons)


def _shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    n, c, h, w = x.shape
    return x.view(n, groups, c // groups, h, w).transpose(1, 2).reshape(n, c, h, w)


class Shuffle(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(_shuffle(F.relu(self.a(x)), 2))


def test_channel_shuffle_prunes_the_same_local_channels_in_every_group() -> None:
    x = torch.randn(2, 3, 4, 4)
    g = _group(gp.analysis.channel_groups(trace(Shuffle().eval(), (x,))), "a.weight", 0)
    assert g.prunable and g.size == 4
    assert {(s.axis, s.offset, s.rep) for s in g.slices if s.weight == "a.weight"} == {
        (0, 0, 1), (0, 4, 1)}
    assert {(s.offset, s.rep) for s in g.slices if s.weight == "b.weight"} == {(0, 2)}
    pruned, _, before = _prune(Shuffle(), x, importance="l1")
    kept = [i for i in range(8) if any(torch.equal(pruned.weights()["a.weight"][j],
                                                   before.weights()["a.weight"][i])
                                       for j in range(4))]
    local = sorted({i % 4 for i in kept})
    assert len(local) == 2 and kept == local + [j + 4 for j in local]   # same j in both groups


class WeightStandardized(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.ws = _WeightStandardizedConv2d(3, 8, 3, padding=1)
        self.ws2 = _WeightStandardizedConv2d(8, 8, 1)
        self.c = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(F.relu(self.ws2(F.relu(self.ws(x)))))


def test_weight_standardized_conv_keeps_its_output_channels_prunable() -> None:
    x = torch.randn(2, 3, 6, 6)
    analysis = gp.analysis.channel_groups(trace(WeightStandardized().eval(), (x,)))
    assert _group(analysis, "ws2.weight", 0).prunable     # read by a plain conv
    into_ws2 = _group(analysis, "ws.weight", 0)           # read by ws2's standardization
    assert not into_ws2.prunable
    assert any("batch_norm (node" in r and "training mode" in r for r in into_ws2.reasons)
    pruned, _, _ = _prune(WeightStandardized(), x)
    assert pruned.weights()["ws2.weight"].shape == (4, 8, 1, 1)
    assert pruned.weights()["c.weight"].shape == (4, 4, 1, 1)


class GlobalResponseNorm(nn.Module):
    """ConvNeXt-V2's block MLP: linear, GELU, GRN (an L2 norm over space, divided by its mean over
    channels), linear."""

    def __init__(self, before: str = "gelu") -> None:
        super().__init__()
        self.up, self.down = nn.Linear(4, 16), nn.Linear(16, 4)
        self.gamma, self.beta = nn.Parameter(torch.randn(16)), nn.Parameter(torch.randn(16))
        self.act = F.gelu if before == "gelu" else torch.sigmoid

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.up(x))                         # [N, H, W, C]
        g = torch.linalg.vector_norm(h, ord=2, dim=(1, 2), keepdim=True)
        n = g / (g.mean(dim=-1, keepdim=True) + 1e-6)
        return self.down(self.gamma * (h * n) + self.beta + h)


def test_grn_mean_over_zero_channels_keeps_its_count() -> None:
    x = torch.randn(2, 3, 3, 4)
    g = _group(gp.analysis.channel_groups(trace(GlobalResponseNorm().eval(), (x,))),
               "up.weight", 0)
    assert g.prunable and {"gamma", "beta", "down.weight"} <= set(g.weights)
    pruned, _, _ = _prune(GlobalResponseNorm(), x)
    assert not _nodes(pruned, "mean")                     # sum / 16: the unpruned count
    divisor = [n for n in _nodes(pruned, "div") if n.args[1] == 16]
    assert len(divisor) == 1 and "sum" in str(divisor[0].args[0].target)


def test_a_mean_over_channels_that_are_not_zero_blocks() -> None:
    x = torch.randn(2, 3, 3, 4)
    g = _group(gp.analysis.channel_groups(trace(GlobalResponseNorm("sigmoid").eval(), (x,))),
               "up.weight", 0)
    assert not g.prunable
    assert any(r.startswith("mean (node") and "reduces over this dimension" in r
               for r in g.reasons)


@pytest.mark.parametrize("op", ["sum", "norm"])
def test_sums_and_norms_over_zero_channels_are_exact(op: str) -> None:
    class Pooled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 4, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = F.relu(self.a(x))
            s = h.sum(1, keepdim=True) if op == "sum" else torch.linalg.vector_norm(
                h, 3, dim=1, keepdim=True)
            return self.b(h / (1 + s))

    pruned, _, _ = _prune(Pooled(), torch.randn(2, 3, 4, 4))
    assert pruned.weights()["a.weight"].shape[0] == 4
