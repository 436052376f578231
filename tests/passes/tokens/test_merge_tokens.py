"""merge_tokens on small hand-built and Hugging Face transformers: structure, numbers against a
direct ToMe forward and the full-length reference, padding, unmerge, refusals, ONNX, compile."""

from __future__ import annotations

import pytest
import torch

import graphpress as gp
from graphpress.errors import PassError
from graphpress.frontends import trace
from graphpress.passes import PassContext, PassManager
from graphpress.pipeline.fingerprint import fingerprint
from tests.passes.tokens.models import (
    TimmStyleViT,
    images,
    padded_tokens,
    tiny_bert,
    tiny_deit,
    tiny_vit_with_registers,
)

aten = torch.ops.aten


def _tokens_seen_by_sdpa(program: gp.Program) -> list[int]:
    return [n.args[0].meta["val"].shape[-2] for n in program.graph.nodes
            if n.target is aten.scaled_dot_product_attention.default]


@pytest.mark.parametrize("proportional", [True, False])
def test_equals_a_direct_tome_forward_on_shorter_sequences(proportional: bool) -> None:
    model, x = TimmStyleViT(registers=2).eval(), images()
    compiled = gp.compile(model, (x,), verify=True, passes=[
        gp.passes.MergeTokens(r=[8, 8, 4], proportional=proportional)])
    with torch.no_grad():
        expected = model.forward_tome(x, [8, 8, 4], proportional=proportional)
        other = model.forward_tome(x, [8, 8, 4], proportional=not proportional)
        # the same matches and sizes; the average is computed as an update of each B token
        # (x_j + sum s_i (x_i - x_j) / s'_j), so only float rounding differs from merge_wavg
        torch.testing.assert_close(compiled(x), expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(compiled(images(seed=1)),
                                   model.forward_tome(images(seed=1), [8, 8, 4], proportional),
                                   rtol=1e-5, atol=1e-6)
        assert not torch.allclose(expected, other, atol=1e-4)  # the option matters
    # 67 tokens (CLS + 2 registers + 64 patches); blocks see 67, 59, 51; 47 leave
    assert _tokens_seen_by_sdpa(compiled.program) == [67, 59, 51]
    record = compiled.report().records[0]
    assert record.stats == {"blocks": 3, "merged_tokens": 20, "tokens_in": 67, "tokens_out": 47,
                            "protected": 3}
    assert record.metrics["cosine"] > 0.9999 and record.metrics["sqnr_db"] > 40
    assert any("r per block: 8, 8, 4" in line for line in record.details["summary"])


def test_prune_mode_equals_a_direct_pruned_forward() -> None:
    model, x = TimmStyleViT(registers=2).eval(), images()
    compiled = gp.compile(model, (x,), verify=True,
                          passes="merge_tokens(r=[8, 8, 4], mode='prune')")
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model.forward_pruned(x, [8, 8, 4]),
                                   rtol=1e-5, atol=1e-5)
    record = compiled.report().records[0]
    assert record.stats["pruned_tokens"] == 20 and record.stats["tokens_out"] == 47
    with pytest.raises(PassError, match="unmerge=True needs mode='merge'"):
        gp.passes.MergeTokens(r=2, mode="prune", unmerge=True)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_prune_mode_drops_padding_first(attention: str) -> None:
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, attn_implementation=attention, num_labels=3)).eval()
    ids, mask = padded_tokens()
    compiled = gp.compile(model, (ids, mask), verify=True,
                          passes="merge_tokens(r=3, mode='prune')")
    other = ids.clone()
    other[1, 9:] = 7
    with torch.no_grad():
        torch.testing.assert_close(compiled(ids, mask).logits, compiled(other, mask).logits)


def test_a_dynamic_batch() -> None:
    model = TimmStyleViT(registers=2).eval()
    compiled = gp.compile(model, (images(),), passes="merge_tokens(r=8)", verify=True,
                          dynamic_batch=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(images(batch=5)),
                                   model.forward_tome(images(batch=5), [8, 8, 8]))
    bert = tiny_bert()
    compiled = gp.compile(bert, padded_tokens(), passes="merge_tokens(r=3, unmerge=True)",
                          verify=True, dynamic_batch=True)
    with torch.no_grad():
        out = compiled(*padded_tokens(batch=3, real=(16, 9, 4)))
    assert out.last_hidden_state.shape == (3, 16, 32)


def test_r_zero_is_exact_and_changes_nothing() -> None:
    model, x = TimmStyleViT().eval(), images()
    compiled = gp.compile(model, (x,), passes="merge_tokens(r=0)", verify=True)
    record = compiled.report().records[0]
    assert not record.changed and record.contract.startswith("exact")
    assert record.max_error == 0.0
    assert _tokens_seen_by_sdpa(compiled.program) == [65, 65, 65]


def test_new_nodes_have_provenance_and_the_program_validates() -> None:
    program = trace(TimmStyleViT().eval(), (images(),))
    PassManager([gp.passes.MergeTokens(r=4)], verify=True, hooks=[],
                context=PassContext(example_inputs=(images(),))).run(program)
    program.validate()
    created = [n for n in program.graph.nodes if n.meta.get("graphpress_pass") == "merge_tokens"]
    assert any(n.target is aten.scatter_add.default for n in created)
    assert not any(n.target is aten.scatter_reduce.two for n in created)  # sum then divide
    # tokens move as whole rows (index_select); gather only on [B, n] and [B, n, 1] values
    assert any(n.target is aten.index_select.default for n in created)
    assert all(n.meta["val"].shape[-1] == 1 or n.meta["val"].dim() == 2 for n in created
               if n.target is aten.gather.default)
    # arithmetic on token rows only touches the r = 4 moved rows of each of the 3 merges:
    # the stream itself is only copied (no x * s, no divide by the sizes over all tokens)
    wide = [n for n in created if n.target in (aten.mul.Tensor, aten.div.Tensor, aten.sub.Tensor)
            and n.meta["val"].dim() == 3 and n.meta["val"].shape[-1] == 32]
    assert len(wide) == 6 and all(n.meta["val"].shape[1] == 4 for n in wide)
    # proportional attention goes through SDPA's attn_mask in blocks after the first merge
    masks = [n.kwargs.get("attn_mask") for n in program.graph.nodes
             if n.target is aten.scaled_dot_product_attention.default]
    assert masks[0] is None and all(m is not None for m in masks[1:])


def test_deit_keeps_cls_and_distillation_tokens() -> None:
    model, x = tiny_deit(), images()
    compiled = gp.compile(model, (x,), passes="merge_tokens(r=16)", verify=True)
    record = compiled.report().records[0]
    assert record.stats["protected"] == 2 and record.stats["tokens_out"] == 66 - 32
    assert "distillation_token" in record.details["summary"][0]
    assert compiled(x).logits.shape == (2, 10)


def test_registers_are_protected_and_unmerge_restores_the_tokens() -> None:
    model, x = tiny_vit_with_registers(), images()
    compiled = gp.compile(model, (x,), passes="merge_tokens(r=16, unmerge=True)", verify=True)
    assert compiled.report().records[0].stats["protected"] == 5
    with torch.no_grad():
        out, full = compiled(x), model(x)
    assert out.last_hidden_state.shape == full.last_hidden_state.shape == (2, 69, 32)
    # CLS and registers are never merged: their outputs stay close to the unmerged model's
    cosine = torch.nn.functional.cosine_similarity(out.last_hidden_state[:, :5],
                                                   full.last_hidden_state[:, :5], dim=-1)
    assert cosine.min() > 0.9


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_padding_is_never_merged_into_real_tokens(attention: str) -> None:
    model = tiny_bert(attention)
    ids, mask = padded_tokens()
    compiled = gp.compile(model, (ids, mask), verify=True,
                          passes="merge_tokens(r=3, unmerge=True)")
    other_padding = ids.clone()
    other_padding[1, 9:] = torch.randint(1, 100, (7,), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        a, b = compiled(ids, mask), compiled(other_padding, mask)
    # the real tokens (row 1: the first 9) and the pooled CLS ignore what the padding holds
    torch.testing.assert_close(a.last_hidden_state[1, :9], b.last_hidden_state[1, :9])
    torch.testing.assert_close(a.pooler_output, b.pooler_output)
    assert not torch.allclose(a.last_hidden_state[1, 9:], b.last_hidden_state[1, 9:])


def test_text_encoder_from_a_pipeline_string_with_a_flop_budget() -> None:
    model = tiny_bert(layers=3)
    ids, mask = padded_tokens()
    compiled = gp.compile(model, (ids, mask), verify=True,
                          passes="merge_tokens(flops=0.7, unmerge=True)")
    summary = compiled.report().records[0].details["summary"]
    assert any(line.startswith("flops=0.7: constant r=") for line in summary)


def test_decreasing_schedule_and_lowered_late_blocks() -> None:
    model, x = TimmStyleViT().eval(), images()
    compiled = gp.compile(model, (x,), passes="merge_tokens(r=20, inflection=0.5)",
                          verify=True)
    summary = compiled.report().records[0].details["summary"]
    # 30, 20, 10 asked; 35 tokens allow 17 in block 1, then 18 tokens allow 8
    assert "r per block: 30, 17, 8; tokens per block: 65, 35, 18 -> 10" in summary[-1]
    assert any("lowered to what the tokens allow" in line for line in summary)


def test_per_token_outputs_need_unmerge() -> None:
    model = tiny_bert()
    ids, mask = padded_tokens()
    with pytest.raises(PassError, match=r"output %layer_norm_4 has a token axis \(16 tokens, "
                                        r"12 after merging\).*unmerge=True"):
        gp.compile(model, (ids, mask), passes="merge_tokens(r=2)")
    with pytest.raises(PassError, match=r"slices the token axis \[1:.*unmerge=True"):
        gp.compile(TimmStyleViT(dense=True).eval(), (images(),), passes="merge_tokens(r=2)")
    dense = gp.compile(TimmStyleViT(dense=True).eval(), (images(),), verify=True,
                       passes="merge_tokens(r=2, unmerge=True)")
    assert dense(images()).shape == (2, 64, 10)


@pytest.mark.parametrize(("model", "inputs", "message"), [
    (lambda: TimmStyleViT(position_per_block=True).eval(), lambda: (images(),),
     r"p_blocks_1_position is added to the token stream before block 1.*positional embedding"),
])
def test_refusals_name_the_reason_and_leave_the_program_untouched(model, inputs,
                                                                  message: str) -> None:
    program = trace(model(), inputs())
    before = fingerprint(program)
    with pytest.raises(PassError, match=message):
        PassManager([gp.passes.MergeTokens(r=2)], hooks=[],
                    context=PassContext(example_inputs=inputs())).run(program)
    assert fingerprint(program) == before


def test_bad_arguments() -> None:
    with pytest.raises(PassError, match="exactly one of r= .* and flops="):
        gp.passes.MergeTokens()
    with pytest.raises(PassError, match="exactly one of"):
        gp.passes.MergeTokens(r=2, flops=0.5)
    with pytest.raises(PassError, match=r"block 0 \(blocks.0\) has 65 tokens \(1 protected\).*"
                                        r"at most r = 32; got r = 40"):
        gp.compile(TimmStyleViT().eval(), (images(),), passes="merge_tokens(r=[40, 0, 0])")
    with pytest.raises(PassError, match=r"budget of 0.1 cannot be met"):
        gp.compile(TimmStyleViT().eval(), (images(),), passes="merge_tokens(flops=0.1)")


@pytest.mark.parametrize(("build", "spec"), [
    (lambda: (tiny_bert(), padded_tokens()), "merge_tokens(r=3, unmerge=True)"),
    (lambda: (TimmStyleViT(registers=2).eval(), (images(),)), "merge_tokens(r=8)"),
    (lambda: (TimmStyleViT().eval(), (images(),)), "merge_tokens(r=8, mode='prune')"),
], ids=["bert-unmerge", "vit-registers", "vit-prune"])
def test_onnx_export_matches_eager(build, spec: str) -> None:
    model, inputs = build()
    compiled = gp.compile(model, inputs, passes=spec, backend="onnx", verify=True)
    assert "onnx vs eager max abs error" in str(compiled.report())
    eager = gp.compile(model, inputs, passes=spec)
    with torch.no_grad():
        got, want = compiled(*inputs), eager(*inputs)
    got = getattr(got, "last_hidden_state", got)
    want = getattr(want, "last_hidden_state", want)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_torch_compile_does_not_recompile_per_call() -> None:
    from torch._dynamo.utils import counters

    model, x = TimmStyleViT().eval(), images()
    module = gp.compile(model, (x,), passes="merge_tokens(r=8)").program.module()
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(module, backend="eager")
    with torch.no_grad():
        for seed in range(3):
            batch = images(seed=seed)
            torch.testing.assert_close(compiled(batch), module(batch))
    assert counters["stats"]["unique_graphs"] == 1
    assert not counters["recompiles"]
