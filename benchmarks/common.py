"""Helpers shared by the benchmark scripts: interleaved timing, Markdown tables, and the
section loop of the scripts that print several tables (``--sections``, ``--threads``).

Timing alternates the two callables (A B, B A, A B, ...) after two warm-up calls each, so the
slow drifts of a shared, noisy machine hit both alike; compare them by the ratio of medians.
The rounds show a progress bar on stderr when it is a terminal (graphpress's one convention,
:mod:`graphpress.ir.progress`), so the tables on stdout stay clean.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import time
from collections.abc import Callable, Mapping
from typing import Any

import torch

from graphpress.ir.progress import progress_bar

__all__ = ["cuda_medians", "interleaved", "markdown_table", "run_sections"]


def interleaved(first: Callable[[], Any], second: Callable[[], Any], repeats: int
                ) -> list[tuple[list[float], list[float]]]:
    """Wall and CPU seconds per call of both: ``[(wall, cpu) of first, (wall, cpu) of
    second]``."""
    times: list[tuple[list[float], list[float]]] = [([], []), ([], [])]
    fns = (first, second)
    with torch.no_grad():
        for fn in (first, second, first, second):
            fn()
        for round_ in progress_bar(range(repeats), desc="timing", unit="round"):
            for i in ((0, 1) if round_ % 2 == 0 else (1, 0)):
                wall, cpu = time.perf_counter(), time.process_time()
                fns[i]()
                times[i][1].append(time.process_time() - cpu)
                times[i][0].append(time.perf_counter() - wall)
    return times


def cuda_medians(fns: Mapping[str, Callable[[], Any]], repeats: int) -> dict[str, float]:
    """Median CUDA-event milliseconds per call of each callable, after three warm-up calls
    each, all of them interleaved in every round (the order reversed every other round)."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for fn in fns.values():
        for _ in range(3):
            fn()
    torch.cuda.synchronize()
    for round_ in range(repeats):
        for name in (list(fns) if round_ % 2 == 0 else list(reversed(fns))):
            start, stop = (torch.cuda.Event(enable_timing=True),
                           torch.cuda.Event(enable_timing=True))
            start.record()
            fns[name]()
            stop.record()
            stop.synchronize()
            times[name].append(start.elapsed_time(stop))
    return {name: statistics.median(values) for name, values in times.items()}


def markdown_table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    """A Markdown table: the first column left-aligned, the others (numbers) right-aligned."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: tuple[str, ...]) -> str:
        padded = [c.ljust(w) if i == 0 else c.rjust(w)
                  for i, (c, w) in enumerate(zip(cells, widths, strict=True))]
        return "| " + " | ".join(padded) + " |"
    rule = "|" + "|".join((":" + "-" * (w + 1)) if i == 0 else ("-" * (w + 1) + ":")
                          for i, w in enumerate(widths)) + "|"
    return "\n".join([line(header), rule, *(line(r) for r in rows)])


def run_sections(parser: argparse.ArgumentParser, sections: Mapping[str, Callable[[], None]],
                 title: str, configure: Callable[[argparse.Namespace], None] | None = None
                 ) -> None:
    """Parse ``--sections`` (default: all, in order) and ``--threads`` (default 1) on top of
    ``parser``'s own options, hand the arguments to ``configure``, set torch's threads and seed,
    print ``title`` with the threads, machine and date, then run each section and print its
    wall seconds, and the total."""
    parser.add_argument("--sections", default=",".join(sections))
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    unknown = [name for name in args.sections.split(",") if name not in sections]
    if unknown:
        parser.error(f"unknown sections {', '.join(unknown)}; known: {', '.join(sections)}")
    if configure is not None:
        configure(args)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    start = time.perf_counter()
    print(f"{title}; {args.threads} threads; {platform.machine()}; {datetime.date.today()}\n")
    for name in args.sections.split(","):
        section_start = time.perf_counter()
        sections[name]()
        print(f"({name}: {time.perf_counter() - section_start:.0f} s)\n")
    print(f"wall: {time.perf_counter() - start:.0f} s")
