"""Variance-based channel pruning with mean folding (the ``variance`` criterion).

A *reader* of a channel group is a layer whose weight's input axis holds a slice of the group:
``linear`` (W axis 1, x's last dim), ``addmm(b, x, W)`` (W axis 0) and ungrouped, untransposed
convolutions (W axis 1, x's channel dim). On calibration batches the core's runner
(``graphpress.ir.runner.run_batches``) records, at every reader's input, the mean ``mu_j`` and
variance ``var_j`` of each element ``j`` along the read axis, over every other dim (batch,
tokens, space). Channel ``c`` scores the sum of ``var_j`` over its elements, reduced over its
readers like the weight criteria; the lowest are removed.

Mean folding. A removed channel is replaced, where a reader reads it, by its mean. For a reader
``y = W x + b`` with ``R`` the removed elements and ``K`` the kept ones::

    W x[R := mu_R] + b = W_K x_K + (b + W_R mu_R)

so the pruned reader gets the bias ``b + W_R mu_R`` (a new bias parameter when it had none). A
convolution zero-pads its input, so the constant ``mu`` is seen only inside the image: its
correction is ``conv(mu_R 1_{HxW}, W_R)`` with the conv's own stride, padding and dilation, a
constant ``[O, H', W']`` added after the conv; with no padding it is spatially constant and
goes into the bias.

Contract (``reference``): the pruned program equals the input program in which every reader's
input has its removed elements replaced by their calibration means (:class:`MeanReplaced`). It
holds because the channel analysis lets a removed channel reach nothing but the weight slices
of its group; a group for which it would not hold is refused, naming the node: channels summed,
averaged or normed over (ConvNeXt-V2's GRN), contracted by a matmul, read by a grouped or
transposed convolution, or read by a padded convolution over a dynamic spatial size.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch.fx import Node

from graphpress.analysis.channels.rules import op_name, size
from graphpress.analysis.channels.solver import ChannelAnalysis, ChannelGroup
from graphpress.ir.builder import GraphBuilder
from graphpress.ir.graph import get_arg, set_arg
from graphpress.ir.program import Program
from graphpress.ir.runner import ProgramRunner, run_batches

__all__ = ["MeanFold", "MeanReplaced", "Reader", "activation_stats", "apply_folds",
           "compute_folds", "find_readers", "refusal", "variance_scores"]

_CONVS = ("conv1d", "conv2d", "conv3d", "convolution")
_SUMS = ("sum", "mean", "linalg_vector_norm", "norm")
_MATMULS = ("matmul", "mm", "bmm")
Stats = dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]]   # (node, dim) -> mean, var


@dataclass(frozen=True)
class Reader:
    """A layer reading channels through its weight's input axis."""

    node: str           # the layer's node
    weight: str         # its weight
    axis: int           # the weight axis holding the channels it reads
    out_axis: int       # the weight axis of its outputs
    activation: str     # the node it reads
    arg: int            # position of that input among the layer's arguments
    dim: int            # the activation's dim holding the channels


@dataclass
class MeanFold:
    """One reader's removed input elements and their means (what the reference substitutes)."""

    reader: Reader
    keep: torch.Tensor          # bool, per element of the read dim
    mean: torch.Tensor          # float64, per element of the read dim


def find_readers(program: Program) -> tuple[dict[tuple[str, int], list[Reader]],
                                            dict[tuple[str, int], str]]:
    """Readers by (weight, input axis); and weight axes read by layers mean folding cannot
    handle, with the reason."""
    readers: dict[tuple[str, int], list[Reader]] = {}
    unsupported: dict[tuple[str, int], str] = {}
    for node in program.graph.nodes:
        if node.op != "call_function":
            continue
        name = op_name(node)
        if name.startswith("conv_transpose"):
            weight = program.weight_name(node.args[1]) if isinstance(node.args[1], Node) else None
            if weight is not None:
                unsupported[(weight, 0)] = f"read by a transposed {name} (node {node.name})"
        elif name == "linear" or name == "addmm" or name in _CONVS:
            arg, w = (1, node.args[2]) if name == "addmm" else (0, node.args[1])
            weight = program.weight_name(w) if isinstance(w, Node) else None
            if weight is None:
                continue
            x = node.args[arg]
            rank = x.meta["val"].dim()
            if name == "linear":
                readers.setdefault((weight, 1), []).append(
                    Reader(node.name, weight, 1, 0, x.name, arg, rank - 1))
            elif name == "addmm":
                readers.setdefault((weight, 0), []).append(
                    Reader(node.name, weight, 0, 1, x.name, arg, 1))
            else:
                transposed = node.args[6] if name == "convolution" else False
                groups = node.args[8] if name == "convolution" else get_arg(node, "groups")
                depthwise = groups == size(x.meta["val"].shape[1]) and \
                    program.weight(weight).shape[1] == 1
                if not transposed and groups == 1:
                    readers.setdefault((weight, 1), []).append(
                        Reader(node.name, weight, 1, 0, x.name, arg, 1))
                elif transposed or not depthwise:
                    kind = "transposed" if transposed else f"grouped ({groups} groups)"
                    unsupported[(weight, 0 if transposed else 1)] = \
                        f"read by a {kind} {name} (node {node.name})"
        elif name in _MATMULS:
            for axis, operand in ((-1, node.args[0]), (-2, node.args[1])):
                weight = program.weight_name(operand) if isinstance(operand, Node) else None
                if weight is not None:
                    unsupported[(weight, axis % operand.meta["val"].dim())] = \
                        f"contracted by {name} (node {node.name})"
    return readers, unsupported


def refusal(program: Program, analysis: ChannelAnalysis, group: ChannelGroup,
            readers: dict[tuple[str, int], list[Reader]],
            unsupported: dict[tuple[str, int], str]) -> str | None:
    """Why mean folding cannot be exact for ``group``; None when it can."""
    for s in group.slices:
        if (s.weight, s.axis) in unsupported:
            return f"variance: channels {unsupported[(s.weight, s.axis)]}"
    if not any((s.weight, s.axis) in readers for s in group.slices):
        return "variance: no linear or convolution reads these channels through its weight"
    for node in program.graph.nodes:
        if node.op != "call_function" or not isinstance(node.args[0], Node):
            continue
        name = op_name(node)
        x = node.args[0]
        if name in _SUMS:
            rank = x.meta["val"].dim()
            axes = get_arg(node, "dim", missing=None)
            axes = range(rank) if axes in (None, []) else \
                [axes] if isinstance(axes, int) else axes
            if any(_holds(analysis, x, a % rank, group) for a in axes):
                return f"variance: channels reduced over by {name} (node {node.name})"
        elif name in _MATMULS and _holds(analysis, x, x.meta["val"].dim() - 1, group):
            return f"variance: channels contracted by {name} (node {node.name})"
        elif name in _CONVS and node.name in _reader_nodes(readers, group):
            spatial = x.meta["val"].shape[2:]
            if any(isinstance(n, torch.SymInt) for n in spatial) and _padded(node):
                return f"variance: padded {name} (node {node.name}) over a dynamic size"
    return None


def _reader_nodes(readers: dict[tuple[str, int], list[Reader]], group: ChannelGroup) -> set[str]:
    return {r.node for s in group.slices for r in readers.get((s.weight, s.axis), [])}


def _holds(analysis: ChannelAnalysis, node: Node, dim: int, group: ChannelGroup) -> bool:
    layouts = analysis.layouts.get(node.name)
    if not isinstance(layouts, list) or layouts[dim] is None:
        return False
    return any(g == group.id for g, _, _ in layouts[dim])


def _padded(node: Node) -> bool:
    padding = get_arg(node, "padding")
    if isinstance(padding, str):
        return padding != "valid"
    return any(p != 0 for p in ([padding] if isinstance(padding, int) else padding))


def activation_stats(program: Program, batches: Iterable[tuple[tuple[Any, ...], dict[str, Any]]],
                     sites: set[tuple[str, int]]) -> Stats:
    """Mean and variance (float64) of each element along ``dim`` of each ``(node, dim)``, over
    every other dim of every batch."""
    sums: dict[tuple[str, int], list[Any]] = {site: [0, 0, 0] for site in sites}
    dims: dict[str, list[int]] = {}
    for name, d in sites:
        dims.setdefault(name, []).append(d)

    def hook(node: Node, value: Any) -> None:
        for d in dims[node.name]:
            rows = value.detach().double().movedim(d, -1)
            rows = rows.reshape(-1, rows.shape[-1])
            acc = sums[(node.name, d)]
            acc[0] += rows.sum(0)
            acc[1] += (rows * rows).sum(0)
            acc[2] += rows.shape[0]

    if not run_batches(program, batches, hook, nodes=set(dims), description="variance"):
        raise ValueError("importance='variance' needs calibration data (calibration_data=, "
                         "batches= or example inputs)")
    out = {}
    for site, (total, squares, count) in sums.items():
        mean = total / count
        out[site] = (mean, (squares / count - mean * mean).clamp_min(0))
    return out


def variance_scores(group: ChannelGroup, readers: dict[tuple[str, int], list[Reader]],
                    stats: Stats, reduce: str) -> torch.Tensor:
    """Per channel, the summed activation variance of its elements at each reader, reduced."""
    scores = []
    for s in group.slices:
        for r in readers.get((s.weight, s.axis), []):
            var = stats[(r.activation, r.dim)][1]
            rows = var[s.offset: s.offset + group.size * s.rep].reshape(group.size, s.rep)
            scores.append(rows.sum(1))
    stacked = torch.stack(scores).float()
    if reduce == "sum":
        return stacked.sum(0)
    return stacked.amax(0) if reduce == "max" else stacked.mean(0)


def compute_folds(program: Program, removed: dict[tuple[str, int], set[int]],
                  readers: dict[tuple[str, int], list[Reader]], stats: Stats
                  ) -> list[tuple[MeanFold, torch.Tensor]]:
    """For every reader of removed elements (from the weights *before* pruning): the fold and
    its output correction ``W_R mu_R`` (``[O]``, or ``[O, *spatial]`` for a padded conv)."""
    folds = []
    nodes = {n.name: n for n in program.graph.nodes}
    for key, drop in removed.items():
        for r in readers.get(key, []):
            mean = stats[(r.activation, r.dim)][0]
            keep = torch.ones(mean.numel(), dtype=torch.bool)
            keep[sorted(drop)] = False
            fill = torch.where(keep, torch.zeros_like(mean), mean)
            w = program.weight(r.weight).detach().double()
            node = nodes[r.node]
            if op_name(node) == "linear":
                delta = w @ fill
            elif op_name(node) == "addmm":
                delta = fill @ w
            else:
                x = node.args[r.arg].meta["val"]
                image = fill.view(1, -1, *[1] * (x.dim() - 2)).expand(
                    1, -1, *[size(n) for n in x.shape[2:]])
                delta = node.target(image, w, None, *node.args[3:], **node.kwargs)[0]
                if not _padded(node):
                    delta = delta.flatten(1)[:, 0]
            folds.append((MeanFold(r, keep, mean), delta))
    return folds


def apply_folds(program: Program, folds: list[tuple[MeanFold, torch.Tensor]],
                kept_rows: dict[tuple[str, int], torch.Tensor]) -> None:
    """Add each correction to its (pruned) reader: into its bias, a new bias, or after it."""
    nodes = {n.name: n for n in program.graph.nodes}
    for fold, delta in folds:
        r = fold.reader
        node = nodes[r.node]
        rows = kept_rows.get((r.weight, r.out_axis))
        if rows is not None:
            delta = delta[rows]
        dtype = program.weight(r.weight).dtype
        bias = node.args[0] if op_name(node) == "addmm" else get_arg(node, "bias")
        if delta.dim() == 1 and isinstance(bias, Node) and program.is_weight(bias) \
                and len(bias.users) == 1 and bias.meta["val"].shape == delta.shape:
            program.replace_weight(bias, (program.weight(bias).detach().double() + delta)
                                   .to(dtype))
        elif delta.dim() == 1 and bias is None:
            name = program.free_weight_name(f"{r.weight.rpartition('.')[0] or r.weight}.bias")
            placeholder = program.add_weight(name, delta.to(dtype), kind="parameter")
            set_arg(node, "bias", placeholder)
        else:
            _add_after(program, node, r, delta.to(dtype))


def _add_after(program: Program, node: Node, reader: Reader, delta: torch.Tensor) -> None:
    name = program.free_weight_name(f"{reader.weight.rpartition('.')[0] or reader.weight}"
                                    ".mean_fold")
    if delta.dim() == 1 and op_name(node) in _CONVS:
        delta = delta.view(-1, *[1] * (node.meta["val"].dim() - 2))
    with GraphBuilder(program, anchor=node, pass_name="prune_channels", after=True) as build:
        correction = build.weight(name, delta, kind="buffer")
        added = build.call(torch.ops.aten.add.Tensor, node, correction)
    node.replace_all_uses_with(added, delete_user_cb=lambda user: user is not added)


class MeanReplaced(ProgramRunner):
    """The input program with each reader's removed input elements replaced by their means."""

    def __init__(self, program: Program, folds: list[MeanFold]) -> None:
        super().__init__(program)
        self.folds: dict[str, list[MeanFold]] = {}
        for fold in folds:
            self.folds.setdefault(fold.reader.node, []).append(fold)

    def evaluate(self, n: Node) -> Any:
        if n.name not in self.folds:
            return super().evaluate(n)
        args, kwargs = self.fetch_args_kwargs_from_env(n)
        args = list(args)
        for fold in self.folds[n.name]:
            x = args[fold.reader.arg]
            shape = [1] * x.dim()
            shape[fold.reader.dim] = -1
            args[fold.reader.arg] = torch.where(fold.keep.view(shape), x,
                                                fold.mean.to(x.dtype).view(shape))
        return getattr(self, n.op)(n.target, tuple(args), kwargs)
