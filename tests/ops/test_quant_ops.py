"""The graphpress::*_affine ops: opcheck, bit-identity with torch's fake-quant ops (ties and
clamp limits), agreement with the independent reference, properties over shapes and dtypes."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import graphpress as gp
from graphpress.ir.purity import is_foldable, is_pure
from graphpress.ops import check_op
from graphpress.ops.quant import (
    CHOOSE_QPARAMS_AFFINE,
    DEQUANTIZE_AFFINE,
    FAKE_QUANTIZE_AFFINE,
    QUANTIZE_AFFINE,
    qparams_from_minmax,
)
from graphpress.testing.quant_reference import reference_fake_quantize, reference_qparams

gq = torch.ops.graphpress
RANGES = {"int8": (-128, 127), "uint8": (0, 255), "int4": (-8, 7), "uint4": (0, 15),
          "float8_e4m3fn": (-448.0, 448.0), "float8_e5m2": (-57344.0, 57344.0)}
STORAGE = {"int8": torch.int8, "uint8": torch.uint8, "int4": torch.int8, "uint4": torch.uint8,
           "float8_e4m3fn": torch.float8_e4m3fn, "float8_e5m2": torch.float8_e5m2}


def _probe(scale: float, quant_min: int, quant_max: int, zero_point: int,
           huge: float = 3.4e38) -> torch.Tensor:
    """Exact ties (k + .5) * scale, their float neighbours, grid points, the clamp limits and
    values far beyond them (up to ``huge``), and random values."""
    s = torch.tensor(scale)
    k = torch.arange(quant_min - zero_point - 3, quant_max - zero_point + 3, dtype=torch.float32)
    ties = (k + 0.5) * s
    big = torch.tensor([1e6, -1e6, huge, -huge])
    limits = torch.tensor([quant_min - zero_point, quant_max - zero_point], dtype=torch.float32)
    return torch.cat([ties, torch.nextafter(ties, ties + 1), torch.nextafter(ties, ties - 1),
                      k * s, limits * s, (limits + torch.tensor([-1.0, 1.0])) * s, big,
                      torch.randn(2000, generator=torch.Generator().manual_seed(0)) * 80 * s])


@pytest.mark.parametrize("scale", [0.5, 0.1, 1 / 3, 0.0123, 7.77, 0.0627])
@pytest.mark.parametrize(("quant_min", "quant_max", "zero_point"),
                         [(-128, 127, 0), (-128, 127, 5), (0, 255, 128), (-8, 7, 0),
                          (0, 15, 3), (-127, 127, 0)])
def test_bit_identical_to_torch_per_tensor(scale: float, quant_min: int, quant_max: int,
                                           zero_point: int) -> None:
    scale = float(torch.tensor(scale))  # exactly representable in float32, as torch uses it
    x = _probe(scale, quant_min, quant_max, zero_point)
    expected = torch.fake_quantize_per_tensor_affine(x, scale, zero_point, quant_min, quant_max)
    got = gq.fake_quantize_affine(x, [x.numel()], torch.tensor([scale]),
                                  torch.tensor([zero_point], dtype=torch.int32),
                                  quant_min, quant_max, "int8")
    assert torch.equal(got, expected)


@pytest.mark.parametrize(("quant_min", "quant_max"), [(-128, 127), (0, 255), (-8, 7)])
@pytest.mark.parametrize("axis", [0, 1])
def test_bit_identical_to_torch_per_channel(quant_min: int, quant_max: int, axis: int) -> None:
    gen = torch.Generator().manual_seed(1)
    # x / scale below 2**63: torch's per-channel kernel casts to int64 before clamping
    probes = [_probe(s, quant_min, quant_max, 0, huge=1e12)[:600]
              for s in (0.1, 1 / 3, 0.0123, 2.5)]
    x = torch.stack(probes, dim=axis)
    scale = torch.tensor([0.1, 1 / 3, 0.0123, 2.5])
    zero_point = torch.randint(quant_min // 2, quant_max // 2 + 1, (4,), generator=gen,
                               dtype=torch.int32)
    if quant_min < 0:
        zero_point.zero_()
    expected = torch.fake_quantize_per_channel_affine(x, scale, zero_point, axis, quant_min,
                                                      quant_max)
    block = [1, 1]
    block[1 - axis] = x.shape[1 - axis]
    shape = [4, 1] if axis == 0 else [1, 4]
    got = gq.fake_quantize_affine(x, block, scale.reshape(shape), zero_point.reshape(shape),
                                  quant_min, quant_max, "int8")
    assert torch.equal(got, expected)


def test_huge_values_saturate_where_torch_per_channel_wraps() -> None:
    x = torch.tensor([[1e20, 3.4e38, float("inf"), -1e20]])
    scale, zero_point = torch.tensor([0.1]), torch.tensor([0], dtype=torch.int32)
    got = gq.fake_quantize_affine(x, [1, 4], scale.reshape(1, 1), None, -8, 7, "int8")
    assert torch.equal(got, torch.tensor([[7.0, 7.0, 7.0, -8.0]]) * scale)
    per_tensor = torch.fake_quantize_per_tensor_affine(x, 0.1, 0, -8, 7)
    assert torch.equal(got, per_tensor)
    wrapped = torch.fake_quantize_per_channel_affine(x, scale, zero_point, 0, -8, 7)
    assert wrapped[0, 0] == -8 * scale  # int64 overflow: the largest values land on quant_min


def test_the_division_formula_is_not_bit_identical() -> None:
    """Why the ops compute x * (1 / scale): x / scale differs from torch on near-ties."""
    scale = float(torch.tensor(0.1))
    x = _probe(scale, -128, 127, 0)
    expected = torch.fake_quantize_per_tensor_affine(x, scale, 0, -128, 127)
    divided = torch.clamp(torch.round(x / scale), -128, 127) * scale
    assert not torch.equal(divided, expected)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float64"])
def test_other_input_dtypes_match_torch(dtype: str) -> None:
    x = _probe(0.1, -128, 127, 0).to(getattr(torch, dtype))
    got = gq.fake_quantize_affine(x, [x.numel()], torch.tensor([0.1]), None, -128, 127, "int8")
    assert got.dtype == x.dtype
    if dtype != "float64":  # torch's kernel takes half and bfloat16, computing in float32
        expected = torch.fake_quantize_per_tensor_affine(x, 0.1, 0, -128, 127)
        assert torch.equal(got, expected)
    assert torch.equal(got, reference_fake_quantize(x, [x.numel()], torch.tensor([0.1]), None,
                                                    -128, 127, "int8"))


def _qparams(x: torch.Tensor, block: list[int], dtype: str, symmetric: bool
             ) -> tuple[torch.Tensor, torch.Tensor | None, float, float]:
    low, high = RANGES[dtype]
    scale, zero_point = gq.choose_qparams_affine(x, block, low, high, symmetric, dtype)
    return scale, None if symmetric or dtype.startswith("float8") else zero_point, low, high


@pytest.mark.parametrize("dtype", list(RANGES))
@pytest.mark.parametrize("block", [[1, 16], [1, 4], [6, 16], [2, 8], [1, 1]])
def test_per_group_and_fp8_match_the_reference(dtype: str, block: list[int]) -> None:
    x = torch.randn(6, 16, generator=torch.Generator().manual_seed(2)) * 3
    symmetric = not dtype.startswith("uint")
    scale, zero_point, low, high = _qparams(x, block, dtype, symmetric)
    got = gq.fake_quantize_affine(x, block, scale, zero_point, low, high, dtype)
    expected = reference_fake_quantize(x, block, scale, zero_point, low, high, dtype)
    assert torch.equal(got, expected)
    if block != [1, 1]:  # one element per block can be on the grid exactly
        assert (got != x).any()


@pytest.mark.parametrize("dtype", list(RANGES))
def test_quantize_then_dequantize_is_fake_quantize(dtype: str) -> None:
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(3))
    block = [1, 4]
    scale, zero_point, low, high = _qparams(x, block, dtype, not dtype.startswith("uint"))
    q = gq.quantize_affine(x, block, scale, zero_point, low, high, dtype)
    assert q.dtype == STORAGE[dtype]
    if not dtype.startswith("float8"):
        assert int(q.min()) >= low and int(q.max()) <= high
    x_hat = gq.dequantize_affine(q, block, scale, zero_point, low, high, dtype)
    assert torch.equal(x_hat, gq.fake_quantize_affine(x, block, scale, zero_point, low, high,
                                                      dtype))
    half = gq.dequantize_affine(q, block, scale, zero_point, low, high, dtype, torch.float16)
    assert half.dtype == torch.float16


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("dtype", ["int8", "int4", "float8_e4m3fn"])
def test_choose_qparams_is_qparams_from_minmax_on_block_ranges(symmetric: bool,
                                                               dtype: str) -> None:
    x = torch.randn(2, 6, 16, generator=torch.Generator().manual_seed(4)) + 0.5
    block = [1, 3, 4]
    low, high = RANGES[dtype]
    blocks = x.reshape(2, 1, 2, 3, 4, 4)
    min_val, max_val = blocks.amin(dim=(1, 3, 5)), blocks.amax(dim=(1, 3, 5))
    expected = qparams_from_minmax(min_val, max_val, low, high, symmetric, dtype)
    got = gq.choose_qparams_affine(x, block, low, high, symmetric, dtype)
    assert got[0].dtype == torch.float32 and got[1].dtype == torch.int32
    assert got[0].shape == (2, 2, 4)
    for g, e, r in zip(got, expected, reference_qparams(x, block, low, high, symmetric, dtype),
                       strict=True):
        assert torch.equal(g, e) and torch.equal(g, r)


def test_qparams_formulas() -> None:
    lo, hi = torch.tensor([-1.0, 0.5, -2.0]), torch.tensor([3.0, 2.0, -1.0])
    scale, zp = qparams_from_minmax(lo, hi, 0, 255, False, "uint8")
    torch.testing.assert_close(scale, torch.tensor([4.0, 2.0, 2.0]) / 255, rtol=0, atol=0)
    assert zp.tolist() == [64, 0, 255]  # the range always contains 0
    scale, zp = qparams_from_minmax(lo, hi, -128, 127, True, "int8")
    torch.testing.assert_close(scale, torch.tensor([3.0, 2.0, 2.0]) / 127.5, rtol=0, atol=0)
    assert zp.tolist() == [0, 0, 0]
    scale, _ = qparams_from_minmax(lo, hi, -448.0, 448.0, True, "float8_e4m3fn")
    torch.testing.assert_close(scale, torch.tensor([3.0, 2.0, 2.0]) / 448)
    eps_scale, _ = qparams_from_minmax(torch.zeros(1), torch.zeros(1), -128, 127, True, "int8")
    assert eps_scale.item() == torch.finfo(torch.float32).eps
    with pytest.raises(ValueError, match="signed range"):
        qparams_from_minmax(lo, hi, 0, 255, True, "uint8")


def test_signed_scale_puts_the_largest_magnitude_on_qmin() -> None:
    """int3: scale = e / -4 for the block's largest-magnitude value e, so e itself is a level
    and the step is |e| / 4 (the plain symmetric grid: amax / 3.5, amax rounded onto 3)."""
    lo, hi = torch.tensor([-0.2, -0.8, 0.0, -0.5]), torch.tensor([0.8, 0.6, 0.0, 0.5])
    scale, zp = qparams_from_minmax(lo, hi, -4, 3, True, "int3", signed_scale=True)
    eps = torch.finfo(torch.float32).eps
    torch.testing.assert_close(scale, torch.tensor([-0.2, 0.2, eps, 0.125]), rtol=0, atol=0)
    assert zp.tolist() == [0, 0, 0, 0]
    w = torch.tensor([[0.8, -0.2, 0.1, 0.7], [-0.8, 0.6, 0.7, 0.0]])
    scale, _ = qparams_from_minmax(w.amin(1, keepdim=True), w.amax(1, keepdim=True), -4, 3, True,
                                   "int3", signed_scale=True)
    q = gq.fake_quantize_affine(w, [1, 4], scale, None, -4, 3, "int3")
    # 0.1 / -0.2 = -0.5 rounds to even (0); 0.7 / -0.2 = -3.5 -> -4; 0.7 / 0.2 = 3.5 -> 4 -> 3
    expected = torch.tensor([[0.8, -0.2, 0.0, 0.8], [-0.8, 0.6, 0.6, 0.0]])
    torch.testing.assert_close(q, expected, rtol=0, atol=1e-7)


def test_fp8_saturates_and_rounds_to_nearest_even() -> None:
    x = torch.tensor([1000.0, -1000.0, 1.0625, 1.1875, 0.3])  # 1.0625: tie between 1 and 1.125
    one = torch.ones(1)
    got = gq.fake_quantize_affine(x, [5], one, None, -448.0, 448.0, "float8_e4m3fn")
    assert got.tolist()[:4] == [448.0, -448.0, 1.0, 1.25]
    assert torch.equal(got, x.clamp(-448, 448).to(torch.float8_e4m3fn).float())


def test_straight_through_gradient() -> None:
    x = torch.tensor([-100.0, -0.26, 0.0, 0.74, 100.0], requires_grad=True)
    y = gq.fake_quantize_affine(x, [5], torch.tensor([0.5]), None, -8, 7, "int4")
    y.sum().backward()
    assert x.grad is not None and x.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 0.0]
    x_t = x.detach().clone().requires_grad_()
    torch.fake_quantize_per_tensor_affine(x_t, 0.5, 0, -8, 7).sum().backward()
    assert torch.equal(x.grad, x_t.grad)


def test_opcheck_every_op() -> None:
    x = torch.randn(4, 8)
    s_group, s_row = torch.rand(4, 2) + 0.05, torch.rand(4, 1) + 0.05
    zp = torch.randint(-3, 3, (4, 1), dtype=torch.int32)
    q = gq.quantize_affine(x, [1, 8], s_row, zp, -128, 127, "int8")
    check_op(QUANTIZE_AFFINE, x, [1, 4], s_group, None, -8, 7, "int4")
    check_op(QUANTIZE_AFFINE, x, [1, 8], s_row, None, -448.0, 448.0, "float8_e5m2")
    check_op(DEQUANTIZE_AFFINE, q, [1, 8], s_row, zp, -128, 127, "int8")
    check_op(DEQUANTIZE_AFFINE, q, [1, 8], s_row, zp, -128, 127, "int8", torch.bfloat16)
    check_op(FAKE_QUANTIZE_AFFINE, x, [4, 8], torch.ones(1, 1), None, -128, 127, "int8")
    check_op(FAKE_QUANTIZE_AFFINE, x.clone().requires_grad_(), [1, 4], s_group, None, -8, 7,
             "int4")
    check_op(FAKE_QUANTIZE_AFFINE, x, [1, 4], s_group, None, -448.0, 448.0, "float8_e4m3fn")
    check_op(CHOOSE_QPARAMS_AFFINE, x, [1, 8], -128, 127, False, "int8")
    check_op(CHOOSE_QPARAMS_AFFINE, x, [1, 4], -448.0, 448.0, True, "float8_e4m3fn")


def test_pure_and_not_foldable() -> None:
    for entry in (QUANTIZE_AFFINE, DEQUANTIZE_AFFINE, FAKE_QUANTIZE_AFFINE,
                  CHOOSE_QPARAMS_AFFINE):
        assert entry.pure and not entry.foldable


def test_bad_arguments_name_the_problem() -> None:
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match="rank 2"):
        gq.fake_quantize_affine(x, [8], torch.ones(1), None, -128, 127, "int8")
    with pytest.raises(ValueError, match="does not divide"):
        gq.fake_quantize_affine(x, [1, 3], torch.ones(4, 2), None, -128, 127, "int8")
    with pytest.raises(ValueError, match=r"needs \(4, 2\)"):
        gq.fake_quantize_affine(x, [1, 4], torch.ones(4, 1), None, -128, 127, "int8")
    with pytest.raises(ValueError, match="unknown quantized dtype 'int2'"):
        gq.quantize_affine(x, [1, 8], torch.ones(4, 1), None, -2, 1, "int2")
    with pytest.raises(ValueError, match="scale-only"):
        gq.fake_quantize_affine(x, [1, 8], torch.ones(4, 1), torch.zeros(4, 1),
                                -448.0, 448.0, "float8_e4m3fn")


class Quantized(nn.Module):
    """A weight fake-quantized per group (static qparams), an activation per token (dynamic)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 4)
        scale, _ = gq.choose_qparams_affine(self.fc.weight.detach(), [1, 4], -8, 7, True, "int4")
        self.register_buffer("w_scale", scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = gq.fake_quantize_affine(self.fc.weight, [1, 4], self.w_scale, None, -8, 7, "int4")
        scale, zp = gq.choose_qparams_affine(x, [1, 8], -128, 127, False, "int8")
        x = gq.fake_quantize_affine(x, [1, 8], scale, zp, -128, 127, "int8")
        return nn.functional.linear(x, w, self.fc.bias)


def test_export_and_cleanup_passes_keep_the_fake_quant_of_a_constant_weight() -> None:
    model, x = Quantized().eval(), torch.randn(3, 8)
    compiled = gp.compile(model, (x,), passes="fixpoint(dce, cse, fold_constants)", verify=True)
    targets = [n.target for n in compiled.program.graph.nodes]
    assert targets.count(gq.fake_quantize_affine.default) == 2
    for node in compiled.program.graph.nodes:
        if node.target is gq.fake_quantize_affine.default:
            assert is_pure(node) and not is_foldable(node)
    assert targets.count(gq.choose_qparams_affine.default) == 1
    assert torch.equal(compiled(x), model(x))
    exported = torch.export.export(model, (x,), dynamic_shapes=({0: torch.export.Dim("b")},))
    other = torch.randn(5, 8)
    assert torch.equal(exported.module()(other), model(other))


def test_reference_runs_on_fake_tensors() -> None:
    x, scale = torch.randn(4, 8), torch.rand(4, 2) + 0.1
    with torch._subclasses.FakeTensorMode() as mode:
        fx, fs = mode.from_tensor(x), mode.from_tensor(scale)
        out = reference_fake_quantize(fx, [1, 4], fs, None, -8, 7, "int4")
        s, z = reference_qparams(fx, [1, 4], -8, 7, False, "int4")
    assert out.shape == (4, 8) and s.shape == (4, 2) and z.dtype == torch.int32


@st.composite
def _cases(draw: st.DrawFn) -> tuple[torch.Tensor, list[int], str, bool]:
    dtype = draw(st.sampled_from(list(RANGES)))
    symmetric = True if dtype.startswith("float8") else draw(st.booleans())
    if dtype.startswith("uint"):
        symmetric = False
    rank = draw(st.integers(1, 3))
    shape, block = [], []
    for _ in range(rank):
        b = draw(st.sampled_from([1, 2, 4]))
        shape.append(b * draw(st.integers(1, 3)))
        block.append(b)
    seed = draw(st.integers(0, 2**16))
    spread = draw(st.sampled_from([1e-3, 1.0, 50.0]))
    shift = draw(st.sampled_from([0.0, 1.0]))
    x = (torch.randn(shape, generator=torch.Generator().manual_seed(seed)) + shift) * spread
    return x, block, dtype, symmetric


@settings(max_examples=40, deadline=None)
@given(_cases())
def test_property_ops_agree_with_the_reference(case: tuple[torch.Tensor, list[int], str, bool]
                                               ) -> None:
    x, block, dtype, symmetric = case
    low, high = RANGES[dtype]
    scale, zero_point = gq.choose_qparams_affine(x, block, low, high, symmetric, dtype)
    ref_scale, ref_zero = reference_qparams(x, block, low, high, symmetric, dtype)
    assert torch.equal(scale, ref_scale) and torch.equal(zero_point, ref_zero)
    zp = None if symmetric or dtype.startswith("float8") else zero_point
    fake = gq.fake_quantize_affine(x, block, scale, zp, low, high, dtype)
    assert torch.equal(fake, reference_fake_quantize(x, block, scale, zp, low, high, dtype))
    q = gq.quantize_affine(x, block, scale, zp, low, high, dtype)
    assert torch.equal(gq.dequantize_affine(q, block, scale, zp, low, high, dtype), fake)
    if not dtype.startswith("float8"):  # the qparams cover the range: error at most scale / 2
        step = scale
        for dim, b in enumerate(block):
            step = step.repeat_interleave(b, dim=dim)
        ulps = 4 * torch.finfo(torch.float32).eps * (x.abs() + step)
        assert ((fake - x).abs() <= step / 2 + ulps).all()
