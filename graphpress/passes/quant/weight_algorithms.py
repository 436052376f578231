"""insert_fake_quant's data-aware weight algorithms, on the Program: AWQ, GPTQ, bias correction,
EoRA.

They run before any fake-quant is inserted, on the calibration batches, through the
calibration runner (:func:`graphpress.quant.algorithms.statistics.collect`):

1. ``algorithm='awq'``: for each producer whose channels reach only weight-quantized linear
   layers (:mod:`~graphpress.passes.quant.channel_scaling`), the scale search of
   :mod:`~graphpress.quant.algorithms.awq` on the readers' input rows (scored on the readers'
   outputs, or with ``loss='block'`` where they meet: :mod:`~graphpress.passes.quant.awq_block`),
   the scales folded into the producer and the readers' weights (the exact part: recorded in
   ``folded``), then
   (``clip``) the clipping search for every weight-quantized linear, on its inputs after the
   folding, and (``refine``) that many steps of the grid refinement (the qparams recorded in
   ``qparams``);
2. ``algorithm='gptq'``: for each weight-quantized linear / matmul layer, ``H = X^T X`` of its
   input, then :func:`~graphpress.quant.algorithms.gptq.gptq_quantize`; the quantized weight
   replaces the stored one and its qparams are recorded (the fake-quant inserted on it is then
   the identity on its values). With ``sequential=True`` the layers go in the graph order of
   their inputs, one statistics run per input value on the program as the layers before it
   left it (quantized, with their EoRA branches and bias corrections), steps 2 to 4 per input;
3. ``bias_correction=True``: for each weight-quantized linear / conv layer, the mean input,
   then :func:`~graphpress.quant.algorithms.bias_correction.output_shift` with the final
   quantized weight, added to the bias (a layer without one gets one; a shared or computed
   bias is refused);
4. ``eora_rank=r``: for each weight-quantized linear, ``H = X^T X`` of its input, then
   :func:`~graphpress.quant.algorithms.eora.eora_factors` of ``W - Q`` (``Q``: the final
   quantized weight of 1-3): a parallel branch ``linear(linear(x, A), B)`` in float, added to
   the layer's output (the branch reads the unquantized input); bias correction then corrects
   what the branch leaves, ``W - Q - B A``.

Statistics for 2 to 4 are taken in one run after 1, on the float program with AWQ's folding
(one run per input value with ``sequential=True``).
What the contract's reference needs comes back in a :class:`WeightPlan`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.fx import Node

from graphpress.ir.program import Program
from graphpress.passes.quant.awq_block import block_objective, find_region
from graphpress.passes.quant.channel_scaling import apply_scales, find_chains, to_producer
from graphpress.passes.quant.placement import Layer, Operand
from graphpress.passes.quant.weight_edits import (
    add_low_rank,
    add_to_bias,
    bias_refusal,
    gram_error,
    layer_fn,
)
from graphpress.pipeline.base import Skip
from graphpress.quant.algorithms.awq import (
    AwqReader,
    awq_clip_search,
    awq_refine_qparams,
    awq_scale_search,
)
from graphpress.quant.algorithms.bias_correction import output_shift
from graphpress.quant.algorithms.eora import eora_factors
from graphpress.quant.algorithms.gptq import DAMP_CANDIDATES, gptq_damp_search, gptq_quantize
from graphpress.quant.algorithms.grid import fake_quantize, minmax_qparams
from graphpress.quant.algorithms.statistics import AbsMean, Gram, Mean, Rows, Values, collect

__all__ = ["ALGORITHMS", "CHOICES", "OPTIONS", "WeightPlan", "plan_weights"]

ALGORITHMS = ("rtn", "gptq", "awq")
OPTIONS = {
    "gptq": {"damp": 0.01, "act_order": False, "block": 128, "sequential": False},
    "awq": {"grid": 20, "duo": True, "loss": "linear", "block_batches": 8, "clip": True,
            "clip_steps": 20, "min_ratio": 0.5, "two_sided": False, "rows": 2048,
            "clip_rows": 512, "power_of_two": True, "refine": 4},
    "rtn": {},
}
CHOICES = {"loss": ("block", "linear")}   # options that take one of a few values
DAMP_FOLDS = 4   # damp="auto": batch b of the calibration data is in fold b mod 4
_LINEAR = ("linear", "matmul", "mm", "addmm")
_BIASED = ("linear", "conv1d", "conv2d", "conv3d")


@dataclass
class WeightPlan:
    """What the algorithms decided: qparams replacing a weight's min-max ones, the weights the
    reference must use (``adjusted``; ``folded`` is AWQ's exact part of them), the bias shift
    (and its channel dim) per layer node, the weights gptq replaced as they were, and the lines
    and refusals for the report."""

    qparams: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = field(default_factory=dict)
    adjusted: dict[str, torch.Tensor] = field(default_factory=dict)
    folded: dict[str, torch.Tensor] = field(default_factory=dict)
    shifts: dict[str, tuple[torch.Tensor, int]] = field(default_factory=dict)
    original: dict[str, torch.Tensor] = field(default_factory=dict)  # before gptq replaced them
    new_biases: dict[str, torch.Tensor] = field(default_factory=dict)  # layer node -> its bias
    low_rank: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # (A, B)
    summary: list[str] = field(default_factory=list)
    skipped: list[Skip] = field(default_factory=list)


def _weight_operand(layer: Layer) -> Operand | None:
    return next((op for op in layer.operands if op.role == "weight"), None)


def _input_of(layer: Layer) -> Node | None:
    index = 1 if layer.op == "addmm" else 0
    value = layer.node.args[index]
    return value if isinstance(value, Node) else None


def _as_rows(layer: Layer, operand: Operand, tensor: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """The weight as ``[N, K]`` (output rows, input columns), and whether it was transposed
    (a matmul weight stored ``[K, N]``)."""
    direct = layer.node.args[operand.index] is operand.value
    if layer.op == "linear" or not direct:
        return tensor, False
    return tensor.T, True


def _rows_block(operand: Operand, transposed: bool) -> list[int]:
    block = list(operand.block_size)
    return block[::-1] if transposed else block


def _awq(program: Program, layers: Sequence[Layer], batches: Sequence[Any],
         options: dict[str, Any], plan: WeightPlan) -> None:
    by_node = {layer.node: layer for layer in layers}
    chains, refused = find_chains(program, ("norm", "layer"), ("linear",))
    plan.skipped += [Skip(s.node, f"awq: {s.reason}") for s in refused
                     if s.reason.split(" ")[0] in ("layer_norm", "rms_norm")]
    usable = []
    for chain in chains:
        operands = [(_weight_operand(by_node[r.node]) if r.node in by_node else None)
                    for r in chain.readers]
        if any(op is None or op.block_size[0] != 1 or op.spec.is_float for op in operands):
            plan.skipped.append(Skip(chain.producer.name, f"awq: {chain.where} feeds a layer "
                                     "whose weight is not quantized per channel or group"))
            continue
        usable.append((chain, operands))
    if not usable:
        return
    stats = {r.value.name: (AbsMean(-1), Rows(options["rows"]))
             for chain, _ in usable for r in chain.readers}
    table = {name: list(group) for name, group in stats.items()}
    regions = {}
    if options["loss"] == "block":
        regions = {chain.producer: region for chain, _ in usable if len(chain.readers) > 1
                   and (region := find_region([r.node for r in chain.readers])) is not None}
    recorded: dict[str, Values] = {}
    for node in (n for region in regions.values() for n in region.externals):
        if not program.is_weight(node) and node.name not in recorded:
            recorded[node.name] = Values(options["block_batches"])
            table.setdefault(node.name, []).append(recorded[node.name])
    collect(program, batches, table, what="awq")
    for chain, operands in usable:
        mean_abs = torch.zeros(chain.channels, dtype=torch.float64)
        readers = []
        for reader, operand in zip(chain.readers, operands, strict=True):
            mean_abs = torch.maximum(mean_abs, to_producer(
                reader, stats[reader.value.name][0].value, chain.channels))
            readers.append(AwqReader(stats[reader.value.name][1].value,
                                     program.weight(reader.weight).detach().float(),
                                     operand.block_size, reader.channel_of))
        spec = operands[0].spec
        region = regions.get(chain.producer)
        objective = None if region is None else block_objective(
            program, region, [r.weight for r in chain.readers],
            {name: values.value for name, values in recorded.items()})
        scale, alpha, losses = awq_scale_search(mean_abs, readers, spec, grid=options["grid"],
                                                power_of_two=options["power_of_two"],
                                                duo=options["duo"], objective=objective)
        apply_scales(program, chain, scale)
        for param in [*chain.params, *(r.weight for r in chain.readers)]:
            plan.folded[program.weight_name(param)] = program.weight(param).detach()
        gain = losses[0] / max(min(losses), 1e-30)
        where = "output" if region is None else f"error at {region.merge.name}"
        spread = float(mean_abs.max() / mean_abs.median().clamp(min=1e-30))
        plan.summary.append(f"awq {chain.where} -> {', '.join(r.node.name for r in chain.readers)}"
                            f": alpha {alpha:.2f}, {where} / RTN's {1 / gain:.3f}; input "
                            f"channel magnitude max / median {spread:.1f}")
    plan.adjusted.update(plan.folded)


def _awq_clip(program: Program, layers: Sequence[Layer], batches: Sequence[Any],
              options: dict[str, Any], plan: WeightPlan) -> None:
    """The clipping search for every weight-quantized linear, on its input rows of the
    program as AWQ's folding left it."""
    targets = []
    for layer in layers:
        operand, value = _weight_operand(layer), _input_of(layer)
        if (layer.op == "linear" and operand is not None and value is not None
                and operand.block_size[0] == 1 and not operand.spec.is_float):
            targets.append((layer, operand, value))
    rows = {value.name: Rows(options["clip_rows"]) for _, _, value in targets}
    collect(program, batches, {name: [c] for name, c in rows.items()}, what="awq clipping")
    for layer, operand, value in targets:
        weight = program.weight(operand.value).detach()
        x = rows[value.name].value
        two_sided = options["two_sided"] and not operand.spec.symmetric
        low, high = (awq_clip_search(x, weight.float(), operand.block_size, operand.spec,
                                     steps=options["clip_steps"], min_ratio=options["min_ratio"],
                                     two_sided=two_sided)
                     if options["clip"] else (torch.ones(()), torch.ones(())))
        qparams = minmax_qparams(weight, operand.block_size, operand.spec, low, high)
        if options["refine"]:
            qparams = awq_refine_qparams(x, weight.float(), operand.block_size, operand.spec,
                                         *qparams, steps=options["refine"])
        plan.qparams[program.weight_name(operand.value)] = qparams
        clipped = fake_quantize(weight, operand.block_size, operand.spec, *qparams)
        rtn = fake_quantize(weight, operand.block_size, operand.spec,
                            *minmax_qparams(weight, operand.block_size, operand.spec))
        gain = float(((x @ (weight - clipped).float().T) ** 2).sum()) / max(
            float(((x @ (weight - rtn).float().T) ** 2).sum()), 1e-30)
        ratios = torch.cat([low.flatten(), high.flatten()])
        searched = (f"range ratio {float(ratios.min()):.2f}..{float(ratios.max()):.2f}, mean "
                    f"{float(ratios.mean()):.3f}" if options["clip"] else "min-max range")
        refined = f", grid refined ({options['refine']} steps)" if options["refine"] else ""
        plan.summary.append(f"awq clipping {layer.node.name}: {searched}{refined}; output "
                            f"error / min-max grid's {gain:.3f}")


def _gptq_and_bias(program: Program, layers: Sequence[Layer], batches: Sequence[Any],
                   algorithm: str, options: dict[str, Any], bias_correction: bool,
                   eora_rank: int, plan: WeightPlan) -> None:
    gptq, corrected, compensated = [], [], []
    for layer in layers:
        operand, value = _weight_operand(layer), _input_of(layer)
        if operand is None or value is None:
            continue
        if algorithm == "gptq":
            if layer.op not in _LINEAR or operand.spec.is_float:
                plan.skipped.append(Skip(layer.node.name, f"gptq: {layer.op} {layer.node.name} "
                                         "is quantized by rounding to nearest (gptq takes "
                                         "linear and matmul layers on integer grids)"))
            else:
                gptq.append((layer, operand, value))
        if eora_rank:
            if layer.op != "linear":
                plan.skipped.append(Skip(layer.node.name, f"eora: {layer.op} "
                                         f"{layer.node.name} is not a linear layer"))
            elif min(program.weight(operand.value).shape) < eora_rank:
                plan.skipped.append(Skip(layer.node.name, f"eora: rank {eora_rank} is above "
                                         f"the weight's smaller dim in {layer.node.name}"))
            else:
                compensated.append((layer, operand, value))
        if bias_correction:
            refusal = (bias_refusal(program, layer) if layer.op in _BIASED else
                       f"bias correction: {layer.op} {layer.node.name} has no bias argument")
            if refusal:
                plan.skipped.append(Skip(layer.node.name, refusal))
            else:
                corrected.append((layer, operand, value))
    what = algorithm or ("bias correction" if corrected else "eora")
    if not options.get("sequential"):
        _quantize_stage(program, batches, gptq, compensated, corrected, options, eora_rank,
                        plan, what)
        return
    order = {node: i for i, node in enumerate(program.graph.nodes)}
    for value in sorted({v for _, _, v in [*gptq, *compensated, *corrected]},
                        key=order.__getitem__):
        stage = [[entry for entry in entries if entry[2] is value]
                 for entries in (gptq, compensated, corrected)]
        _quantize_stage(program, batches, *stage, options, eora_rank, plan, what)


def _quantize_stage(program: Program, batches: Sequence[Any],
                    gptq: list[tuple[Layer, Operand, Node]],
                    compensated: list[tuple[Layer, Operand, Node]],
                    corrected: list[tuple[Layer, Operand, Node]], options: dict[str, Any],
                    eora_rank: int, plan: WeightPlan, what: str) -> None:
    """GPTQ, EoRA and bias correction of the given layers from one run of statistics; their
    quantized weights then replace the stored ones."""
    auto_damp = options.get("damp") == "auto"
    folds = min(DAMP_FOLDS, len(batches)) if auto_damp else 1
    if auto_damp and folds < 2:
        raise ValueError(f"gptq: damp='auto' chooses the damping by cross-validation over the "
                         f"calibration batches and needs at least 2, got {len(batches)}: pass "
                         "more batches, or a number as damp (e.g. 0.01)")
    grams = {v.name: Gram(folds if any(v is g for _, _, g in gptq) else 1)
             for _, _, v in [*gptq, *compensated]}
    means = {v.name: Mean() for _, _, v in corrected}
    collect(program, batches, {name: [c for c in (grams.get(name), means.get(name)) if c]
                               for name in grams.keys() | means.keys()}, what=what)
    gptq_options = {k: v for k, v in options.items() if k != "sequential"}
    quantized: dict[str, torch.Tensor] = {}
    for layer, operand, value in gptq:
        name = program.weight_name(operand.value)
        tensor = program.weight(operand.value).detach()
        rows, transposed = _as_rows(layer, operand, tensor)
        block = _rows_block(operand, transposed)
        gram = grams[value.name]
        chose = ""
        if auto_damp:
            damp, errors = gptq_damp_search(rows, gram.fold_totals, operand.spec, block,
                                            act_order=options["act_order"],
                                            block=options["block"])
            gptq_options = {**gptq_options, "damp": damp}
            chose = (f"damp {damp:g} (held-out error / damp {DAMP_CANDIDATES[0]:g}'s "
                     f"{min(errors) / max(errors[0], 1e-30):.3f}), ")
        q, scale, zero_point = gptq_quantize(rows, gram.total, operand.spec, block,
                                             **gptq_options)
        rtn = fake_quantize(rows, block, operand.spec, *minmax_qparams(rows, block,
                                                                       operand.spec))
        h = gram.total.to(torch.float32)
        err, base = (((rows - q) @ h) * (rows - q)).sum(), (((rows - rtn) @ h) * (rows - rtn)).sum()
        plan.summary.append(f"gptq {layer.node.name}: {chose}output error / RTN's "
                            f"{float(err / base.clamp(min=1e-30)):.3f}")
        if transposed:
            q, scale = q.T, scale.T
            zero_point = None if zero_point is None else zero_point.T
        quantized[name] = q.contiguous()
        plan.qparams[name] = (scale.contiguous(), None if zero_point is None
                              else zero_point.contiguous())
    compensation: dict[str, torch.Tensor] = {}   # EoRA's B A, which bias correction sees
    for layer, operand, value in compensated:
        name = program.weight_name(operand.value)
        weight = program.weight(operand.value).detach()
        final = _final_weight(weight, operand, quantized.get(name), plan.qparams.get(name))
        gram = grams[value.name].total
        a, b = eora_factors(weight - final, gram, eora_rank)
        add_low_rank(program, layer, value, a, b)
        plan.low_rank[layer.node.name] = (a, b)
        compensation[name] = b @ a
        before = gram_error(weight - final, gram)
        after = gram_error(weight - final - b @ a, gram)
        plan.summary.append(f"eora {layer.node.name}: rank {eora_rank}, output error / "
                            f"quantized's {after / max(before, 1e-30):.3f}")
    for layer, operand, value in corrected:
        name = program.weight_name(operand.value)
        weight = program.weight(operand.value).detach()
        final = _final_weight(weight, operand, quantized.get(name), plan.qparams.get(name))
        if name in compensation:  # the branch already compensates part of the error
            final = final + compensation[name]
        dim = -1 if layer.op == "linear" else 1
        shift = output_shift(layer_fn(layer), means[value.name].value, weight, final, dim)
        key, bias, new = add_to_bias(program, layer, operand.value, shift)
        (plan.new_biases if new else plan.adjusted)[key] = bias
        plan.shifts[layer.node.name] = (shift, dim)
        plan.summary.append(f"bias correction {layer.node.name}: mean shift "
                            f"{float(shift.abs().mean()):.3g} (max {float(shift.abs().max()):.3g})")
    for name, tensor in quantized.items():
        plan.original[name] = program.weight(name).detach()
        program.replace_weight(name, tensor)
        plan.adjusted[name] = tensor


def _final_weight(weight: torch.Tensor, operand: Operand, quantized: torch.Tensor | None,
                  qparams: tuple[torch.Tensor, torch.Tensor | None] | None) -> torch.Tensor:
    """The weight the program will compute with: GPTQ's, or the fake-quant of ``weight`` with
    the chosen (AWQ's clipped) or min-max qparams."""
    if quantized is not None:
        return quantized
    scale, zero_point = qparams or minmax_qparams(weight, operand.block_size, operand.spec)
    return fake_quantize(weight, operand.block_size, operand.spec, scale, zero_point)


def plan_weights(program: Program, layers: Sequence[Layer], batches: Sequence[Any],
                 algorithm: str, options: dict[str, Any], bias_correction: bool,
                 eora_rank: int = 0) -> WeightPlan:
    """Run the algorithms (module docstring) on ``program`` in place; what they decided."""
    plan = WeightPlan()
    if algorithm == "awq":
        _awq(program, layers, batches, options, plan)
        if options["clip"] or options["refine"]:
            _awq_clip(program, layers, batches, options, plan)
    if algorithm == "gptq" or bias_correction or eora_rank:
        gptq_options = options if algorithm == "gptq" else {}
        _gptq_and_bias(program, layers, batches, algorithm if algorithm == "gptq" else "",
                       gptq_options, bias_correction, eora_rank, plan)
    return plan
