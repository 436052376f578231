"""ONNX export of the graphpress::*_affine ops: every dtype and granularity becomes Q/DQ that
onnx.checker accepts and onnxruntime runs within one quantization step of eager."""

from __future__ import annotations

import onnx
import pytest
import torch
from torch import nn

import graphpress as gp
from graphpress.errors import BackendError

gq = torch.ops.graphpress
RANGES = {"int8": (-128, 127), "uint8": (0, 255), "int4": (-8, 7), "uint4": (0, 15),
          "int3": (-4, 3), "uint3": (0, 7),
          "float8_e4m3fn": (-448.0, 448.0), "float8_e5m2": (-57344.0, 57344.0)}
# granularity -> (weight block of a [6, 8] weight, activation block of a [3, 8] input)
LAYOUTS = {"per_tensor": ([6, 8], [3, 8]), "per_channel": ([1, 8], [1, 8]),
           "per_group": ([1, 4], [1, 4])}


class QuantLinear(nn.Module):
    """Fake-quantizes its weight (static qparams) and its input (qparams chosen in the graph),
    and returns both next to the linear output."""

    def __init__(self, dtype: str, granularity: str, symmetric: bool,
                 narrow: bool = False) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 6)
        low, high = RANGES[dtype]
        self.qrange = (-high, high) if narrow else (low, high)
        self.dtype, self.symmetric = dtype, symmetric
        self.w_block, self.x_block = LAYOUTS[granularity]
        scale, zero_point = gq.choose_qparams_affine(self.fc.weight.detach(), self.w_block,
                                                     *self.qrange, symmetric, dtype)
        self.register_buffer("w_scale", scale)
        self.register_buffer("w_zero", zero_point)

    def _zero(self, zero_point: torch.Tensor) -> torch.Tensor | None:
        return None if self.symmetric or self.dtype.startswith("float8") else zero_point

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        w = gq.fake_quantize_affine(self.fc.weight, self.w_block, self.w_scale,
                                    self._zero(self.w_zero), *self.qrange, self.dtype)
        scale, zero_point = gq.choose_qparams_affine(x, self.x_block, *self.qrange,
                                                     self.symmetric, self.dtype)
        xq = gq.fake_quantize_affine(x, self.x_block, scale, self._zero(zero_point),
                                     *self.qrange, self.dtype)
        return nn.functional.linear(xq, w, self.fc.bias), xq, w, scale


def _step(scale: torch.Tensor, block: list[int]) -> torch.Tensor:
    for dim, b in enumerate(block):
        if scale.shape[dim] != 1:
            scale = scale.repeat_interleave(b, dim=dim)
    return scale


CASES = [(dtype, granularity, symmetric)
         for dtype in RANGES for granularity in LAYOUTS
         for symmetric in ([True] if dtype.startswith("float8") else
                           [False] if dtype.startswith("uint") else [True, False])]


@pytest.mark.parametrize(("dtype", "granularity", "symmetric"), CASES)
def test_every_dtype_and_granularity_runs_in_onnxruntime(dtype: str, granularity: str,
                                                         symmetric: bool) -> None:
    torch.manual_seed(0)
    model, x = QuantLinear(dtype, granularity, symmetric).eval(), torch.randn(3, 8)
    # about one step; checked exactly below
    tolerance = {"4": 0.5, "3": 1.0}.get(dtype[-1], 0.05)
    compiled = gp.compile(model, (x,), backend="onnx", verify=True,
                          backend_options={"opset": 21, "atol": tolerance, "rtol": tolerance})
    onnx.checker.check_model(compiled.artifact.onnx_program.model_proto, full_check=True)
    graph = compiled.artifact.onnx_program.model_proto.graph
    assert "DequantizeLinear" in {node.op_type for node in graph.node}
    # the weight is stored quantized (8-bit or float8 storage), not as float32
    stored = {init.data_type for init in graph.initializer if list(init.dims) == [6, 8]}
    assert stored and onnx.TensorProto.FLOAT not in stored
    got, expected = compiled(x), model(x)
    assert torch.equal(got[3], expected[3])  # the chosen scales
    assert torch.equal(got[2], expected[2])  # stored weights: bit-identical to eager
    if dtype.startswith("float8"):  # both divide and round to nearest even: bit-exact
        assert torch.equal(got[1], expected[1])
    else:  # a scale chosen in the graph: the exact formula, within float rounding
        x_step = _step(expected[3], model.x_block)
        assert ((got[1] - expected[1]).abs() <= x_step * (1 + 1e-6)).all()


@pytest.mark.parametrize("dtype", ["int8", "int4"])
def test_narrow_symmetric_ranges_are_clipped(dtype: str) -> None:
    torch.manual_seed(1)
    model, x = QuantLinear(dtype, "per_channel", True, narrow=True).eval(), torch.randn(3, 8) * 4
    compiled = gp.compile(model, (x,), backend="onnx", verify=True,
                          backend_options={"opset": 21, "atol": 0.05, "rtol": 0.05})
    graph = compiled.artifact.onnx_program.model_proto.graph
    assert "Clip" in {node.op_type for node in graph.node}
    low, high = model.qrange
    got = compiled(x)
    levels = got[1] / _step(got[3], model.x_block)
    assert levels.round().min() >= low and levels.round().max() <= high


def test_int8_per_tensor_and_per_channel_need_no_opset_21() -> None:
    torch.manual_seed(2)
    model, x = QuantLinear("int8", "per_channel", False).eval(), torch.randn(3, 8)
    compiled = gp.compile(model, (x,), backend="onnx", verify=True,
                          backend_options={"atol": 0.05, "rtol": 0.05})
    assert compiled.artifact.opset < 21


def test_int4_with_an_older_opset_is_refused() -> None:
    model, x = QuantLinear("int4", "per_group", True).eval(), torch.randn(3, 8)
    with pytest.raises(BackendError, match="21"):
        gp.compile(model, (x,), backend="onnx", backend_options={"opset": 20})


class QuantizeDequantize(nn.Module):
    def __init__(self, dtype: str) -> None:
        super().__init__()
        self.dtype = dtype
        self.register_buffer("scale", torch.full((4, 2), 0.05))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        low, high = RANGES[self.dtype]
        q = gq.quantize_affine(x, [1, 4], self.scale, None, low, high, self.dtype)
        x_hat = gq.dequantize_affine(q, [1, 4], self.scale, None, low, high, self.dtype)
        # a float8 output would come back from onnxruntime as raw bytes: return its values
        return q.float() if self.dtype.startswith("float8") else q, x_hat


@pytest.mark.parametrize("dtype", ["int8", "int4", "float8_e4m3fn"])
def test_quantize_and_dequantize(dtype: str) -> None:
    torch.manual_seed(3)
    model, x = QuantizeDequantize(dtype).eval(), torch.randn(4, 8) * 0.2
    compiled = gp.compile(model, (x,), backend="onnx", verify=True,
                          backend_options={"opset": 21, "atol": 0.05, "rtol": 0.05})
    q, x_hat = compiled(x)
    eq, _ = model(x)
    assert q.dtype == eq.dtype
    assert (q.float() - eq.float()).abs().max() <= 1
    assert torch.equal(x_hat, gq.dequantize_affine(q.to(eq.dtype) if dtype.startswith("float8")
                                                   else q, [1, 4], model.scale, None,
                                                   *RANGES[dtype], dtype))
