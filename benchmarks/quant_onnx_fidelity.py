"""How far onnxruntime's output is from eager fake-quant, in int8 steps of the output.

Usage::

    python benchmarks/quant_onnx_fidelity.py [--models a,b] [--modes qdq,exact]

For every zoo model (default size) and scheme — ``int8_static`` on every model (after
``fold_bn`` where it has BatchNorm; 8 generated calibration batches), and ``int8_dynamic``,
``int4_weight_only(group_size=16)`` and ``fp8`` on the transformers — the program is exported
with each ONNX ``quantization`` mode (``"qdq"``: QuantizeLinear / DequantizeLinear, run by
onnxruntime's int8 kernels; ``"exact"``: the fake-quant formula in float ops) and run by
onnxruntime on the example input and 3 generated samples. The figure is the largest
``max |onnx - eager| / step`` over outputs and samples, where ``step = (max - min) / 255`` of
the eager output (one int8 step of it: the bound the backend check of ``gp.compile`` applies).
``quantized acts`` counts the activations with static or dynamic fake-quant, the number of
rounding decisions a float difference can flip.
"""

from __future__ import annotations

import argparse
import datetime
import platform
from typing import Any

import torch
from common import markdown_table

import graphpress as gp
from graphpress.pipeline.samples import generate_samples
from graphpress.testing.zoo import zoo_models

SCHEMES = {
    "int8_static": "insert_fake_quant(scheme='int8_static')",
    "int8_dynamic": "insert_fake_quant(scheme='int8_dynamic')",
    "int4_weight_only(16)": "insert_fake_quant(scheme='int4_weight_only', group_size=16)",
    "fp8": "insert_fake_quant(scheme='fp8')",
}
TRANSFORMER_TAGS = {"transformer", "attention"}


def _steps(got: Any, want: Any) -> float:
    worst = 0.0
    for a, b in zip(torch.utils._pytree.tree_leaves(got), torch.utils._pytree.tree_leaves(want),
                    strict=True):
        if not (isinstance(b, torch.Tensor) and b.is_floating_point()):
            continue
        step = float(b.max() - b.min()) / 255 or 1.0
        worst = max(worst, float((a - b).abs().max()) / step)
    return worst


def measure(entry: Any, scheme: str, mode: str) -> tuple[str, str]:
    model, inputs = entry.make()
    samples = [(inputs, {}), *generate_samples((inputs, {}), 3)]
    calibration = [args for args, _ in generate_samples((inputs, {}), 8, seed=1)]
    passes = (["fold_bn"] if "batchnorm" in entry.tags else []) + [SCHEMES[scheme]]
    try:
        compiled = gp.compile(model, inputs, passes=passes, calibration_data=calibration,
                              backend="onnx", backend_options={"quantization": mode})
    except Exception as exc:  # the table shows what failed
        return f"FAIL {type(exc).__name__}", str(exc).split("\n", 1)[0][:160]
    program = compiled.program
    worst = 0.0
    with torch.no_grad():
        for args, kwargs in samples:
            worst = max(worst, _steps(compiled(*args, **kwargs), program(*args, **kwargs)))
    acts = sum(1 for record in compiled.report().records for q in
               record.details.get("quantized", []) if q.role == "activation")
    return f"{worst:.3f} ({acts})", ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="")
    parser.add_argument("--modes", default="qdq,exact")
    args = parser.parse_args()
    torch.set_num_threads(1)
    modes = args.modes.split(",")
    wanted = set(filter(None, args.models.split(",")))
    print(f"onnx fidelity: torch {torch.__version__}, {platform.machine()}, "
          f"{datetime.date.today()}; figures: max |onnx - eager| in int8 steps of the output "
          "(quantized activations)\n")
    rows, failures = [], []
    for entry in zoo_models():
        if wanted and entry.name not in wanted:
            continue
        schemes = (list(SCHEMES) if TRANSFORMER_TAGS & set(entry.tags) else ["int8_static"])
        for scheme in schemes:
            cells = []
            for mode in modes:
                cell, error = measure(entry, scheme, mode)
                cells.append(cell)
                if error:
                    failures.append(f"- {entry.name}, {scheme}, {mode}: {error}")
            rows.append((entry.name, scheme, *cells))
    print(markdown_table(("model", "scheme", *modes), rows))
    if failures:
        print("\nfailures:\n" + "\n".join(failures))


if __name__ == "__main__":
    main()
