"""Calibration: run the calibration batches through a Program and feed observers.

:func:`calibrate` runs ``graphpress.ir.runner.run_batches`` (tqdm bar for long runs) with a
hook that passes each observed node's value to its observers, then, when a
``torch.distributed`` process group is initialized, calls ``all_reduce`` on every observer, in
the order of the ``observers`` mapping (the same on every rank, since every rank builds it from
the same program). The observers' statistics merge exactly (min / max with MIN / MAX, the
power-of-two histograms with MAX of the exponent, then SUM of the moved counts; see
:mod:`graphpress.quant.observers`), so N data-parallel ranks, each calibrating on its share of
the batches, end with the qparams one process gets on rank 0's batches, then rank 1's, and so
on; for every observer but the order-dependent moving average, on the union in any order.

A rank may have no batches of its own (the global count is all-reduced first); calibration
with no batches at all is an error, since static activation qparams need data.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch.fx import Node

from graphpress.errors import GraphpressError, InputError
from graphpress.ir.program import Program
from graphpress.ir.runner import run_batches
from graphpress.quant.observers import Observer

__all__ = ["calibrate"]


def calibrate(program: Program, observers: Mapping[str, Observer | Sequence[Observer]],
              batches: Iterable[tuple[tuple[Any, ...], dict[str, Any]]], *,
              progress: bool | None = None) -> int:
    """Feed the value of every node named in ``observers`` (node name -> observer or list of
    observers) over ``batches`` (``(args, kwargs)`` pairs); all-reduce across ranks when
    distributed. Returns the number of batches (over all ranks)."""
    table = {name: [obs] if isinstance(obs, Observer) else list(obs)
             for name, obs in observers.items()}
    if not table:
        return 0
    missing = sorted(set(table) - {n.name for n in program.graph.nodes})
    if missing:
        raise InputError(f"calibrate: the program has no node named {', '.join(missing)}; "
                         "observers are keyed by node name")
    batches = list(batches)
    for index, batch in enumerate(batches):
        _check_batch(program, index, batch)
    distributed = dist.is_available() and dist.is_initialized()
    total = len(batches)
    if distributed:
        count = torch.tensor([total], dtype=torch.int64)
        if dist.get_backend() == "nccl":
            count = count.cuda()
        dist.all_reduce(count)
        total = int(count.item())
    if total == 0:
        raise InputError(f"static activation quantization needs calibration data (values "
                         f"{', '.join(sorted(table)[:4])}): pass gp.compile(..., "
                         "calibration_data=[(x,), ...]) with a few representative batches, or "
                         "use a dynamic scheme such as 'int8_dynamic'")
    first = next(iter(program.graph.nodes)).name
    position = {"batch": -1}

    def hook(node: Node, value: Any) -> None:
        if node.name == first:
            position["batch"] += 1
        for observer in table.get(node.name, ()):
            try:
                observer.update(value)
            except (InputError, ValueError) as exc:
                raise InputError(f"calibration batch {position['batch']}, value {node.name}: "
                                 f"{exc}") from exc

    try:
        run_batches(program, batches, hook, nodes=set(table) | {first}, progress=progress)
    except GraphpressError:
        raise
    except Exception as exc:
        raise InputError(f"calibration batch {max(position['batch'], 0)} does not run through "
                         f"the program ({type(exc).__name__}: {_first_line(exc)}); every batch "
                         "needs the structure, shapes and dtypes of the example inputs: "
                         f"{_expected(program)}") from exc
    if distributed:  # an observer fed by several nodes (shared qparams) is reduced once
        unique = {id(obs): obs for group in table.values() for obs in group}
        for observer in unique.values():
            observer.all_reduce()
    return total


def _first_line(exc: Exception) -> str:
    """The message of ``exc`` without the FX interpreter's traceback lines."""
    return str(exc).strip().split("\n", 1)[0]


def _expected(program: Program) -> str:
    """The user inputs the program takes, as ``name: dtype[shape]``."""
    parts = []
    for node in program.user_inputs():
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor):
            parts.append(f"{node.name}: {str(val.dtype).removeprefix('torch.')}"
                         f"{list(val.shape)}")
        else:
            parts.append(f"{node.name}: {type(val).__name__}")
    return ", ".join(parts)


def _check_batch(program: Program, index: int, batch: Any) -> None:
    """A batch is an ``(args, kwargs)`` pair whose structure matches the program's inputs."""
    if not (isinstance(batch, tuple) and len(batch) == 2 and isinstance(batch[0], tuple)
            and isinstance(batch[1], dict)):
        raise InputError(f"calibration batch {index} is a {type(batch).__name__}, not an "
                         "(args, kwargs) pair; gp.compile(calibration_data=...) normalizes "
                         "batches (graphpress.frontends.inputs.normalize_batches does it "
                         f"directly); the program takes {_expected(program)}")
    try:
        program.flat_inputs(*batch)
    except Exception as exc:
        raise InputError(f"calibration batch {index} does not match the example inputs' "
                         f"structure and shapes ({type(exc).__name__}: {_first_line(exc)}); "
                         f"the program takes {_expected(program)}") from exc
