"""prune_channels over the model zoo: every model prunes at ratio 0.5 with its contract checked."""

from __future__ import annotations

import re

import pytest
import torch
from torch.utils import _pytree as pytree

import graphpress as gp
from graphpress.testing.zoo import ZooModel, get_model, zoo_models


def _shapes(value: object) -> list[tuple[int, ...]]:
    return [tuple(t.shape) for t in pytree.tree_leaves(value) if isinstance(t, torch.Tensor)]


# Models added for the op patterns of issue 13: each loses at least a quarter of its parameters.
_PATTERNS = ("hf_gpt2", "hf_swin", "hf_levit", "hf_convnext_v2", "shuffle_net",
             "weight_standardized_net", "fused_qkv_net")


def _check(zoo: ZooModel, prune_heads: bool = True) -> None:
    model, inputs = zoo.make()
    with torch.no_grad():
        expected = _shapes(model(*inputs))
    prune = gp.passes.PruneChannels(ratio=0.5, prune_heads=prune_heads)
    compiled = gp.compile(model, inputs, passes=[prune], verify=True)
    record = compiled.report().records[-1]
    assert record.parameters[1] < record.parameters[0], "no parameter was removed"
    if zoo.name in _PATTERNS and prune_heads:
        assert record.parameters[1] <= 0.75 * record.parameters[0], record.parameters
    assert record.stats["channels_after"] < record.stats["channels_before"]
    assert record.skipped, "the groups at the model's input and output are never pruned"
    for weight, reason in record.skipped:       # every unprunable group says why
        assert re.fullmatch(r"group of \d+ channels unprunable: \S.*", reason), (weight, reason)
    with torch.no_grad():
        assert _shapes(compiled(*inputs)) == expected


@pytest.mark.parametrize("zoo", zoo_models(), ids=lambda z: z.name)
def test_prunes_every_zoo_model_at_half(zoo: ZooModel) -> None:
    _check(zoo)


def test_weight_standardized_bit_names_what_blocks_it() -> None:
    """Every conv of BiT is weight-standardized: the standardization's statistics sum over each
    conv's input channels, so only the last stage's output channels (read by the classifier
    alone) are pruned; every other group names the standardization's batch_norm node."""
    model, inputs = get_model("hf_bit").make()
    compiled = gp.compile(model, inputs, passes=[gp.passes.PruneChannels(ratio=0.5)], verify=True)
    record = compiled.report().records[-1]
    assert record.stats["groups_pruned"] == 1
    reason = re.compile(r"batch_norm \(node batch_norm\w*\) in training mode normalises")
    assert sum(bool(reason.search(r)) for _, r in record.skipped) >= 8, record.skipped


_PROJECTION = re.compile(r".*(query|key|value|[qkv]_proj)\.weight")


@pytest.mark.parametrize("name", ["hf_bert_eager", "hf_llama_eager", "bmm_attention_net"])
def test_prunes_heads_of_matmul_attention(name: str) -> None:
    """Attention written with matmul/bmm loses half its heads in q, k and v alike."""
    model, inputs = get_model(name).make()
    compiled = gp.compile(model, inputs, passes=[gp.passes.PruneChannels(ratio=0.5)], verify=True)
    before = {n: p.shape for n, p in model.named_parameters() if _PROJECTION.fullmatch(n)}
    after = compiled.program.weights()
    assert len(before) >= 6
    for weight, shape in before.items():
        assert after[weight].shape == (shape[0] // 2, shape[1]), weight


@pytest.mark.slow
@pytest.mark.parametrize("zoo", zoo_models(include=["large"], exclude=()), ids=lambda z: z.name)
def test_prunes_large_zoo_models_at_half(zoo: ZooModel) -> None:
    _check(zoo)


@pytest.mark.parametrize("name", ["hf_llama", "hf_vit", "hf_gpt2", "hf_resnet", "concat_net"])
def test_variance_with_mean_folding_on_zoo_models(name: str) -> None:
    """Transformer MLPs and heads (linear, GPT-2's addmm), ResNet's residual stages (1x1 and
    padded 3x3 convs), concat: the pruned program equals the model with the removed channels
    replaced by their means where they are read (checked by verify=True)."""
    model, inputs = get_model(name).make()
    prune = gp.passes.PruneChannels(ratio=0.5, importance="variance")
    record = gp.compile(model, inputs, passes=[prune], verify=True).report().records[-1]
    assert record.contract.startswith("reference") and "calibration mean" in record.contract
    assert record.stats["readers_mean_folded"] >= 4 and record.max_error < 1e-5
    assert record.stats["channels_after"] < record.stats["channels_before"]
