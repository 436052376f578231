"""Which nodes a rewrite may delete, merge or evaluate ahead of time.

A node is *pure* when its result depends only on its arguments and running it has no effect
besides producing that result: not an in-place or mutating op, not an assertion or other
side-effecting op, not random (``nondeterministic_seeded``: dropout, rand).
"""

from __future__ import annotations

import torch
from torch.fx import Node

__all__ = ["is_pure"]


def is_pure(node: Node) -> bool:
    if node.op != "call_function" or node.is_impure():
        return False
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        if torch.Tag.nondeterministic_seeded in target.tags:
            return False
        if target._schema.is_mutable:
            return False
    return True
