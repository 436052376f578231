"""Which nodes a rewrite may delete, merge or evaluate ahead of time.

Two properties, recorded per op and kept apart:

* *pure*: the result depends only on the arguments and running the op has no effect besides
  producing it: not in-place or mutating (a mutable schema), not an assertion or other
  side-effecting op (FX's side-effect list, and any op whose schema returns nothing, like
  ``_assert_async``), not random (``nondeterministic_seeded``: dropout, rand). Pure nodes may
  be deleted when unused (dce) and merged when repeated (cse).
* *foldable*: a pure op on constants may be evaluated ahead of time and replaced by its value
  (fold_constants). Fake-quantize, quantize and dequantize are pure but not foldable: folding
  them into float weights would erase the quantization before a backend lowers it.

Ops are keyed by their namespace-qualified name (``aten::add``, ``graphpress::dequantize``),
so ``mylib::linear`` never takes ``aten::linear``'s properties. ATen and prims ops are
foldable when pure, except ATen's fake-quantize, quantize and dequantize ops; an op of another
namespace is foldable only if its registry entry says so
(:func:`register_op_properties`, called by the ``graphpress::`` op library for its ops and
available to plugins for theirs), since graphpress cannot know what it is for.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch.fx import Node

__all__ = ["ATEN_QUANT_OPS", "OpProperties", "is_foldable", "is_pure", "op_properties",
           "qualified_name", "register_op_properties"]

_FOLDABLE_NAMESPACES = ("aten", "prims")


@dataclass(frozen=True)
class OpProperties:
    """What a rewrite may do with an op: delete or merge it (pure), precompute it (foldable)."""

    pure: bool
    foldable: bool

    def __post_init__(self) -> None:
        if self.foldable and not self.pure:
            raise ValueError("an op that is not pure cannot be foldable")


_PROPERTIES: dict[str, OpProperties] = {}

# ATen's own quant ops: pure, but kept for the backend (the ONNX backend emits Q/DQ); the
# graphpress:: ones are in graphpress.ops.quant, which also groups both for the other layers
ATEN_QUANT_OPS = frozenset((
    "aten::fake_quantize_per_tensor_affine",
    "aten::fake_quantize_per_tensor_affine_cachemask",
    "aten::fake_quantize_per_channel_affine",
    "aten::fake_quantize_per_channel_affine_cachemask",
    "aten::_fake_quantize_learnable_per_tensor_affine",
    "aten::_fake_quantize_learnable_per_channel_affine",
    "aten::_fake_quantize_per_tensor_affine_cachemask_tensor_qparams",
    "aten::quantize_per_tensor",
    "aten::quantize_per_channel",
    "aten::dequantize",
))
_PROPERTIES.update({name: OpProperties(pure=True, foldable=False) for name in ATEN_QUANT_OPS})


def qualified_name(target: Any) -> str:
    """``namespace::name`` of an op target (overload dropped), or '' for non-op targets."""
    if isinstance(target, torch._ops.OpOverload):
        return target._schema.name
    if isinstance(target, torch._ops.OpOverloadPacket):
        return target._qualified_op_name
    return ""


def register_op_properties(name: str, *, pure: bool, foldable: bool) -> None:
    """Record the properties of the op ``namespace::name`` (overrides what the schema says)."""
    if "::" not in name:
        raise ValueError(f"op names are namespace-qualified ('mylib::op'), got {name!r}")
    _PROPERTIES[name] = OpProperties(pure=pure, foldable=foldable)


def op_properties(target: Any) -> OpProperties | None:
    """The registered properties of an op target, if any."""
    return _PROPERTIES.get(qualified_name(target))


def is_pure(node: Node) -> bool:
    if node.op != "call_function":
        return False
    target = node.target
    registered = op_properties(target)
    if registered is not None:
        return registered.pure
    if node.is_impure():
        return False
    if isinstance(target, torch._ops.OpOverload):
        if torch.Tag.nondeterministic_seeded in target.tags:
            return False
        if target._schema.is_mutable:
            return False
        if not target._schema.returns:
            return False  # returns nothing: it exists for its effect (_assert_async, ...)
    return True


def is_foldable(node: Node) -> bool:
    """Pure and allowed to be evaluated ahead of time on constant inputs."""
    if not is_pure(node):
        return False
    registered = op_properties(node.target)
    if registered is not None:
        return registered.foldable
    name = qualified_name(node.target)
    if name:
        return name.split("::", 1)[0] in _FOLDABLE_NAMESPACES
    return True  # Python-level functions of the graph (operator.getitem and the like)
