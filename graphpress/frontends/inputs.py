"""Validation of example inputs, shared by the frontends.

Example inputs are a tuple of positional arguments whose leaves are tensors, Python scalars,
strings or None, nested in tuples, lists and dicts. Anything else is rejected with a message
that names the position and the type and says how to convert it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils import _pytree as pytree

from graphpress.errors import InputError

__all__ = ["normalize_inputs"]

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
