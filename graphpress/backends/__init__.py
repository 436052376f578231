"""Backends: turn a Program into something that runs and can be saved.

A backend is a factory ``(Program, **options) -> Artifact``; an artifact is callable like the
model and has ``save(folder) -> list of files written``. Optional: ``tolerance`` (rtol, atol)
for checking it against eager when ``verify=True``, and ``info() -> dict`` of facts for the
report (file size, opset, ...). ``eager`` is built in; ``onnx`` (:mod:`graphpress.backends.onnx`)
and ``triton`` (:mod:`graphpress.backends.triton`) are imported on first use, as onnx,
onnxruntime and triton are slow to import.
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


def _triton(program: Program, **options: Any) -> Artifact:
    from graphpress.backends.triton import triton_backend

    return triton_backend(program, **options)


BACKENDS: dict[str, Callable[..., Artifact]] = {"eager": EagerArtifact, "onnx": _onnx,
                                               "triton": _triton}


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
    raise BackendError(f"unknown backend {name!r}; available: {', '.join(BACKENDS)}")
