"""prune_hidden=True: width pruning of the residual stream, exact against the masked original
whose normalisations run over the kept channels only."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import graphpress as gp
from graphpress.frontends import trace
from graphpress.passes import PassContext, PruneChannels
from graphpress.testing import assert_equivalent
from graphpress.testing.zoo import get_model


class RMSNorm(nn.Module):
    """Written out, as Hugging Face's Llama does: x * rsqrt(mean(x^2) + eps) * weight."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.rand(width) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight


class Stream(nn.Module):
    """embedding -> LayerNorm -> MLP block on a residual stream -> RMSNorm -> head."""

    def __init__(self, width: int = 8, vocab: int = 11) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.ln = nn.LayerNorm(width)
        self.up, self.down = nn.Linear(width, 2 * width), nn.Linear(2 * width, width)
        self.norm = RMSNorm(width)
        self.head = nn.Linear(width, 5, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids)
        h = h + self.down(F.gelu(self.up(self.ln(h))))
        return self.head(self.norm(h))


def _narrow(model: Stream, keep: list[int]) -> Stream:
    """The same model built at the kept width, its weights sliced by hand: what a narrower
    model computes, with every normalisation over the kept channels."""
    hidden = model.up.out_features
    small = Stream(len(keep)).eval()
    small.up, small.down = nn.Linear(len(keep), hidden), nn.Linear(hidden, len(keep))
    with torch.no_grad():
        small.embed.weight.copy_(model.embed.weight[:, keep])
        small.ln.weight.copy_(model.ln.weight[keep])
        small.ln.bias.copy_(model.ln.bias[keep])
        small.up.weight.copy_(model.up.weight[:, keep])
        small.up.bias.copy_(model.up.bias)
        small.down.weight.copy_(model.down.weight[keep])
        small.down.bias.copy_(model.down.bias[keep])
        small.norm.weight.copy_(model.norm.weight[keep])
        small.head.weight.copy_(model.head.weight[:, keep])
    return small


def test_stream_pruned_equals_the_narrower_model_and_the_reference() -> None:
    torch.manual_seed(0)
    model = Stream().eval()
    ids = torch.randint(0, 11, (2, 6))
    program = trace(model, (ids,))
    before = program.copy()
    pass_ = PruneChannels(ratio=0.5, prune_hidden=True, ratios={"up.bias": 0.0})
    result = pass_.run(program, PassContext(example_inputs=(ids,)))
    stream = next(g for g in result.details["plan"].groups
                  if ("embed.weight", 1, 0, 1) in g.slices)
    assert len(stream.keep) == 4 and result.stats["normalizations_over_kept"] == 2
    w = program.weights()
    assert w["embed.weight"].shape == (11, 4) and w["ln.weight"].shape == (4,)
    assert w["up.weight"].shape == (16, 4) and w["down.weight"].shape == (4, 16)
    layer_norm = next(n for n in program.graph.nodes
                      if n.target == torch.ops.aten.layer_norm.default)
    assert layer_norm.args[1] == [4]
    # the RMS statistic stays a mean (of the kept channels), not sum / old width
    assert any(n.target == torch.ops.aten.mean.dim for n in program.graph.nodes)
    others = [(torch.randint(0, 11, (2, 6)),) for _ in range(2)]
    assert_equivalent(program, _narrow(model, stream.keep), others, rtol=1e-5, atol=1e-5)
    assert_equivalent(program, pass_.reference(before, result), others, rtol=1e-5, atol=1e-5)
    deviation = result.details["deviation"]
    assert set(deviation) == {"sqnr_db", "cosine", "top1_agreement", "max_abs_error"}
    assert deviation["max_abs_error"] > 0 and deviation["cosine"] < 1
    assert pass_.contract_for(before).report_vs_input


def test_without_prune_hidden_the_stream_stays() -> None:
    model, ids = Stream().eval(), torch.randint(0, 11, (2, 6))
    program = trace(model, (ids,))
    PruneChannels(ratio=0.5).run(program, PassContext())
    assert program.weights()["embed.weight"].shape == (11, 8)


@pytest.mark.parametrize("name", ["hf_llama", "hf_vit", "hf_bert_classifier"])
def test_prune_hidden_on_transformer_zoo_models(name: str) -> None:
    model, inputs = get_model(name).make()
    prune = PruneChannels(ratio=0.5, prune_hidden=True)
    compiled = gp.compile(model, inputs, passes=[prune], verify=True)
    record = compiled.report().records[-1]
    assert record.max_error < 1e-5 and "kept channels only" in record.contract
    assert record.parameters[1] < 0.5 * record.parameters[0]
    assert record.macs[1] < 0.5 * record.macs[0]
    assert record.stats["normalizations_over_kept"] >= 5       # every norm of the stream
    assert {"sqnr_db vs input", "cosine vs input"} <= set(record.metrics)
    assert "deviation" in record.details
    embedding = next(t for n, t in compiled.program.weights().items()
                     if n.endswith(("embed_tokens.weight", "word_embeddings.weight",
                                    "cls_token")))
    assert embedding.shape[-1] == 16                            # hidden 32 -> 16


def test_a_stream_that_is_the_output_stays_and_says_why() -> None:
    model, inputs = get_model("hf_bert").make()       # BertModel returns the hidden states
    program = trace(model, inputs)
    result = PruneChannels(ratio=0.5, prune_hidden=True).run(program, PassContext())
    assert program.weights()["embeddings.word_embeddings.weight"].shape == (100, 32)
    assert any(w == "embeddings.word_embeddings.weight" and "model output" in r
               for w, r in ((s.node, s.reason) for s in result.skipped))


def test_prune_hidden_plans_on_meta_weights() -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
                         use_cache=False, attn_implementation="sdpa")
    with torch.device("meta"):
        meta = LlamaForCausalLM(config).eval()
    ids = torch.randint(0, 100, (1, 8))
    prune = PruneChannels(ratio=0.5, prune_hidden=True, importance="random")
    plan, _ = prune.make_plan(trace(meta, (ids,)))
    real = LlamaForCausalLM(config).eval()
    program = trace(real, (ids,))
    before = program.copy()
    result = PruneChannels(plan=plan, prune_hidden=True).run(program,
                                                             PassContext(example_inputs=(ids,)))
    assert program.weights()["model.embed_tokens.weight"].shape == (100, 32)
    reference = PruneChannels(prune_hidden=True).reference(before, result)
    assert_equivalent(program, reference, (ids,), rtol=1e-5, atol=1e-5)


def test_variance_with_prune_hidden_is_refused() -> None:
    with pytest.raises(ValueError, match="prune_hidden"):
        PruneChannels(importance="variance", prune_hidden=True)


class WSConv(nn.Conv2d):
    """A weight-standardized conv (BiT): W standardized over its inputs and kernel per output."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = F.batch_norm(self.weight.reshape(1, self.out_channels, -1), None, None,
                         training=True, momentum=0.0, eps=1e-5).reshape_as(self.weight)
        return F.conv2d(x, w, self.bias, padding=1)


class WSNet(nn.Module):
    def __init__(self, width: int = 6) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, width, 3, padding=1)
        self.ws = WSConv(width, 4, 3, padding=1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ws(F.relu(self.conv(x)))
        return self.fc(h.mean((2, 3)))


def test_weight_standardized_inputs_pruned_over_the_kept_channels() -> None:
    """Under prune_hidden=True the standardization of a conv's weight runs over its kept input
    channels: the pruned program is the narrower net, standardized as it would be."""
    torch.manual_seed(0)
    model, x = WSNet().eval(), torch.randn(2, 2, 5, 5)
    program = trace(model, (x,))
    result = PruneChannels(ratio=0.5, prune_hidden=True, ignore=("fc",)).run(
        program, PassContext(example_inputs=(x,)))
    group = next(g for g in result.details["plan"].groups if ("conv.weight", 0, 0, 1) in g.slices)
    keep = group.keep
    assert len(keep) == 3 and program.weights()["ws.weight"].shape == (4, 3, 3, 3)
    assert result.stats["normalizations_over_kept"] == 1
    narrow = WSNet(3).eval()
    with torch.no_grad():
        narrow.conv.weight.copy_(model.conv.weight[keep])
        narrow.conv.bias.copy_(model.conv.bias[keep])
        narrow.ws.weight.copy_(model.ws.weight[:, keep])
        narrow.ws.bias.copy_(model.ws.bias)
        narrow.fc.load_state_dict(model.fc.state_dict())
    assert_equivalent(program, narrow, [(torch.randn(2, 2, 5, 5),)], rtol=1e-5, atol=1e-5)
    # without it, the standardization's statistics block the conv's inputs, naming the node
    with pytest.raises(ValueError, match=r"batch_norm \(node batch_norm\) in training mode"):
        PruneChannels(ratio=0.5, ignore=("fc",)).run(trace(model, (x,)), PassContext())


def test_hf_bit_prunes_a_quarter_with_prune_hidden() -> None:
    model, inputs = get_model("hf_bit").make()
    prune = PruneChannels(ratio=0.5, prune_hidden=True)
    record = gp.compile(model, inputs, passes=[prune], verify=True).report().records[-1]
    assert record.parameters[1] <= 0.75 * record.parameters[0], record.parameters
    assert record.stats["normalizations_over_kept"] >= 8 and record.max_error < 1e-5
