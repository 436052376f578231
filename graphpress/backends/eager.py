"""Eager backend: the rewritten program run by PyTorch (the reference for other backends)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from graphpress.ir.program import Program

__all__ = ["EagerArtifact"]


class EagerArtifact:
    """Runs the Program's graph as an ``nn.Module``; saves it as a ``.pt2`` file."""

    name = "eager"

    def __init__(self, program: Program) -> None:
        self.program = program

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.program(*args, **kwargs)

    def save(self, folder: Path) -> list[str]:
        torch.export.save(self.program.exported_program, folder / "program.pt2")
        return ["program.pt2"]
