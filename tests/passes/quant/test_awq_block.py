"""AWQ's block objective: the region from a producer's readers to where they meet, and the
objective it scores, against the same computation written out by hand."""

from __future__ import annotations

import pytest
import torch

import graphpress as gp
from graphpress.passes.quant.awq_block import block_objective, find_region
from graphpress.passes.quant.channel_scaling import find_chains
from graphpress.quant.algorithms.statistics import Values, collect
from tests.passes.quant.test_algorithms import W4, _compile, _error, _norm_mlp


def _program_and_chain() -> tuple[gp.Program, object, list]:
    model, batches = _norm_mlp()
    program = gp.compile(model, batches[0], passes=[]).program
    chains, _ = find_chains(program, ("norm", "layer"), ("linear",))
    (chain,) = [c for c in chains if len(c.readers) == 2]       # the norm -> up, gate
    return program, chain, batches


def test_region_ends_where_the_readers_meet() -> None:
    _, chain, _ = _program_and_chain()
    region = find_region([r.node for r in chain.readers])
    assert region is not None
    ops = [str(n.target) for n in region.nodes]
    assert str(region.merge.target) == "aten.mul.Tensor" and region.nodes[-1] is region.merge
    assert {r.node for r in chain.readers} <= set(region.nodes)
    assert any("sigmoid" in op for op in ops) and not any("down" in n.name for n in region.nodes)
    assert chain.readers[0].value in region.externals             # the norm's output
    assert {r.weight for r in chain.readers} <= set(region.externals)


def test_objective_is_the_error_at_the_merge_point_by_hand() -> None:
    """L(C) = sum_b || up(h) sigmoid(gate(h)) - (h C_up^T) sigmoid(h C_gate^T) ||^2."""
    program, chain, batches = _program_and_chain()
    region = find_region([r.node for r in chain.readers])
    recorded = {n.name: Values(8) for n in region.externals if not program.is_weight(n)}
    collect(program, [(b, {}) for b in batches], {k: [v] for k, v in recorded.items()},
            what="test")
    weights = [r.weight for r in chain.readers]
    loss = block_objective(program, region, weights, {k: v.value for k, v in recorded.items()})
    originals = [program.weight(w).detach() for w in weights]
    assert loss(originals) == 0.0
    generator = torch.Generator().manual_seed(2)
    candidates = [w + 0.01 * torch.randn(w.shape, generator=generator) for w in originals]
    by_name = dict(zip([r.node.name for r in chain.readers], range(2), strict=True))
    up, gate = (by_name[n] for n in ("linear", "linear_1"))
    expected = 0.0
    for h in recorded[chain.readers[0].value.name].value:
        reference = (h @ originals[up].T) * torch.sigmoid(h @ originals[gate].T)
        value = (h @ candidates[up].T) * torch.sigmoid(h @ candidates[gate].T)
        expected += float(((reference - value) ** 2).sum())
    assert loss(candidates) == pytest.approx(expected, rel=1e-5)


def test_awq_with_the_block_objective_passes_its_contract() -> None:
    model, batches = _norm_mlp()
    rtn = _compile(model, batches, W4 + ")")
    awq = _compile(model, batches, W4 + ", algorithm='awq', algorithm_options={'loss': "
                   "'block'})")
    record = awq.report().records[0]
    assert record.max_error <= 1e-5
    assert any("error at mul" in line for line in record.details["summary"])
    assert _error(awq, model, batches) < _error(rtn, model, batches)


def test_unknown_loss_is_refused() -> None:
    with pytest.raises(ValueError, match="loss='block output' is not one of 'block', 'linear'"):
        gp.passes.InsertFakeQuant(algorithm="awq", algorithm_options={"loss": "block output"})
