"""The LAMP, Hessian-aware and variance (mean folding) criteria of prune_channels, on tiny graphs
whose scores are computed by hand."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import graphpress as gp
from graphpress.analysis.channels.solver import channel_groups
from graphpress.frontends import trace
from graphpress.passes import PassContext, PassManager, PruneChannels
from graphpress.passes.prune import variance
from graphpress.passes.prune.importance import group_importance, hessian_saliency, lamp_scores
from graphpress.passes.prune.plan import PrunePlan
from graphpress.testing import assert_equivalent
from graphpress.testing.zoo import get_model


class MLP(nn.Module):
    def __init__(self, widths: tuple[int, ...], bias: bool = False, relu: bool = True) -> None:
        super().__init__()
        self.fc1 = nn.Linear(widths[0], widths[1], bias=bias)
        self.fc2 = nn.Linear(widths[1], widths[2], bias=bias)
        self.relu = relu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        return self.fc2(F.relu(h) if self.relu else h)


def _set(layer: nn.Linear, weight: list[list[float]], bias: list[float] | None = None) -> None:
    with torch.no_grad():
        layer.weight.copy_(torch.tensor(weight))
        if bias is not None:
            layer.bias.copy_(torch.tensor(bias))


def _hidden_group(program):
    return next(g for g in channel_groups(program).groups if g.prunable)


def test_one_element_channels_and_shared_axes_score_as_their_norms() -> None:
    """1-D slices are scored by |w| and a group's slices of one weight axis share one norm
    computation: both equal each slice's own vector_norm, bitwise, at any magnitude."""
    model, inputs = get_model("depthwise_grouped_net").make()
    program = trace(model, inputs)
    with torch.no_grad():      # magnitudes from 1e-30 to 1e20 in the first BatchNorm's weight
        program.weight("stem.1.weight").copy_(torch.logspace(-30, 20, 16) * torch.tensor(
            [1.0, -1.0] * 8))
    group = next(g for g in channel_groups(program).groups
                 if any(s.weight == "stem.1.weight" for s in g.slices))
    assert len([s for s in group.slices if s.weight == "stem.1.weight"]) == 2   # two pieces
    for criterion, p in (("l1", 1), ("l2", 2)):
        expected = []
        for s in group.slices:
            w = program.weight(s.weight)
            if not isinstance(w, torch.nn.Parameter):
                continue
            rows = w.detach().movedim(s.axis, 0)[s.offset: s.offset + group.size]
            expected.append(torch.linalg.vector_norm(rows.reshape(group.size, -1), p, dim=1))
        assert torch.equal(group_importance(program, group, criterion),
                           torch.stack(expected).mean(0))


def test_lamp_scores_by_hand() -> None:
    """Squared norms (mean over fc1's rows and fc2's columns) 1, 2.5, 1.5, 5; sorted 1, 1.5,
    2.5, 5 of sum 10: LAMP = 1/10, 1.5/9, 2.5/7.5, 5/5."""
    model = MLP((2, 4, 1))
    _set(model.fc1, [[1, 0], [0, 2], [1, 1], [0, 3]])
    _set(model.fc2, [[1, 1, 1, 1]])
    program = trace(model, (torch.randn(1, 2),))
    scores = group_importance(program, _hidden_group(program), "lamp")
    assert torch.allclose(scores, torch.tensor([0.1, 1 / 3, 1 / 6, 1.0]))
    assert torch.allclose(lamp_scores(torch.ones(4)), torch.tensor([1 / 4, 1 / 3, 1 / 2, 1]))


def test_lamp_global_ranking_cuts_the_lowest_lamp_scores_across_groups() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 2))
    with torch.no_grad():
        model[2].weight.mul_(10)       # the second layer's magnitudes dwarf the first's
    x = torch.randn(3, 4)
    program = trace(model, (x,))
    analysis = channel_groups(program)
    groups = analysis.prunable()
    lamp = torch.cat([group_importance(program, g, "lamp") for g in groups])
    cut = int(0.5 * lamp.numel())
    before = program.copy()
    result = PruneChannels(ratio=0.5, importance="lamp", global_ranking=True).run(
        program, PassContext())
    kept = sum(len(g.keep) for g in result.details["plan"].groups)
    assert kept == int((lamp > lamp.sort().values[cut - 1]).sum())
    # magnitude scaling of one layer does not starve it: LAMP is scale-free per group
    assert all(len(g.keep) >= 2 for g in result.details["plan"].groups)
    masked = PruneChannels().reference(before, result)
    assert_equivalent(program, masked, (x,), rtol=1e-5, atol=1e-5)


def test_hessian_scores_by_hand() -> None:
    """L = sum(y), y = x (c a + d b) with fc1 = [a, b] = [1, 2], fc2 = [c, d] = [3, -1]; batches
    x = 1 and x = 3. Gradients (a, b, c, d) -> x (c, d, a, b), so t_b = g_b . w_c is 6x for
    channel 0 (a, c) and -4x for channel 1 (b, d): means 12 and -8, mean squares 180 and 80.
    |-12 + 180/2| = 78, |8 + 80/2| = 48."""
    model = MLP((1, 2, 1), relu=False)
    _set(model.fc1, [[1], [2]])
    _set(model.fc2, [[3, -1]])
    batches = [(torch.tensor([[1.0]]),), (torch.tensor([[3.0]]),)]
    program = trace(model, batches[0])
    (scores,) = hessian_saliency(program, [_hidden_group(program)], batches, torch.sum)
    assert torch.allclose(scores, torch.tensor([78.0, 48.0]))
    assert all(t.grad is None for t in program.state_dict.values())
    before = program.copy()
    pass_ = PruneChannels(ratio=0.5, importance="hessian", batches=batches, loss=torch.sum)
    result = pass_.run(program, PassContext())
    assert result.details["plan"].groups[0].keep == [0]
    assert_equivalent(program, pass_.reference(before, result), batches, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="hessian"):
        PruneChannels(importance="hessian").run(trace(model, batches[0]), PassContext())


def _variance_mlp() -> tuple[nn.Module, list[tuple[torch.Tensor]]]:
    """h = relu([x0, x1, x0 + x1]); on the batches below h = [1,2,3], [3,2,5], [2,2,4]:
    means (2, 2, 4), variances (2/3, 0, 2/3)."""
    model = MLP((2, 3, 2), bias=True)
    _set(model.fc1, [[1, 0], [0, 1], [1, 1]], [0, 0, 0])
    _set(model.fc2, [[1, 2, 3], [4, 5, 6]], [0.5, -0.5])
    return model, [(torch.tensor([[1.0, 2], [3, 2]]),), (torch.tensor([[2.0, 2]]),)]


def test_variance_scores_and_mean_folding_by_hand() -> None:
    model, batches = _variance_mlp()
    program = trace(model, (torch.randn(2, 2),), dynamic_batch=True)
    readers, _ = variance.find_readers(program)
    group = _hidden_group(program)
    sites = {(r.activation, r.dim) for r in readers[("fc2.weight", 1)]}
    stats = variance.activation_stats(program, [(b, {}) for b in batches], sites)
    scores = variance.variance_scores(group, readers, stats, "mean")
    assert torch.allclose(scores, torch.tensor([2 / 3, 0.0, 2 / 3]))

    before = program.copy()
    pass_ = PruneChannels(ratio=1 / 3, importance="variance", batches=batches)
    result = pass_.run(program, PassContext())
    assert result.details["plan"].groups[0].keep == [0, 2]
    assert result.stats["readers_mean_folded"] == 1
    w = program.weights()
    assert w["fc2.weight"].tolist() == [[1, 3], [4, 6]]
    # the removed channel's mean 2 goes into fc2's bias: b + W[:, 1] * 2
    assert torch.allclose(w["fc2.bias"], torch.tensor([0.5 + 2 * 2, -0.5 + 5 * 2]))
    # channel 1 is constant on the calibration data: there, pruning changes nothing
    assert_equivalent(program, before, batches, rtol=1e-6, atol=1e-6)
    others = [(torch.randn(4, 2),) for _ in range(2)]
    assert_equivalent(program, pass_.reference(before, result), others, rtol=1e-6, atol=1e-6)
    assert pass_.contract_for(before).description.startswith("equals the input program with "
                                                             "each removed channel replaced")


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 3, 3, padding=1, stride=2, bias=False)
        self.conv3 = nn.Conv2d(3, 2, 1, bias=False)
        self.fc = nn.Linear(2 * 3 * 3, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.conv2(F.relu(self.conv1(x))))
        return self.fc(F.relu(self.conv3(h)).flatten(1))


def test_variance_against_an_independent_mean_replaced_model() -> None:
    """Padded, strided conv without bias (a constant map added after it), an unpadded 1x1 conv
    without bias (a new bias) and a linear over flattened channels (its bias): the pruned
    program equals the model whose readers see the removed channels' calibration means, built
    here with forward pre-hooks."""
    torch.manual_seed(0)
    model = ConvNet().eval()
    batches = [(torch.randn(4, 1, 6, 6),) for _ in range(3)]
    program = trace(model, batches[0], dynamic_batch=True)
    result = PassManager([PruneChannels(ratio=0.5, importance="variance")], verify=True,
                         context=PassContext(example_inputs=batches[0],
                                             calibration_data=[(b, {}) for b in batches]),
                         hooks=[]).run(program).records[0]
    assert result.stats["readers_mean_folded"] == 3 and result.max_error < 1e-5
    plan = result.details["plan"]
    removed = plan.removed()
    inputs: dict[str, list[torch.Tensor]] = {"conv2": [], "conv3": [], "fc": []}
    hooks = [getattr(model, name).register_forward_pre_hook(
        lambda m, a, name=name: inputs[name].append(a[0])) for name in inputs]
    with torch.no_grad():
        for b in batches:
            model(*b)
    for h in hooks:
        h.remove()
    means = {"conv2": torch.cat(inputs["conv2"]).mean((0, 2, 3)),
             "conv3": torch.cat(inputs["conv3"]).mean((0, 2, 3)),
             "fc": torch.cat(inputs["fc"]).mean(0)}

    def replace(name: str):
        drop = sorted(removed[(f"{name}.weight", 1)])

        def hook(module, args):
            x = args[0].clone()
            shape = (-1, 1, 1) if x.dim() == 4 else (-1,)
            x[:, drop] = means[name][drop].view(shape).expand_as(x[:, drop])
            return (x,)
        return getattr(model, name).register_forward_pre_hook(hook)

    for name in inputs:
        replace(name)
    others = [(torch.randn(2, 1, 6, 6),) for _ in range(2)]
    assert_equivalent(program, model, others, rtol=1e-5, atol=1e-5)
    names = set(program.weights())
    assert "conv2.mean_fold" in names and "conv3.bias" in names
    assert program.weights()["conv2.mean_fold"].shape == (2, 3, 3)     # [O kept, H', W']


class GRN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 8), nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.fc1(x))
        return self.fc2(h / (h.sum(-1, keepdim=True) + 1))


def test_variance_refuses_channels_summed_over_naming_the_node() -> None:
    x = torch.rand(3, 4)
    with pytest.raises(ValueError, match=r"variance: channels reduced over by sum \(node sum"):
        PruneChannels(importance="variance").run(trace(GRN(), (x,)),
                                                 PassContext(example_inputs=(x,)))
    with pytest.raises(ValueError, match="prune_heads=True"):
        PruneChannels(importance="variance", prune_heads=False)


def test_a_variance_plan_reapplied_folds_the_means_again(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = ConvNet().eval()
    batches = [(torch.randn(4, 1, 6, 6),) for _ in range(2)]
    first = trace(model, batches[0])
    PruneChannels(ratio=0.5, importance="variance", batches=batches).run(first, PassContext())
    path = tmp_path / "plan.json"
    plan = PruneChannels(ratio=0.5, importance="variance", batches=batches).make_plan(
        trace(model, batches[0]))[0]
    plan.save(path)
    again = trace(model, batches[0])
    PruneChannels(plan=PrunePlan.load(path), importance="variance", batches=batches).run(
        again, PassContext())
    assert_equivalent(again, first, batches, rtol=0, atol=0)


def test_lamp_and_variance_by_name_in_a_pipeline_string() -> None:
    model, x = ConvNet().eval(), torch.randn(4, 1, 6, 6)
    compiled = gp.compile(model, (x,), passes="prune_channels(importance='lamp', "
                          "global_ranking=True)", verify=True)
    assert compiled.report().records[-1].max_error < 1e-5
    compiled = gp.compile(model, (x,), passes="prune_channels(importance='variance')",
                          calibration_data=[x], verify=True)
    assert "calibration mean" in compiled.report().records[-1].contract


def test_variance_skips_groups_read_by_a_transposed_conv_naming_it() -> None:
    model, inputs = get_model("transposed_conv_net").make()
    program = trace(model, inputs)
    result = PruneChannels(importance="variance").run(program, PassContext(example_inputs=inputs))
    assert any(s.reason == "variance: channels read by a transposed conv_transpose2d (node "
               "conv_transpose2d)" for s in result.skipped)
    assert result.stats["readers_mean_folded"] >= 1     # the other groups are pruned
