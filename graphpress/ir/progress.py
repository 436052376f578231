"""Progress bars: one convention for every long step of graphpress.

Tracing, calibration, verification, the passes, the backend, the demo and the benchmarks show
tqdm bars through this module, so one rule decides whether a bar appears:

1. ``GRAPHPRESS_PROGRESS=0`` turns every bar off (it beats ``progress=True``);
2. otherwise an explicit ``progress=True`` / ``False`` (an argument, or :func:`progress_mode`
   around a block: the command line's ``--quiet``) shows or hides it;
3. otherwise ``GRAPHPRESS_PROGRESS=1`` shows it even when stderr is not a terminal;
4. otherwise a bar shows only when stderr is a terminal (never in pipes, CI logs, tests).

Bars write to stderr, never to stdout, so a command's printed output stays parseable. A bar
appears only once its work has run :data:`DELAY` seconds (``delay=``), so quick runs print
nothing, and it is erased when the work ends. :func:`progress_bar` counts items of a loop;
:func:`progress_status` is for one long call that reports no progress of its own (tracing,
an ONNX export): it shows the elapsed time and the current stage, refreshed by a timer thread.
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

__all__ = ["DELAY", "progress_bar", "progress_disabled", "progress_mode", "progress_status"]

DELAY = 1.0
"""Seconds a step runs before its bar appears (read at each call, so tests may lower it)."""

_MODE: ContextVar[bool | None] = ContextVar("graphpress_progress", default=None)


def progress_disabled(progress: bool | None = None) -> bool | None:
    """tqdm's ``disable`` argument under the rule of the module docstring: True (off), False
    (on, even off a terminal) or None (on when the stream is a terminal)."""
    environment = os.environ.get("GRAPHPRESS_PROGRESS", "")
    if environment == "0":
        return True
    if progress is None:
        progress = _MODE.get()
    if progress is not None:
        return not progress
    return False if environment == "1" else None


@contextmanager
def progress_mode(progress: bool | None) -> Iterator[None]:
    """Within the block, bars that were not told otherwise follow ``progress`` (None: the
    default rule); ``GRAPHPRESS_PROGRESS=0`` still turns them off."""
    token = _MODE.set(progress)
    try:
        yield
    finally:
        _MODE.reset(token)


def progress_bar(iterable: Iterable[Any] | None = None, *, desc: str, unit: str = "it",
                 total: int | None = None, progress: bool | None = None,
                 delay: float | None = None) -> Any:
    """A tqdm bar over ``iterable`` (or a manual one, with ``total``) on stderr."""
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, unit=unit, total=total, file=sys.stderr, leave=False,
                disable=progress_disabled(progress), delay=DELAY if delay is None else delay,
                dynamic_ncols=True)


class _Ticker(threading.Thread):
    """Refreshes a bar's elapsed time every ``interval`` seconds until stopped."""

    def __init__(self, bar: Any, interval: float) -> None:
        super().__init__(daemon=True, name="graphpress-progress")
        self.bar, self.interval, self.stopped = bar, interval, threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(self.interval):
            self.bar.update(0)  # displays once the bar's delay has passed


@contextmanager
def progress_status(desc: str, *, progress: bool | None = None, delay: float | None = None,
                    interval: float = 0.5) -> Iterator[Any]:
    """A bar for one long call: ``desc, stage [elapsed]``; ``bar.set_postfix_str(stage,
    refresh=False)`` names the current stage."""
    bar = progress_bar(desc=desc, unit="s", progress=progress, delay=delay)
    bar.bar_format = "{desc}{postfix} [{elapsed}]"  # tqdm writes ", stage"
    ticker = None if bar.disable else _Ticker(bar, interval)
    if ticker is not None:
        ticker.start()
    try:
        yield bar
    finally:
        if ticker is not None:
            ticker.stopped.set()
            ticker.join()
        bar.close()
