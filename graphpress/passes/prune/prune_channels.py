"""Structural channel pruning over the channel dependency groups of the IR.

For every prunable group of ``channel_groups`` (see ``graphpress/analysis/channels/``) the pass
scores the channels (``importance.py``), keeps the most important
``ceil((1 - ratio) * n / m) * m`` of them (``m`` = ``round_to``; at least ``m``, at most ``n``),
and removes the others from every weight slice of the group at once; the shape arguments
in the graph follow (``plan.py``). ``global_ranking=True`` ranks the
channels of all groups together (scores normalised by their group mean) instead of cutting each
group by the same ratio; ``ratios={"module.path": r}`` overrides the ratio per module.

Contract (checked by ``verify=True``): the pruned program equals the *masked original*, the
program before the pass with the removed channels zeroed in every weight slice of their group
(producers, their biases and norms, and consumers' input slices), to fp32 rounding. Pruning
channels whose weights are all zero therefore changes nothing.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from graphpress.analysis.channels.solver import ChannelAnalysis, ChannelGroup, channel_groups
from graphpress.ir.program import Program
from graphpress.passes.prune.importance import (
    CRITERIA,
    REDUCTIONS,
    group_importance,
    weight_gradients,
)
from graphpress.passes.prune.plan import GroupPlan, PrunePlan, apply_plan, key_of, masked_copy
from graphpress.pipeline.base import Contract, Pass, PassContext, PassResult, Skip
from graphpress.pipeline.registry import register_pass

__all__ = ["PruneChannels", "PrunePlan"]


@register_pass("prune_channels")
@dataclass
class PruneChannels(Pass):
    """Replaces every coupled channel group with its most important channels."""

    ratio: float = 0.5                      # fraction of each group's channels to remove
    importance: str | Callable[..., Any] = "l2"   # l1 | l2 | bn_scale | random | callable
    reduce: str = "mean"                    # combine slice scores: mean | sum | max
    global_ranking: bool = False            # one ranking across groups instead of per group
    prune_heads: bool = True                # attention: whole heads, or (False) head_dim
    ratios: dict[str, float] | None = None  # module path -> ratio (first match wins)
    round_to: int = 1                       # kept channels are a multiple of this
    ignore: tuple[str, ...] | Callable[[str], bool] = ()     # module paths, or predicate(weight)
    plan: PrunePlan | None = None           # apply this plan instead of computing one
    batches: list[tuple[Any, ...]] | None = None   # taylor: inputs (default: example inputs)
    loss: Callable[[Any], torch.Tensor] | None = None  # taylor: outputs -> scalar loss
    seed: int = 0                           # for importance="random"

    contract: ClassVar[Contract] = Contract.against_reference(
        "equals the input program with the removed channels zeroed in every slice of their group",
        rtol=1e-5, atol=1e-5)
    rewrites_weights = True

    def __post_init__(self) -> None:
        for r in [self.ratio, *(self.ratios or {}).values()]:
            if not 0.0 <= r < 1.0:
                raise ValueError(f"ratio must be in [0, 1), got {r}")
        if not callable(self.importance) and self.importance not in CRITERIA:
            raise ValueError(f"importance must be one of {CRITERIA} or a callable, "
                             f"got {self.importance!r}")
        if self.reduce not in REDUCTIONS:
            raise ValueError(f"reduce must be one of {REDUCTIONS}, got {self.reduce!r}")
        if self.round_to < 1:
            raise ValueError(f"round_to must be >= 1, got {self.round_to}")
        if isinstance(self.ignore, str):
            self.ignore = (self.ignore,)

    # --------------------------------------------------------------- selection
    def _ignored(self, program: Program) -> Callable[[str], bool]:
        if callable(self.ignore):
            return self.ignore
        names = list(program.state_dict) + list(program.constants)
        for path in self.ignore:
            if not any(_under(n, path) for n in names):
                raise ValueError(f"ignore entry {path!r} matches no weight of the program")
        return lambda weight: any(_under(weight, path) for path in self.ignore)

    def _ratio(self, group: ChannelGroup) -> float:
        for path, r in (self.ratios or {}).items():
            if any(_under(w, path) for w in group.weights):
                return r
        return self.ratio

    def _analysis(self, program: Program) -> ChannelAnalysis:
        if self.prune_heads:
            return program.analysis("channel_groups")
        return channel_groups(program, head_dim=True)

    def make_plan(self, program: Program, ctx: PassContext | None = None
                  ) -> tuple[PrunePlan, list[Skip]]:
        """Score and select: which channels of which group to keep."""
        analysis = self._analysis(program)
        ignored = self._ignored(program)
        skips, chosen = [], []
        for g in analysis.groups:
            where = g.slices[0].weight
            if not g.prunable:
                reason = "; ".join(g.reasons) or "a single channel"
                skips.append(Skip(where, f"group of {g.size} channels unprunable: {reason}"))
            elif any(ignored(w) for w in g.weights):
                skips.append(Skip(where, "group touches an ignored module"))
            else:
                chosen.append(g)
        if not chosen:
            reasons = "; ".join(f"{s.node}: {s.reason}" for s in skips[:5])
            raise ValueError(f"nothing prunable in this program ({reasons})")
        generator = torch.Generator().manual_seed(self.seed)
        grads = self._gradients(program, ctx) if self.importance == "taylor" else None
        scores = [group_importance(program, g, self.importance, self.reduce, generator, grads)
                  for g in chosen]
        counts = self._global_counts(chosen, scores) if self.global_ranking else [
            g.size - math.floor(self._ratio(g) * g.size) for g in chosen]
        plan = PrunePlan()
        for g, s, k in zip(chosen, scores, counts, strict=True):
            m = self.round_to
            k = min(g.size, max(m, math.ceil(k / m) * m))
            keep = sorted(torch.argsort(s, descending=True, stable=True)[:k].tolist())
            plan.groups.append(GroupPlan(key_of(g), g.size, keep))
        return plan, skips

    def _gradients(self, program: Program, ctx: PassContext | None) -> dict[str, torch.Tensor]:
        batches = self.batches or ([tuple(ctx.example_inputs)] if ctx and ctx.example_inputs
                                   else [])
        if not batches or self.loss is None:
            raise ValueError("importance='taylor' needs loss=callable(outputs) and batches= "
                             "(or example inputs)")
        return weight_gradients(program, batches, self.loss)

    def _global_counts(self, groups: list[ChannelGroup], scores: list[torch.Tensor]) -> list[int]:
        normed = [s / s.mean().clamp_min(1e-12) for s in scores]
        flat = torch.cat(normed)
        cut = math.floor(self.ratio * flat.numel())
        if cut == 0:
            return [g.size for g in groups]
        threshold = flat.sort().values[cut - 1]
        return [max(1, int((n > threshold).sum())) for n in normed]

    # --------------------------------------------------------------------- run
    def run(self, program: Program, ctx: PassContext) -> PassResult:
        plan, skips = (self.plan, []) if self.plan is not None else self.make_plan(program, ctx)
        pruned = [g for g in plan.groups if len(g.keep) < g.size]
        if not pruned:
            return PassResult(changed=False, skipped=skips, details={"plan": plan})
        removed = apply_plan(program, plan, self._analysis(program))
        stats = {"groups": len(plan.groups), "groups_pruned": len(pruned),
                 "channels_before": sum(g.size for g in plan.groups),
                 "channels_after": sum(len(g.keep) for g in plan.groups),
                 "weight_elements_removed": removed}
        summary = [f"{g.slices[0][0]} (+{len(g.slices) - 1} coupled): {g.size} -> "
                   f"{len(g.keep)} channels" for g in pruned]
        return PassResult(changed=True, stats=stats, skipped=skips,
                          details={"plan": plan, "summary": summary})

    def reference(self, before: Program, result: PassResult) -> Callable[..., Any]:
        return masked_copy(before, result.details["plan"])


def _under(weight: str, path: str) -> bool:
    return weight == path or weight.startswith(path + ".")
