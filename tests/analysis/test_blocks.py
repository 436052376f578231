"""The transformer block finder: blocks, merge points, token axis, special tokens, refusals."""

from __future__ import annotations

import pytest
import torch

from graphpress.analysis import transformer_blocks
from graphpress.frontends import trace
from graphpress.testing.zoo import get_model
from tests.passes.tokens.models import (
    TimmStyleViT,
    images,
    tiny_deit,
    tiny_vit_with_registers,
)

aten = torch.ops.aten


def _zoo(name: str):
    model, inputs = get_model(name).make()
    return trace(model, inputs)


def test_hf_vit_blocks_chain_and_protect_the_cls_token() -> None:
    program = _zoo("hf_vit")
    found = program.analysis("transformer_blocks")
    assert found is transformer_blocks(program) or len(found.blocks) == 2
    assert [b.attention.kind for b in found.blocks] == ["sdpa", "sdpa"]
    first, second = found.blocks
    assert second.stream_in is first.output and first.tokens == 17 and first.channels == 32
    # pre-norm: the merge point is the attention's residual add, read by the MLP norm
    assert first.mid is first.attention_residual
    assert {u.target for u in first.mid.users} == {aten.layer_norm.default, aten.add.Tensor}
    assert found.special_tokens == 1
    assert "vit.embeddings.cls_token" in found.special_reasons[0]
    assert first.module == "vit.layers.0.attention"


def test_post_norm_bert_with_softmax_attention() -> None:
    program = _zoo("hf_bert_eager")
    found = program.analysis("transformer_blocks")
    block = found.blocks[0]
    assert block.attention.kind == "softmax"
    assert block.attention.mask is not None and block.attention.mask_add is not None
    assert block.mid.target is aten.layer_norm.default      # post-norm: after the residual
    assert block.output.target is aten.layer_norm.default
    assert found.special_tokens == 1 and "read by %select" in found.special_reasons[0]


def test_fused_qkv_with_register_tokens() -> None:
    program = trace(TimmStyleViT(registers=3).eval(), (images(),))
    found = program.analysis("transformer_blocks")
    assert len(found.blocks) == 3 and not found.refused
    assert found.special_tokens == 4 and "cls, registers" in found.special_reasons[0]
    # the keys come out of unbind(permute(reshape(qkv))): token axis -2 proven through them
    assert found.blocks[0].attention.key.target.__name__ == "getitem"


def test_distillation_and_register_tokens_of_hugging_face_models() -> None:
    deit = trace(tiny_deit(), (images(),)).analysis("transformer_blocks")
    assert deit.special_tokens == 2
    assert "distillation_token" in deit.special_reasons[0]
    registers = trace(tiny_vit_with_registers(), (images(),)).analysis("transformer_blocks")
    assert registers.special_tokens == 5  # CLS + 4 registers, through slice and cat


def test_bmm_attention_over_batch_times_heads() -> None:
    found = _zoo("bmm_attention_net").analysis("transformer_blocks")
    assert len(found.blocks) == 2 and found.special_tokens == 0
    assert found.blocks[0].attention.key.meta["val"].dim() == 3


@pytest.mark.parametrize(("name", "reason"), [
    ("hf_llama", "rotary"),
    ("hf_llama_eager", "rotary"),
])
def test_rotary_keys_are_refused_with_the_reason(name: str, reason: str) -> None:
    found = _zoo(name).analysis("transformer_blocks")
    assert not found.blocks
    assert found.refused and all(reason in why for _, why in found.refused)


def test_causal_attention_is_found_and_flagged() -> None:
    found = _zoo("attention_net").analysis("transformer_blocks")
    assert found.blocks and all(b.attention.causal for b in found.blocks)


def test_a_convnet_has_no_blocks() -> None:
    found = _zoo("hf_resnet").analysis("transformer_blocks")
    assert found.blocks == [] and found.refused == []
