"""Backends: turn a Program into something that runs and can be saved.

A backend is a factory ``(Program, **options) -> Artifact``; an artifact is callable like the
model and has ``save(folder) -> list of files written``. Optional: ``tolerance`` (rtol, atol)
for checking it against eager when ``verify=True``, and ``info() -> dict`` of facts for the
report (file size, opset, ...). ``eager`` is built in; ``onnx`` (:mod:`graphpress.backends.onnx`)
is imported on first use, as onnx and onnxruntime are slow to import. ``triton`` is planned:
until its module exists, asking for it raises a BackendError that says so (no placeholder
pretends to run).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from graphpress.backends.eager import EagerArtifact
from graphpress.errors import BackendError
from graphpress.ir.program import Program

__all__ = ["Artifact", "BACKENDS", "build_backend", "register_backend"]


class Artifact(Protocol):
    name: str

    def __call__(self, *args: Any, **kwargs: Any) -> Any: ...

    def save(self, folder: Path) -> list[str]: ...


def _onnx(program: Program, **options: Any) -> Artifact:
    from graphpress.backends.onnx import onnx_backend

    return onnx_backend(program, **options)


BACKENDS: dict[str, Callable[..., Artifact]] = {"eager": EagerArtifact, "onnx": _onnx}
_PLANNED = {"triton": "generated Triton kernels"}


def register_backend(name: str, factory: Callable[..., Artifact]) -> None:
    BACKENDS[name] = factory


def build_backend(name: str, program: Program, **options: Any) -> Artifact:
    if name in BACKENDS:
        try:
            return BACKENDS[name](program, **options)
        except TypeError as exc:
            if options and "argument" in str(exc):
                raise BackendError(f"backend {name!r} rejected its options {options}: {exc}"
                                   ) from exc
            raise
    if name in _PLANNED:
        raise BackendError(
            f"backend {name!r} ({_PLANNED[name]}) is not available in this version of "
            f"graphpress; use backend='eager' (available: {', '.join(BACKENDS)})")
    raise BackendError(f"unknown backend {name!r}; available: {', '.join(BACKENDS)}")
