"""fold_bn: CPU latency, node count and weight bytes, unfolded vs folded, on ResNet-50 and
MobileNetV2 (the zoo's ``hf_resnet50`` and ``hf_mobilenet_v2_full``, 224x224 inputs).

Usage::

    python benchmarks/fold_bn.py [--models hf_resnet50,hf_mobilenet_v2_full] [--batches 1,32]
                                 [--repeats 20] [--large-batch-repeats 5] [--threads N]

Both programs go through ``gp.compile`` with the eager backend, traced at each batch size:
``passes=[]`` (unfolded) and ``passes=["fold_bn"]`` (folded); only folding differs. Timing is
interleaved in one process: each round runs both once, in alternating order, under
``torch.no_grad()``, after two warm-up runs each. The table shows the median and the minimum of
each, and their ratios (on a shared machine the minimum is the least disturbed run), and the
median CPU time per call (``time.process_time``, all threads of the process; less sensitive than
wall time to other processes taking the cores). Batches of 8 or more use
``--large-batch-repeats`` rounds (ResNet-50 at batch 32 takes seconds on 2 cores).

"weight bytes" counts every weight of the program (parameters, buffers such as BatchNorm's
running statistics, constants). "max |diff|" is the largest absolute difference between the
folded and unfolded outputs on the timed input (a sanity check; the contract is checked by the
tests with ``verify=True``).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import time

import torch
from common import interleaved, markdown_table

import graphpress as gp
from graphpress.testing.zoo import get_model

_IMAGE = (3, 224, 224)


def _weight_bytes(compiled: gp.CompiledModel) -> int:
    return sum(t.numel() * t.element_size() for t in compiled.program.weights().values())


def _bytes(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def bench(name: str, batches: list[int], repeats: int, large_repeats: int
          ) -> list[tuple[str, ...]]:
    model, _ = get_model(name).make()
    rows = []
    for batch in batches:
        x = torch.randn(batch, *_IMAGE, generator=torch.Generator().manual_seed(batch))
        unfolded = gp.compile(model, (x,), passes=[])
        start = time.perf_counter()
        folded = gp.compile(model, (x,), passes=["fold_bn"])
        compile_s = time.perf_counter() - start
        stats = folded.report().records[0].stats
        runs = repeats if batch < 8 else large_repeats
        (before, cpu_before), (after, cpu_after) = interleaved(
            lambda u=unfolded, x=x: u(x), lambda f=folded, x=x: f(x), runs)
        with torch.no_grad():
            diff = (unfolded(x).logits - folded(x).logits).abs().max().item()
        med = statistics.median
        rows.append((name, str(batch), str(runs),
                     f"{stats['folded']} / {stats['not_folded']}",
                     f"{unfolded.program.num_nodes()} -> {folded.program.num_nodes()}",
                     f"{_bytes(_weight_bytes(unfolded))} -> {_bytes(_weight_bytes(folded))}",
                     f"{med(before) * 1e3:.0f} / {min(before) * 1e3:.0f}",
                     f"{med(after) * 1e3:.0f} / {min(after) * 1e3:.0f}",
                     f"{med(before) / med(after):.2f}x / {min(before) / min(after):.2f}x",
                     f"{med(cpu_before) * 1e3:.0f} / {med(cpu_after) * 1e3:.0f}",
                     f"{med(cpu_before) / med(cpu_after):.2f}x", f"{diff:.1e}"))
        print(f"  {name} batch {batch}: done (compile with fold_bn {compile_s:.1f} s)",
              flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="hf_resnet50,hf_mobilenet_v2_full")
    parser.add_argument("--batches", default="1,32")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--large-batch-repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    batches = [int(b) for b in args.batches.split(",")]
    start, cpu = time.perf_counter(), time.process_time()
    print(f"load average at the start: {', '.join(f'{v:.1f}' for v in os.getloadavg())}")
    rows = []
    for name in args.models.split(","):
        rows += bench(name, batches, args.repeats, args.large_batch_repeats)
    print(f"\nfold_bn: eager backend, unfolded vs folded; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {platform.processor() or platform.machine()}, "
          f"{datetime.date.today()}")
    print(markdown_table(("model", "batch", "rounds", "folded / not", "nodes", "weight bytes",
                  "unfolded ms (median / min)", "folded ms (median / min)",
                  "speedup (median / min)", "CPU ms (unfolded / folded)", "CPU ratio",
                  "max |diff|"), rows))
    print(f"load average at the end: {', '.join(f'{v:.1f}' for v in os.getloadavg())}")
    print(f"\ntotal {time.perf_counter() - start:.0f} s wall, {time.process_time() - cpu:.0f} s "
          "CPU")


if __name__ == "__main__":
    main()
