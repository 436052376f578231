"""Transformer blocks in the IR: attention, then the MLP, each with its residual add.

A block is found from its attention core (:mod:`.attention`) by following the residual stream::

    x ──(norm)── q, k, v ── attention ── (o_proj) ──▶ add(·, x) = h   [post-norm: mid = norm(h)]
    mid ──(norm)── MLP ──▶ add(·, mid) = out                            [post-norm: out = norm(·)]

``stream_in`` is ``x`` (the ``[B, N, C]`` value the keys are computed from, through the norm),
``mid`` the stream between attention and MLP (where token merging inserts its merge), ``output``
the block's result. The token axis is axis 1 of ``x``; the finder proves it is axis ``-2`` of
the queries and keys by following it through the views and permutes in between, so a head
layout the finder does not understand is a refusal, not a guess.

Special tokens are a prefix of the sequence the finder protects:

* learned tokens concatenated before the first block (``cat([cls, dist, registers, patches],
  1)`` with leading operands that are weights, through ``expand``): CLS, distillation, register
  tokens;
* positions read after the last block (``select(out, 1, k)`` or ``out[:, :k]``, a pooler or a
  classifier reading the CLS token): tokens ``0..k``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch.fx import Node

from graphpress.analysis.blocks.attention import (
    Attention,
    find_attention,
    follow_token_axis,
    source_of,
)
from graphpress.ir.analyses import register_analysis
from graphpress.ir.graph import get_arg, is_view

if TYPE_CHECKING:
    from graphpress.ir.program import Program

__all__ = ["BlockAnalysis", "TransformerBlock", "transformer_blocks"]

aten = torch.ops.aten
_NORMS = {aten.layer_norm.default, aten.rms_norm.default, aten.native_layer_norm.default}
_MAX_DEPTH = 16  # nodes between the attention output and its residual add


@dataclass(frozen=True)
class TransformerBlock:
    """One block: its attention and the residual stream around it (see the module docstring)."""

    index: int
    module: str
    attention: Attention
    stream_in: Node
    attention_residual: Node
    mid: Node
    mlp_residual: Node
    output: Node
    tokens: int
    channels: int

    def describe(self) -> str:
        return (f"block {self.index} ({self.module or self.attention.node.name}): "
                f"{self.attention.kind} attention at %{self.attention.node.name}, "
                f"{self.tokens} tokens, merge point %{self.mid.name}")


@dataclass
class BlockAnalysis:
    """The blocks in execution order, the protected prefix, and why other attention was not a
    block (``refused``: (node name, reason))."""

    blocks: list[TransformerBlock]
    special_tokens: int = 0
    special_reasons: list[str] = field(default_factory=list)
    refused: list[tuple[str, str]] = field(default_factory=list)


def _ancestors(node: Node, limit: int = 4000) -> set[Node]:
    seen: set[Node] = set()
    stack = [node]
    while stack and len(seen) < limit:
        current = stack.pop()
        for parent in current.all_input_nodes:
            if parent not in seen:
                seen.add(parent)
                stack.append(parent)
    return seen


def _shape(node: Node) -> tuple[int, ...] | None:
    val = node.meta.get("val")
    return tuple(val.shape) if isinstance(val, torch.Tensor) else None


def _residual_add(start: Node, inputs: set[Node], shape: tuple[int, ...]) -> tuple[Node, Node]:
    """The first ``add(a, b)`` downstream of ``start`` whose other operand is in ``inputs``."""
    frontier, seen = [start], {start}
    for _ in range(_MAX_DEPTH):
        following = []
        for node in frontier:
            for user in node.users:
                if user in seen:
                    continue
                seen.add(user)
                out = _shape(user)
                if user.target is aten.add.Tensor and out and len(out) == 3 \
                        and out[:2] == shape[:2]:
                    other = user.args[1] if user.args[0] is node else user.args[0]
                    if isinstance(other, Node) and other in inputs and other is not node:
                        return user, other
                following.append(user)
        frontier = following
    raise LookupError("no residual add of the attention output found")


def _block(attention: Attention, index: int, program: Program) -> TransformerBlock:
    key_path, query_path = source_of(attention.key), source_of(attention.query)
    key_src = key_path[0]
    shape = _shape(key_src)
    if shape is not None and len(shape) == 4 and key_src.target in (aten.add.Tensor,
                                                                     aten.mul.Tensor):
        raise LookupError(f"the keys are rewritten per position after the head split "
                          f"(%{key_src.name}: a rotary or relative-position embedding applied in "
                          "every block), which merging tokens would break")
    if shape is None or len(shape) != 3:
        raise LookupError(f"the keys come from %{key_src.name} of shape {shape}, not [B, N, C]")
    for name, path in (("keys", key_path), ("queries", query_path)):
        ndim = len(path[-1].meta["val"].shape)
        if follow_token_axis(path, 1) != ndim - 2:
            raise LookupError(f"axis 1 of %{path[0].name} is not the token axis (-2) of the "
                              f"{name} %{path[-1].name} through its views: a head layout the "
                              "block finder does not understand")
    query_shape = _shape(query_path[0])
    if query_shape is None or query_shape[:2] != shape[:2]:
        raise LookupError("queries and keys come from values of different shapes "
                          "(cross-attention)")
    ancestors = _ancestors(key_src) | {key_src}
    residual, stream_in = _residual_add(attention.output, ancestors, shape)
    shape = _shape(residual)
    mid = residual
    users = [u for u in residual.users]
    if len(users) == 1 and users[0].target in _NORMS:   # post-norm (BERT)
        mid = users[0]
    mlp_residual, _ = _residual_add_from(mid, shape)
    output = mlp_residual
    users = list(mlp_residual.users)
    if mid is not residual and len(users) == 1 and users[0].target in _NORMS:
        output = users[0]
    module = program.source_module(attention.node)
    return TransformerBlock(index, module, attention, stream_in, residual, mid, mlp_residual,
                            output, shape[1], shape[2])


def _residual_add_from(mid: Node, shape: tuple[int, ...]) -> tuple[Node, Node]:
    for user in mid.users:
        if user.target is aten.add.Tensor and _shape(user) == shape:
            other = user.args[1] if user.args[0] is mid else user.args[0]
            if isinstance(other, Node) and other is not mid and mid in _ancestors(other, 400):
                return user, other
    raise LookupError(f"no MLP with a residual add reads the stream %{mid.name} after the "
                      "attention")


def _prefix(node: Any, program: Program, names: list[str], depth: int = 0) -> int:
    """How many leading tokens of ``node`` are learned tokens (weights), through views,
    ``expand``, per-token ops, start slices and concatenations on the token axis."""
    shape = _shape(node) if isinstance(node, Node) else None
    if shape is None or depth > 40:
        return 0
    if program.is_weight(node):
        names.append(program.weight_name(node) or node.name)
        return shape[1] if len(shape) == 3 else 0
    if node.op != "call_function":
        return 0
    target = node.target
    if target is aten.cat.default and len(shape) == 3 and get_arg(node, "dim") % 3 == 1:
        total = 0
        for operand in node.args[0]:
            found = _prefix(operand, program, names, depth + 1)
            total += found
            if found < operand.meta["val"].shape[1]:
                break
        return total
    if target is aten.slice.Tensor and len(shape) == 3 and get_arg(node, "dim") % 3 == 1:
        if (get_arg(node, "start") or 0) != 0:
            return 0
        return min(shape[1], _prefix(node.args[0], program, names, depth + 1))
    if target in (aten.add.Tensor, aten.mul.Tensor):
        tokens = [a for a in node.args[:2] if isinstance(a, Node) and not program.is_weight(a)
                  and _shape(a) is not None and len(_shape(a)) == 3]
        found = [_prefix(a, program, names, depth + 1) for a in tokens]
        return min(found) if found else 0
    if (is_view(node) or target in _NORMS or target in (aten.expand.default,
                                                        aten.dropout.default)):
        source = node.args[0]
        if _shape(source) is not None and len(_shape(source)) == len(shape):
            return _prefix(source, program, names, depth + 1)
    return 0


def _learned_prefix(stream_in: Node, program: Program) -> tuple[int, str]:
    names: list[str] = []
    count = _prefix(stream_in, program, names)
    if not count:
        return 0, ""
    return count, f"{count} learned token(s) before the blocks: {', '.join(names)}"


def _positional_reads(output: Node) -> tuple[int, str]:
    frontier, seen, need, where = [output], set(), 0, ""
    while frontier:
        node = frontier.pop()
        for user in node.users:
            if user in seen:
                continue
            seen.add(user)
            shape = _shape(node)
            if user.target is aten.select.int and get_arg(user, "dim") % len(shape) == 1:
                index = get_arg(user, "index")
                if index >= 0 and index + 1 > need:
                    need, where = index + 1, f"token {index} read by %{user.name}"
            elif user.target is aten.slice.Tensor and get_arg(user, "dim") % len(shape) == 1:
                start, end = get_arg(user, "start") or 0, get_arg(user, "end")
                if start == 0 and end is not None and 0 < end < shape[1] and end > need:
                    need, where = end, f"tokens :{end} read by %{user.name}"
            elif ((user.target in _NORMS or is_view(user)
                   or user.target in (aten.dropout.default, aten.add.Tensor, aten.mul.Tensor))
                  and _shape(user) is not None and len(_shape(user)) == 3):
                frontier.append(user)
    return need, where


@register_analysis("transformer_blocks")
def transformer_blocks(program: Program) -> BlockAnalysis:
    """The transformer blocks of ``program`` in execution order (see the module docstring)."""
    blocks: list[TransformerBlock] = []
    refused: list[tuple[str, str]] = []
    for node in program.graph.nodes:
        attention = find_attention(node)
        if attention is None:
            continue
        try:
            blocks.append(_block(attention, len(blocks), program))
        except LookupError as exc:
            refused.append((node.name, str(exc)))
    analysis = BlockAnalysis(blocks, refused=refused)
    if blocks:
        learned, why_learned = _learned_prefix(blocks[0].stream_in, program)
        read, why_read = _positional_reads(blocks[-1].output)
        analysis.special_tokens = max(learned, read)
        analysis.special_reasons = [r for r in (why_learned, why_read) if r]
    return analysis
