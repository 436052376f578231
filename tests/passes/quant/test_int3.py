"""3-bit weights (``int3_weight_only``): the grid, the pass with and without the weight
algorithms, and the paths downstream that pack weights (which refuse int3 with the reason)."""

from __future__ import annotations

import torch
from torch import nn

import graphpress as gp
from graphpress.ops import quant as gq
from graphpress.testing.quant_reference import reference_fake_quantize

W3 = "insert_fake_quant(scheme='int3_weight_only', group_size=16"
FQ = torch.ops.graphpress.fake_quantize_affine.default


def _mlp() -> tuple[nn.Module, list[tuple[torch.Tensor]]]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 16)).eval()
    generator = torch.Generator().manual_seed(1)
    return model, [(torch.randn(8, 32, generator=generator),) for _ in range(4)]


def test_int3_grid_matches_torch_and_the_reference_with_ties() -> None:
    """[-4, 3] with zero points: bit-identical to torch's per-channel fake-quant, ties (exact
    .5 multiples of the scale) round to even, values beyond the grid clamp."""
    scale = torch.tensor([0.5, 0.25, 1.0])
    zero_point = torch.tensor([0, 1, -1], dtype=torch.int32)
    x = torch.tensor([[-9.0, -1.75, -0.25, 0.25, 0.75, 1.25, 1.5, 7.0],
                      [-2.0, -0.375, -0.125, 0.125, 0.375, 0.5, 0.625, 3.0],
                      [-6.0, -2.5, -1.5, -0.5, 0.5, 1.5, 2.5, 4.0]])
    ours = gq.fake_quantize_affine(x, [1, 8], scale[:, None], zero_point[:, None], -4, 3, "int3")
    torch_fq = torch.fake_quantize_per_channel_affine(x, scale, zero_point, 0, -4, 3)
    assert torch.equal(ours, torch_fq)
    reference = reference_fake_quantize(x, [1, 8], scale[:, None], zero_point[:, None], -4, 3,
                                        "int3")
    assert torch.equal(ours, reference)
    q = gq.quantize_affine(x, [1, 8], scale[:, None], zero_point[:, None], -4, 3, "int3")
    assert q.dtype == torch.int8 and int(q.min()) == -4 and int(q.max()) == 3
    assert ours[0].tolist() == [-2.0, -2.0, 0.0, 0.0, 1.0, 1.0, 1.5, 1.5]  # ties to even


def test_int3_weight_only_puts_eight_levels_per_group() -> None:
    model, batches = _mlp()
    compiled = gp.compile(model, batches[0], passes=W3 + ")", verify=True)
    record = compiled.report().records[0]
    assert record.stats["weights"] == 2 and record.max_error <= 1e-5
    assert any("int3 per_group g16 asym" in line for line in record.details["summary"])
    for node in compiled.program.graph.nodes:
        if node.target is FQ:
            assert node.args[4:] == (-4.0, 3.0, "int3")
            weight = compiled.program.weight(node.args[0])
            value = FQ(weight, node.args[1], compiled.program.weight(node.args[2]),
                       compiled.program.weight(node.args[3]), -4.0, 3.0, "int3")
            levels = value.reshape(value.shape[0], -1, 16)[0, 0].unique()
            assert 2 <= len(levels) <= 8
    int4 = gp.compile(model, batches[0], verify=True,
                      passes="insert_fake_quant(scheme='int4_weight_only', group_size=16)")
    with torch.no_grad():
        error3 = sum(float((compiled(*b) - model(*b)).pow(2).sum()) for b in batches)
        error4 = sum(float((int4(*b) - model(*b)).pow(2).sum()) for b in batches)
    assert error3 > 2 * error4, "3 bits err more than 4"


def test_int3_with_gptq_and_awq_beats_rounding() -> None:
    model, batches = _mlp()

    def error(options: str) -> float:
        compiled = gp.compile(model, batches[0], passes=W3 + options + ")", verify=True,
                              calibration_data=batches)
        with torch.no_grad():
            return sum(float((compiled(*b) - model(*b)).pow(2).sum()) for b in batches)

    rtn = error("")
    assert error(", algorithm='gptq'") < rtn
    assert error(", algorithm='awq'") <= rtn


def test_packing_refuses_int3_with_the_reason() -> None:
    model, batches = _mlp()
    compiled = gp.compile(model, batches[0], passes=W3 + "), fuse_dequant_matmul",
                          verify=True)
    record = compiled.report().records[1]
    assert not record.changed
    reasons = [reason for _, reason in record.skipped]
    assert len(reasons) == 2 and all("int3" in r and "cannot pack" in r for r in reasons)
