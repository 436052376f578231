"""fuse_dequant_matmul on tiny programs: which layers it fuses (linear, matmul with leading
dims, addmm, transposed weights, shared weights), what leaves the state dict, the report, the
refusals, the W8A8 dynamic variant, and the ONNX backend on the result."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

import graphpress as gp
from graphpress.errors import BackendError, PipelineError
from graphpress.ops.quant import choose_qparams_affine

FQ = torch.ops.graphpress.fake_quantize_affine.default
DEQUANT = torch.ops.graphpress.dequant_matmul.default
DYNAMIC = torch.ops.graphpress.dynamic_quant_matmul.default
INT4 = "insert_fake_quant(scheme='int4_weight_only', group_size=16)"


class Layers(nn.Module):
    """A linear, a matmul with leading dims on a stored [K, N] weight, and an addmm (Conv1D)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(64, 32)
        self.w = nn.Parameter(torch.randn(32, 48) * 0.1)
        self.conv1d_weight = nn.Parameter(torch.randn(48, 40) * 0.1)
        self.conv1d_bias = nn.Parameter(torch.randn(40))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x) @ self.w
        return torch.addmm(self.conv1d_bias, h.reshape(-1, 48), self.conv1d_weight)


class Transposed(nn.Module):
    """Weights fake-quantized by hand and used through transposes: ``x @ fq(W).t()`` with W
    [N, K], and ``linear(x, fq(V).t())`` with V stored [K, N]."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(24, 32))
        self.v = nn.Parameter(torch.randn(24, 40))
        for name, weight, block in (("w", self.w, [1, 16]), ("v", self.v, [8, 1])):
            scale, zero = choose_qparams_affine(weight.detach(), block, -8, 7, False, "int4")
            self.register_buffer(f"{name}_scale", scale)
            self.register_buffer(f"{name}_zero", zero)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = FQ(self.w, [1, 16], self.w_scale, self.w_zero, -8, 7, "int4")
        v = FQ(self.v, [8, 1], self.v_scale, self.v_zero, -8, 7, "int4")
        return nn.functional.linear(x @ w.t(), v.t())


class TiedHead(nn.Module):
    """An embedding whose table is also the output projection (lm_head)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, 32)
        self.hidden = nn.Linear(32, 32)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(self.hidden(self.embed(ids)), self.embed.weight)


def _compile(model: nn.Module, inputs: tuple[object, ...], quant: str = INT4,
             **kwargs: object) -> gp.CompiledModel:
    return gp.compile(model.eval(), inputs, passes=f"{quant}, fuse_dequant_matmul",
                      verify=True, **kwargs)


def _count(compiled: gp.CompiledModel, target: object) -> int:
    return sum(n.target == target for n in compiled.program.graph.nodes)


def test_linear_matmul_and_addmm_are_fused_and_float_weights_leave() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 3, 64)
    compiled = _compile(Layers(), (x,))
    record = compiled.report().records[-1]
    assert record.name == "fuse_dequant_matmul" and record.changed
    assert record.stats["fused"] == 3 and record.skipped == []
    assert _count(compiled, DEQUANT) == 3 and _count(compiled, FQ) == 0
    weights = compiled.program.weights()
    assert not {"fc.weight", "w", "conv1d_weight"} & set(weights)
    assert not any(name.endswith(("_weight_scale", "_zero_point")) for name in weights)
    assert weights["fc.weight_qweight"].shape == (32, 32)
    assert weights["fc.weight_qweight"].dtype == torch.uint8
    assert weights["w_scales"].shape == (48, 2) and weights["conv1d_weight_zeros"].shape == (40, 2)
    before, after = record.stats["weight_bytes_before"], record.stats["weight_bytes_after"]
    assert before == 4 * (32 * 64 + 32 * 48 + 48 * 40)
    assert after == sum(t.numel() * t.element_size() for n, t in weights.items()
                        if n.endswith(("_qweight", "_scales", "_zeros")))
    assert after / before < 0.21  # 4 bits + a float32 scale and a 4-bit zero per 16 weights
    assert record.max_error is not None and record.max_error <= 1e-5
    summary = compiled.report().details("fuse_dequant_matmul")["summary"]
    assert summary[0].startswith("linear (fc): linear (32, 64) -> int4 g16")


def test_transposed_weights_follow_their_k_axis() -> None:
    torch.manual_seed(0)
    model, x = Transposed(), torch.randn(5, 32)
    compiled = gp.compile(model.eval(), (x,), passes="fuse_dequant_matmul", verify=True)
    assert _count(compiled, DEQUANT) == 2 and _count(compiled, FQ) == 0
    assert _count(compiled, torch.ops.aten.t.default) == 0
    weights = compiled.program.weights()
    assert weights["w_qweight"].shape == (24, 16)       # [N, K/2], groups of 16 along K
    assert weights["v_qweight"].shape == (40, 12)       # V [24, 40] read as [N=40, K=24]
    assert weights["v_scales"].shape == (40, 3)         # per-channel... blocks of 8 along K
    torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)


def test_shared_weights_are_packed_once_and_tied_floats_stay() -> None:
    torch.manual_seed(0)
    ids = torch.randint(0, 50, (2, 7))
    compiled = _compile(TiedHead(), (ids,))
    record = compiled.report().records[-1]
    assert record.stats["fused"] == 2
    weights = compiled.program.weights()
    assert "embed.weight" in weights  # the embedding still reads the float table
    kept = compiled.report().details("fuse_dequant_matmul")["float_weights_kept"]
    assert kept and kept[0].startswith("embed.weight (still read by %embedding")
    assert record.stats["weight_bytes_after"] > 50 * 32 * 4


def test_int8_dynamic_becomes_the_w8a8_op() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 3, 64)
    compiled = _compile(Layers(), (x,), "insert_fake_quant(scheme='int8_dynamic')")
    record = compiled.report().records[-1]
    assert record.stats["fused_w8a8"] == 3 and _count(compiled, DYNAMIC) == 3
    assert _count(compiled, FQ) == 0
    assert _count(compiled, torch.ops.graphpress.choose_qparams_affine.default) == 0
    assert compiled.program.weights()["fc.weight_qweight"].dtype == torch.int8
    no_w8a8 = gp.compile(Layers().eval(), (x,), verify=True, passes=[
        gp.passes.InsertFakeQuant(gp.quant.int8_dynamic()),
        gp.passes.FuseDequantMatmul(w8a8=False)])
    assert _count(no_w8a8, DEQUANT) == 3 and _count(no_w8a8, FQ) == 3  # activations stay


def test_weight_only_int8_and_static_activations() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 3, 64)
    compiled = _compile(Layers(), (x,), "insert_fake_quant(scheme='int8_weight_only')")
    assert _count(compiled, DEQUANT) == 3
    static = _compile(Layers(), (x,), "insert_fake_quant(scheme='int8_static')",
                      calibration_data=[(torch.randn(2, 3, 64),) for _ in range(2)])
    assert _count(static, DEQUANT) == 3 and _count(static, FQ) == 3  # activations stay


def test_refusals_name_the_layer_and_the_reason() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 3, 64)
    fp8 = _compile(Layers(), (x,), "insert_fake_quant(scheme='fp8')")
    record = fp8.report().records[-1]
    assert not record.changed and len(record.skipped) == 3
    assert "fake-quantized to float8_e4m3fn, which the op cannot pack" in record.skipped[0][1]
    activation_only = gp.quant.QuantConfig(
        activation=gp.quant.QuantSpec("int8", "per_token", symmetric=False, dynamic=True))
    compiled = gp.compile(Layers().eval(), (x,), verify=True, passes=[
        gp.passes.InsertFakeQuant(activation_only), gp.passes.FuseDequantMatmul()])
    reasons = dict(compiled.report().records[-1].skipped)
    assert set(reasons) == {"linear", "matmul", "addmm"}
    assert "activation-only quantization" in reasons["linear"]


class OddK(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(33, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


def test_odd_k_with_four_bits_is_refused() -> None:
    int4_per_channel = gp.quant.QuantConfig(
        weight=gp.quant.QuantSpec("int4", "per_channel", symmetric=False))
    compiled = gp.compile(OddK().eval(), (torch.randn(2, 33),), verify=True, passes=[
        gp.passes.InsertFakeQuant(int4_per_channel), gp.passes.FuseDequantMatmul()])
    ((node, reason),) = compiled.report().records[-1].skipped
    assert node == "linear" and "K=33 is odd" in reason


def test_half_precision_scales_are_checked_statistically() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 3, 64)
    compiled = gp.compile(Layers().eval(), (x,), verify=True, passes=[
        gp.passes.InsertFakeQuant(gp.quant.int4_weight_only(group_size=16)),
        gp.passes.FuseDequantMatmul(scale_dtype="float16")])
    record = compiled.report().records[-1]
    assert record.contract_kind == "statistical"
    assert compiled.program.weights()["fc.weight_scales"].dtype == torch.float16
    with pytest.raises(ValueError, match="scale_dtype must be one of"):
        gp.passes.FuseDequantMatmul(scale_dtype="float8")


def test_runs_after_insert_fake_quant() -> None:
    with pytest.raises(PipelineError, match="insert_fake_quant"):
        gp.compile(Layers().eval(), (torch.randn(2, 3, 64),),
                   passes=f"fuse_dequant_matmul, {INT4}")


@pytest.mark.parametrize(("group", "onnx_op"), [(16, "MatMulNBits"), (8, "MatMul")])
def test_onnx_backend_runs_the_packed_program(group: int, onnx_op: str, tmp_path: object
                                              ) -> None:
    torch.manual_seed(0)
    model, x = Layers(), torch.randn(2, 3, 64)
    quant = f"insert_fake_quant(scheme='int4_weight_only', group_size={group})"
    compiled = _compile(model, (x,), quant, backend="onnx")
    proto = compiled.artifact.onnx_program.model_proto
    ops = [node.op_type for node in proto.graph.node]
    assert ops.count(onnx_op) >= 3 and not any("Quantize" in op for op in ops)
    eager = _compile(model, (x,), quant)
    torch.testing.assert_close(compiled(x), eager(x), rtol=1e-4, atol=1e-4)
    compiled.save(tmp_path)
    torch.testing.assert_close(gp.load(tmp_path)(x), compiled(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", ["eager", "onnx"])
def test_signed_scales_pack_and_run(backend: str) -> None:
    """A signed-scale int4 grid (negative scales where a group's extreme is positive) packs
    and runs like any other."""
    torch.manual_seed(0)
    model, x = Layers(), torch.randn(2, 3, 64)
    config = gp.quant.int4_weight_only(group_size=16, symmetric=True, signed_scale=True)
    quantized = gp.compile(model, (x,), passes=[gp.passes.InsertFakeQuant(config)])
    assert any(bool((t < 0).any()) for n, t in quantized.program.weights().items()
               if n.endswith("_scale"))
    fused = gp.compile(model, (x,), passes=[gp.passes.InsertFakeQuant(config),
                                            "fuse_dequant_matmul"], backend=backend, verify=True)
    torch.testing.assert_close(fused(x), quantized(x), rtol=1e-4, atol=1e-4)


def test_saved_eager_program_reloads(tmp_path: object) -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 3, 64)
    compiled = _compile(Layers(), (x,))
    compiled.save(tmp_path)
    assert torch.equal(gp.load(tmp_path)(x), compiled(x))


def _accuracy_levels(proto: object) -> list[int]:
    return [next((a.i for a in node.attribute if a.name == "accuracy_level"), 0)
            for node in proto.graph.node if node.op_type == "MatMulNBits"]


def test_onnx_accuracy_level_is_a_backend_option(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model, x = Layers(), torch.randn(2, 3, 64)
    eager = _compile(model, (x,))
    faithful = _compile(model, (x,), backend="onnx")
    assert set(_accuracy_levels(faithful.artifact.onnx_program.model_proto)) == {0}
    fast = gp.compile(model.eval(), (x,), passes=f"{INT4}, fuse_dequant_matmul", backend="onnx",
                      backend_options={"accuracy_level": 4})
    levels = _accuracy_levels(fast.artifact.onnx_program.model_proto)
    assert len(levels) >= 3 and set(levels) == {4}
    assert fast.report().extra["onnx MatMulNBits accuracy level"] == "4"
    # int8 activations: near the program, not at float32 tolerance as level 0 is
    torch.testing.assert_close(faithful(x), eager(x), rtol=1e-4, atol=1e-4)
    error = (fast(x) - eager(x)).abs().max().item()
    assert 1e-4 < error < 0.05 * eager(x).abs().max().item()
    fast.save(tmp_path)
    manifest = json.loads((tmp_path / "onnx_manifest.json").read_text())
    assert manifest["accuracy_level"] == 4
    assert manifest["session_config"]["session.qdq_matmulnbits_accuracy_level"] == "4"


@pytest.mark.parametrize("level", [5, -1, 2.0, True, "4"])
def test_onnx_accuracy_level_is_validated(level: object) -> None:
    with pytest.raises(BackendError, match=r"accuracy_level must be one of \[0, 1, 2, 3, 4\]"):
        gp.compile(Layers().eval(), (torch.randn(2, 3, 64),), passes=INT4, backend="onnx",
                   backend_options={"accuracy_level": level})


def test_verify_under_a_narrow_accuracy_level_names_the_option() -> None:
    torch.manual_seed(0)
    model, x = Layers(), torch.randn(2, 3, 64)
    with pytest.raises(BackendError, match=r"accuracy_level=4 computes MatMulNBits' "
                                           r"activations in a narrower type"):
        gp.compile(model.eval(), (x,), passes=f"{INT4}, fuse_dequant_matmul", backend="onnx",
                   verify=True, backend_options={"accuracy_level": 4})
