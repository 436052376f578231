"""Packed weight formats (graphpress.ops.packing): pack / unpack are exact inverses, the
nibble order is the documented one, and dequantizing a packed weight is bit-identical to
fake_quantize_affine on the same qparams."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from graphpress.ops.packing import (
    dequantize_packed,
    pack_codes,
    pack_weight,
    pack_zeros,
    unpack_codes,
    unpack_zeros,
)
from graphpress.ops.quant import choose_qparams_affine, fake_quantize_affine, quantize_affine

_RANGES = {"int4": (-8, 7), "uint4": (0, 15), "int8": (-128, 127), "uint8": (0, 255)}


@st.composite
def _codes(draw: st.DrawFn) -> tuple[torch.Tensor, int]:
    bits = draw(st.sampled_from([4, 8]))
    n = draw(st.integers(1, 6))
    k = 2 * draw(st.integers(1, 12))
    values = draw(st.lists(st.integers(0, (1 << bits) - 1), min_size=n * k, max_size=n * k))
    return torch.tensor(values, dtype=torch.uint8).reshape(n, k), bits


@settings(max_examples=200, deadline=None)
@given(_codes())
def test_unpack_inverts_pack(case: tuple[torch.Tensor, int]) -> None:
    codes, bits = case
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.shape == (codes.shape[0], codes.shape[1] * bits // 8)
    assert torch.equal(unpack_codes(packed, bits), codes)


@settings(max_examples=200, deadline=None)
@given(st.sampled_from([4, 8]), st.integers(1, 5), st.integers(1, 8), st.data())
def test_pack_inverts_unpack(bits: int, n: int, width: int, data: st.DataObject) -> None:
    raw = data.draw(st.lists(st.integers(0, 255), min_size=n * width, max_size=n * width))
    packed = torch.tensor(raw, dtype=torch.uint8).reshape(n, width)
    assert torch.equal(pack_codes(unpack_codes(packed, bits), bits), packed)


@settings(max_examples=100, deadline=None)
@given(st.sampled_from([4, 8]), st.integers(1, 4), st.integers(1, 9), st.data())
def test_zero_codes_round_trip(bits: int, n: int, groups: int, data: st.DataObject) -> None:
    values = data.draw(st.lists(st.integers(0, (1 << bits) - 1), min_size=n * groups,
                                max_size=n * groups))
    zeros = torch.tensor(values, dtype=torch.uint8).reshape(n, groups)
    stored = pack_zeros(zeros, bits)
    assert stored.shape == (n, groups if bits == 8 else (groups + 1) // 2)
    assert torch.equal(unpack_zeros(stored, bits, groups), zeros)


def test_nibble_order_is_low_first() -> None:
    codes = torch.tensor([[1, 2, 15, 0]], dtype=torch.uint8)
    assert pack_codes(codes, 4).tolist() == [[0x21, 0x0F]]
    assert pack_zeros(torch.tensor([[3, 4, 5]]), 4).tolist() == [[0x43, 0x05]]


def test_bad_codes_are_refused() -> None:
    with pytest.raises(ValueError, match=r"lie in \[0, 15\]"):
        pack_codes(torch.tensor([[16, 0]]), 4)
    with pytest.raises(ValueError, match="K must be even"):
        pack_codes(torch.tensor([[1, 2, 3]]), 4)
    with pytest.raises(ValueError, match="4 or 8 bits"):
        pack_codes(torch.tensor([[1, 2]]), 2)
    with pytest.raises(ValueError, match="must be integers"):
        pack_codes(torch.tensor([[1.0, 2.0]]), 8)


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(list(_RANGES)), st.booleans(), st.sampled_from([4, 6, 8, 16, 24]),
       st.integers(1, 5), st.integers(0, 2**16))
def test_packed_weight_equals_fake_quant(dtype: str, symmetric: bool, group: int, n: int,
                                         seed: int) -> None:
    symmetric = symmetric and dtype.startswith("int")
    qmin, qmax = _RANGES[dtype]
    k = 48
    weight = torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * 3
    block = [1, group]
    scale, zero_point = choose_qparams_affine(weight, block, qmin, qmax, symmetric, dtype)
    zero_point = None if symmetric else zero_point
    q = quantize_affine(weight, block, scale, zero_point, qmin, qmax, dtype)
    packed = pack_weight(q, scale, zero_point, dtype)
    assert packed.group_size == group and packed.in_features == k and packed.out_features == n
    # no zeros stored when every zero code is the midpoint (always so for symmetric): a signed
    # zero point z is stored as the code z + 2**(bits - 1), an unsigned one as z itself
    bits = packed.bits
    offset = 2 ** (bits - 1) if dtype.startswith("int") else 0
    codes = (q.new_zeros(()) if zero_point is None else zero_point) + offset
    assert (packed.zeros is None) == bool(codes.eq(2 ** (bits - 1)).all())
    expected = fake_quantize_affine(weight, block, scale, zero_point, qmin, qmax, dtype)
    restored = dequantize_packed(packed.qweight, packed.scales, packed.zeros, packed.bits,
                                 packed.group_size)
    assert torch.equal(restored, expected)


def test_per_tensor_qparams_repeat_over_rows_and_scales_round_to_half() -> None:
    weight = torch.randn(6, 8)
    scale, zero_point = choose_qparams_affine(weight, [6, 8], -8, 7, False, "int4")
    q = quantize_affine(weight, [6, 8], scale, zero_point, -8, 7, "int4")
    packed = pack_weight(q, scale, zero_point, "int4", scale_dtype=torch.float16)
    assert packed.scales.shape == (6, 1) and packed.scales.dtype == torch.float16
    assert packed.nbytes() == 6 * 4 + 6 * 2 + 6
    restored = dequantize_packed(packed.qweight, packed.scales, packed.zeros, 4, 8)
    expected = fake_quantize_affine(weight, [6, 8], scale.half().float(), zero_point, -8, 7,
                                    "int4")
    assert torch.equal(restored, expected)


def test_floating_dtypes_are_refused() -> None:
    with pytest.raises(ValueError, match="float8_e4m3fn"):
        pack_weight(torch.zeros(2, 2), torch.ones(2, 1), None, "float8_e4m3fn")
