"""insert_fake_quant's placements beyond layer inputs: quantized attention
(``attention=True``) and shared qparams for cat and residual adds (``shared_qparams``)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import graphpress as gp
from graphpress.passes.quant.calibrate import activation_qparams
from graphpress.quant import calibration as calibration_module
from graphpress.quant.observers import MinMaxObserver

FQ = torch.ops.graphpress.fake_quantize_affine.default


class Attention(nn.Module):
    """One head-split self-attention, with SDPA or written out with matmul and softmax."""

    def __init__(self, sdpa: bool) -> None:
        super().__init__()
        self.sdpa = sdpa
        self.qkv = nn.Linear(16, 48)
        self.out = nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = (p.view(b, t, 2, 8).transpose(1, 2) for p in self.qkv(x).chunk(3, dim=-1))
        if self.sdpa:
            y = F.scaled_dot_product_attention(q, k, v)
        else:
            y = torch.softmax(q @ k.transpose(-1, -2) / 8 ** 0.5, dim=-1) @ v
        return self.out(y.transpose(1, 2).reshape(b, t, 16))


class CatAdd(nn.Module):
    """Two branches concatenated, then a residual add: the ops shared qparams are for."""

    def __init__(self) -> None:
        super().__init__()
        self.left, self.right = nn.Linear(8, 8), nn.Linear(8, 4)
        self.mix = nn.Linear(12, 12)
        self.head = nn.Linear(12, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        joined = torch.cat([torch.relu(self.left(x)), 3 * torch.tanh(self.right(x))], dim=-1)
        return self.head(joined + self.mix(joined))


def _batches(*shape: int) -> list[tuple[torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    return [(torch.randn(*shape, generator=generator),) for _ in range(4)]


def _quantized_args(compiled: gp.CompiledModel, op: str) -> list[list[Any]]:
    """For every node calling ``op``, its tensor arguments that are fake-quant outputs."""
    found = []
    for node in compiled.program.graph.nodes:
        if node.op == "call_function" and op in str(node.target):
            flat = node.args[0] if op.endswith("cat") else node.args
            found.append([a for a in flat if getattr(a, "target", None) is FQ])
    return found


@pytest.mark.parametrize("scheme", ["int8_static", "int8_dynamic"])
def test_sdpa_query_key_value_are_quantized_with_their_blocks(scheme: str) -> None:
    torch.manual_seed(0)
    model, x = Attention(sdpa=True).eval(), torch.randn(2, 6, 16)
    compiled = gp.compile(model, (x,), passes=[gp.passes.InsertFakeQuant(
        scheme=scheme, attention=True)], calibration_data=_batches(2, 6, 16), verify=True)
    (quantized,) = _quantized_args(compiled, "scaled_dot_product_attention")
    assert len(quantized) == 3
    blocks = [list(fq.args[1]) for fq in quantized]
    if scheme == "int8_dynamic":  # q, k one scale per token; v one per channel (over tokens)
        assert blocks == [[1, 1, 1, 8], [1, 1, 1, 8], [1, 1, 6, 1]]
    else:
        assert blocks == [[2, 2, 6, 8]] * 3
    (record,) = compiled.report().records
    assert record.max_error is not None and record.max_error < 1e-5


def test_written_out_attention_quantizes_both_operands_of_each_product() -> None:
    torch.manual_seed(0)
    model, x = Attention(sdpa=False).eval(), torch.randn(2, 6, 16)
    compiled = gp.compile(model, (x,), passes="insert_fake_quant(scheme='int8_dynamic', "
                          "attention=True)", verify=True)
    products = [q for q in _quantized_args(compiled, "aten.matmul") if q]
    assert len(products) == 2 and all(len(q) == 2 for q in products)
    right_blocks = [list(q[1].args[1]) for q in products]  # k^T per token, v per channel
    assert right_blocks == [[1, 1, 8, 1], [1, 1, 6, 1]]


def test_attention_stays_float_by_default() -> None:
    torch.manual_seed(0)
    model, x = Attention(sdpa=True).eval(), torch.randn(2, 6, 16)
    compiled = gp.compile(model, (x,), passes="insert_fake_quant(scheme='int8_dynamic')")
    assert _quantized_args(compiled, "scaled_dot_product_attention") == [[]]


def test_cat_and_residual_add_share_one_scale() -> None:
    torch.manual_seed(0)
    model, x = CatAdd().eval(), torch.randn(5, 8)
    batches = _batches(5, 8)
    compiled = gp.compile(model, (x,), passes=[gp.passes.InsertFakeQuant(
        shared_qparams=("cat", "add"))], calibration_data=batches, verify=True)
    (cat_inputs,) = _quantized_args(compiled, "aten.cat")
    (add_inputs,) = _quantized_args(compiled, "aten.add")
    program = compiled.program
    scales = {float(program.weight(fq.args[2])) for fq in cat_inputs + add_inputs}
    assert len(cat_inputs) == 2 and len(add_inputs) == 2
    assert len(scales) == 1, "one group: the cat, its output read by mix, and the add"
    # one observer over every member: its range covers the widest of them on the batches
    with torch.no_grad():
        left = torch.cat([torch.relu(model.left(b)) for (b,) in batches])
        right = torch.cat([3 * torch.tanh(model.right(b)) for (b,) in batches])
        joined = torch.cat([left, right], dim=-1)
        widest = torch.cat([joined.flatten(), model.mix(joined).flatten()])
    expected = float(widest.max() - widest.min()) / 255
    assert scales.pop() == pytest.approx(expected, rel=1e-6)
    (record,) = compiled.report().records
    assert record.stats["shared_qparam_groups"] == 1
    assert any("shared by group 0" in line for line in record.details["summary"])


def test_shared_qparams_go_through_onnx() -> None:
    torch.manual_seed(0)
    model, x = CatAdd().eval(), torch.randn(5, 8)
    compiled = gp.compile(model, (x,), passes="insert_fake_quant(scheme='int8_static', "
                          "shared_qparams=('cat', 'add'))", calibration_data=_batches(5, 8),
                          verify=True, backend="onnx")
    assert "onnx vs eager max abs error" in compiled.report().extra


@pytest.mark.parametrize(("options", "message"), [
    ({"scheme": "int8_dynamic", "shared_qparams": ("cat",)}, "static per-tensor"),
    ({"scheme": "int8_static", "shared_qparams": ("mul",)}, "shared_qparams takes"),
    ({"scheme": "int8_weight_only", "attention": True}, "needs an activation spec"),
])
def test_placement_options_are_validated(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        gp.passes.InsertFakeQuant(**options)


def test_a_shared_observer_is_all_reduced_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """Distributed calibration reduces each observer once, even one fed by several values."""
    torch.manual_seed(0)
    model, x = CatAdd().eval(), torch.randn(5, 8)
    program = gp.compile(model, (x,)).program
    layers_pass = gp.passes.InsertFakeQuant(shared_qparams=("cat", "add"))
    layers, _, groups = layers_pass._place(program)
    static = [op for layer in layers for op in layer.operands if op.role == "activation"]
    reduced: list[int] = []
    monkeypatch.setattr(calibration_module.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(calibration_module.dist, "get_backend", lambda: "gloo")
    monkeypatch.setattr(calibration_module.dist, "all_reduce", lambda *a, **k: None)
    monkeypatch.setattr(MinMaxObserver, "all_reduce", lambda self: reduced.append(id(self)))
    activation_qparams(program, static, [((b,), {}) for (b,) in _batches(5, 8)], groups)
    assert len(reduced) == len(set(reduced)) > 0
