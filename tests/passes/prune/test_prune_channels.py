"""prune_channels on tiny graphs: shapes, numbers against the masked original, options, errors."""

from __future__ import annotations

import operator
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import graphpress as gp
from graphpress.frontends import trace
from graphpress.ir.program import Program
from graphpress.passes import PassContext, PruneChannels
from graphpress.passes.prune.plan import GroupPlan, PrunePlan
from graphpress.testing import assert_equivalent
from graphpress.testing.zoo import get_model


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.bn = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.b, self.c = nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 12, 1)
        self.fc = nn.Linear(12 * 4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn(self.a(x)))
        y = y + F.relu(self.b(y))                     # residual: a and b share channels
        u, v = torch.split(self.c(y), [4, 8], dim=1)  # split sizes must be rewritten
        y = torch.cat([u.sigmoid(), v], dim=1)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(y, 2), 1))


def _net() -> tuple[nn.Module, tuple[torch.Tensor]]:
    model = Net().eval()
    with torch.no_grad():
        model.bn.running_mean.uniform_(-1, 1)
        model.bn.running_var.uniform_(0.5, 2)
        model.bn.bias.uniform_(-1, 1)
    return model, (torch.randn(2, 3, 8, 8),)


def _run(p: PruneChannels, program: Program) -> tuple[Program, Program]:
    before = program.copy()
    result = p.run(program, PassContext())
    return before, p.reference(before, result)


def test_prunes_coupled_weights_and_equals_masked_original() -> None:
    model, inputs = _net()
    program = trace(model, inputs)
    before, masked = _run(PruneChannels(ratio=0.5), program)
    w = program.weights()
    assert w["a.weight"].shape == (4, 3, 3, 3) and w["b.weight"].shape == (4, 4, 3, 3)
    assert w["bn.running_var"].shape == (4,) and w["c.weight"].shape == (6, 4, 1, 1)
    assert w["fc.weight"].shape == (5, 6 * 4)
    split = next(n for n in program.graph.nodes if "split" in str(n.target))
    assert split.args[1] == [2, 4]
    assert program(*inputs).shape == before(*inputs).shape == (2, 5)
    assert_equivalent(program, masked, inputs, rtol=1e-5, atol=1e-5)
    assert (program(*inputs) - before(*inputs)).abs().max() > 1e-3   # pruning did something


def test_pruning_all_zero_channels_changes_nothing() -> None:
    model, inputs = _net()
    with torch.no_grad():                      # channels 0..3 of the residual group are zero
        for p in (model.a.weight, model.a.bias, model.bn.weight, model.bn.bias,
                  model.b.weight, model.b.bias):
            p[:4] = 0
        model.b.weight[:, :4] = 0
        model.c.weight[:, :4] = 0
    program = trace(model, inputs)
    before = program.copy()
    PruneChannels(ratio=0.0, ratios={"a": 0.5}, importance="l1").run(program, PassContext())
    assert program.weights()["a.weight"].shape[0] == 4
    assert_equivalent(program, before, inputs, rtol=1e-6, atol=1e-6)


def test_compile_verify_checks_the_contract() -> None:
    model, inputs = _net()
    compiled = gp.compile(model, inputs, passes="prune_channels(ratio=0.25)", verify=True)
    record = compiled.report().records[-1]
    assert record.parameters[1] < record.parameters[0]
    assert record.stats["groups_pruned"] >= 3
    assert compiled(*inputs).shape == (2, 5)
    plan = compiled.report().details("prune_channels")["plan"]
    assert isinstance(plan, PrunePlan) and plan.removed()
    pruned = [g for g in plan.groups if len(g.keep) < g.size]
    text = str(compiled.report())
    assert "details:" in text
    for group in pruned:
        assert f"{group.size} -> {len(group.keep)} channels" in text


def test_pruned_program_saves_and_loads(tmp_path: Path) -> None:
    model, inputs = _net()
    compiled = gp.compile(model, inputs, passes=[PruneChannels(ratio=0.5)])
    loaded = gp.load(compiled.save(tmp_path / "pruned"))
    assert_equivalent(loaded, compiled, inputs, rtol=0, atol=0)


def test_round_to_ignore_and_per_module_ratios() -> None:
    model, inputs = _net()
    program = trace(model, inputs)
    PruneChannels(ratio=0.5, round_to=3, ignore=("fc",)).run(program, PassContext())
    w = program.weights()
    assert w["a.weight"].shape[0] == 6          # keeps 4 -> rounded up to a multiple of 3
    assert w["c.weight"].shape[0] == 12         # its groups reach the ignored module fc
    program = trace(model, inputs)
    PruneChannels(ratio=0.5, ratios={"a": 0.75}).run(program, PassContext())
    assert program.weights()["a.weight"].shape[0] == 2


@pytest.mark.parametrize("importance", ["l1", "l2", "bn_scale", "random"])
def test_importance_criteria_and_global_ranking(importance: str) -> None:
    model, inputs = _net()
    for global_ranking in (False, True):
        program = trace(model, inputs)
        before, masked = _run(PruneChannels(ratio=0.5, importance=importance,
                                            global_ranking=global_ranking), program)
        assert sum(t.numel() for t in program.weights().values()) < sum(
            t.numel() for t in before.weights().values())
        assert_equivalent(program, masked, inputs, rtol=1e-5, atol=1e-5)


def test_taylor_importance_uses_the_loss_gradient() -> None:
    model, inputs = _net()
    program = trace(model, inputs)
    target = torch.randn(2, 5)
    before, masked = _run(PruneChannels(ratio=0.5, importance="taylor", batches=[inputs],
                                        loss=lambda out: F.mse_loss(out, target)), program)
    assert program.weights()["a.weight"].shape[0] == 4
    assert all(t.grad is None for t in before.state_dict.values()
               if isinstance(t, torch.nn.Parameter))
    assert_equivalent(program, masked, inputs, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="taylor"):
        PruneChannels(importance="taylor").run(trace(model, inputs), PassContext())


def test_custom_importance_keeps_the_top_scores() -> None:
    model, inputs = _net()
    program = trace(model, inputs)
    result = PruneChannels(ratio=0.5, importance=lambda prog, g: torch.arange(g.size)).run(
        program, PassContext())
    assert all(g.keep == list(range(g.size - len(g.keep), g.size))
               for g in result.details["plan"].groups)


def test_bn_scale_keeps_the_largest_gammas() -> None:
    model, inputs = _net()
    with torch.no_grad():
        model.bn.weight.copy_(torch.tensor([5.0, 0.1, 4, 0.1, 3, 0.1, 2, 0.1]))
    program = trace(model, inputs)
    result = PruneChannels(ratio=0.5, importance="bn_scale").run(program, PassContext())
    group = next(g for g in result.details["plan"].groups if g.slices[0][0].startswith("a."))
    assert group.keep == [0, 2, 4, 6]


def test_plan_is_data_saved_and_reapplied_to_a_fresh_checkpoint(tmp_path: Path) -> None:
    model, inputs = _net()
    program = trace(model, inputs)
    plan = PruneChannels(ratio=0.5).run(program, PassContext()).details["plan"]
    plan.save(tmp_path / "plan.json")
    indices = plan.weight_indices(trace(model, inputs))
    assert ("a.weight", 0) in {(w, a) for w, a, _ in indices}
    fresh = trace(model, inputs)
    PruneChannels(plan=PrunePlan.load(tmp_path / "plan.json")).run(fresh, PassContext())
    assert_equivalent(fresh, program, inputs, rtol=0, atol=0)


def test_pruned_program_trains() -> None:
    model, inputs = _net()
    program = trace(model, inputs)
    PruneChannels(ratio=0.5).run(program, PassContext())
    module = program.module()
    opt = torch.optim.SGD(module.parameters(), lr=0.05)
    target = torch.randn(2, 5)
    losses = []
    for _ in range(5):
        loss = F.mse_loss(module(*inputs), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_bad_arguments_are_clear_errors() -> None:
    for ratio in (1.0, -0.1):
        with pytest.raises(ValueError, match="ratio must be in"):
            PruneChannels(ratio=ratio)
    model, inputs = _net()
    with pytest.raises(ValueError, match="'nope' matches no weight"):
        PruneChannels(ignore=("nope",)).run(trace(model, inputs), PassContext())
    with pytest.raises(ValueError, match="nothing prunable"):
        PruneChannels().run(trace(nn.Linear(4, 3).eval(), (torch.randn(2, 4),)), PassContext())


class Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q, self.o = nn.Linear(8, 8), nn.Linear(8, 8)
        self.k, self.v = nn.Linear(8, 4), nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q = self.q(x).view(b, n, 4, 2).transpose(1, 2)
        k = self.k(x).view(b, n, 2, 2).transpose(1, 2)      # GQA: 2 KV heads for 4 query heads
        v = self.v(x).view(b, n, 2, 2).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        return self.o(y.transpose(1, 2).reshape(b, n, 8))


def test_gqa_heads_pruned_whole_or_head_dim() -> None:
    inputs = (torch.randn(2, 5, 8),)
    program = trace(Attention().eval(), inputs)
    _, masked = _run(PruneChannels(ratio=0.5), program)
    w = program.weights()
    assert w["q.weight"].shape == (4, 8) and w["o.weight"].shape == (8, 4)
    assert w["k.weight"].shape == w["v.weight"].shape == (2, 8)
    assert_equivalent(program, masked, inputs, rtol=1e-5, atol=1e-5)
    program = trace(Attention().eval(), inputs)
    _, masked = _run(PruneChannels(ratio=0.5, prune_heads=False), program)
    w = program.weights()          # head_dim 2 -> 1 in all 4 query and 2 KV heads
    assert w["q.weight"].shape == (4, 8) and w["k.weight"].shape == w["v.weight"].shape == (2, 8)
    sdpa = next(n for n in program.graph.nodes if "attention" in str(n.target))
    assert sdpa.kwargs["scale"] == 2 ** -0.5     # the original default scale, pinned
    assert_equivalent(program, masked, inputs, rtol=1e-5, atol=1e-5)


def test_plan_from_meta_weights_applies_to_real_weights() -> None:
    model, inputs = _net()
    with torch.device("meta"):
        meta_program = trace(Net().eval(), (torch.empty(2, 3, 8, 8),))
    plan, _ = PruneChannels(ratio=0.5, importance="random").make_plan(meta_program)
    program = trace(model, inputs)
    reference = program.copy()
    result = PruneChannels(plan=plan).run(program, PassContext())
    assert program.weights()["a.weight"].shape == (4, 3, 3, 3)
    assert_equivalent(program, PruneChannels().reference(reference, result), inputs)


class FusedQKV(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.qkv, self.o = nn.Linear(8, 24), nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, 4, 2).permute(2, 0, 3, 1, 4).unbind(0)
        y = F.scaled_dot_product_attention(q, k, v)
        return self.o(y.transpose(1, 2).reshape(b, n, 8))


def test_fused_qkv_reshape_is_rewritten() -> None:
    inputs = (torch.randn(2, 5, 8),)
    program = trace(FusedQKV().eval(), inputs)
    _, masked = _run(PruneChannels(ratio=0.5), program)
    assert program.weights()["qkv.weight"].shape == (12, 8)
    reshape = next(n for n in program.graph.nodes if "reshape" in str(n.target))
    assert list(reshape.args[1])[2:] == [3, 2, 2]
    assert_equivalent(program, masked, inputs, rtol=1e-5, atol=1e-5)


class EagerAttention(nn.Module):
    """Attention written with matmul (Hugging Face ``attn_implementation="eager"``)."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(8, 8) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = (p(x).view(b, n, 4, 2).transpose(1, 2) for p in (self.q, self.k, self.v))
        s = (q @ k.transpose(-2, -1)) * 2 ** -0.5
        return self.o((s.softmax(-1) @ v).transpose(1, 2).reshape(b, n, 8))


def test_random_plan_keeps_the_same_heads_in_q_k_and_v() -> None:
    inputs = (torch.randn(2, 5, 8),)
    for seed in range(4):
        prune = PruneChannels(ratio=0.5, importance="random", seed=seed)
        compiled = gp.compile(EagerAttention().eval(), inputs, passes=[prune], verify=True)
        plan = compiled.report().details("prune_channels")["plan"]
        program = trace(EagerAttention().eval(), inputs)
        kept = {(w, axis): idx for w, axis, idx in plan.weight_indices(program)}
        assert len(kept[("q.weight", 0)]) == 4
        assert kept[("q.weight", 0)] == kept[("k.weight", 0)] == kept[("v.weight", 0)] \
            == kept[("o.weight", 1)]
        _, masked = _run(PruneChannels(plan=plan), program)
        assert_equivalent(program, masked, inputs, rtol=1e-5, atol=1e-5)


def test_dynamic_batch_stays_dynamic_after_pruning() -> None:
    for model in (EagerAttention().eval(), Attention().eval()):
        program = trace(model, (torch.randn(2, 5, 8),), dynamic_batch=True)
        _, masked = _run(PruneChannels(ratio=0.5), program)
        assert program.weights()["q.weight"].shape == (4, 8)
        for batch in (3, 1, 2):
            x = (torch.randn(batch, 5, 8),)
            assert_equivalent(program, masked, x, rtol=1e-5, atol=1e-5)


def test_pruned_batch_times_heads_size_stays_symbolic() -> None:
    model, (x,) = get_model("bmm_attention_net").make()
    program = trace(model, (x,), dynamic_batch=True)
    _, masked = _run(PruneChannels(ratio=0.5), program)
    assert program.weights()["attns.0.q_proj.weight"].shape == (16, 32)
    merged = [n for n in program.graph.nodes if n.target is operator.floordiv]
    assert merged, "batch * heads is rewritten as (batch * heads) // 2"
    for batch in (3, 1):
        inputs = (torch.randn(batch, *x.shape[1:]),)
        assert_equivalent(program, masked, inputs, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("name", "offsets", "reps"), [
    ("concat_net", True, False), ("depthwise_grouped_net", True, False),
    ("fused_qkv_net", True, True), ("hf_bert", True, True), ("hf_swin", False, True)])
def test_kept_indices_are_the_true_positions_of_the_kept_masks(name: str, offsets: bool,
                                                               reps: bool) -> None:
    """apply_plan takes the kept indices straight from the plan where one slice spans a whole
    axis, else from the mask: the same indices either way (slices at offsets, fused parts,
    heads with ``rep`` elements per channel)."""
    from graphpress.passes.prune.plan import _kept_index, kept_elements

    program = trace(*get_model(name).make())
    plan, _ = PruneChannels(ratio=0.5, importance="random").make_plan(program)
    partial = PrunePlan([GroupPlan(g.slices, g.size, list(range(g.size)) if i % 2 else g.keep)
                         for i, g in enumerate(plan.groups)])     # gaps between pruned slices
    for p in (plan, partial):
        direct = _kept_index(p, program)
        masks = kept_elements(p, program)
        assert direct.keys() == masks.keys()
        for key, mask in masks.items():
            assert torch.equal(direct[key], mask.nonzero().flatten()), key
    assert any(rep > 1 for g in plan.groups for *_, rep in g.slices) == reps
    assert any(offset for g in plan.groups for _, _, offset, _ in g.slices) == offsets


@pytest.mark.parametrize("name", ["hf_gpt2", "minilm", "fused_qkv_net"])
def test_head_dim_pruning_of_fused_and_split_projections(name: str) -> None:
    """prune_heads=False on models whose q, k and v come from one projection (split or
    unflattened) or whose heads split a fused axis: head_dim positions removed, exact against
    the masked original."""
    model, inputs = get_model(name).make()
    program = trace(model, inputs)
    params = sum(t.numel() for t in program.state_dict.values())
    _, masked = _run(PruneChannels(ratio=0.5, prune_heads=False), program)
    assert sum(t.numel() for t in program.state_dict.values()) < params
    assert_equivalent(program, masked, inputs, rtol=1e-5, atol=1e-5)


def test_top_channels_is_a_stable_descending_sort() -> None:
    """Small groups are sorted in Python: the same channels as torch's stable descending sort,
    ties (signed zeros too) to the lower index, NaN first, sizes on both sides of the cut-over."""
    from graphpress.passes.prune.prune_channels import top_channels

    generator = torch.Generator().manual_seed(0)
    for n in (1, 2, 5, 16, 63, 64, 65, 200):
        for case in range(20):
            scores = torch.randint(0, 4, (n,), generator=generator).float()   # many ties
            if case % 3 == 1:
                scores = torch.rand(n, generator=generator)
            if case % 5 == 2:
                scores[torch.rand(n, generator=generator) < 0.3] = -0.0
            if case % 7 == 3:
                scores[torch.randint(0, n, (2,), generator=generator)] = float("nan")
            for k in {1, n // 2, n}:
                expected = sorted(torch.argsort(scores, descending=True, stable=True)[:k]
                                  .tolist())
                assert top_channels(scores, k) == expected, (n, case, k, scores)
