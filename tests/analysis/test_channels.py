"""Channel dependency analysis on tiny graphs: one test per coupling rule and per refusal."""

from __future__ import annotations

import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import graphpress as gp
from graphpress.analysis.channels.rules import RULES
from graphpress.analysis.channels.solver import ChannelAnalysis, ChannelGroup
from graphpress.frontends import trace
from graphpress.ops.registry import define_op


def _groups(model: nn.Module, *inputs: torch.Tensor) -> ChannelAnalysis:
    return gp.analysis.channel_groups(trace(model.eval(), inputs))


def _group_of(analysis: ChannelAnalysis, weight: str, axis: int) -> ChannelGroup:
    found = [g for g in analysis.groups
             if any(s.weight == weight and s.axis == axis for s in g.slices)]
    assert len(found) == 1, f"{weight}[{axis}] in {len(found)} groups"
    return found[0]


def _members(group: ChannelGroup) -> set[tuple[str, int]]:
    return {(s.weight, s.axis) for s in group.slices}


class ConvBnConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.bn, self.b = nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(F.relu(self.bn(self.a(x))))


def test_conv_bn_conv_couples_producer_norm_and_consumer() -> None:
    analysis = _groups(ConvBnConv(), torch.randn(1, 3, 8, 8))
    g = _group_of(analysis, "a.weight", 0)
    assert g.prunable and g.size == 8
    assert _members(g) == {("a.weight", 0), ("a.bias", 0), ("bn.weight", 0), ("bn.bias", 0),
                           ("bn.running_mean", 0), ("bn.running_var", 0), ("b.weight", 1)}
    out = _group_of(analysis, "b.weight", 0)
    assert not out.prunable and any("model output" in r for r in out.reasons)
    inp = _group_of(analysis, "a.weight", 1)
    assert any("model input" in r for r in inp.reasons)


class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 8, 3, padding=1)
        self.c = nn.Conv2d(8, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.a(x)
        return self.c(y + self.b(y))


def test_residual_add_couples_both_branches() -> None:
    g = _group_of(_groups(Residual(), torch.randn(1, 3, 6, 6)), "a.weight", 0)
    assert {("a.weight", 0), ("b.weight", 0), ("b.weight", 1), ("c.weight", 1)} <= _members(g)
    assert g.prunable


class Concat(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 6, 1), nn.Conv2d(10, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(torch.cat([self.a(x), self.b(x)], dim=1))


def test_cat_gives_each_producer_its_offset_range_in_the_consumer() -> None:
    analysis = _groups(Concat(), torch.randn(1, 3, 4, 4))
    ga, gb = _group_of(analysis, "a.weight", 0), _group_of(analysis, "b.weight", 0)
    assert ga.id != gb.id and ga.size == 4 and gb.size == 6
    assert ("c.weight", 1, 0) in {(s.weight, s.axis, s.offset) for s in ga.slices}
    assert ("c.weight", 1, 4) in {(s.weight, s.axis, s.offset) for s in gb.slices}


class Split(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(3, 10, 1), nn.Conv2d(4, 2, 1), nn.Conv2d(6, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u, v = torch.split(self.a(x), [4, 6], dim=1)
        return self.b(u) + self.c(v)


def test_split_cuts_the_producer_into_ranges() -> None:
    analysis = _groups(Split(), torch.randn(1, 3, 4, 4))
    ranges = sorted((g.size, s.offset) for g in analysis.groups for s in g.slices
                    if s.weight == "a.weight" and s.axis == 0)
    assert ranges == [(4, 0), (6, 4)]
    assert all(g.prunable for g in analysis.groups if "b.weight" in g.weights
               and any(s.axis == 1 for s in g.slices))


class Depthwise(nn.Module):
    def __init__(self, groups: int) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=groups)
        self.b = nn.Conv2d(8, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.dw(self.a(x)))


def test_depthwise_conv_couples_its_input_and_output_channels() -> None:
    g = _group_of(_groups(Depthwise(8), torch.randn(1, 3, 4, 4)), "a.weight", 0)
    assert {("a.weight", 0), ("dw.weight", 0), ("dw.bias", 0), ("b.weight", 1)} <= _members(g)
    assert g.prunable


def test_grouped_conv_keeps_the_same_local_channels_in_every_group() -> None:
    g = _group_of(_groups(Depthwise(2), torch.randn(1, 3, 4, 4)), "dw.weight", 1)
    assert g.size == 4 and g.prunable
    assert {("a.weight", 0, 0), ("a.weight", 0, 4), ("dw.weight", 1, 0)} <= {
        (s.weight, s.axis, s.offset) for s in g.slices}


class ConvTranspose(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up, self.b = nn.ConvTranspose2d(3, 6, 2, stride=2), nn.Conv2d(6, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.up(x))


def test_transposed_conv_creates_channels_on_weight_axis_1() -> None:
    g = _group_of(_groups(ConvTranspose(), torch.randn(1, 3, 4, 4)), "up.weight", 1)
    assert _members(g) == {("up.weight", 1), ("up.bias", 0), ("b.weight", 1)} and g.prunable


class FlattenLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.fc = nn.Conv2d(3, 4, 1), nn.Linear(4 * 9, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(F.max_pool2d(self.a(x), 2), 1))


def test_flatten_maps_a_channel_to_its_spatial_block() -> None:
    g = _group_of(_groups(FlattenLinear(), torch.randn(1, 3, 6, 6)), "a.weight", 0)
    assert ("fc.weight", 1, 0, 9) in {(s.weight, s.axis, s.offset, s.rep) for s in g.slices}
    assert g.prunable


class Heads(nn.Module):
    def __init__(self, kv_heads: int = 2) -> None:
        super().__init__()
        self.kv = kv_heads
        self.q, self.k, self.v = nn.Linear(8, 8), nn.Linear(8, 2 * kv_heads), nn.Linear(8, 8)
        self.norm, self.o = nn.LayerNorm(8), nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        x = self.norm(x)
        q = self.q(x).view(b, n, 4, 2).transpose(1, 2)
        k = self.k(x).view(b, n, self.kv, 2).transpose(1, 2)
        v = self.v(x)[..., : 2 * self.kv].view(b, n, self.kv, 2).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, enable_gqa=self.kv != 4)
        return self.o(y.transpose(1, 2).reshape(b, n, 8))


def test_attention_heads_couple_whole_and_layer_norm_blocks() -> None:
    analysis = _groups(Heads(kv_heads=4), torch.randn(1, 3, 8))
    heads = _group_of(analysis, "q.weight", 0)
    assert heads.prunable and heads.heads and heads.size == 4
    assert {(s.weight, s.axis, s.rep) for s in heads.slices} >= {
        ("q.weight", 0, 2), ("k.weight", 0, 2), ("o.weight", 1, 2)}
    norm = _group_of(analysis, "norm.weight", 0)
    assert any("layer_norm" in r and "normalises" in r for r in norm.reasons)


def test_grouped_query_attention_keeps_a_kv_head_with_its_query_heads() -> None:
    heads = _group_of(_groups(Heads(kv_heads=2), torch.randn(1, 3, 8)), "k.weight", 0)
    assert heads.size == 2 and heads.prunable
    assert ("q.weight", 0, 4) in {(s.weight, s.axis, s.rep) for s in heads.slices}


class Unknown(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 1), nn.Conv2d(4, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.flip(self.a(x), [1]))


def test_op_without_rule_blocks_its_group_and_names_op_and_node() -> None:
    g = _group_of(_groups(Unknown(), torch.randn(1, 3, 4, 4)), "a.weight", 0)
    assert not g.prunable
    assert "no channel rule for flip (node flip)" in g.reasons


class Embed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb, self.fc1, self.fc2 = nn.Embedding(10, 6), nn.Linear(6, 5), nn.Linear(5, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(self.emb(ids))))


def test_embedding_dim_and_linear_chain() -> None:
    analysis = _groups(Embed(), torch.tensor([[1, 2, 3]]))
    g = _group_of(analysis, "emb.weight", 1)
    assert _members(g) == {("emb.weight", 1), ("fc1.weight", 1)} and g.prunable
    hidden = _group_of(analysis, "fc1.weight", 0)
    assert _members(hidden) == {("fc1.weight", 0), ("fc1.bias", 0), ("fc2.weight", 1)}


def test_analysis_is_cached_and_listed() -> None:
    program = trace(ConvBnConv().eval(), (torch.randn(1, 3, 8, 8),))
    assert program.analysis("channel_groups") is program.analysis("channel_groups")
    assert "channel_groups" in gp.ir.ANALYSES


def test_networkx_view_links_groups_and_weights() -> None:
    analysis = _groups(Concat(), torch.randn(1, 3, 4, 4))
    graph = analysis.to_networkx()
    group = _group_of(analysis, "b.weight", 0)
    assert graph.edges[("group", group.id), "c.weight"]["slices"] == [(1, 4, 1)]
    assert graph.nodes[("group", group.id)]["prunable"]


class LinearToConv1d(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc, self.conv, self.out = nn.Linear(6, 32), nn.Conv1d(4, 4, 3), nn.Linear(24, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.conv(self.fc(x).unflatten(1, (4, 8))).flatten(1))


def test_unflatten_into_channels_and_length() -> None:
    x = torch.randn(2, 6)
    analysis = _groups(LinearToConv1d(), x)
    fc = _group_of(analysis, "fc.weight", 0)
    assert fc.prunable and fc.size == 4 and ("fc.weight", 0, 0, 8) in {
        (s.weight, s.axis, s.offset, s.rep) for s in fc.slices}
    # read as (heads, head_dim), the 8 positions land on the conv's length: never pruned
    fc = _group_of(gp.analysis.channel_groups(trace(LinearToConv1d().eval(), (x,)), head_dim=True),
                   "fc.bias", 0)
    assert any("spatial dim of conv1d" in r for r in fc.reasons)


class EagerAttention(nn.Module):
    """Attention written with matmul, as Hugging Face ``attn_implementation="eager"`` does."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(8, 8) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = (p(x).view(b, n, 4, 2).transpose(1, 2) for p in (self.q, self.k, self.v))
        s = (q @ k.transpose(-2, -1)) * 0.7
        return self.o((s.softmax(-1) @ v).transpose(1, 2).reshape(b, n, 8))


def test_matmul_attention_couples_the_heads_of_q_k_and_v() -> None:
    heads = _group_of(_groups(EagerAttention(), torch.randn(2, 3, 8)), "q.weight", 0)
    assert heads.prunable and heads.heads and heads.size == 4
    assert {(s.weight, s.axis, s.rep) for s in heads.slices} >= {
        ("q.weight", 0, 2), ("k.weight", 0, 2), ("v.weight", 0, 2), ("o.weight", 1, 2)}
    # head_dim mode: q k^T contracts head_dim, so q's and k's positions couple; v's reach o
    analysis = gp.analysis.channel_groups(trace(EagerAttention().eval(), (torch.randn(2, 3, 8),)),
                                          head_dim=True)
    assert {("q.weight", 0), ("k.weight", 0)} <= _members(_group_of(analysis, "q.weight", 0))
    assert {("v.weight", 0), ("o.weight", 1)} <= _members(_group_of(analysis, "v.weight", 0))


class MatmulWeight(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 8), nn.Linear(6, 2)
        self.w = nn.Parameter(torch.randn(8, 6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(torch.relu(self.a(x)) @ self.w))


def test_matmul_contraction_couples_its_operands() -> None:
    analysis = _groups(MatmulWeight(), torch.randn(2, 3, 4))
    inner = _group_of(analysis, "a.weight", 0)
    assert _members(inner) == {("a.weight", 0), ("a.bias", 0), ("w", 0)} and inner.prunable
    out = _group_of(analysis, "w", 1)
    assert _members(out) == {("w", 1), ("b.weight", 1)} and out.prunable


class BroadcastKey(nn.Module):
    """One key head broadcast against four query heads by matmul's batch broadcasting."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.o = nn.Linear(8, 8), nn.Linear(8, 2), nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q = self.q(x).view(b, n, 4, 2).transpose(1, 2)
        k = self.k(x).view(b, n, 1, 2).transpose(1, 2)
        s = (q @ k.transpose(-2, -1)).softmax(-1)
        return self.o((s @ q).transpose(1, 2).reshape(b, n, 8))


def test_matmul_batch_broadcast_blocks_with_a_reason() -> None:
    heads = _group_of(_groups(BroadcastKey(), torch.randn(2, 3, 8)), "q.weight", 0)
    assert not heads.prunable
    assert any("matmul" in r and "broadcast" in r for r in heads.reasons), heads.reasons


class Norms(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv1d(3, 8, 1), nn.Conv1d(8, 4, 1)
        self.c, self.d = nn.Conv1d(3, 6, 1), nn.Conv1d(6, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x).sigmoid()          # normalised over channels (dim 1), nonzero if removed
        h = h / torch.ops.aten.norm(h, 2, [1], True)
        g = self.c(x)                                    # normalised over length (dim 2)
        g = g / torch.linalg.vector_norm(g, 2, dim=2, keepdim=True)
        return self.b(h) + self.d(g)


def test_norm_family_reads_its_dim_argument() -> None:
    analysis = _groups(Norms(), torch.randn(2, 3, 5))
    over_channels = _group_of(analysis, "a.weight", 0)
    assert not over_channels.prunable
    assert any(r.startswith("norm (node") and "reduces" in r for r in over_channels.reasons)
    assert _group_of(analysis, "c.weight", 0).prunable


@torch.library.custom_op("mylib::linear", mutates_args=())
def _my_linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return x @ w.t() + b


@_my_linear.register_fake
def _(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], w.shape[0])


class CustomLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(4, 8), nn.Linear(8, 6), nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.a(x))
        return self.c(torch.relu(_my_linear(h, self.b.weight, self.b.bias)))


def test_rules_match_the_qualified_op_name() -> None:
    analysis = _groups(CustomLinear(), torch.randn(2, 4))
    for weight, axis in (("a.weight", 0), ("b.weight", 0)):
        g = _group_of(analysis, weight, axis)
        assert not g.prunable
        assert any("no channel rule for mylib::linear" in r for r in g.reasons), g.reasons


def _scale(x: torch.Tensor, s: float) -> torch.Tensor:
    """x * s, elementwise."""
    return x * s


def _scale_fake(x: torch.Tensor, s: float) -> torch.Tensor:
    return torch.empty_like(x)


_CHANNEL_SCALE = define_op("gptest_channels::scale", _scale, fake=_scale_fake,
                           channel_rule=RULES["relu"])      # elementwise: channels pass through
_NO_RULE_SCALE = define_op("gptest_channels::scale_no_rule", _scale, fake=_scale_fake)


class RegistryOps(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(4, 8), nn.Linear(8, 6), nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = _CHANNEL_SCALE.op(self.a(x), 2.0)
        return self.c(_NO_RULE_SCALE.op(self.b(h), 3.0))


def test_custom_ops_get_the_channel_rule_of_their_registry_entry() -> None:
    analysis = _groups(RegistryOps(), torch.randn(2, 4))
    ruled = _group_of(analysis, "a.weight", 0)
    assert ruled.prunable and ("b.weight", 1) in _members(ruled)
    unruled = _group_of(analysis, "b.weight", 0)
    assert any("no channel rule for gptest_channels::scale_no_rule" in r
               for r in unruled.reasons), unruled.reasons


def test_without_the_op_library_custom_ops_have_no_rule(monkeypatch: pytest.MonkeyPatch) -> None:
    program = trace(RegistryOps().eval(), (torch.randn(2, 4),))
    monkeypatch.setitem(sys.modules, "graphpress.ops.registry", None)   # import fails
    ruled = _group_of(gp.analysis.channel_groups(program), "a.weight", 0)
    assert "no channel rule for gptest_channels::scale (node scale)" in ruled.reasons


class NormedStream(nn.Module):
    """A residual stream normalised by a LayerNorm and by an RMSNorm written out."""

    def __init__(self) -> None:
        super().__init__()
        self.inp, self.ln = nn.Linear(3, 8), nn.LayerNorm(8)
        self.mlp, self.rms, self.out = nn.Linear(8, 8), nn.Parameter(torch.ones(8)), nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        h = h + self.mlp(self.ln(h))
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6) * self.rms
        return self.out(h)


def test_hidden_mode_lets_the_stream_normalisations_pass_and_lists_them() -> None:
    program = trace(NormedStream().eval(), (torch.randn(2, 3),))
    stream = _group_of(gp.analysis.channel_groups(program), "inp.weight", 0)
    assert not stream.prunable and any("layer_norm" in r for r in stream.reasons)
    assert any("mean" in r and "reduces" in r for r in stream.reasons)
    hidden = gp.analysis.channel_groups(program, hidden=True)
    stream = _group_of(hidden, "inp.weight", 0)
    assert stream.prunable and stream.size == 8
    assert _members(stream) >= {("inp.weight", 0), ("inp.bias", 0), ("ln.weight", 0),
                                ("ln.bias", 0), ("mlp.weight", 1), ("mlp.weight", 0),
                                ("mlp.bias", 0), ("rms", 0), ("out.weight", 1)}
    ops = {name: str(next(n.target for n in program.graph.nodes if n.name == name))
           for name in hidden.normalized}
    assert sorted(ops.values()) == ["aten.layer_norm.default", "aten.mean.dim"]
    assert set(hidden.normalized.values()) == {1}


class ThreeWaySplit(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 12)
        self.b, self.c, self.d = nn.Linear(2, 3), nn.Linear(4, 3), nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u, v, w = torch.split(self.a(x), [2, 4, 6], dim=-1)
        _, r = torch.split(self.a(x), [3, 9], dim=-1)        # a second split, other cuts
        return self.b(u) + self.c(v) + self.d(w) + r.sum(-1, keepdim=True)


def test_a_split_asks_for_all_its_cuts_in_one_round(monkeypatch: pytest.MonkeyPatch) -> None:
    """Both splits' boundaries inside the one atom of ``a``'s outputs are asked for in the first
    round, the second split's although the first already asked for a rerun: one rerun. Made
    within the round (nothing but a linear read ``a``'s outputs yet), no rerun at all."""
    from graphpress.analysis.channels import regrain

    program = trace(ThreeWaySplit().eval(), (torch.randn(2, 4),))
    within = gp.analysis.channel_groups(program)
    monkeypatch.setattr(regrain, "cut_in_place", lambda *args: None)
    requested = gp.analysis.channel_groups(program)
    for analysis, rounds in ((within, 1), (requested, 2)):
        ranges = sorted((s.offset, g.size) for g in analysis.groups for s in g.slices
                        if s.weight == "a.weight" and s.axis == 0)
        assert ranges == [(0, 2), (2, 1), (3, 3), (6, 6)]
        assert analysis.rounds == rounds
        assert not any("(rerun)" in r for g in analysis.groups for r in g.reasons)


@pytest.mark.parametrize("name", ["hf_gpt2", "minilm", "fused_qkv_net"])
def test_head_dim_mode_converges_on_fused_and_split_projections(name: str) -> None:
    """In head_dim mode every head is cut at its head_dim boundaries: all of them in one round
    (one at a time took more rounds than the analysis allows, leaving groups blocked)."""
    from graphpress.testing.zoo import get_model

    program = trace(*get_model(name).make())
    analysis = gp.analysis.channel_groups(program, head_dim=True)
    assert analysis.rounds <= 3
    assert not any("(rerun)" in r for g in analysis.groups for r in g.reasons)
    assert any(g.prunable and not g.heads for g in analysis.groups
               if any("attn" in w or "qkv" in w or "query" in w for w in g.weights))


def _zoo_names() -> list[str]:
    from graphpress.testing.zoo import zoo_models

    return [z.name for z in zoo_models()]


@pytest.mark.parametrize("name", _zoo_names())
def test_refinements_within_a_round_equal_the_rerun(name: str,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Whole heads and norm groups, the cuts of a freshly sliced weight and the cuts of a split
    made within a round (``regrain.py``) give the groups, reasons and layouts the rerun gives, in
    every mode, in no more rounds."""
    from graphpress.analysis.channels import regrain
    from graphpress.testing.zoo import get_model

    program = trace(*get_model(name).make())
    modes = [{}, {"head_dim": True}, {"hidden": True}]
    within = [gp.analysis.channel_groups(program, **mode) for mode in modes]
    monkeypatch.setattr(regrain, "regrain_in_place", lambda *args: None)
    monkeypatch.setattr(regrain, "cut_fresh_weight", lambda *args: None)
    monkeypatch.setattr(regrain, "cut_in_place", lambda *args: None)
    rerun = [gp.analysis.channel_groups(program, **mode) for mode in modes]
    for a, b in zip(within, rerun, strict=True):
        assert [(g.size, g.slices, g.reasons, g.heads) for g in a.groups] == \
            [(g.size, g.slices, g.reasons, g.heads) for g in b.groups]
        assert a.layouts == b.layouts and a.normalized == b.normalized
        assert a.rounds <= b.rounds
    if name == "hf_bert":       # the rerun was taken: heads and position ids asked for one
        assert within[0].rounds == 1 < rerun[0].rounds == 2


def test_head_views_of_projections_need_no_rerun() -> None:
    """Attention whose q, k, v come from linear layers reshaped into heads, GPT-2's fused
    c_attn split into q, k, v, and BERT's sliced position ids: one round."""
    from graphpress.testing.zoo import get_model

    for name in ("hf_bert", "hf_vit", "hf_gpt2", "bmm_attention_net", "mlp_1d_bn"):
        analysis = gp.analysis.channel_groups(trace(*get_model(name).make()))
        assert analysis.rounds == 1, name
        assert any(g.heads and g.prunable for g in analysis.groups) or name == "mlp_1d_bn"


def test_the_analysis_leaves_no_cyclic_garbage() -> None:
    """Every object of an analysis is freed by reference counting: a reference cycle (a
    recursive closure over the tracer did this) leaves it to the cyclic collector, whose
    collections then land in later, unrelated calls."""
    import gc

    from graphpress.testing.zoo import get_model

    model, inputs = get_model("depthwise_grouped_net").make()
    program = trace(model, inputs)
    gp.analysis.channel_groups(program)
    gc.collect()
    enabled = gc.isenabled()
    gc.disable()
    try:
        gp.analysis.channel_groups(program)
        assert gc.collect() == 0
    finally:
        if enabled:
            gc.enable()
