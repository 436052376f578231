"""ONNX backend: export time, file size, and onnxruntime vs eager CPU latency per zoo model.

Usage::

    python benchmarks/onnx_backend.py [--models a,b] [--passes PIPELINE] [--repeats 50]
                                      [--threads 2] [--large]

Each model is compiled with ``gp.compile(model, inputs, passes=PIPELINE)`` on its zoo example
inputs (batch 2; batch 1 for ``--large`` models), then its Program goes to the ONNX backend
factory. "export s" is ``torch.onnx.export`` alone; "build s" is the whole factory (export,
``onnx.checker``, opening the onnxruntime session). "size" is model.onnx as saved. Latency
compares the onnxruntime session with the eager backend (the same rewritten Program run by
PyTorch), both on ``--threads`` intra-op threads, interleaved in one process: two warm-up calls
each, then ``--repeats`` rounds that run both in alternating order; the table shows medians and
eager / onnxruntime (above 1: onnxruntime is faster). onnxruntime's threads do not spin-wait
after a run here (``session.intra_op.allow_spinning=0``): with spinning on, they compete with
PyTorch's threads in the interleaved rounds and double eager's latency on a 2-core machine.
"max |diff|" is onnxruntime against eager on the timed input.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import time
from typing import Any

import torch
from common import interleaved, markdown_table

import graphpress as gp
from graphpress.backends.onnx import onnx_backend
from graphpress.numerics import compare_outputs
from graphpress.testing.zoo import zoo_models

CLEANUP = "fixpoint(dce, cse, fold_constants)"


def _size(n: int) -> str:
    return f"{n / 2**20:.2f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


def bench(name: str, model: torch.nn.Module, inputs: tuple[Any, ...], passes: str,
          repeats: int, threads: int) -> tuple[str, ...]:
    compiled = gp.compile(model, inputs, passes=passes)  # the eager backend
    start = time.perf_counter()
    artifact = onnx_backend(compiled.program, intra_op_threads=threads,
                            session_config={"session.intra_op.allow_spinning": "0"})
    build = time.perf_counter() - start
    (eager, _), (ort, _) = interleaved(lambda: compiled(*inputs), lambda: artifact(*inputs),
                                        repeats)
    eager_s, onnx_s = statistics.median(eager), statistics.median(ort)
    with torch.no_grad():
        diff = compare_outputs(artifact(*inputs), compiled(*inputs), rtol=0, atol=1)
    return (name, f"{artifact.export_seconds:.2f}", f"{build:.2f}", _size(artifact.size_bytes),
            f"{eager_s * 1e3:.2f}", f"{onnx_s * 1e3:.2f}", f"{eager_s / onnx_s:.2f}",
            f"{diff.max_abs_error:.1e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="", help="comma-separated zoo names (default: all)")
    parser.add_argument("--passes", default=CLEANUP)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--large", action="store_true", help="the benchmark-size zoo models")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    entries = zoo_models(include=["large"], exclude=()) if args.large else zoo_models()
    wanted = [m for m in args.models.split(",") if m]
    entries = [e for e in entries if not wanted or e.name in wanted]
    header = ("model", "export s", "build s", "size", "eager ms", "onnxruntime ms",
              "eager / ort", "max |diff|")
    rows = []
    for entry in entries:
        model, inputs = entry.make()
        rows.append(bench(entry.name, model, inputs, args.passes, args.repeats, args.threads))
        print(" ".join(rows[-1]), flush=True)
    print(f"\npipeline: {args.passes}; torch {torch.__version__}; {args.threads} threads "
          f"(torch and onnxruntime); {args.repeats} rounds; {platform.processor() or 'cpu'}; "
          f"{datetime.date.today()}\n")
    print(markdown_table(header, rows))


if __name__ == "__main__":
    main()
