"""ONNX int8 vs fp32 latency: onnxruntime on the fp32 program and on its int8_static one.

Usage::

    python benchmarks/quant_onnx_latency.py [--repeats 20] [--threads 1]

Models: the zoo's benchmark-size ResNet-50 (``hf_resnet50``, batch 1, 224x224, after fold_bn)
and a BERT-base configuration (Hugging Face ``BertConfig()`` defaults: 12 layers, hidden 768,
random weights, batch 1, 128 tokens). The int8 program is ``insert_fake_quant(scheme=
'int8_static')`` calibrated on 8 generated batches and exported with the default
``quantization="qdq"`` (QuantizeLinear / DequantizeLinear, which onnxruntime fuses into its
int8 kernels at ``graph_optimization_level="all"``). Both sessions run on ``--threads`` intra-op
threads, timed interleaved in the same rounds (benchmarks/common.py) after two warm-up calls;
medians. "max |diff|" is the int8 session against the fp32 one on the timed input.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
from typing import Any

import torch
from common import interleaved, markdown_table

import graphpress as gp
from graphpress.pipeline.samples import generate_samples
from graphpress.testing.zoo import get_model


def _bert_base() -> tuple[torch.nn.Module, tuple[torch.Tensor, ...]]:
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    model = BertModel(BertConfig(attn_implementation="sdpa")).eval()
    ids = torch.randint(0, 30522, (1, 128), generator=torch.Generator().manual_seed(0))
    return model, (ids, torch.ones(1, 128, dtype=torch.int64))


def _models() -> dict[str, tuple[torch.nn.Module, tuple[Any, ...], list[str]]]:
    resnet, resnet_inputs = get_model("hf_resnet50").make()
    bert, bert_inputs = _bert_base()
    return {"hf_resnet50": (resnet, resnet_inputs, ["fold_bn"]),
            "bert-base (BertConfig())": (bert, bert_inputs, [])}


def _first(output: Any) -> torch.Tensor:
    leaves = torch.utils._pytree.tree_leaves(output)
    return leaves[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    options = {"intra_op_threads": args.threads}
    rows = []
    for name, (model, inputs, before) in _models().items():
        batches = [a for a, _ in generate_samples((inputs, {}), 8, seed=1)]
        fp32 = gp.compile(model, inputs, passes=before, backend="onnx",
                          backend_options=options)
        int8 = gp.compile(model, inputs, passes=[*before, "insert_fake_quant(scheme="
                                                 "'int8_static')"],
                          calibration_data=batches, backend="onnx", backend_options=options)
        (fp32_wall, _), (int8_wall, _) = interleaved(lambda f=fp32, x=inputs: f(*x),
                                                     lambda q=int8, x=inputs: q(*x), args.repeats)
        fp32_ms, int8_ms = (statistics.median(w) * 1e3 for w in (fp32_wall, int8_wall))
        with torch.no_grad():
            diff = float((_first(fp32(*inputs)) - _first(int8(*inputs))).abs().max())
        rows.append((name, fp32.report().extra["onnx size on disk"],
                     int8.report().extra["onnx size on disk"], f"{fp32_ms:.1f}",
                     f"{int8_ms:.1f}", f"{fp32_ms / int8_ms:.2f}", f"{diff:.3g}"))
        print(f"  {name}: done", flush=True)
    print(f"\nonnxruntime int8 (qdq) vs fp32; torch {torch.__version__}; {args.threads} "
          f"thread(s); {args.repeats} rounds; {platform.machine()}; "
          f"{datetime.date.today()}\n")
    print(markdown_table(("model", "fp32 size", "int8 size", "fp32 ms", "int8 ms",
                          "fp32 / int8", "max |diff|"), rows))


if __name__ == "__main__":
    main()
