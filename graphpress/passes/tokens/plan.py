"""What merge_tokens will do to a program, decided before any edit: the blocks, the protected
prefix, the per-block r, or the reason the model cannot be merged.

Refused models (an error naming the block and the reason): no transformer block found; blocks
that do not form one chain (each block's output is the next one's input); causal attention
(``is_causal``, or a mask that varies by query on the example inputs: causal or windowed),
and whatever the block finder refused (rotary keys, head layouts it cannot follow).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

import torch

from graphpress.errors import PassError
from graphpress.ir.program import Program
from graphpress.passes.tokens.schedule import (
    BlockShape,
    budget_schedule,
    check_schedule,
    rate_schedule,
)
from graphpress.pipeline.base import PassContext

__all__ = ["MergePlan", "plan_merges"]

aten = torch.ops.aten


@dataclass
class MergePlan:
    rates: list[int]
    tokens: int
    protected: int
    summary: list[str] = field(default_factory=list)
    trivial_masks: set[str] = field(default_factory=set)   # all-allowing, input-independent
    blocks: list[str] = field(default_factory=list)        # block names, as in the summary

    @property
    def any_merge(self) -> bool:
        return any(self.rates)

    def tokens_per_block(self) -> list[dict[str, Any]]:
        """Per block: its name, the tokens its attention sees and those left after its merge
        (the report charts them)."""
        rows, tokens = [], self.tokens
        for name, rate in zip(self.blocks, self.rates):
            rows.append({"block": name, "tokens_in": tokens, "tokens_out": tokens - rate})
            tokens -= rate
        return rows


def _refuse(why: str) -> PassError:
    return PassError(f"merge_tokens cannot merge tokens in this model: {why}")


def _mlp_width(mid: Any, channels: int) -> int:
    frontier = list(mid.users)
    for _ in range(3):
        following = []
        for node in frontier:
            if node.target is aten.linear.default:
                return int(node.meta["val"].shape[-1])
            following.extend(node.users)
        frontier = following
    return 4 * channels


def _inspect_masks(program: Program, blocks: list[Any], ctx: PassContext
                   ) -> tuple[list[str], set[str]]:
    """Masks that differ between queries (refused), and masks computed from no user input that
    allow everything (ViT's all-True mask): merging can drop those instead of gathering them."""
    from graphpress.ir.runner import ProgramRunner

    masks = {b.attention.mask.name: b for b in blocks if b.attention.mask is not None}
    if not masks or not ctx.example_inputs:
        return [], set()
    values: dict[str, torch.Tensor] = {}
    ProgramRunner(program, lambda n, v: values.__setitem__(n.name, v), nodes=masks)(
        *ctx.example_inputs, **ctx.example_kwargs)
    found, trivial = [], set()
    user = set(program.user_inputs())
    for name, value in values.items():
        if value.dim() == 4 and value.shape[-2] > 1 and not torch.equal(
                value, value[..., :1, :].expand_as(value)):
            found.append(f"{masks[name].describe()}: its attention mask %{name} differs "
                         "between queries (causal or windowed attention), so a merged token "
                         "would attend what some of its tokens may not")
        node = masks[name].attention.mask
        allows_all = bool(value.all()) if value.dtype == torch.bool else bool((value == 0).all())
        if allows_all and not _ancestors(node) & user:
            trivial.add(name)
    return found, trivial


def _ancestors(node: Any) -> set[Any]:
    seen, stack = set(), [node]
    while stack:
        for parent in stack.pop().all_input_nodes:
            if parent not in seen:
                seen.add(parent)
                stack.append(parent)
    return seen


def plan_merges(pass_: Any, program: Program, ctx: PassContext) -> MergePlan:
    analysis = program.analysis("transformer_blocks")
    blocks = analysis.blocks
    if not blocks:
        reasons = "; ".join(f"%{n}: {why}" for n, why in analysis.refused)
        raise _refuse("no transformer block (attention, then an MLP, each with a residual add) "
                      "was found" + (f"; attention seen but not used: {reasons}" if reasons
                                     else "; the graph has no SDPA or softmax attention"))
    if analysis.refused:
        n, why = analysis.refused[0]
        raise _refuse(f"the attention at %{n} is not a block merge_tokens can use: {why}")
    causal = [b.describe() for b in blocks if b.attention.causal]
    if causal:
        raise _refuse(f"causal attention (a decoder), {causal[0]}: merging would let a token "
                      "see the future of the tokens it absorbed")
    for prev, nxt in itertools.pairwise(blocks):
        if nxt.stream_in is not prev.output:
            between = nxt.stream_in
            if between.target is aten.add.Tensor and prev.output in between.args:
                other = next(a for a in between.args if a is not prev.output)
                raise _refuse(f"%{getattr(other, 'name', other)} is added to the token stream "
                              f"before block {nxt.index} (%{between.name}): a per-token tensor "
                              "such as a positional embedding applied in every block, which "
                              "merged tokens no longer line up with")
            raise _refuse(f"the blocks are not one chain: block {nxt.index} reads "
                          f"%{nxt.stream_in.name}, not block {prev.index}'s output "
                          f"%{prev.output.name}")
    varying, trivial = _inspect_masks(program, blocks, ctx)
    if varying:
        raise _refuse(varying[0])
    tokens = blocks[0].tokens
    if not isinstance(tokens, int):
        raise _refuse(f"the token count of {blocks[0].describe()} is dynamic ({tokens}); "
                      "merge_tokens needs a static sequence length")
    protected = analysis.special_tokens if pass_.protect is None else pass_.protect
    shapes = [BlockShape(f"block {b.index} ({b.module or b.attention.node.name})", b.channels,
                         _mlp_width(b.mid, b.channels)) for b in blocks]
    summary = [f"{len(blocks)} transformer blocks, {tokens} tokens, {protected} protected"
               + (f" ({'; '.join(analysis.special_reasons)})" if analysis.special_reasons
                  else "")]
    if pass_.flops is not None:
        rates, line = budget_schedule(pass_.flops, tokens, protected, shapes)
        summary.append(line)
    else:
        rates = rate_schedule(pass_.r, len(blocks), pass_.inflection)
    asked = list(rates)
    rates, counts = check_schedule(rates, tokens, protected, shapes,
                                   cap=isinstance(pass_.r, int))
    lowered = [f"block {i}: {a} -> {r}" for i, (a, r) in enumerate(zip(asked, rates)) if a != r]
    if lowered:
        summary.append("lowered to what the tokens allow: " + ", ".join(lowered))
    summary.append("r per block: " + ", ".join(map(str, rates)) + "; tokens per block: "
                   + ", ".join(map(str, counts)) + f" -> {counts[-1] - rates[-1]}")
    if trivial:
        summary.append("attention mask(s) " + ", ".join(f"%{m}" for m in sorted(trivial))
                       + " allow everything and depend on no input: merged blocks drop them")
    return MergePlan(rates, tokens, protected, summary, trivial,
                     blocks=[shape.name for shape in shapes])
