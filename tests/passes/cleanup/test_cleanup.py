"""dce, cse, fold_constants on tiny graphs: structure and numbers."""

from __future__ import annotations

import torch
from torch import nn

import graphpress as gp
from graphpress.frontends import trace
from graphpress.ir.program import Program
from graphpress.passes import PassContext, PassManager
from graphpress.testing import assert_equivalent
from tests.models import Redundant, vec_inputs

aten = torch.ops.aten


def _run(program: Program, pipeline: str) -> list[object]:
    ctx = PassContext(example_inputs=vec_inputs())
    return PassManager(pipeline, verify=True, context=ctx, hooks=[]).run(program).records


def _targets(program: Program) -> list[object]:
    return [n.target for n in program.graph.nodes if n.op == "call_function"]


def test_dce_removes_dead_nodes_and_unused_weights(redundant_program: Program) -> None:
    assert aten.sigmoid.default in _targets(redundant_program)
    (record,) = _run(redundant_program, "dce")
    assert aten.sigmoid.default not in _targets(redundant_program)
    assert "unused.weight" not in redundant_program.weights()
    assert record.stats == {"nodes_removed": 2, "weights_removed": 2}


def test_dce_keeps_user_inputs_and_side_effects() -> None:
    class Unused(nn.Module):
        def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            torch._assert_async(x.sum() > -1e9)   # a runtime check: unused result, kept
            dead = (x + 1) * 3                    # no user, no effect: removed
            del dead
            return x * 2

    program = trace(Unused(), (torch.randn(3), torch.randn(3)))
    targets_before = _targets(program)
    assert aten._assert_async.default in targets_before and aten.add.Tensor in targets_before
    records = PassManager("dce", context=PassContext((torch.randn(3), torch.randn(3))),
                          hooks=[]).run(program).records
    targets = _targets(program)
    assert aten._assert_async.default in targets and aten.gt.Scalar in targets
    assert aten.add.Tensor not in targets and records[0].stats["nodes_removed"] == 2
    assert len(program.user_inputs()) == 2


def test_cse_merges_identical_and_keeps_distinct_literals() -> None:
    class Literals(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return (x + 1) * (x + 1) + (x + 1.5) + torch.dropout(x, 0.5, True) + torch.dropout(
                x, 0.5, True)

    program = trace(Literals(), vec_inputs())
    adds = sum(1 for t in _targets(program) if t == aten.add.Tensor)
    PassManager("cse", hooks=[]).run(program)
    assert sum(1 for t in _targets(program) if t == aten.add.Tensor) == adds - 1
    assert sum(1 for t in _targets(program) if t == aten.dropout.default) == 2


def test_cse_distinguishes_int_float_bool() -> None:
    class Mixed(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.sum(x, 0, True) + torch.sum(x, 0, False)

    program = trace(Mixed(), vec_inputs())
    PassManager("cse", hooks=[]).run(program)
    assert sum(1 for t in _targets(program) if t == aten.sum.dim_IntList) == 2


def test_fold_constants_folds_weight_chains() -> None:
    model = Redundant().eval()
    redundant_program = trace(model, vec_inputs())
    records = _run(redundant_program, "fold_constants, dce")
    assert records[0].stats["folded"] == 3   # t, mul by 2.0, scale*scale
    names = set(redundant_program.weights())
    assert "scale" not in names and any(n.endswith("_folded") for n in names)
    kinds = {redundant_program.weight_name(n): redundant_program.input_kind(n).name
             for n in redundant_program.nodes("placeholder") if redundant_program.is_weight(n)}
    folded = {k: v for k, v in kinds.items() if k.endswith("_folded")}
    assert sorted(folded.values()) == ["BUFFER", "PARAMETER"]
    assert_equivalent(redundant_program, model, vec_inputs(), rtol=0, atol=0)


def test_fold_constants_does_not_grow_model() -> None:
    class Expand(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bias = nn.Parameter(torch.randn(1, 2048))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + self.bias.expand(4, 2048)

    program = trace(Expand(), (torch.randn(4, 2048),))
    records = PassManager("fold_constants", hooks=[]).run(program).records
    assert records[0].stats["folded"] == 0
    assert "would add" in records[0].skipped[0][1]


def test_fold_constants_skips_symbolic_shapes() -> None:
    class Arange(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + torch.arange(x.shape[0]).unsqueeze(1)

    program = trace(Arange(), (torch.randn(5, 3),), dynamic_batch=True)
    records = PassManager("fold_constants", hooks=[]).run(program).records
    assert records[0].stats["folded"] == 0
    assert aten.arange.default in _targets(program), "the batch-sized arange stays in the graph"
    x = torch.randn(7, 3)
    assert_equivalent(program, Arange(), (x,), rtol=0, atol=0)


class RelativePositionAttention(nn.Module):
    """SDPA whose attn_mask is a learned relative-position bias gathered by a constant index:
    the whole mask is a computation on weights, which fold_constants precomputes."""

    def __init__(self, tokens: int = 6, dim: int = 16, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.table = nn.Parameter(torch.randn(heads, 2 * tokens - 1))
        positions = torch.arange(tokens)
        self.register_buffer("index", positions[None, :] - positions[:, None] + tokens - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        bias = self.table[:, self.index].unsqueeze(0) * 0.5
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return out.transpose(1, 2).reshape(b, n, d)


def test_constant_relative_position_bias_folds_into_sdpa_bit_exactly() -> None:
    torch.manual_seed(0)
    model = RelativePositionAttention().eval()
    x = torch.randn(2, 6, 16)
    compiled = gp.compile(model, (x,), passes="fixpoint(fold_constants, cse, dce)", verify=True)
    sdpa = next(n for n in compiled.program.graph.nodes
                if n.target == aten.scaled_dot_product_attention.default)
    mask = sdpa.kwargs.get("attn_mask", sdpa.args[3] if len(sdpa.args) > 3 else None)
    assert compiled.program.is_weight(mask), "the bias became one precomputed weight"
    assert aten.index.Tensor not in _targets(compiled.program)
    for sample in (x, torch.randn(2, 6, 16)):
        with torch.no_grad():
            assert torch.equal(compiled(sample), model(sample))
