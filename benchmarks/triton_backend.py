"""The Triton backend on the zoo: how much of each program runs in generated kernels, how many
kernels it launches against the ATen ops eager PyTorch runs, and its error against eager.

Usage::

    python benchmarks/triton_backend.py [--models hf_vit,hf_llama] [--pipeline "..."]

Each model is compiled with ``passes=<pipeline>`` (default ``fold_bn, fixpoint(dce, cse)``),
``backend="triton"`` and ``verify=True`` (which compares the backend with eager). Columns:
``eager ops``: ATen ops of the program that compute (views launch nothing); ``launches``: what
the generated module launches per call (its kernels, graphpress library kernels, ATen
fallbacks); ``kernels``: generated kernel launches, covering ``fused ops`` ATen ops
(``distinct``: different kernel functions in the source); ``nodes``/``FLOPs in kernels``: the
share of compute nodes and of FLOPs (2 per MAC of a contraction, 1 per element otherwise) in
generated or library kernels. Without a GPU the kernels run in Triton's interpreter
(``TRITON_INTERPRET=1``): these are structure figures, not speed; the speed is
``benchmarks/triton_backend_gpu.py``'s.
"""

from __future__ import annotations

import argparse
import os
import time

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from common import markdown_table

import graphpress as gp
from graphpress.testing.zoo import get_model, zoo_models

PIPELINE = "fold_bn, fixpoint(dce, cse)"


def _row(name: str, pipeline: str) -> tuple[tuple[str, ...], dict[str, int]]:
    model, inputs = get_model(name).make()
    start = time.perf_counter()
    compiled = gp.compile(model, inputs, passes=pipeline, backend="triton", verify=True)
    seconds = time.perf_counter() - start
    stats = compiled.artifact.stats()
    error = compiled.report().extra["triton vs eager max abs error"].split(" ")[0]
    nodes = stats["nodes_in_kernels"] / max(stats["nodes_in_kernels"] + stats["fallbacks"], 1)
    flops = stats["flops_in_kernels"] / max(
        stats["flops_in_kernels"] + stats["flops_in_fallbacks"], 1)
    return (name, str(stats["eager_ops"]), str(stats["launches"]), str(stats["kernels"]),
            str(stats["ops_in_kernels"]), str(stats["distinct_kernels"]), f"{100 * nodes:.0f}%",
            f"{100 * flops:.0f}%", error, f"{seconds:.1f}"), stats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="", help="comma-separated zoo names (default: "
                        "every model not tagged large)")
    parser.add_argument("--pipeline", default=PIPELINE)
    args = parser.parse_args()
    names = [n for n in args.models.split(",") if n] or [
        m.name for m in zoo_models(exclude=("large",))]
    torch.set_num_threads(1)
    rows, totals = [], {"eager_ops": 0, "launches": 0, "kernels": 0, "ops_in_kernels": 0}
    for name in names:
        row, stats = _row(name, args.pipeline)
        rows.append(row)
        for key in totals:
            totals[key] += stats[key]
    rows.append(("**all**", str(totals["eager_ops"]), str(totals["launches"]),
                 str(totals["kernels"]), str(totals["ops_in_kernels"]), "", "", "", "", ""))
    mode = "interpreter (CPU)" if os.environ.get("TRITON_INTERPRET") == "1" else \
        torch.cuda.get_device_name()
    print(f"Triton backend on the zoo, pipeline {args.pipeline!r}, kernels run by {mode}, "
          f"torch {torch.__version__}\n")
    print(markdown_table(("model", "eager ops", "launches", "kernels", "fused ops", "distinct",
                          "nodes in kernels", "FLOPs in kernels", "max abs error", "compile s"),
                         rows))
    print(f"\nlaunches / eager ops over the zoo: {totals['launches'] / totals['eager_ops']:.2f}; "
          f"kernels / fused ops: {totals['kernels'] / totals['ops_in_kernels']:.2f}")


if __name__ == "__main__":
    main()
