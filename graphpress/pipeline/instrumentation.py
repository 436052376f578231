"""Instrumentation hooks of the PassManager, and the debug switches built on them.

A hook gets ``before_pass(pass, program, index)`` and ``after_pass(pass, program, record,
index)``. Built in, switched by environment (like Inductor's ``TORCH_COMPILE_DEBUG``):

* ``GRAPHPRESS_DEBUG=1`` prints the pipeline and one line per pass to stderr;
  ``GRAPHPRESS_DEBUG=2`` also prints each pass's IR diff.
* ``GRAPHPRESS_DUMP=dir`` writes ``NN_<pass>.before.txt`` / ``.after.txt`` with the IR text.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from graphpress.ir.printer import diff_programs, format_program

if TYPE_CHECKING:
    from graphpress.ir.program import Program
    from graphpress.pipeline.base import Pass
    from graphpress.pipeline.report import PassRecord

__all__ = ["DebugPrinter", "IRDumper", "Instrumentation", "hooks_from_environment"]


class Instrumentation(Protocol):
    def before_pass(self, pass_: Pass, program: Program, index: int) -> None: ...

    def after_pass(self, pass_: Pass, program: Program, record: PassRecord,
                   index: int) -> None: ...


class DebugPrinter:
    """Prints each pass as it runs; at level 2 also the IR diff it made."""

    def __init__(self, level: int) -> None:
        self.level = level
        self._before: Program | None = None

    def before_pass(self, pass_: Pass, program: Program, index: int) -> None:
        if self.level >= 2:
            self._before = program.copy()

    def after_pass(self, pass_: Pass, program: Program, record: PassRecord, index: int) -> None:
        err = "" if record.max_error is None else f", max error {record.max_error:.2e}"
        print(f"[graphpress] {index:02d} {pass_.describe()}: "
              f"{'changed' if record.changed else 'no change'}, {record.seconds * 1e3:.1f} ms, "
              f"nodes {record.nodes[0]} -> {record.nodes[1]}{err}", file=sys.stderr)
        for node, why in record.skipped:
            print(f"[graphpress]     not applied at {node}: {why}", file=sys.stderr)
        if self._before is not None:
            diff = diff_programs(self._before, program)
            print(diff or "[graphpress]     (IR unchanged)", file=sys.stderr)
            self._before = None


class IRDumper:
    """Writes the IR before and after each pass into a folder."""

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)

    def before_pass(self, pass_: Pass, program: Program, index: int) -> None:
        path = self.folder / f"{index:02d}_{pass_.name}.before.txt"
        path.write_text(format_program(program))

    def after_pass(self, pass_: Pass, program: Program, record: PassRecord, index: int) -> None:
        path = self.folder / f"{index:02d}_{pass_.name}.after.txt"
        path.write_text(format_program(program))


def hooks_from_environment() -> list[Instrumentation]:
    hooks: list[Instrumentation] = []
    level = os.environ.get("GRAPHPRESS_DEBUG", "")
    if level:
        try:
            hooks.append(DebugPrinter(int(level)))
        except ValueError:
            print(f"[graphpress] GRAPHPRESS_DEBUG={level!r} is not an int; ignored",
                  file=sys.stderr)
    dump = os.environ.get("GRAPHPRESS_DUMP", "")
    if dump:
        hooks.append(IRDumper(dump))
    return hooks
