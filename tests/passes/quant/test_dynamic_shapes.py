"""insert_fake_quant on programs traced with a dynamic batch: per-tensor static qparams cover a
symbolic dim (the block is the whole dim, read with sym_size in the graph), calibrated on
batches of any size, and the program runs and exports at every batch size."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import graphpress as gp

FQ = torch.ops.graphpress.fake_quantize_affine.default


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).eval()


def _cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Flatten(), nn.Linear(8 * 6 * 6, 5)).eval()


@pytest.mark.parametrize("scheme", ["int8_static", "int8_dynamic", "fp8"])
def test_every_activation_is_quantized_with_a_dynamic_batch(scheme: str) -> None:
    model = _mlp()
    batches = [(torch.randn(b, 8),) for b in (2, 5, 3)]
    compiled = gp.compile(model, (torch.randn(4, 8),), passes=f"insert_fake_quant(scheme="
                          f"'{scheme}')", calibration_data=batches, dynamic_batch=True,
                          verify=True, verify_inputs=[(torch.randn(7, 8),)])
    (record,) = compiled.report().records
    assert record.stats["activations"] == 2 and record.stats["not_quantized"] == 0
    activations = [n for n in compiled.program.graph.nodes
                   if n.target is FQ and not compiled.program.is_weight(n.args[0])]
    assert len(activations) == 2
    if scheme == "int8_static":  # the batch dim's block is read in the graph
        assert all(isinstance(fq.args[1][0], torch.fx.Node) for fq in activations)
    assert compiled(torch.randn(9, 8)).shape == (9, 4)


def test_static_qparams_do_not_depend_on_the_batch_size() -> None:
    """One call of 6 rows equals the 6 rows called one by one: a per-tensor grid is fixed."""
    model = _cnn()
    batches = [(torch.randn(b, 3, 6, 6),) for b in (1, 4, 2)]
    compiled = gp.compile(model, (torch.randn(2, 3, 6, 6),), passes="fold_bn, insert_fake_quant",
                          calibration_data=batches, dynamic_batch=True, verify=True)
    x = torch.randn(6, 3, 6, 6)
    with torch.no_grad():
        whole = compiled(x)
        rows = torch.cat([compiled(x[i:i + 1]) for i in range(6)])
    assert torch.allclose(whole, rows, atol=1e-6)


def test_dynamic_batch_exports_to_onnx() -> None:
    model = _cnn()
    batches = [(torch.randn(b, 3, 6, 6),) for b in (1, 4, 2)]
    compiled = gp.compile(model, (torch.randn(2, 3, 6, 6),), passes="fold_bn, insert_fake_quant",
                          calibration_data=batches, dynamic_batch=True, verify=True,
                          backend="onnx")
    assert "onnx vs eager max abs error" in compiled.report().extra
    with torch.no_grad():
        x = torch.randn(5, 3, 6, 6)
        assert torch.allclose(compiled(x), compiled.program(x), atol=1e-2)


def test_per_channel_activations_with_a_symbolic_dim_are_refused() -> None:
    spec = gp.quant.QuantSpec("int8", "per_channel", axis=0, symmetric=False)
    config = gp.quant.QuantConfig(weight=gp.quant.QuantSpec("int8", "per_channel"),
                                  activation=spec)
    compiled = gp.compile(_mlp(), (torch.randn(4, 8),), passes=[gp.passes.InsertFakeQuant(config)],
                          calibration_data=[(torch.randn(3, 8),)], dynamic_batch=True)
    (record,) = compiled.report().records
    reasons = [reason for _, reason in record.skipped]
    assert reasons and all("symbolic (dynamic) shape" in r for r in reasons)
