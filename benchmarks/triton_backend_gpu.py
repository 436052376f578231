"""GPU: the Triton backend's generated module against eager PyTorch and ``torch.compile``
(Inductor), fp16, on a ResNet-50 config, a ViT-B/16 config and one decode step of a
Llama-config model with int4 weights (``insert_fake_quant(int4_weight_only, 128),
fuse_dequant_matmul``: graphpress's fused dequant-matmul kernel; eager and Inductor run the
fp16 model).

Usage (one command, at most about 5 minutes on one GPU)::

    python benchmarks/triton_backend_gpu.py [--repeats 30] [--models resnet50,vit_b,llama_decode]
    python benchmarks/triton_backend_gpu.py --smoke   # tiny configs on CPU, interpreter: checks
                                                      # the script itself, prints no figures

Each model is timed with CUDA events after warm-up (autotuning and compilation excluded), the
three callables interleaved in every round; medians, and the ratios eager / graphpress and
Inductor / graphpress (above 1: graphpress is faster). ``max abs diff`` is graphpress against
eager on the same input. Models come from ``transformers`` configs with random weights (no
download). Without a GPU (and without ``--smoke``) the script says so and exits with status 2:
it never prints CPU figures as GPU ones.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
from common import cuda_medians

SMOKE = "--smoke" in sys.argv
if SMOKE:
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _resnet50(smoke: bool) -> tuple[torch.nn.Module, tuple[torch.Tensor, ...], str]:
    from transformers import ResNetConfig, ResNetModel

    config = ResNetConfig(hidden_sizes=[8, 16], depths=[1, 1], embedding_size=8) if smoke \
        else ResNetConfig()  # the default config is ResNet-50
    batch, size = (1, 32) if smoke else (8, 224)
    return ResNetModel(config), (torch.randn(batch, 3, size, size),), ""


def _vit_b(smoke: bool) -> tuple[torch.nn.Module, tuple[torch.Tensor, ...], str]:
    from transformers import ViTConfig, ViTModel

    config = ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                       intermediate_size=64, image_size=32, patch_size=8) if smoke \
        else ViTConfig()  # ViT-B/16, 224 x 224
    config._attn_implementation = "sdpa"
    batch = 1 if smoke else 8
    return ViTModel(config), (torch.randn(batch, 3, config.image_size, config.image_size),), ""


def _llama_decode(smoke: bool) -> tuple[torch.nn.Module, tuple[torch.Tensor, ...], str]:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, vocab_size=256) if smoke \
        else LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=2,
                         num_attention_heads=32, num_key_value_heads=32, vocab_size=32000)
    config._attn_implementation = "sdpa"
    config.use_cache = False
    group = 32 if smoke else 128
    passes = (f"insert_fake_quant(scheme='int4_weight_only', group_size={group}), "
              "fuse_dequant_matmul")
    return LlamaForCausalLM(config), (torch.randint(0, config.vocab_size, (1, 1)),), passes


MODELS: dict[str, Callable[[bool], tuple[torch.nn.Module, tuple[torch.Tensor, ...], str]]] = {
    "resnet50": _resnet50, "vit_b": _vit_b, "llama_decode": _llama_decode}


def _first_tensor(value: Any) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    if hasattr(value, "to_tuple"):
        value = value.to_tuple()
    return next(v for v in value if isinstance(v, torch.Tensor))


def _run(name: str, repeats: int, smoke: bool) -> str:
    import graphpress as gp

    device, dtype = ("cpu", torch.float32) if smoke else ("cuda", torch.float16)
    model, inputs, passes = MODELS[name](smoke)
    model = model.eval().to(device=device, dtype=dtype)
    inputs = tuple(t.to(device=device, dtype=dtype) if t.is_floating_point() else t.to(device)
                   for t in inputs)
    start = time.perf_counter()
    compiled = gp.compile(model, inputs, passes=passes, backend="triton")
    build = time.perf_counter() - start
    stats = compiled.artifact.stats()
    with torch.no_grad():
        diff = float((_first_tensor(compiled(*inputs)).float()
                      - _first_tensor(model(*inputs)).float()).abs().max())
    if smoke:
        return (f"| {name} | smoke | {stats['kernels']} kernels, {stats['launches']} launches "
                f"| {diff:.3g} | {build:.1f} |")
    inductor = torch.compile(model)

    def run(fn: Callable[..., Any]) -> Callable[[], Any]:
        def call() -> Any:
            with torch.no_grad():
                return fn(*inputs)
        return call

    ms = cuda_medians({"eager": run(model), "inductor": run(inductor), "graphpress": run(compiled)},
               repeats)
    return (f"| {name} | {ms['eager']:.3f} | {ms['inductor']:.3f} | {ms['graphpress']:.3f} | "
            f"{ms['eager'] / ms['graphpress']:.2f} | {ms['inductor'] / ms['graphpress']:.2f} | "
            f"{stats['kernels']} / {stats['launches']} | {diff:.3g} | {build:.1f} |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args()
    if not args.smoke and not torch.cuda.is_available():
        print("no CUDA device: this benchmark measures GPU latency and prints nothing on CPU "
              "(use --smoke to check the script under the Triton interpreter)")
        return 2
    device = "CPU (smoke, interpreter)" if args.smoke else torch.cuda.get_device_name()
    print(f"Triton backend vs eager and Inductor, fp16, {device}, torch {torch.__version__}\n")
    print("| model | eager ms | Inductor ms | graphpress ms | eager / graphpress | "
          "Inductor / graphpress | kernels / launches | max abs diff | build s |")
    print("|:--|--:|--:|--:|--:|--:|--:|--:|--:|")
    for name in [n for n in args.models.split(",") if n]:
        try:
            print(_run(name, args.repeats, args.smoke), flush=True)
        except Exception as exc:  # one model failing must not hide the others' figures
            print(f"| {name} | failed: {type(exc).__name__}: {str(exc)[:200]} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
