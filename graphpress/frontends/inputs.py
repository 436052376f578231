"""Validation of example inputs, shared by the frontends.

Example inputs are a tuple of positional arguments whose leaves are tensors, Python scalars,
strings or None, nested in tuples, lists and dicts. Anything else is rejected with a message
that names the position and the type and says how to convert it.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch.utils import _pytree as pytree

from graphpress.errors import InputError

__all__ = ["normalize_batches", "normalize_inputs"]

_OK_LEAVES = (torch.Tensor, int, float, bool, str, type(None))


def normalize_inputs(example_inputs: Any, example_kwargs: Any = None
                     ) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Return ``(args, kwargs)``; a single tensor is accepted as a one-element tuple."""
    if example_inputs is None:
        args: tuple[Any, ...] = ()
    elif isinstance(example_inputs, torch.Tensor):
        args = (example_inputs,)
    elif isinstance(example_inputs, tuple | list):
        args = tuple(example_inputs)
    else:
        raise InputError(
            f"example_inputs must be a tuple of positional arguments (tensors, or nested "
            f"lists/dicts of tensors); got {type(example_inputs).__name__}. "
            "Wrap a single input as (x,) and pass keyword arguments as example_kwargs.")
    kwargs = dict(example_kwargs or {})
    if not isinstance(example_kwargs or {}, dict):
        raise InputError(f"example_kwargs must be a dict, got {type(example_kwargs).__name__}")
    leaves, _ = pytree.tree_flatten_with_path((args, kwargs))
    for path, leaf in leaves:
        if not isinstance(leaf, _OK_LEAVES):
            where = pytree.keystr(path)
            hint = ""
            if type(leaf).__module__ == "numpy":
                hint = " Convert it with torch.from_numpy(...)."
            raise InputError(
                f"example input {where} has type {type(leaf).__module__}.{type(leaf).__name__}, "
                f"which cannot be traced; use torch tensors (or ints/floats/bools).{hint}")
    if not any(isinstance(leaf, torch.Tensor) for _, leaf in leaves):
        raise InputError(
            "example inputs contain no tensor: pass the inputs the model is called with, "
            "e.g. gp.compile(model, example_inputs=(torch.randn(1, 3, 224, 224),))")
    return args, kwargs


def normalize_batches(batches: Iterable[Any] | None
                      ) -> list[tuple[tuple[Any, ...], dict[str, Any]]]:
    """Calibration batches as ``(args, kwargs)`` pairs: each batch is a tuple (or list) of
    positional inputs, a dict of keyword inputs, or a single tensor."""
    if batches is None:
        return []
    if isinstance(batches, torch.Tensor | dict):
        raise InputError(
            "calibration_data must be an iterable of batches (e.g. a list of input tuples or "
            "a DataLoader yielding them), not a single tensor or dict; wrap it: [(x,)]")
    normalized = []
    for index, batch in enumerate(batches):
        try:
            normalized.append(normalize_inputs(None, batch) if isinstance(batch, dict)
                              else normalize_inputs(batch))
        except InputError as exc:
            raise InputError(f"calibration batch {index}: {exc}") from exc
    return normalized
