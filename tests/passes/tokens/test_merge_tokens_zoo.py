"""merge_tokens over the zoo's transformers: every encoder merges with verify=True (the
contract against the full-length reference, per sample); decoders are refused with the reason.
MiniLM (real weights, padded sentences) runs in the nightly job."""

from __future__ import annotations

import pytest

import graphpress as gp
from graphpress.errors import PassError
from graphpress.testing.zoo import get_model

_MERGES = {
    "hf_vit": "merge_tokens(r=4)",
    "hf_bert": "merge_tokens(r=2, unmerge=True)",
    "hf_bert_eager": "merge_tokens(r=2, unmerge=True, proportional=False)",
    "bmm_attention_net": "merge_tokens(r=2, unmerge=True)",
    "minilm": "merge_tokens(r=1, unmerge=True)",
}
_REFUSED = {
    "hf_llama": "rotary or relative-position embedding",
    "hf_llama_eager": "rotary or relative-position embedding",
    "attention_net": "causal attention",
    "hf_resnet": "no transformer block",
}


@pytest.mark.parametrize("name", [pytest.param(n, marks=[pytest.mark.slow] if n == "minilm"
                                               else []) for n in _MERGES])
def test_encoders_merge_and_keep_their_contract(name: str) -> None:
    model, inputs = get_model(name).make()
    compiled = gp.compile(model, inputs, passes=_MERGES[name], verify=True)
    record = compiled.report().records[0]
    assert record.changed and record.stats["merged_tokens"] > 0
    assert record.metrics["cosine"] >= 0.9999 and record.metrics["sqnr_db"] >= 40


@pytest.mark.parametrize("name", list(_REFUSED))
def test_decoders_and_others_are_refused_with_the_reason(name: str) -> None:
    model, inputs = get_model(name).make()
    with pytest.raises(PassError, match=_REFUSED[name]):
        gp.compile(model, inputs, passes="merge_tokens(r=2)")


@pytest.mark.slow
def test_benchmark_size_vit_merges_at_r16() -> None:
    model, inputs = get_model("hf_vit_base").make()
    compiled = gp.compile(model, inputs, passes="merge_tokens(r=16)", verify=True)
    assert compiled.report().records[0].stats["tokens_out"] == 197 - 16 * 11 - 10
