"""graphpress::dequant_matmul and graphpress::dynamic_quant_matmul: equal to the fake-quant
matmul they replace, opcheck, torch.export save/load, torch.compile, bad input; the Triton
kernels under TRITON_INTERPRET=1 (CPU tensors) at small and odd sizes."""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import pytest
import torch

# Triton reads TRITON_INTERPRET when it is imported: set it before anything imports it, so the
# kernels run on CPU tensors (on a CUDA machine they run compiled, on CUDA tensors elsewhere).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from graphpress.kernels import triton_available
from graphpress.kernels.cpu_dequant import (
    amx_matmul,
    build,
    dequant_gemm,
    dequantize,
    fused_gemv,
    kernel_available,
)
from graphpress.ops import check_op
from graphpress.ops.dequant_matmul import (
    DEQUANT_MATMUL,
    DYNAMIC_QUANT_MATMUL,
    cpu_dequant_matmul,
    use_triton,
)
from graphpress.ops.packing import PackedWeight, pack_weight
from graphpress.ops.quant import choose_qparams_affine, fake_quantize_affine, quantize_affine

_RANGES = {"int4": (-8, 7), "uint4": (0, 15), "int8": (-128, 127), "uint8": (0, 255)}


def _quantized(n: int, k: int, dtype: str, group: int, symmetric: bool, seed: int = 0
               ) -> tuple[torch.Tensor, PackedWeight]:
    """(the fake-quantized weight, its packed form)."""
    qmin, qmax = _RANGES[dtype]
    weight = torch.randn(n, k, generator=torch.Generator().manual_seed(seed))
    block = [1, group]
    scale, zero_point = choose_qparams_affine(weight, block, qmin, qmax, symmetric, dtype)
    zero_point = None if symmetric else zero_point
    q = quantize_affine(weight, block, scale, zero_point, qmin, qmax, dtype)
    fake = fake_quantize_affine(weight, block, scale, zero_point, qmin, qmax, dtype)
    return fake, pack_weight(q, scale, zero_point, dtype)


def _call(x: torch.Tensor, packed: PackedWeight, bias: torch.Tensor | None = None
          ) -> torch.Tensor:
    return DEQUANT_MATMUL.op(x, packed.qweight, packed.scales, packed.zeros, bias, packed.bits,
                             packed.group_size)


@pytest.mark.parametrize(("dtype", "group", "symmetric"), [
    ("int4", 16, False), ("int4", 32, True), ("uint4", 8, False), ("int4", 6, False),
    ("int8", 48, True), ("int8", 16, False), ("uint8", 96, False)])
def test_equals_the_fake_quant_linear(dtype: str, group: int, symmetric: bool) -> None:
    fake, packed = _quantized(40, 96, dtype, group, symmetric)
    x, bias = torch.randn(2, 3, 96), torch.randn(40)
    _assert_float32_product(_call(x, packed, bias), x, fake, bias)


def test_cpu_kernel_blocks_and_half_inputs() -> None:
    fake, packed = _quantized(70, 64, "int4", 32, False)
    x = torch.randn(5, 64)
    blocked = cpu_dequant_matmul(x, packed.qweight, packed.scales, packed.zeros, 4, 32,
                                 rows_per_block=16)
    _assert_float32_product(blocked, x, fake)
    for dtype in (torch.float16, torch.bfloat16):
        out = _call(x.to(dtype), packed)
        assert out.dtype == dtype
        torch.testing.assert_close(out.float(), x.to(dtype).float() @ fake.t(), rtol=1e-2,
                                   atol=1e-2)
    assert _call(torch.randn(0, 64), packed).shape == (0, 70)


# group sizes that leave a partial 16-byte chunk at the end of every group (4 bits: 6, 8, 20;
# 8 bits: 40, 24), whole chunks (32, 64, 48 at 8 bits), odd ones (45: only the blocked kernel)
_KERNEL_LAYOUTS = [("int4", 32, False), ("int4", 64, True), ("uint4", 8, False),
                   ("int4", 6, False), ("int4", 20, True), ("int8", 48, True),
                   ("int8", 40, False), ("uint8", 24, False), ("int4", 45, False)]


def _check_kernels(kernels: object, dtype: str, group: int, symmetric: bool) -> None:
    k = group * (2 if group % 2 else 3)  # 4-bit packing needs an even K
    fake, packed = _quantized(37, k, dtype, group, symmetric)
    args = (packed.qweight, packed.scales, packed.zeros, packed.bits, packed.group_size)
    assert torch.equal(dequantize(*args, kernels=kernels), fake)  # bit-identical weights
    for m in (1, 2, 3, 4, 5, 9, 33):  # the GEMV: 4 rows of x a pass; AMX: 16-row blocks, pairs
        x = torch.randn(m, k)
        for rows in (16, 37, 256):  # blocks of W rows: several, one exact, one partial
            out = dequant_gemm(x, *args, rows_per_block=rows, kernels=kernels)
            _assert_float32_product(out, x, fake)
        out = fused_gemv(x, *args, kernels=kernels)
        if group == 45:  # groups straddle bytes: the GEMV does not cover them
            assert out is None
        else:
            assert out is not None and out.shape == (m, 37)
            _assert_float32_product(out, x, fake)
        out = amx_matmul(x, *args, kernels=kernels)
        if out is not None:  # AMX here, and a group size it tiles
            assert group % 32 == 0 and out.shape == (m, 37)
            _assert_float32_product(out, x, fake)


def _assert_float32_product(out: torch.Tensor, x: torch.Tensor, fake: torch.Tensor,
                            bias: torch.Tensor | None = None) -> None:
    """``out`` is ``x @ fake^T (+ bias)`` summed in float32 in some order: within the
    worst-case rounding bound of such a sum, ``(k + 2) u (|x| @ |fake|^T + |bias|)`` with
    ``u = 2^-24``, of the exact float64 value. Kernels sum in other orders than torch's float32
    matmul, and which order wins depends on the CPU (AMX, AVX-512 or neither), so both are held
    to the exact value, not to each other."""
    exact = x.double() @ fake.double().t()
    magnitude = x.double().abs() @ fake.double().abs().t()
    if bias is not None:
        exact, magnitude = exact + bias.double(), magnitude + bias.double().abs()
    bound = (x.shape[-1] + 2) * 2.0 ** -24 * magnitude
    error = (out.double() - exact).abs()
    assert out.shape == exact.shape and bool((error <= bound).all()), (
        f"error {float(error.max()):.3g} above the float32 bound at "
        f"{tuple(int(i) for i in torch.unravel_index((error - bound).argmax(), error.shape))}")


@pytest.mark.parametrize(("dtype", "group", "symmetric"), _KERNEL_LAYOUTS)
def test_cpu_kernels_match_the_reference(dtype: str, group: int, symmetric: bool) -> None:
    if not kernel_available():
        pytest.skip("the CPU kernels could not be built here (no C++ compiler or "
                    "GRAPHPRESS_CPU_KERNELS=0); the op uses the torch path")
    _check_kernels(None, dtype, group, symmetric)


@pytest.mark.slow
def test_portable_cpu_kernels_match_the_reference() -> None:
    """The loops built where AVX-512 is missing (here: built with -mno-avx512f)."""
    portable = build("graphpress_cpu_kernels_portable_test", ("-mno-avx512f",))
    if portable is None:
        pytest.skip("no C++ compiler here")
    for layout in _KERNEL_LAYOUTS:
        _check_kernels(portable, *layout)


def test_non_finite_inputs_propagate_as_in_float32() -> None:
    fake, packed = _quantized(24, 64, "int4", 32, False)
    for m in (1, 7):  # the GEMV and the M > 4 kernel
        x = torch.randn(m, 64)
        x[0, 3], x[-1, 10] = float("inf"), float("nan")
        out, expected = _call(x, packed), x @ fake.t()
        assert torch.equal(out.isnan(), expected.isnan())
        assert torch.equal(out.isinf(), expected.isinf())
        assert torch.equal(out[out.isinf()], expected[expected.isinf()])


def test_the_op_takes_each_cpu_path() -> None:
    """M <= 4: the fused GEMV; larger M: AMX where the CPU has it, else the blocked GEMM."""
    fake, packed = _quantized(300, 256, "int4", 128, False)
    for m in (1, 4, 5, 40):
        x = torch.randn(m, 256)
        _assert_float32_product(_call(x, packed), x, fake)


def test_opcheck() -> None:
    _, packed = _quantized(24, 64, "int4", 16, False)
    check_op(DEQUANT_MATMUL, torch.randn(3, 64), packed.qweight, packed.scales, packed.zeros,
             torch.randn(24), 4, 16)
    _, sym = _quantized(24, 64, "int8", 64, True)
    check_op(DEQUANT_MATMUL, torch.randn(2, 3, 64), sym.qweight, sym.scales, None, None, 8, 64)
    weight, scales = _int8_weight(24, 64)
    for symmetric in (False, True):
        check_op(DYNAMIC_QUANT_MATMUL, torch.randn(2, 5, 64), weight, scales, torch.randn(24),
                 symmetric)


def _int8_weight(n: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    weight = torch.randn(n, k)
    scale, _ = choose_qparams_affine(weight, [1, k], -128, 127, True, "int8")
    return quantize_affine(weight, [1, k], scale, None, -128, 127, "int8"), scale


@pytest.mark.parametrize("symmetric", [False, True])
def test_dynamic_quant_matmul_equals_the_fake_quant_program(symmetric: bool) -> None:
    weight, scales = _int8_weight(40, 96)
    x, bias = torch.randn(2, 7, 96) * 3, torch.randn(40)
    block = [1, 1, 96]
    x_scale, x_zero = torch.ops.graphpress.choose_qparams_affine(x, block, -128, 127,
                                                                 symmetric, "int8")
    x_fake = fake_quantize_affine(x, block, x_scale, x_zero, -128, 127, "int8")
    w_fake = fake_quantize_affine(weight.float() * scales, [1, 96], scales, None, -128, 127,
                                  "int8")
    expected = torch.nn.functional.linear(x_fake, w_fake, bias)
    out = DYNAMIC_QUANT_MATMUL.op(x, weight, scales, bias, symmetric)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


class _Packed(torch.nn.Module):
    def __init__(self, packed: PackedWeight) -> None:
        super().__init__()
        self.packed = packed
        self.register_buffer("qweight", packed.qweight)
        self.register_buffer("scales", packed.scales)
        self.register_buffer("zeros", packed.zeros)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return DEQUANT_MATMUL.op(x, self.qweight, self.scales, self.zeros, None,
                                 self.packed.bits, self.packed.group_size)


def test_export_save_load_and_torch_compile(tmp_path: object) -> None:
    _, packed = _quantized(24, 64, "int4", 32, False)
    module, x = _Packed(packed), torch.randn(3, 64)
    expected = module(x)
    exported = torch.export.export(module, (x,))
    path = f"{tmp_path}/dequant.pt2"
    torch.export.save(exported, path)
    loaded = torch.export.load(path)
    assert any(n.target == DEQUANT_MATMUL.op for n in loaded.graph.nodes)
    assert torch.equal(loaded.module()(x), expected)
    compiled = torch.compile(module, backend="aot_eager", fullgraph=True)
    assert torch.equal(compiled(x), expected)


def test_bad_input_names_the_problem() -> None:
    _, packed = _quantized(8, 32, "int4", 16, False)
    with pytest.raises(ValueError, match="x has 30 features"):
        _call(torch.randn(2, 30), packed)
    with pytest.raises(ValueError, match="scales must be float"):
        DEQUANT_MATMUL.op(torch.randn(2, 32), packed.qweight, packed.scales[:, :1],
                          packed.zeros, None, 4, 16)
    with pytest.raises(ValueError, match="zeros must be uint8"):
        DEQUANT_MATMUL.op(torch.randn(2, 32), packed.qweight, packed.scales,
                          packed.zeros.to(torch.int8), None, 4, 16)
    with pytest.raises(ValueError, match="bits must be 4 or 8"):
        DEQUANT_MATMUL.op(torch.randn(2, 32), packed.qweight, packed.scales, None, None, 3, 16)
    with pytest.raises(ValueError, match="group_size 5 does not divide"):
        DEQUANT_MATMUL.op(torch.randn(2, 32), packed.qweight, packed.scales, None, None, 4, 5)
    weight, scales = _int8_weight(8, 32)
    with pytest.raises(ValueError, match="qweight must be int8"):
        DYNAMIC_QUANT_MATMUL.op(torch.randn(2, 32), weight.to(torch.uint8), scales, None, False)


# ------------------------------------------------------------------ Triton (interpreter)
@pytest.fixture(scope="module")
def interpreted_kernels() -> ModuleType:
    """The Triton kernel module, decorated under TRITON_INTERPRET=1 (CPU tensors)."""
    if not triton_available():
        pytest.skip("triton is not installed (pip install triton with torch pinned: "
                    "docs/ops/packed_formats.md); the Triton kernels are untested here")
    from triton import knobs

    if not knobs.runtime.interpret:
        pytest.skip("triton was imported before TRITON_INTERPRET=1 was set (this module sets "
                    "it at import on machines without CUDA); run with TRITON_INTERPRET=1")
    return importlib.import_module("graphpress.kernels.dequant_matmul")


@pytest.mark.parametrize("m", [1, 3, 17])
@pytest.mark.parametrize(("dtype", "group", "symmetric", "n", "k"), [
    ("int4", 32, False, 37, 96), ("int4", 64, True, 24, 192), ("int4", 128, False, 19, 256),
    ("int4", 90, False, 21, 90), ("uint4", 16, False, 13, 48), ("int8", 32, True, 29, 64),
    ("int8", 75, False, 11, 75), ("int8", 128, False, 33, 384)])
def test_triton_kernels_match_the_reference(interpreted_kernels: ModuleType, m: int,
                                            dtype: str, group: int, symmetric: bool, n: int,
                                            k: int) -> None:
    fake, packed = _quantized(n, k, dtype, group, symmetric, seed=m)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m))
    out = interpreted_kernels.triton_dequant_matmul(x, packed.qweight, packed.scales,
                                                    packed.zeros, packed.bits,
                                                    packed.group_size)
    assert out.shape == (m, n) and out.dtype == torch.float32
    _assert_float32_product(out, x, fake)


def test_triton_split_k_and_the_op_switch(interpreted_kernels: ModuleType) -> None:
    fake, packed = _quantized(20, 1024, "int4", 128, False)
    x = torch.randn(2, 1024)
    for splits in (1, 3, 4):
        out = interpreted_kernels.triton_dequant_matmul(x, packed.qweight, packed.scales,
                                                        packed.zeros, 4, 128, split_k=splits)
        _assert_float32_product(out, x, fake)
    with use_triton():
        _assert_float32_product(_call(x.reshape(1, 2, 1024), packed), x.reshape(1, 2, 1024),
                                fake)
