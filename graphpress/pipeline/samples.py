"""Sample inputs for verification, and runs on them that leave no trace.

Samples: the example inputs, plus ``generated`` more of the same structure, shapes and dtypes
(seeded, so a compile is reproducible), plus any ``verify_inputs`` the user gave. A generated
sample keeps what the model may depend on:

* floating-point tensors: normal noise with the example's mean and standard deviation;
* integer tensors: uniform within the example's observed range ``[min, max]`` (token ids stay
  valid ids), except masks, integer or bool tensors holding only 0 and 1, which are kept;
* everything else (Python numbers, strings, None) is kept.

A verification run must not change the state the user sees. :func:`run_samples` snapshots
the state of whatever it runs (a Program's buffers and constants, an ``nn.Module``'s buffers
and parameters) and restores it afterwards, and gives each run its own copy of the inputs, so
buffer mutations (a step counter, running statistics) and input mutations stay invisible.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch.utils import _pytree as pytree

__all__ = ["Sample", "Samples", "generate_samples", "preserved_state", "run_samples"]

Sample = tuple[tuple[Any, ...], dict[str, Any]]
Samples = list[Sample]


def _is_mask(t: torch.Tensor) -> bool:
    if t.dtype == torch.bool:
        return True
    return t.numel() > 0 and bool(((t == 0) | (t == 1)).all())


def _like(t: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    if t.numel() == 0 or t.is_complex():
        return t.clone()
    if t.is_floating_point():
        sample = t.detach().to(torch.float64)
        mean = float(sample.mean())
        std = float(sample.std()) if t.numel() > 1 else 0.0
        std = std if std > 0 else max(abs(mean), 1.0)
        noise = torch.randn(t.shape, generator=generator, dtype=torch.float64)
        return (noise * std + mean).to(dtype=t.dtype, device=t.device)
    if _is_mask(t):
        return t.clone()
    low, high = int(t.min()), int(t.max())
    values = torch.randint(low, high + 1, t.shape, generator=generator, dtype=torch.int64)
    return values.to(dtype=t.dtype, device=t.device)


def generate_samples(example: Sample, count: int, *, seed: int = 0) -> Samples:
    """``count`` samples like ``example`` (see the module docstring)."""
    generator = torch.Generator().manual_seed(seed)

    def new(leaf: Any) -> Any:
        return _like(leaf, generator) if isinstance(leaf, torch.Tensor) else leaf

    return [pytree.tree_map(new, example) for _ in range(count)]


def _state_of(fn: Any) -> dict[str, Any] | None:
    """The mutable state of a callable: the stores of a Program, or an nn.Module."""
    if isinstance(fn, torch.nn.Module):
        return None
    stores = [getattr(fn, name, None) for name in ("state_dict", "constants")]
    if all(isinstance(store, dict) for store in stores):
        return {"state_dict": stores[0], "constants": stores[1]}
    return None


@contextmanager
def preserved_state(fn: Any) -> Iterator[None]:
    """Restore ``fn``'s state (Program stores or nn.Module tensors) when the block ends."""
    if isinstance(fn, torch.nn.Module):
        saved = {name: t.detach().clone() for name, t in fn.state_dict(keep_vars=True).items()}
        try:
            yield
        finally:
            live = fn.state_dict(keep_vars=True)
            with torch.no_grad():
                for name, tensor in saved.items():
                    if name in live:
                        live[name].copy_(tensor)
        return
    stores = _state_of(fn)
    if stores is None:
        yield
        return
    # a Program stores a mutated buffer's new value as a new tensor: a shallow copy suffices
    saved_stores = {key: dict(store) for key, store in stores.items()}
    try:
        yield
    finally:
        for key, store in stores.items():
            store.clear()
            store.update(saved_stores[key])


def _copy_inputs(sample: Sample) -> Sample:
    return pytree.tree_map(lambda v: v.clone() if isinstance(v, torch.Tensor) else v, sample)


def run_samples(fn: Any, samples: Samples, *, description: str | None = None) -> list[Any]:
    """``fn`` on each sample under no_grad, from the same state each time, leaving none; with
    a ``description``, a progress bar over the samples (:mod:`graphpress.ir.progress`)."""
    from graphpress.ir.progress import progress_bar

    outputs = []
    iterator = samples if description is None else progress_bar(
        samples, desc=description, unit="sample")
    with torch.no_grad(), preserved_state(fn):
        for sample in iterator:
            with preserved_state(fn):
                args, kwargs = _copy_inputs(sample)
                outputs.append(fn(*args, **kwargs))
    return outputs
