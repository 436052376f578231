"""The ONNX backend on attention whose output strides torch.onnx's two fake-tensor runs see
differently (graphpress/backends/onnx/layouts.py): a regression test for hf_swin, whose export
failed with "Cannot view a tensor with shape ... and strides ..." with or without passes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import graphpress as gp
from graphpress.backends.onnx.layouts import contiguous_attention_outputs
from graphpress.frontends.export import export_program

SDPA = torch.ops.aten.scaled_dot_product_attention.default
CLONE = torch.ops.aten.clone.default


class WindowAttention(nn.Module):
    """Swin's pattern: heads as a transpose of [B, L, H, D], a bias of shape [H, L, L]
    broadcast over the batch as the attention mask, and the heads merged back by
    ``transpose(1, 2).contiguous().reshape(B, L, -1)``."""

    def __init__(self, dim: int = 16, heads: int = 2, length: int = 8) -> None:
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v = (nn.Linear(dim, dim) for _ in range(3))
        self.bias = nn.Parameter(torch.randn(heads, length, length))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, length, _ = x.shape
        q, k, v = (m(x).view(b, length, self.heads, -1).transpose(1, 2)
                   for m in (self.q, self.k, self.v))
        out = nn.functional.scaled_dot_product_attention(q, k, v,
                                                         attn_mask=self.bias.unsqueeze(0))
        return out.transpose(1, 2).contiguous().reshape(b, length, -1)


@pytest.mark.parametrize("passes", [[], ["dce"], ["fixpoint(dce, cse, fold_constants)"]])
def test_attention_with_a_broadcast_mask_exports(passes: list[str]) -> None:
    torch.manual_seed(0)
    model, x = WindowAttention().eval(), torch.randn(2, 8, 16)
    compiled = gp.compile(model, (x,), passes=passes, backend="onnx", verify=True)
    torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)


def test_attention_outputs_are_cloned_contiguous_in_a_copy() -> None:
    program = export_program(WindowAttention().eval(), (torch.randn(2, 8, 16),))
    before = [n.target for n in program.graph.nodes]
    lowered = contiguous_attention_outputs(program)
    assert lowered is not program and [n.target for n in program.graph.nodes] == before
    (attention,) = [n for n in lowered.graph.nodes if n.target is SDPA]
    (clone,) = attention.users
    assert clone.target is CLONE and clone.kwargs["memory_format"] == torch.contiguous_format
    assert clone.meta["val"].is_contiguous() and all(u.target is not SDPA for u in clone.users)
    lowered.validate(who="contiguous_attention_outputs")
    x = torch.randn(2, 8, 16)
    assert torch.equal(lowered(x), program(x))


def test_programs_without_attention_are_not_copied() -> None:
    program = export_program(nn.Linear(4, 3).eval(), (torch.randn(2, 4),))
    assert contiguous_attention_outputs(program) is program
