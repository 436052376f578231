"""The op registry: every op graphpress passes introduce has exactly one :class:`OpEntry`.

Invariant: an entry's ``op`` is a ``torch.library.custom_op`` with a registered fake (meta)
implementation, so it survives ``torch.export``, ``torch.compile`` and serialization; the entry's
purity and foldability are also recorded in :mod:`graphpress.ir.purity` under the same
namespace-qualified name (``graphpress::dequantize``), which is the key of every per-op table
(channel rules, ONNX translations, Triton lowerings): ``mylib::linear`` never gets
``aten::linear``'s rule.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch

from graphpress.ir.purity import register_op_properties

__all__ = ["OpEntry", "check_op", "define_op", "entries", "lookup"]


@dataclass(frozen=True)
class OpEntry:
    """Everything graphpress knows about one op.

    ``name``: ``namespace::op``. ``op``: the ``OpOverload`` graph nodes call
    (``torch.ops.namespace.op.default``). ``eager``: the reference implementation. ``fake``: the
    fake (meta) implementation: output shapes and dtypes only. ``pure``: may be deleted when
    unused and merged when repeated. ``foldable``: may be evaluated ahead of time on constant
    inputs (pure ops only). ``channel_rule``: the op's rule in the channel dependency analysis
    (signature of ``graphpress.analysis.channels.rules``: ``(tracer, node, program)``); without
    one, pruning blocks every dimension the op touches. ``onnx_translation``: an onnxscript
    function the ONNX backend adds to its translation table. ``triton_lowering``: a function
    with the op's signature that runs it on Triton kernels; the Triton backend's host code calls
    it (without one, the op runs as a fallback through its dispatcher). ``doc``: one line for
    listings.
    """

    name: str
    op: torch._ops.OpOverload
    eager: Callable[..., Any]
    fake: Callable[..., Any]
    pure: bool = True
    foldable: bool = True
    channel_rule: Callable[..., Any] | None = None
    onnx_translation: Callable[..., Any] | None = None
    triton_lowering: Callable[..., Any] | None = None
    doc: str = ""


_ENTRIES: dict[str, OpEntry] = {}


def define_op(name: str, eager: Callable[..., Any], *, fake: Callable[..., Any],
              schema: str | None = None, mutates_args: Iterable[str] = (), pure: bool = True,
              foldable: bool = True, channel_rule: Callable[..., Any] | None = None,
              onnx_translation: Callable[..., Any] | None = None,
              triton_lowering: Callable[..., Any] | None = None,
              doc: str | None = None) -> OpEntry:
    """Define the op ``name`` (``namespace::op``) and record its registry entry.

    ``eager`` is the reference implementation; its type hints give the schema unless ``schema``
    is passed (``"(Tensor x, float s) -> Tensor"``). ``fake`` computes outputs of the right
    shape and dtype from fake inputs (``torch.empty_like``, ``x.new_empty``). An op that mutates
    an argument (``mutates_args``) cannot be pure.
    """
    if "::" not in name:
        raise ValueError(f"op names are namespace-qualified ('mylib::op'), got {name!r}")
    if name in _ENTRIES:
        raise ValueError(f"op {name!r} is already defined (by {_ENTRIES[name].eager.__module__}); "
                         "pick another name or reuse the entry with lookup()")
    mutated = tuple(mutates_args)
    if pure and mutated:
        raise ValueError(f"op {name!r} mutates {mutated} so it cannot be pure; pass pure=False")
    if foldable and not pure:
        raise ValueError(f"op {name!r}: an op that is not pure cannot be foldable; "
                         "pass foldable=False")
    definition = torch.library.custom_op(name, eager, mutates_args=mutated, schema=schema)
    torch.library.register_fake(definition, fake)
    namespace, op_name = name.split("::", 1)
    overload = getattr(getattr(torch.ops, namespace), op_name).default
    entry = OpEntry(name=name, op=overload, eager=eager, fake=fake, pure=pure,
                    foldable=foldable, channel_rule=channel_rule,
                    onnx_translation=onnx_translation, triton_lowering=triton_lowering,
                    doc=doc if doc is not None else _first_line(eager.__doc__))
    register_op_properties(name, pure=pure, foldable=foldable)
    _ENTRIES[name] = entry
    return entry


def lookup(qualified_name: str) -> OpEntry | None:
    """The entry of the op ``namespace::op`` (no overload), or None for ops not defined here."""
    return _ENTRIES.get(qualified_name)


def entries() -> dict[str, OpEntry]:
    """Every registered entry by qualified name (a copy)."""
    return dict(_ENTRIES)


def check_op(entry: OpEntry, *args: Any, **kwargs: Any) -> None:
    """Run ``torch.library.opcheck`` on sample arguments; raises on the first failing check.

    The checks: schema (mutation and aliasing as declared), autograd registration, fake tensor
    (the fake matches the eager implementation), and AOT dispatch with dynamic shapes.
    """
    torch.library.opcheck(entry.op, args, kwargs)


def _first_line(text: str | None) -> str:
    return text.strip().splitlines()[0] if text and text.strip() else ""
