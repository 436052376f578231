"""Frontends: turn a model into a Program.

``export`` (default) uses torch.export; ``fx`` symbolically traces first (see
:mod:`graphpress.frontends.fx`). The ``torch.compile`` backend receives graphs from Dynamo
rather than tracing a model itself; it drives the whole pipeline, so it lives in
:mod:`graphpress.integrations.torch_compile`.
"""

from __future__ import annotations

from typing import Any

import torch

from graphpress.errors import InputError
from graphpress.frontends.export import export_program
from graphpress.frontends.fx import fx_program
from graphpress.ir.program import Program

__all__ = ["FRONTENDS", "trace"]

FRONTENDS = ("export", "fx")


def trace(model: torch.nn.Module, example_inputs: Any = None,
          example_kwargs: dict[str, Any] | None = None, *, frontend: str = "export",
          **options: Any) -> Program:
    """Trace ``model`` on its example inputs with the named frontend."""
    if frontend == "export":
        return export_program(model, example_inputs, example_kwargs, **options)
    if frontend == "fx":
        return fx_program(model, example_inputs, example_kwargs, **options)
    hint = (" (the dynamo frontend is used through torch.compile(model, backend='graphpress'))"
            if frontend == "dynamo" else "")
    raise InputError(f"unknown frontend {frontend!r}; choose one of {FRONTENDS}{hint}")
