"""GPU: graphpress's Triton dequant-matmul kernels against torch's fp16 matmul (cuBLAS), and
against torchao's int4 path and gemlite when they are importable.

Usage (one command, at most about 5 minutes on one GPU; installs triton if it is missing)::

    python benchmarks/fuse_dequant_matmul_gpu.py [--install] [--repeats 50] [--quick]

Shapes ``N x K``: 4096 x 4096, 8192 x 8192, 8192 x 28672 (``K = 28672``: Llama-3-70B's down
projection) at M = 1, 16 and 128 fp16 tokens. Weights: int4, group 128, asymmetric, fp16 scales
(graphpress's packed format, docs/ops/packed_formats.md). Each kernel is timed with CUDA events
after warm-up (autotuning included), interleaved with cuBLAS in the same rounds; medians, and
the ratio cuBLAS / kernel. ``max |diff|`` is the kernel against the fp16 matmul on the
dequantized weight. Then a decode step (one token, no KV cache) of a Llama-config model
(hidden 4096, intermediate 11008, 2 layers, vocabulary 32000, fp16) with every linear fused by
``insert_fake_quant(int4_weight_only, 128), fuse_dequant_matmul`` against the fp16 model.

Without a GPU the script says so and exits with status 2: it never prints CPU figures as GPU ones.
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
from common import cuda_medians

SHAPES = ((4096, 4096), (8192, 8192), (8192, 28672))
TOKENS = (1, 16, 128)


def _install(packages: list[str]) -> None:
    missing = [p for p in packages if importlib.util.find_spec(p) is None]
    if missing:  # keep the installed torch: never let pip pick another one
        subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", *missing],
                       check=False)


def _packed(n: int, k: int) -> tuple[Any, torch.Tensor]:
    from graphpress.ops.packing import pack_weight
    from graphpress.ops.quant import choose_qparams_affine, quantize_affine

    weight = torch.randn(n, k, device="cuda") * 0.02
    scale, zero = choose_qparams_affine(weight, [1, 128], -8, 7, False, "int4")
    q = quantize_affine(weight, [1, 128], scale, zero, -8, 7, "int4")
    packed = pack_weight(q.cpu(), scale.cpu(), zero.cpu(), "int4", scale_dtype=torch.float16)
    return packed, weight.half()


def _torchao(weight: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor] | None:
    try:
        from torchao.quantization import Int4WeightOnlyConfig, quantize_
    except Exception:
        return None
    layer = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="cuda",
                            dtype=torch.bfloat16)
    layer.weight.data = weight.to(torch.bfloat16)
    try:
        quantize_(layer, Int4WeightOnlyConfig(group_size=128))
    except Exception as exc:
        print(f"# torchao int4 unavailable here: {type(exc).__name__}: {exc}")
        return None
    return lambda x: layer(x.to(torch.bfloat16))


def _gemlite(weight: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor] | None:
    try:
        import gemlite  # noqa: F401
        from gemlite.helper import A16W4
    except Exception:
        return None
    try:
        layer = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="cuda",
                                dtype=torch.float16)
        layer.weight.data = weight
        fused = A16W4(device="cuda").from_linear(layer)
    except Exception as exc:
        print(f"# gemlite unavailable here: {type(exc).__name__}: {exc}")
        return None
    return fused


def _shape_rows(n: int, k: int, repeats: int) -> None:
    from graphpress.kernels.dequant_matmul import triton_dequant_matmul
    from graphpress.ops.packing import dequantize_packed

    packed, _ = _packed(n, k)
    qweight, scales, zeros = packed.qweight.cuda(), packed.scales.cuda(), packed.zeros.cuda()
    dense = dequantize_packed(packed.qweight, packed.scales, packed.zeros, 4, 128,
                              torch.float16).cuda()
    ao, gl = _torchao(dense), _gemlite(dense)
    for m in TOKENS:
        x = torch.randn(m, k, device="cuda", dtype=torch.float16)
        fns: dict[str, Callable[[], Any]] = {
            "cublas": lambda x=x: x @ dense.t(),
            "graphpress": lambda x=x: triton_dequant_matmul(x, qweight, scales, zeros, 4, 128)}
        if ao is not None:
            fns["torchao"] = lambda x=x: ao(x)
        if gl is not None:
            fns["gemlite"] = lambda x=x: gl(x)
        ms = cuda_medians(fns, repeats)
        diff = float((fns["graphpress"]() - (x @ dense.t()).float()).abs().max())
        cells = [f"{ms[name]:.4f}" if name in ms else "n/a" for name in ("torchao", "gemlite")]
        print(f"| {n} x {k} | {m} | {ms['cublas']:.4f} | {ms['graphpress']:.4f} | "
              f"{ms['cublas'] / ms['graphpress']:.2f} | {cells[0]} | {cells[1]} | "
              f"{diff:.3g} |")


def kernels(repeats: int, quick: bool) -> None:
    print("| N x K | M | cuBLAS fp16 ms | graphpress ms | cuBLAS / graphpress | torchao ms | "
          "gemlite ms | max abs diff |")
    print("|:--|--:|--:|--:|--:|--:|--:|--:|")
    for n, k in SHAPES[:1] if quick else SHAPES:
        _shape_rows(n, k, repeats)


def decode_step(repeats: int) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    import graphpress as gp

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=2,
                         num_attention_heads=32, num_key_value_heads=8, vocab_size=32000,
                         use_cache=False)
    model = LlamaForCausalLM(config).eval().half()
    ids = torch.randint(0, 32000, (1, 1))
    fused = gp.compile(model, (ids,), passes="insert_fake_quant(scheme='int4_weight_only', "
                       "group_size=128), fuse_dequant_matmul(scale_dtype='float16')"
                       ).program.module().cuda()
    dense = model.cuda()
    ids = ids.cuda()
    with torch.no_grad():
        ms = cuda_medians({"fp16": lambda: dense(ids), "graphpress W4": lambda: fused(ids)},
                          repeats)
    print(f"\ndecode step, Llama 4096x2, fp16 (one token, no KV cache): fp16 "
          f"{ms['fp16']:.3f} ms, W4 {ms['graphpress W4']:.3f} ms, ratio "
          f"{ms['fp16'] / ms['graphpress W4']:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--install", action="store_true",
                        help="pip install --no-deps triton (and gemlite) when missing")
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--quick", action="store_true", help="the first shape only")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device here: this benchmark measures GPU kernels only (CPU figures: "
              "benchmarks/fuse_dequant_matmul.py)")
        sys.exit(2)
    if args.install:
        _install(["triton", "gemlite"])
    start = time.perf_counter()
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}")
    kernels(args.repeats, args.quick)
    decode_step(max(10, args.repeats // 5))
    print(f"\n({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
