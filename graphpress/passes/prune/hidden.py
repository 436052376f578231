"""Width pruning of the residual stream (``prune_hidden=True``): the reference and the deviation.

With ``channel_groups(program, hidden=True)`` the residual stream of a transformer is one
channel group: the embedding columns, every norm's weight and bias, the input columns of every
projection reading the stream (q, k, v, the MLP's up/gate, the head) and the output rows and
biases of every projection writing it (attention output, MLP down). Its normalisations
(``layer_norm`` / ``rms_norm`` over the stream, and the ``mean(x^2)`` of an RMSNorm written out)
do not block it; once pruned they run over the kept channels, as the norm of a narrower model
would (LLM-Pruner, Minitron).

Contract (``reference``): the pruned program equals the *masked original* (the removed
channels zeroed in every weight slice of their group) in which each such normalisation is
computed over the kept channels only (:class:`KeptStatistics`): ``layer_norm`` / ``rms_norm``
of ``x[..., K]`` with ``weight[K]``, ``bias[K]`` (the removed outputs are 0, as the masked
weights make them), ``mean`` over ``K``, and a weight standardization (``batch_norm`` in
training mode of ``W.reshape(1, O, -1)``) over the kept input channels (the removed columns
are 0: they multiply input channels that are 0). It is exact because the removed channels are zero
everywhere else in the masked original. The pruned model is *not* the original model: how far
it moved is measured on the example inputs (:func:`deviation`) and reported.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.fx import Node

from graphpress.analysis.channels.solver import ChannelAnalysis
from graphpress.ir.program import Program
from graphpress.ir.runner import ProgramRunner
from graphpress.numerics import compare_outputs, output_metrics
from graphpress.passes.prune.plan import PrunePlan, kept_indices

__all__ = ["KeptStatistics", "deviation", "kept_statistics"]


def kept_statistics(program: Program, analysis: ChannelAnalysis, plan: PrunePlan
                    ) -> dict[str, tuple[int, torch.Tensor]]:
    """Hidden mode: each normalisation over a pruned dim -> (that dim, its kept indices)."""
    if not analysis.normalized:
        return {}
    nodes = {n.name: n for n in program.graph.nodes}
    out = {}
    for name, d in analysis.normalized.items():
        layout = analysis.layouts[nodes[name].args[0].name][d]
        index = kept_indices(layout, analysis, plan)
        if len(index) < sum(n * rep for _, rep, n in layout):
            out[name] = (d, index)
    return out


class KeptStatistics(ProgramRunner):
    """``program`` with each normalisation of ``kept`` (node -> (dim, kept indices)) computed
    over the kept channels of that dim only."""

    def __init__(self, program: Program, kept: dict[str, tuple[int, torch.Tensor]]) -> None:
        super().__init__(program)
        self.kept = kept

    def evaluate(self, n: Node) -> Any:
        if n.name not in self.kept:
            return super().evaluate(n)
        dim, index = self.kept[n.name]
        args, kwargs = self.fetch_args_kwargs_from_env(n)
        x = args[0]
        index = index.to(x.device)
        part = x.index_select(dim, index)
        if n.target is torch.ops.aten.mean.dim:
            return n.target(part, *args[1:], **kwargs)
        if n.target is torch.ops.aten.batch_norm.default:   # weight standardization
            normed = n.target(part, *args[1:], **kwargs)
            return x.new_zeros(x.shape).index_copy(dim, index, normed)
        # layer_norm(x, shape, weight, bias, ...) / rms_norm(x, shape, weight, eps)
        rest = [a.index_select(0, index) if isinstance(a, torch.Tensor) else a
                for a in args[2:]]
        normed = n.target(part, [len(index)], *rest, **kwargs)
        return x.new_zeros(x.shape).index_copy(dim, index, normed)


def deviation(before: Program, after: Program, inputs: tuple[Any, ...],
              kwargs: dict[str, Any]) -> dict[str, float]:
    """How far the pruned program's outputs are from the unpruned one's on ``inputs``: SQNR (dB),
    cosine, top-1 agreement along the last dim, and the largest absolute difference."""
    with torch.no_grad():
        want, got = before(*inputs, **kwargs), after(*inputs, **kwargs)
    metrics = output_metrics(got, want, ("sqnr_db", "cosine", "top1_agreement"))
    worst = compare_outputs(got, want, rtol=0.0, atol=float("inf"))
    metrics["max_abs_error"] = float(worst.max_abs_error)
    return metrics
