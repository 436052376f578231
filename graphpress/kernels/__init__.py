"""Compute kernels over plain tensors (no graphpress imports): the Triton kernels behind the
op library's ops (:mod:`graphpress.kernels.dequant_matmul`). ``graphpress.ops`` calls them; a
kernel module imports triton only when it is imported itself, and :func:`triton_available` says
whether it can be."""

from __future__ import annotations

import functools
import importlib.util
import os

__all__ = ["interpreting", "triton_available"]


@functools.cache
def triton_available() -> bool:
    """Whether triton is installed (the Triton kernels can be imported)."""
    return importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    """Whether Triton runs in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"
