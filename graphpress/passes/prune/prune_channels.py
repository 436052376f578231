"""Structural channel pruning over the channel dependency groups of the IR.

For every prunable group of ``channel_groups`` (see ``graphpress/analysis/channels/``) the pass
scores the channels (``importance.py``), keeps the most important
``n - floor(ratio * n)`` of them, rounded up so that every weight slice of the group keeps a
multiple of ``round_to`` elements (``rounding.py``: plain channels a multiple of ``round_to``,
attention heads usually as they are; at most ``n``), and removes the others from every weight
slice of the group at once; the shape arguments in the graph follow (``plan.py``).
``global_ranking=True`` ranks the channels of all groups together (scores normalised by their
group mean) instead of cutting each group by the same ratio; ``ratios={"module.path": r}``
overrides the ratio per module.

Contract (checked by ``verify=True``): the pruned program equals the *masked original*, the
program before the pass with the removed channels zeroed in every weight slice of their group
(producers, their biases and norms, and consumers' input slices), to fp32 rounding. Pruning
channels whose weights are all zero therefore changes nothing. ``prune_hidden=True`` also
prunes the normalised residual stream; its reference computes those normalisations over the
kept channels (``hidden.py``). With ``importance="variance"``
the removed channels' calibration means are folded into the layers that read them, and the
reference is the input program with those channels replaced by their means where they are read
(``variance.py``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from graphpress.analysis.channels.solver import ChannelAnalysis, ChannelGroup, channel_groups
from graphpress.ir.program import Program
from graphpress.passes.prune import hidden, variance
from graphpress.passes.prune.importance import (
    CRITERIA,
    REDUCTIONS,
    group_importance,
    hessian_saliency,
    weight_gradients,
)
from graphpress.passes.prune.plan import (
    GroupPlan,
    PrunePlan,
    apply_plan,
    kept_elements,
    key_of,
    masked_copy,
)
from graphpress.passes.prune.rounding import rounded_keep
from graphpress.pipeline.base import Contract, Pass, PassContext, PassResult, Skip
from graphpress.pipeline.registry import register_pass

__all__ = ["PruneChannels", "PrunePlan"]


@register_pass("prune_channels")
@dataclass
class PruneChannels(Pass):
    """Replaces every coupled channel group with its most important channels."""

    ratio: float = 0.5                      # fraction of each group's channels to remove
    importance: str | Callable[..., Any] = "l2"   # one of CRITERIA, or a callable
    reduce: str = "mean"                    # combine slice scores: mean | sum | max
    global_ranking: bool = False            # one ranking across groups instead of per group
    prune_heads: bool = True                # attention: whole heads, or (False) head_dim
    prune_hidden: bool = False              # also the residual stream (norms over kept channels)
    ratios: dict[str, float] | None = None  # module path -> ratio (first match wins)
    round_to: int = 1                       # kept elements per weight slice: a multiple of this
    ignore: tuple[str, ...] | Callable[[str], bool] = ()     # module paths, or predicate(weight)
    plan: PrunePlan | None = None           # apply this plan instead of computing one
    batches: list[tuple[Any, ...]] | None = None   # taylor, hessian, variance: input tuples
    loss: Callable[[Any], torch.Tensor] | None = None  # taylor, hessian: outputs -> scalar loss
    seed: int = 0                           # for importance="random"

    contract: ClassVar[Contract] = Contract.against_reference(
        "equals the input program with the removed channels zeroed in every slice of their group",
        rtol=1e-5, atol=1e-5)
    mean_contract: ClassVar[Contract] = Contract.against_reference(
        "equals the input program with each removed channel replaced by its calibration mean "
        "where a layer reads it", rtol=1e-5, atol=1e-5)
    hidden_contract: ClassVar[Contract] = Contract.against_reference(
        "equals the input program with the removed channels zeroed in every slice of their group "
        "and every normalisation over a pruned dimension (layer_norm, rms_norm, mean, weight "
        "standardization) computed over the kept channels only", rtol=1e-5, atol=1e-5,
        report_vs_input=("sqnr_db", "cosine", "top1_agreement"))
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
        if self.importance == "variance" and not self.prune_heads:
            raise ValueError("importance='variance' prunes whole heads only (prune_heads=True): "
                             "head_dim positions are contracted by attention, not read by a "
                             "layer whose bias can take their mean")
        if self.importance == "variance" and self.prune_hidden:
            raise ValueError("importance='variance' with prune_hidden=True is not supported: "
                             "the stream's norms read every channel, so a removed channel "
                             "cannot be replaced by its mean where it is read")
        if self.round_to < 1:
            raise ValueError(f"round_to must be >= 1, got {self.round_to}")
        if isinstance(self.ignore, str):
            self.ignore = (self.ignore,)

    # --------------------------------------------------------------- selection
    def _ignored(self, program: Program) -> Callable[[str], bool] | None:
        """Whether a weight is in an ignored module; None when nothing is ignored."""
        if callable(self.ignore):
            return self.ignore
        if not self.ignore:
            return None
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
        if self.prune_heads and not self.prune_hidden:
            return program.analysis("channel_groups")
        return channel_groups(program, head_dim=not self.prune_heads, hidden=self.prune_hidden)

    def contract_for(self, program: Program) -> Contract:
        if self.importance == "variance":
            return self.mean_contract
        return self.hidden_contract if self.prune_hidden else self.contract

    def make_plan(self, program: Program, ctx: PassContext | None = None
                  ) -> tuple[PrunePlan, list[Skip]]:
        """Score and select: which channels of which group to keep."""
        plan, skips, _ = self._plan(program, ctx, self._analysis(program))
        return plan, skips

    def _plan(self, program: Program, ctx: PassContext | None, analysis: ChannelAnalysis
              ) -> tuple[PrunePlan, list[Skip], Any]:
        ignored = self._ignored(program)
        skips, chosen = [], []
        for g in analysis.groups:
            where = g.slices[0].weight
            if not g.prunable:
                reason = "; ".join(g.reasons) or "a single channel"
                skips.append(Skip(where, f"group of {g.size} channels unprunable: {reason}"))
            elif ignored is not None and any(ignored(w) for w in g.weights):
                skips.append(Skip(where, "group touches an ignored module"))
            else:
                chosen.append(g)
        calibration = None
        if self.importance == "variance":
            chosen, calibration = self._calibrate(program, analysis, chosen, skips, ctx)
        if not chosen:
            reasons = "; ".join(f"{s.node}: {s.reason}" for s in skips[:5])
            raise ValueError(f"nothing prunable in this program ({reasons})")
        generator = torch.Generator().manual_seed(self.seed) if self.importance == "random" \
            else None
        if calibration is not None:
            scores = [variance.variance_scores(g, calibration[0], calibration[1], self.reduce)
                      for g in chosen]
        elif self.importance == "hessian":
            scores = hessian_saliency(program, chosen, *self._loss_batches(ctx))
        else:
            grads = weight_gradients(program, *self._loss_batches(ctx)) \
                if self.importance == "taylor" else None
            scores = [group_importance(program, g, self.importance, self.reduce, generator,
                                       grads) for g in chosen]
        counts = self._global_counts(chosen, scores) if self.global_ranking else [
            g.size - math.floor(self._ratio(g) * g.size) for g in chosen]
        plan = PrunePlan()
        for g, s, k in zip(chosen, scores, counts, strict=True):
            k = rounded_keep(g, k, self.round_to)
            keep = top_channels(s, k)
            plan.groups.append(GroupPlan(key_of(g), g.size, keep))
        return plan, skips, calibration

    def _calibrate(self, program: Program, analysis: ChannelAnalysis, groups: list[ChannelGroup],
                   skips: list[Skip], ctx: PassContext | None) -> tuple[list[ChannelGroup], Any]:
        """variance: the groups mean folding handles (the others skipped, with why), and the
        activation statistics at their readers' inputs."""
        readers, unsupported = variance.find_readers(program)
        chosen = []
        for g in groups:
            why = variance.refusal(program, analysis, g, readers, unsupported)
            if why:
                skips.append(Skip(g.slices[0].weight, why))
            else:
                chosen.append(g)
        sites = {(r.activation, r.dim) for g in chosen for s in g.slices
                 for r in readers.get((s.weight, s.axis), [])}
        if not sites:
            return chosen, None
        return chosen, (readers, variance.activation_stats(program, self._batches(ctx), sites))

    def _recalibrate(self, program: Program, analysis: ChannelAnalysis, plan: PrunePlan,
                     ctx: PassContext | None) -> Any:
        """variance, re-applying a plan: the statistics to fold its removed channels again."""
        keys = {tuple(sorted(g.slices)) for g in plan.groups if len(g.keep) < g.size}
        skips: list[Skip] = []
        groups = [g for g in analysis.groups if tuple(key_of(g)) in keys]
        calibration = self._calibrate(program, analysis, groups, skips, ctx)[1]
        if skips:
            raise ValueError(f"plan group over {skips[0].node}: {skips[0].reason}")
        return calibration

    def _batches(self, ctx: PassContext | None) -> list[tuple[tuple[Any, ...], dict[str, Any]]]:
        """Calibration data, else ``batches=``, else the example inputs, as (args, kwargs)."""
        if ctx is not None and ctx.calibration_data:
            return list(ctx.calibration_data)
        if self.batches:
            return [(tuple(b), {}) for b in self.batches]
        if ctx is not None and ctx.example_inputs:
            return [(tuple(ctx.example_inputs), dict(ctx.example_kwargs))]
        return []

    def _loss_batches(self, ctx: PassContext | None
                      ) -> tuple[list[tuple[Any, ...]], Callable[[Any], torch.Tensor]]:
        """taylor, hessian: the batches (default: the example inputs) and the loss."""
        batches = self.batches or ([tuple(ctx.example_inputs)] if ctx and ctx.example_inputs
                                   else [])
        if not batches or self.loss is None:
            raise ValueError(f"importance={self.importance!r} needs loss=callable(outputs) and "
                             "batches= (or example inputs)")
        return batches, self.loss

    def _global_counts(self, groups: list[ChannelGroup], scores: list[torch.Tensor]) -> list[int]:
        """LAMP scores are comparable across groups as they are; others are divided by their
        group's mean."""
        normed = scores if self.importance == "lamp" else [
            s / s.mean().clamp_min(1e-12) for s in scores]
        flat = torch.cat(normed)
        cut = math.floor(self.ratio * flat.numel())
        if cut == 0:
            return [g.size for g in groups]
        threshold = flat.sort().values[cut - 1]
        return [max(1, int((n > threshold).sum())) for n in normed]

    # --------------------------------------------------------------------- run
    def run(self, program: Program, ctx: PassContext) -> PassResult:
        analysis = self._analysis(program)
        if self.plan is None:
            plan, skips, calibration = self._plan(program, ctx, analysis)
        else:
            plan, skips = self.plan, []
            calibration = self._recalibrate(program, analysis, plan, ctx) \
                if self.importance == "variance" else None
        pruned = [g for g in plan.groups if len(g.keep) < g.size]
        if not pruned:
            return PassResult(changed=False, skipped=skips, details={"plan": plan})
        folds = variance.compute_folds(program, plan.removed(), *calibration) \
            if calibration is not None else []
        kept = {k: m.nonzero().flatten() for k, m in kept_elements(plan, program).items()} \
            if folds else {}
        statistics = hidden.kept_statistics(program, analysis, plan)
        before = program.copy() if self.prune_hidden else None
        removed = apply_plan(program, plan, analysis)
        variance.apply_folds(program, folds, kept)
        if folds:
            program.refresh_shapes()
        stats = {"groups": len(plan.groups), "groups_pruned": len(pruned),
                 "channels_before": sum(g.size for g in plan.groups),
                 "channels_after": sum(len(g.keep) for g in plan.groups),
                 "weight_elements_removed": removed}
        summary = [f"{g.slices[0][0]} (+{len(g.slices) - 1} coupled): {g.size} -> "
                   f"{len(g.keep)} channels" for g in pruned]
        details = {"plan": plan, "summary": summary}
        if self.prune_hidden:
            details["kept_statistics"] = statistics
            stats["normalizations_over_kept"] = len(statistics)
            if ctx.example_inputs and not _on_meta(program):
                details["deviation"] = hidden.deviation(before, program, ctx.example_inputs,
                                                        ctx.example_kwargs)
                summary.append("deviation from the unpruned program on the example inputs: "
                               + ", ".join(f"{k} {v:.4g}"
                                           for k, v in details["deviation"].items()))
        if calibration is not None:
            stats["readers_mean_folded"] = len(folds)
            details["mean_folds"] = [fold for fold, _ in folds]
        return PassResult(changed=True, stats=stats, skipped=skips, details=details)

    def reference(self, before: Program, result: PassResult) -> Callable[..., Any]:
        if "mean_folds" in result.details:
            return variance.MeanReplaced(before, result.details["mean_folds"])
        masked = masked_copy(before, result.details["plan"])
        if "kept_statistics" in result.details:
            return hidden.KeptStatistics(masked, result.details["kept_statistics"])
        return masked


def top_channels(scores: torch.Tensor, k: int) -> list[int]:
    """The ``k`` highest-scoring channels in index order; among equal scores the lower index
    wins (a stable descending sort). Up to 64 scores without NaN are sorted in Python, where a
    torch sort costs its dispatch several times over; others by torch, which orders NaN
    first."""
    if scores.numel() <= 64:
        values = scores.tolist()
        if not any(v != v for v in values):      # no NaN: Python's order is total
            order = sorted(range(len(values)), key=values.__getitem__, reverse=True)
            return sorted(order[:k])
    return sorted(torch.argsort(scores, descending=True, stable=True)[:k].tolist())


def _on_meta(program: Program) -> bool:
    return any(t.device.type == "meta" for t in program.state_dict.values())


def _under(weight: str, path: str) -> bool:
    return weight == path or weight.startswith(path + ".")
