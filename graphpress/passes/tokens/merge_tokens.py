"""merge_tokens: ToMe's bipartite soft matching inserted after the attention of every block.

The block finder (``transformer_blocks``) gives each block's keys and its merge point ``mid``
(the stream between attention and MLP). Block ``i`` merges ``r_i`` tokens there
(:mod:`.matching`: similarity of the keys averaged over heads, alternating bipartite split, top
``r_i`` edges, size-weighted average by scatter-add and divide), so its MLP and every later
block run on fewer tokens; the schedule is :mod:`.schedule`'s. Token sizes ``s`` are carried
through the blocks; with ``proportional=True`` every later attention adds ``log s`` to its
logits on the keys (through SDPA's ``attn_mask``, or before the softmax), the attention mask is
gathered at each token's representative, and padding keys are never averaged into real ones.
Everything downstream is re-specialized to the shorter token axis (:mod:`.respecialize`).

``mode="prune"`` drops the ``r`` least attended tokens instead (:mod:`.pruning`), under the
same machinery.

Protected: the special tokens the finder reports (learned CLS / distillation / register tokens,
positions read after the blocks), kept at positions ``0..P-1``. Refused, with the reason:
causal attention (``is_causal`` or a mask that varies by query, evaluated on the example
inputs), per-block rotary / relative-position embeddings, reshapes that split the token axis
(windowed attention), and outputs with a token axis (or a slice or mean over tokens after the
blocks) unless ``unmerge=True``, which gathers each original token's merged value back after
the last block (dense heads, mean pooling).

Contract: ``r = 0`` is exact (the program is unchanged). Otherwise statistical against
:class:`graphpress.passes.tokens.reference.MergedReference`, the program before the pass with
merging simulated at full length by the independent ``graphpress.testing.token_merging``:
equal up to float rounding (cosine >= 0.9999, SQNR >= 40 dB), since both implement the same
algorithm and only the order of float operations differs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch.fx import Node

from graphpress.errors import PassError
from graphpress.ir.builder import GraphBuilder
from graphpress.ir.program import Program
from graphpress.pipeline.base import Contract, Pass, PassContext, PassResult
from graphpress.pipeline.registry import register_pass

__all__ = ["MergeTokens"]

aten = torch.ops.aten


@register_pass("merge_tokens")
@dataclass
class MergeTokens(Pass):
    """Replaces the token stream of each transformer block with its ToMe-merged version."""

    r: int | list[int] | tuple[int, ...] | None = None
    flops: float | None = None
    inflection: float | None = None
    proportional: bool = True
    unmerge: bool = False
    protect: int | None = None
    mode: str = "merge"

    contract = Contract.statistical(
        "equal to the input program with bipartite soft matching simulated at full length "
        "(graphpress.testing.token_merging), up to float rounding", cosine=0.9999, sqnr_db=40.0)
    requires = ("shapes",)

    def __post_init__(self) -> None:
        if (self.r is None) == (self.flops is None):
            raise PassError("merge_tokens needs exactly one of r= (tokens merged per block, or a "
                            "list with one per block) and flops= (a fraction of the blocks' "
                            "cost), e.g. merge_tokens(r=8) or merge_tokens(flops=0.6)")
        if isinstance(self.r, list):
            self.r = tuple(self.r)
        if self.mode not in ("merge", "prune"):
            raise PassError(f"merge_tokens: mode is 'merge' or 'prune', got {self.mode!r}")
        if self.mode == "prune" and self.unmerge:
            raise PassError("merge_tokens: unmerge=True needs mode='merge': pruned tokens have "
                            "no value to copy back")

    def contract_for(self, program: Program) -> Contract:
        if self.flops is None and not any(self._rates_hint()):
            return Contract.exact(rtol=0.0, atol=0.0)
        return self.contract

    def _rates_hint(self) -> list[int]:
        return [self.r] if isinstance(self.r, int) else list(self.r or ())

    def run(self, program: Program, ctx: PassContext) -> PassResult:
        from graphpress.passes.tokens.plan import plan_merges

        plan = plan_merges(self, program, ctx)
        if not plan.any_merge:
            return PassResult(False, {"blocks": len(plan.rates), "merged_tokens": 0},
                              details={"summary": plan.summary, "rates": plan.rates,
                                       "tokens_per_block": plan.tokens_per_block()})
        self._apply(program.copy(), plan)  # a refusal found here leaves the program untouched
        details = self._apply(program, plan)
        details["summary"] = plan.summary
        details["tokens_per_block"] = plan.tokens_per_block()
        stats = {"blocks": len(plan.rates), "merged_tokens": sum(plan.rates),
                 "tokens_in": plan.tokens, "tokens_out": plan.tokens - sum(plan.rates),
                 "protected": plan.protected}
        if self.mode == "prune":
            stats["pruned_tokens"] = stats.pop("merged_tokens")
        return PassResult(True, stats, details=details)

    def _apply(self, program: Program, plan: Any) -> dict[str, Any]:
        from graphpress.passes.tokens.matching import (
            attention_bias,
            initial_state,
            key_validity,
            merge_step,
        )
        from graphpress.passes.tokens.pruning import attention_importance, prune_step
        from graphpress.passes.tokens.respecialize import Refusal, changed_axes, respecialize

        blocks = program.analysis("transformer_blocks").blocks
        old = {n: n.meta.get("val") for n in program.graph.nodes}
        merge_at = {blk.mid: (blk, rate) for blk, rate in zip(blocks, plan.rates) if rate}
        sites: dict[Node, Any] = {}
        for blk in blocks:
            att = blk.attention
            at = att.node if att.kind == "sdpa" else (att.mask_add or att.node)
            sites[at] = blk
        def mask_of(blk: Any) -> Node | None:
            mask = blk.attention.mask
            return None if mask is None or mask.name in plan.trivial_masks else mask

        masks = {mask_of(blk) for blk in blocks} - {None}
        state, fake_mode, cache = None, program.fake_mode(), {}
        record: dict[str, Any] = {"merges": [], "attention": [], "protected": plan.protected,
                                  "proportional": self.proportional and self.mode == "merge",
                                  "validity_mask": None, "mode": self.mode}
        for node in list(program.graph.nodes):
            if node.op == "output":
                if state is not None:
                    self._outputs(node, old, changed_axes)
                continue
            if state is not None and node in sites:
                self._attention(program, sites[node], node, state, cache, attention_bias,
                                record, old, mask_of(sites[node]))
            if state is not None and node.op == "call_function":
                try:
                    respecialize(node, old, plan.protected, fake_mode)
                except Refusal as exc:
                    raise PassError(f"merge_tokens cannot merge tokens in this model: {exc}") \
                        from None
            if node is blocks[-1].output and self.unmerge and state is not None:
                self._unmerge(program, node, old, state)
            if node in merge_at:
                blk, rate = merge_at[node]
                before = set(program.graph.nodes)
                with GraphBuilder(program, anchor=node, pass_name=self.name, after=True) as b:
                    if state is None:
                        mask = mask_of(blk) if self.mode == "merge" else None
                        valid = key_validity(b, mask, node) if mask is not None else None
                        record["validity_mask"] = mask.name if valid is not None else None
                        state = initial_state(b, node, valid, self.unmerge,
                                              self.mode == "merge", bool(masks))
                    if self.mode == "prune":
                        importance = attention_importance(b, blk.attention, node)
                        merged, state = prune_step(b, node, importance, rate, plan.protected,
                                                   state)
                    else:
                        merged, state = merge_step(b, node, blk.attention.key, rate,
                                                   plan.protected, state)
                new = set(program.graph.nodes) - before
                node.replace_all_uses_with(merged,
                                           delete_user_cb=lambda u, made=new: u not in made)
                old[merged] = old[node]
                record["merges"].append({"block": blk.index, "mid": blk.mid.name,
                                         "key": blk.attention.key.name, "r": rate,
                                         "attention": blk.attention.node.name})
        return record

    def _attention(self, program: Program, blk: Any, node: Node, state: Any,
                   cache: dict[Any, Node], attention_bias: Any, record: dict[str, Any],
                   old: dict[Node, Any], mask: Node | None) -> None:
        """Give a block after a merge its gathered mask and ``log size`` (``mask``: the
        block's mask, None where it allows everything and is dropped)."""
        from graphpress.passes.tokens.matching import batch_size

        att = blk.attention
        query = att.query.meta["val"].shape
        heads = query[0] // blk.stream_in.meta["val"].shape[0] if len(query) == 3 else None
        if heads is not None and not isinstance(heads, int):
            raise PassError(f"merge_tokens: {blk.describe()} has [B * H, N, D] attention and "
                            "a dynamic batch size; trace it with a static batch")
        if heads is not None and mask is not None:
            raise PassError(f"merge_tokens: {blk.describe()} has [B * H, N, D] attention with a "
                            "mask, which merge_tokens does not gather")
        key = (mask, state.stage, heads)
        if key not in cache:
            with GraphBuilder(program, anchor=node, pass_name=self.name) as b:
                cache[key] = attention_bias(b, mask, state, batch_size(b, blk.stream_in),
                                            self.proportional, heads)
        bias = cache[key]
        if att.kind == "sdpa":
            record["attention"].append({"at": node.name, "kind": "sdpa"})
            if bias is not att.mask:
                if len(node.args) > 3:
                    node.update_arg(3, bias)
                else:
                    node.update_kwarg("attn_mask", bias)
        elif att.mask_add is not None:
            record["attention"].append({"at": node.name, "kind": "mask_add"})
            index = 1 if node.args[1] is att.mask else 0
            node.update_arg(index, 0.0 if bias is None else bias)
        else:
            record["attention"].append({"at": node.name, "kind": "softmax"})
            if bias is not None:
                with GraphBuilder(program, anchor=node, pass_name=self.name) as b:
                    biased = b.call(aten.add.Tensor, node.args[0], bias)
                old[biased] = old[node.args[0]]
                node.update_arg(0, biased)

    def _unmerge(self, program: Program, node: Node, old: dict[Node, Any], state: Any) -> None:
        """After the last block: every original token gets its merged token's value back."""
        from graphpress.passes.tokens.matching import batch_size, take_tokens

        with GraphBuilder(program, anchor=node, pass_name=self.name, after=True) as b:
            restored = take_tokens(b, node, state.source, batch_size(b, node))
        node.replace_all_uses_with(restored, delete_user_cb=lambda u: u is not restored
                                   and u.meta.get("graphpress_pass") != self.name)
        old[restored] = old[node]

    def _outputs(self, output: Node, old: dict[Node, Any], changed_axes: Any) -> None:
        for leaf in output.all_input_nodes:
            axes = changed_axes(old.get(leaf, leaf.meta["val"]), leaf.meta["val"])
            if axes:
                fix = ("mode='prune' cannot keep them (pruned tokens have no value); use "
                       "mode='merge' with unmerge=True" if self.mode == "prune" else
                       "they need merge_tokens(..., unmerge=True), which copies each merged "
                       "token back to the positions it absorbed after the last block")
                raise PassError(
                    f"merge_tokens: the output %{leaf.name} has a token axis "
                    f"({old[leaf].shape[axes[0]]} tokens, {leaf.meta['val'].shape[axes[0]]} "
                    f"after merging): outputs that are per token; {fix}")

    def reference(self, before: Program, result: PassResult) -> Any:
        from graphpress.passes.tokens.reference import MergedReference

        return MergedReference(before, result.details)
