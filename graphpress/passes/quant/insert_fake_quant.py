"""insert_fake_quant: quantize-dequantize the weights and activations of a Program's layers.

For every layer :mod:`placement <graphpress.passes.quant.placement>` finds, each selected operand
``v`` of the layer is replaced by

    fake_quantize_affine(v, block_size, scale, zero_point, quant_min, quant_max, dtype)

(the ``graphpress::`` op; see ``docs/ops/quant.md``), so the layer computes on the values the
quantized model will see. Where the qparams come from:

* weights: the min and max of each block of the stored weight (``qparams_from_minmax``: the
  grid includes 0; symmetric grids use ``max(|min|, |max|)``), stored as buffers next to it;
* static activations: an observer per quantized value (min-max, moving average, percentile,
  MSE, entropy: ``spec.observer``) run over ``calibration_data`` with the calibration runner,
  before any fake-quant is inserted; the qparams are stored as buffers;
* dynamic activations: ``choose_qparams_affine`` in the graph, on every call.

Contract (``reference``): the output equals the input program run with each quantized operand
passed through the independent reference ``graphpress.testing.quant_reference`` (plain
PyTorch, not the pass's ops) with the same qparams, at fp32 tolerance. The report also shows
the deviation from the float program (SQNR, cosine, top-1 agreement), and per layer the scheme,
the range and the weight's SQNR. It must run after ``fold_bn``, ``prune_channels``,
``smooth_quant`` and ``equalize`` (quantizing weights that are folded, pruned or rescaled
afterwards would quantize the wrong values).

Weight algorithms (``algorithm='gptq' | 'awq'``, ``bias_correction=True``, ``eora_rank=r``;
:mod:`~graphpress.passes.quant.weight_algorithms`) change the weights on calibration data
before the fake-quant goes in: AWQ folds scales into the producers and picks clipped qparams,
GPTQ stores its quantized weights with their qparams, bias correction adds the mean output
shift to the biases, EoRA adds a float rank-r branch beside each quantized linear. The
contract stays the same statement about the same weights: the reference
(:mod:`~graphpress.passes.quant.algorithm_reference`) runs the input program with the
algorithms' final weights (and EoRA's branches) through the independent quantize-dequantize,
and AWQ's folding, an exact rewrite, is checked exactly on its own first.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch.fx import Node

from graphpress.errors import InputError
from graphpress.ir.builder import GraphBuilder
from graphpress.ir.program import Program
from graphpress.numerics import output_metrics
from graphpress.pipeline.base import Contract, Pass, PassContext, PassResult
from graphpress.pipeline.registry import register_pass
from graphpress.quant.config import QuantConfig, scheme
from graphpress.quant.spec import QuantSpec, block_minmax

__all__ = ["InsertFakeQuant"]


def _sqnr_db(quantized: torch.Tensor, reference: torch.Tensor) -> float:
    return output_metrics(quantized, reference, ("sqnr_db",))["sqnr_db"]

_SCHEME_ARGS = {"group_size": ("int4_weight_only", "int3_weight_only", "w4a8"),
                "observer": ("int8_static", "fp8")}


@dataclass(frozen=True)
class _Quantized:
    """What the reference needs to know of one inserted fake-quant."""

    layer: str
    index: int
    role: str
    value: str
    block_size: tuple[int | None, ...]  # None: a symbolic (dynamic) dim, the whole of it
    spec: QuantSpec
    scale: torch.Tensor | None      # None when dynamic
    zero_point: torch.Tensor | None
    position: int | None = None     # index in the list argument (cat's tensors)


def _replace_operand(node: Node, operand: Any, value: Node) -> None:
    if operand.position is None:
        node.update_arg(operand.index, value)
        return
    items = list(node.args[operand.index])
    items[operand.position] = value
    node.update_arg(operand.index, items)


def _group_note(operand: Any, groups: dict[str, int]) -> str:
    group = groups.get(operand.value.name)
    if group is None or operand.role != "activation":
        return ""
    size = sum(1 for g in groups.values() if g == group)
    return f", qparams shared by group {group} ({size} values)"


@register_pass("insert_fake_quant")
@dataclass
class InsertFakeQuant(Pass):
    """Replaces the weights and activations of conv / linear / matmul layers with their
    quantize-dequantize (fake-quant)."""

    config: QuantConfig | None = None
    scheme: str = "int8_static"
    group_size: int | None = None
    observer: str | None = None
    skip: tuple[str, ...] = ()
    calibration_batches: int | None = None
    attention: bool | None = None                 # QuantConfig.attention
    shared_qparams: tuple[str, ...] | None = None  # QuantConfig.shared_qparams
    algorithm: str = "rtn"                        # "rtn" | "gptq" | "awq" (weight_algorithms)
    algorithm_options: dict[str, Any] | None = None  # e.g. {"act_order": True} for gptq
    bias_correction: bool = False                 # fold the mean output shift into biases
    eora_rank: int = 0                            # rank of EoRA's error-compensating branch

    contract = Contract.against_reference(
        "equal to the input program with each quantized tensor passed through the independent "
        "quantize-dequantize reference (graphpress.testing.quant_reference), same qparams",
        report_vs_input=("sqnr_db", "cosine", "top1_agreement"))
    rewrites_weights = True
    runs_after = ("fold_bn", "prune_channels", "smooth_quant", "equalize")

    def __post_init__(self) -> None:
        self._options = self._algorithm_options()
        if self.config is not None:
            if not isinstance(self.config, QuantConfig):
                raise InputError(f"config must be a gp.quant.QuantConfig, got "
                                 f"{type(self.config).__name__}; or pass scheme='int8_static'")
            self._config = self._placement(self.config.with_overrides(skip=self.skip))
            return
        kwargs: dict[str, Any] = {}
        for name, schemes in _SCHEME_ARGS.items():
            value = getattr(self, name)
            if value is not None:
                if self.scheme not in schemes:
                    raise ValueError(f"{name}= applies to the schemes {', '.join(schemes)}, "
                                     f"not {self.scheme!r}")
                kwargs[name] = value
        self._config = self._placement(scheme(self.scheme, skip=list(self.skip), **kwargs))

    def _uses_data(self) -> bool:
        return self.algorithm != "rtn" or self.bias_correction or self.eora_rank > 0

    def _algorithm_options(self) -> dict[str, Any]:
        from graphpress.passes.quant.weight_algorithms import ALGORITHMS, CHOICES, OPTIONS

        if self.eora_rank < 0:
            raise ValueError(f"eora_rank must be >= 0 (0: no low-rank branch), got "
                             f"{self.eora_rank}")
        if self.algorithm not in ALGORITHMS:
            raise ValueError(f"unknown algorithm {self.algorithm!r}; known: "
                             f"{', '.join(ALGORITHMS)}")
        given = dict(self.algorithm_options or {})
        accepted = OPTIONS[self.algorithm]
        unknown = sorted(set(given) - set(accepted))
        if unknown:
            raise ValueError(f"algorithm {self.algorithm!r} does not take "
                             f"{', '.join(unknown)}; it accepts: "
                             f"{', '.join(accepted) or 'no options'}")
        for name, choices in CHOICES.items():
            if name in given and given[name] not in choices:
                raise ValueError(f"algorithm option {name}={given[name]!r} is not one of "
                                 f"{', '.join(map(repr, choices))}")
        damp = given.get("damp", 0.0)
        if damp != "auto" and (isinstance(damp, bool) or not isinstance(damp, int | float)
                               or damp < 0):
            raise ValueError(f"algorithm option damp={damp!r} is neither a number >= 0 nor "
                             "'auto' (chosen by cross-validation over the calibration batches)")
        refine = given.get("refine", 0)
        if isinstance(refine, bool) or not isinstance(refine, int) or refine < 0:
            raise ValueError(f"algorithm option refine={refine!r} is not a step count >= 0 "
                             "(0: keep the clipping search's grids)")
        return {**accepted, **given}

    def _placement(self, config: QuantConfig) -> QuantConfig:
        changes = {name: value for name in ("attention", "shared_qparams")
                   if (value := getattr(self, name)) is not None}
        return replace(config, **changes) if changes else config

    def describe(self) -> str:
        if self.config is not None:
            return f"{self.name}({self._config.describe()})"
        return super().describe()

    def run(self, program: Program, ctx: PassContext) -> PassResult:
        from graphpress.passes.quant.calibrate import activation_qparams
        from graphpress.passes.quant.weight_algorithms import WeightPlan, plan_weights

        layers, skipped, groups = self._place(program)
        batches = ctx.calibration_data[: self.calibration_batches]
        plan = WeightPlan()
        if self._uses_data():
            plan = plan_weights(program, layers, batches, self.algorithm, self._options,
                                self.bias_correction, self.eora_rank)
            skipped = skipped + plan.skipped
        static = [op for layer in layers for op in layer.operands
                  if op.role == "activation" and not op.spec.dynamic]
        activation_qp = activation_qparams(program, static, batches, groups) if static else {}
        inserted: dict[tuple[Any, ...], tuple[Node, _Quantized]] = {}
        records: list[_Quantized] = []
        summary: list[str] = []
        for layer in layers:
            for operand in layer.operands:
                key = (operand.value, operand.spec, tuple(operand.block_size))
                if key not in inserted:  # one fake-quant per value and spec, shared by layers
                    fq, record, line = self._insert(program, layer, operand, activation_qp,
                                                    plan)
                    inserted[key] = (fq, record)
                    summary.append(line + _group_note(operand, groups))
                fq, record = inserted[key]
                _replace_operand(operand.layer, operand, fq)
                records.append(_Quantized(operand.layer.name, operand.index, operand.role,
                                          operand.value.name, tuple(operand.block_size),
                                          operand.spec, record.scale, record.zero_point,
                                          operand.position))
        stats = {"layers": len(layers), "weights": sum(r.role == "weight" for r in records),
                 "activations": sum(r.role == "activation" for r in records),
                 "calibration_batches": len(batches) if static else 0,
                 "not_quantized": len(skipped)}
        if groups:
            stats["shared_qparam_groups"] = len(set(groups.values()))
        if self._uses_data():
            stats.update({"gptq_layers": sum(n in plan.original for n in plan.qparams),
                          "awq_folded_weights": len(plan.folded),
                          "bias_corrected": len(plan.shifts), "eora_layers": len(plan.low_rank)})
        details = {"quantized": records, "summary": summary + plan.summary,
                   "config": self._config.describe(), "weight_plan": plan}
        return PassResult(bool(records), stats, skipped, details)

    def _place(self, program: Program) -> tuple[list[Any], list[Any], dict[str, int]]:
        """The layers (with attention products and shared-qparam ops when configured), the
        refusals, and the shared-qparam groups (value name -> group id)."""
        from graphpress.passes.quant.attention import attention_layers
        from graphpress.passes.quant.placement import find_layers
        from graphpress.passes.quant.sharing import shared_groups

        layers, skipped = find_layers(program, self._config)
        groups: dict[str, int] = {}
        if self._config.attention:
            extra, refused = attention_layers(program, self._config,
                                              {layer.node for layer in layers})
            layers, skipped = layers + extra, skipped + refused
        if self._config.shared_qparams:
            extra, groups, refused = shared_groups(program, self._config)
            layers, skipped = layers + extra, skipped + refused
        return layers, skipped, groups

    def _insert(self, program: Program, layer: Any, operand: Any,
                activation_qp: dict[tuple[str, QuantSpec], tuple[torch.Tensor, Any]],
                plan: Any) -> tuple[Node, _Quantized, str]:
        from graphpress.ops.quant import qparams_from_minmax

        spec: QuantSpec = operand.spec
        qmin, qmax = spec.qrange()
        value: Node = operand.value
        where = layer.module or layer.node.name
        with GraphBuilder(program, anchor=operand.layer, pass_name=self.name) as build:
            # a symbolic (dynamic) block length is the dim's size, read in the graph
            block_args = [b if b is not None else build.call(torch.ops.aten.sym_size.int,
                                                              value, dim)
                          for dim, b in enumerate(operand.block_size)]
            if spec.dynamic:
                qparams = build.call(torch.ops.graphpress.choose_qparams_affine.default, value,
                                     block_args, float(qmin), float(qmax),
                                     spec.symmetric, spec.dtype)
                scale_node = build.call(operator.getitem, qparams, 0)
                zp_node = (None if spec.symmetric
                           else build.call(operator.getitem, qparams, 1))
                scale = zero_point = None
                line = f"{where} ({layer.op}) {operand.role}: {spec.describe()}"
            else:
                if operand.role == "weight":
                    name = program.weight_name(value)
                    tensor = program.weight(value).detach()
                    low, high = block_minmax(plan.original.get(name, tensor), operand.block_size)
                    scale, zero_point = plan.qparams.get(name) or qparams_from_minmax(
                        low, high, qmin, qmax, spec.symmetric, spec.dtype,
                        signed_scale=spec.signed_scale)
                else:
                    scale, zero_point = activation_qp[(value.name, spec)]
                    low, high = None, None
                zero_point = None if spec.symmetric or spec.is_float else zero_point
                base = f"{where}.{value.name}_{operand.role}" if where else value.name
                scale_node = build.weight(program.free_weight_name(f"{base}_scale"), scale,
                                          kind="buffer")
                zp_node = (None if zero_point is None else
                           build.weight(program.free_weight_name(f"{base}_zero_point"),
                                        zero_point, kind="buffer"))
                line = f"{where} ({layer.op}) {operand.role}: {spec.describe()}"
                if operand.role == "weight":
                    fq_value = torch.ops.graphpress.fake_quantize_affine(
                        tensor, list(operand.block_size), scale, zero_point, float(qmin),
                        float(qmax), spec.dtype)
                    line += (f", range [{float(low.min()):.4g}, {float(high.max()):.4g}], "
                             f"SQNR {_sqnr_db(fq_value, plan.original.get(name, tensor)):.1f} "
                             "dB")
                else:
                    line += f", scale {float(scale.min()):.4g}..{float(scale.max()):.4g}"
            fq = build.call(torch.ops.graphpress.fake_quantize_affine.default, value,
                            block_args, scale_node, zp_node, float(qmin),
                            float(qmax), spec.dtype)
        record = _Quantized(operand.layer.name, operand.index, operand.role, value.name,
                            tuple(operand.block_size), spec, scale, zero_point)
        return fq, record, line

    def reference(self, before: Program, result: PassResult) -> Any:
        from graphpress.passes.quant.algorithm_reference import AlgorithmReference
        from graphpress.passes.quant.reference import QuantizedReference

        plan = result.details.get("weight_plan")
        if plan is not None and (plan.adjusted or plan.new_biases or plan.low_rank):
            contract = self.contract
            return AlgorithmReference(before, result.details["quantized"], plan, contract.rtol,
                                      contract.atol)
        return QuantizedReference(before, result.details["quantized"])

