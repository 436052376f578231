"""Helpers shared by the benchmark scripts: interleaved timing and Markdown tables.

Timing alternates the two callables (A B, B A, A B, ...) after two warm-up calls each, so the
slow drifts of a shared, noisy machine hit both alike; compare them by the ratio of medians.
The rounds show a progress bar on stderr when it is a terminal (graphpress's one convention,
:mod:`graphpress.ir.progress`), so the tables on stdout stay clean.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch

from graphpress.ir.progress import progress_bar

__all__ = ["interleaved", "markdown_table"]


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
