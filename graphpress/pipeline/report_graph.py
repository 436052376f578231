"""What the HTML report draws, recorded while the pipeline runs.

:class:`ReportCollector` is a PassManager instrumentation hook (``gp.compile`` installs one). It
records into the report:

* ``graphs``: the graph before the first pass (``{"record": None, "graph": ...}``) and after
  every pass that changed the program (``{"record": i, "graph": ..., "added": [...],
  "removed": [...], "changed": [...]}``, with ``i`` the index of the pass's record). A node is
  *added* or *removed* when its name appears only after or only before the pass, and *changed*
  when it appears in both and its op, target, input nodes or shape differ, or, for a weight's
  placeholder, when the pass stored a new tensor for the weight. A graph is a list of nodes
  ``{"n": name, "k": kind, "t": label, "s": shape, "m": module path, "p": pass that created
  it, "i": [input node names]}``, in graph order.
* ``charts``: the bytes of the program's weights (parameters, buffers, constants: packed
  weights count at their packed size) before and after every pass (``{"kind": "size",
  "record": i, "bytes": [before, after]}``); channels kept per pruning group (from a
  ``PrunePlan`` in the pass's details); tokens per block (a pass's
  ``details["tokens_per_block"]``: a list of ``{"block", "tokens_in", "tokens_out"}``, the
  tokens a block's attention sees and those left after its merge, as merge_tokens records,
  or a list of counts, or a dict of block name to count), and, for a pass that inserts
  quantization (fake-quantize nodes, or
  quantize -> dequantize pairs), one entry per quantized operand measured on the example
  inputs: SQNR ``10 log10(sum x^2 / sum (x - q(x))^2)`` between the operand ``x`` and its
  quantized value ``q(x)``, the observed range ``[min x, max x]`` and the representable range
  ``[(qmin - zp) * scale, (qmax - zp) * scale]`` (over all blocks).

Reading details goes by duck typing, so this layer imports no pass. Measuring quantization
runs the program once with :class:`graphpress.ir.runner.ProgramRunner`, which never changes
the program's state. The collector also shows a progress bar over the passes
(:mod:`graphpress.ir.progress`: on a terminal, once the pipeline has run a second;
``progress=False`` or ``GRAPHPRESS_PROGRESS=0`` turns it off).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
from torch.fx import Node

from graphpress.ir.printer import format_value
from graphpress.ir.progress import progress_bar
from graphpress.ir.purity import qualified_name
from graphpress.ir.runner import ProgramRunner

if TYPE_CHECKING:
    from graphpress.ir.program import Program
    from graphpress.pipeline.base import Pass
    from graphpress.pipeline.report import PassRecord, Report

__all__ = ["MAX_GRAPH_NODES", "ReportCollector", "snapshot", "weight_bytes"]

MAX_GRAPH_NODES = 20_000
"""Graphs with more nodes are not recorded (the report says so): the page stays loadable."""

# op -> positions of (scale, zero_point, quant_min, quant_max) among its arguments
_FAKE_QUANT_ARGS: dict[str, tuple[int, int, int, int]] = {
    "graphpress::fake_quantize_affine": (2, 3, 4, 5),
    "aten::fake_quantize_per_tensor_affine": (1, 2, 3, 4),
    "aten::fake_quantize_per_channel_affine": (1, 2, 4, 5),
}
_QUANTIZE, _DEQUANTIZE = "graphpress::quantize_affine", "graphpress::dequantize_affine"


def weight_bytes(program: Program) -> int:
    """Bytes of the program's parameters, buffers and constant tensors (the costs analysis)."""
    costs = program.analysis("costs")
    return int(costs.parameter_bytes + costs.buffer_bytes)


def _label(node: Node, weight: str | None) -> str:
    if weight is not None:
        return weight
    if node.op in ("placeholder", "output"):
        return node.name if node.op == "placeholder" else "output"
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        namespace, name = target.namespace, target._schema.name.split("::")[-1]
        overload = "" if target._overloadname == "default" else f".{target._overloadname}"
        return ("" if namespace == "aten" else f"{namespace}.") + name + overload
    return getattr(target, "__name__", str(target))


def snapshot(program: Program) -> list[dict[str, Any]]:
    """The graph as JSON-ready nodes (see the module docstring), in graph order."""
    nodes = []
    for node in program.graph.nodes:
        weight = program.weight_name(node) if node.op == "placeholder" else None
        if node.op == "placeholder":
            kind = program.input_kind(node)
            kind_name = "input" if weight is None else (kind.name.lower() if kind else "weight")
        else:
            kind_name = "output" if node.op == "output" else "op"
        nodes.append({"n": node.name, "k": kind_name, "t": _label(node, weight),
                      "s": format_value(node.meta.get("val")), "m": program.source_module(node),
                      "p": node.meta.get("graphpress_pass", ""),
                      "i": [a.name for a in node.all_input_nodes]})
    return nodes


def _changes(before: list[dict[str, Any]], after: list[dict[str, Any]],
             replaced: set[str]) -> tuple[list[str], list[str], list[str]]:
    old = {n["n"]: n for n in before}
    new = {n["n"]: n for n in after}
    added = [name for name in new if name not in old]
    removed = [name for name in old if name not in new]
    changed = [name for name, n in new.items() if name in old and (
        name in replaced or any(n[k] != old[name][k] for k in ("k", "t", "s", "i")))]
    return added, removed, changed


def _quant_sites(program: Program) -> list[tuple[Node, Node, Node, tuple[int, int, int, int]]]:
    """(operand, quantized value, node holding the qparams, qparam positions) per site."""
    sites = []
    for node in program.graph.nodes:
        name = qualified_name(node.target)
        if name in _FAKE_QUANT_ARGS and isinstance(node.args[0], Node):
            sites.append((node.args[0], node, node, _FAKE_QUANT_ARGS[name]))
        elif (name == _DEQUANTIZE and isinstance(node.args[0], Node)
              and qualified_name(node.args[0].target) == _QUANTIZE
              and isinstance(node.args[0].args[0], Node)):
            quantize = node.args[0]
            sites.append((quantize.args[0], node, quantize, (2, 3, 4, 5)))
    return sites


def _inserted_quantization(program: Program, pass_name: str) -> bool:
    """Whether the named pass created a fake-quantize or quantize node."""
    quant_ops = {*_FAKE_QUANT_ARGS, _QUANTIZE}
    return any(n.meta.get("graphpress_pass") == pass_name
               and qualified_name(n.target) in quant_ops for n in program.graph.nodes)


def _value(values: dict[str, Any], arg: Any) -> Any:
    return values.get(arg.name) if isinstance(arg, Node) else arg


def _sqnr_db(x: torch.Tensor, q: torch.Tensor) -> float | None:
    """None when ``q`` equals ``x`` exactly (infinite SQNR)."""
    x, q = x.detach().double(), q.detach().double()
    noise = float((x - q).pow(2).sum())
    if noise == 0.0:
        return None
    return 10 * math.log10(max(float(x.pow(2).sum()), 1e-300) / noise)


def quantization_operands(program: Program, args: tuple[Any, ...],
                          kwargs: dict[str, Any]) -> list[dict[str, Any]]:
    """One entry per quantized operand of ``program``, measured on one run of the inputs."""
    sites = _quant_sites(program)
    if not sites:
        return []
    wanted: set[str] = set()
    for operand, quantized, holder, positions in sites:
        wanted |= {operand.name, quantized.name}
        wanted |= {a.name for i in positions[:2] if isinstance(a := holder.args[i], Node)}
    values: dict[str, Any] = {}

    def keep(node: Node, value: Any) -> None:
        values[node.name] = value.detach() if isinstance(value, torch.Tensor) else value

    ProgramRunner(program, keep, nodes=wanted)(*args, **kwargs)
    entries = []
    for operand, quantized, holder, (s_at, zp_at, lo_at, hi_at) in sites:
        x, q = values.get(operand.name), values.get(quantized.name)
        scale = _value(values, holder.args[s_at])
        if not all(isinstance(t, torch.Tensor) and t.is_floating_point() for t in (x, q, scale)):
            continue
        zero_point = _value(values, holder.args[zp_at])
        zero = zero_point.double() if isinstance(zero_point, torch.Tensor) else float(
            zero_point or 0)
        low = (float(holder.args[lo_at]) - zero) * scale.double()
        high = (float(holder.args[hi_at]) - zero) * scale.double()
        weight = program.weight_name(operand) if operand.op == "placeholder" else None
        layer = next((u for u in quantized.users if u.op == "call_function"), quantized)
        where = program.source_module(layer) or layer.name
        entries.append({
            "label": f"{where} {'weight' if weight else 'input'}", "node": quantized.name,
            "layer": layer.name, "role": "weight" if weight else "activation",
            "sqnr_db": _sqnr_db(x, q),
            "observed": [float(x.min()), float(x.max())] if x.numel() else [0.0, 0.0],
            "representable": [float(torch.as_tensor(low).min()),
                              float(torch.as_tensor(high).max())],
            "scales": int(scale.numel())})
    return entries


def _pruning(details: dict[str, Any]) -> list[dict[str, Any]]:
    groups = getattr(details.get("plan"), "groups", None) or []
    out = []
    for group in groups:
        slices, size, keep = (getattr(group, k, None) for k in ("slices", "size", "keep"))
        if isinstance(size, int) and keep is not None:
            name = slices[0][0] if slices else "group"
            out.append({"name": str(name), "size": size, "kept": len(keep),
                        "coupled": max(len(slices or []) - 1, 0)})
    return out


def _tokens(details: dict[str, Any]) -> dict[str, Any]:
    """``{"blocks": {block: tokens after it}, "attention": {block: tokens it attends}}``
    (``attention`` only when the pass reports it), or {} when there is nothing to chart."""
    tokens = details.get("tokens_per_block")
    if isinstance(tokens, dict):
        return {"blocks": {str(k): int(v) for k, v in tokens.items()}}
    if not isinstance(tokens, list | tuple) or not tokens:
        return {}
    if all(isinstance(t, dict) and {"block", "tokens_in", "tokens_out"} <= t.keys()
           for t in tokens):
        return {"blocks": {str(t["block"]): int(t["tokens_out"]) for t in tokens},
                "attention": {str(t["block"]): int(t["tokens_in"]) for t in tokens}}
    return {"blocks": {f"block {i}": int(v) for i, v in enumerate(tokens)}}


class ReportCollector:
    """Instrumentation hook that records graphs and chart data into ``report``."""

    def __init__(self, report: Report, example: tuple[tuple[Any, ...], dict[str, Any]]
                 | None = None, *, progress: bool | None = None,
                 max_nodes: int = MAX_GRAPH_NODES) -> None:
        self.report = report
        self.example = example
        self.max_nodes = max_nodes
        self._offset = len(report.records)
        self._runs = 0
        self._last: list[dict[str, Any]] | None = None
        self._weights: dict[str, object] = {}
        self._bytes = 0
        self._progress = progress
        self._bar: Any = None

    def before_pass(self, pass_: Pass, program: Program, index: int) -> None:
        if self._last is None:
            self._start(program)
        if self._bar is not None:
            self._bar.set_postfix_str(pass_.name)
        self._weights = {**program.state_dict, **program.constants}
        self._bytes = weight_bytes(program)

    def _start(self, program: Program) -> None:
        if program.num_nodes() > self.max_nodes:
            self.report.extra["graph view"] = (
                f"not recorded: {program.num_nodes()} nodes, more than {self.max_nodes}")
            self._last = []
        else:
            self._last = snapshot(program)
            self.report.graphs.append({"record": None, "graph": self._last})
        self._bar = progress_bar(desc="passes", unit="pass", progress=self._progress)

    def after_pass(self, pass_: Pass, program: Program, record: PassRecord, index: int) -> None:
        position = self._offset + self._runs
        self._runs += 1
        if self._bar is not None:
            self._bar.update()
        self.report.charts.append({"kind": "size", "record": position,
                                   "bytes": [self._bytes, weight_bytes(program)]})
        if not record.changed:
            return
        if self._last:  # graphs are recorded (not over max_nodes)
            now = snapshot(program)
            current = {**program.state_dict, **program.constants}
            replaced = {node.name for node in program.nodes("placeholder")
                        if (name := program.weight_name(node)) is not None
                        and current.get(name) is not self._weights.get(name)}
            added, removed, changed = _changes(self._last, now, replaced)
            self.report.graphs.append({"record": position, "graph": now, "added": added,
                                       "removed": removed, "changed": changed})
            self._last = now
        self._charts(program, record, position)

    def _charts(self, program: Program, record: PassRecord, position: int) -> None:
        if groups := _pruning(record.details):
            self.report.charts.append({"kind": "pruning", "record": position,
                                       "groups": groups})
        if tokens := _tokens(record.details):
            self.report.charts.append({"kind": "tokens", "record": position, **tokens})
        if self.example is not None and _inserted_quantization(program, record.name):
            operands = quantization_operands(program, *self.example)
            if operands:
                self.report.charts.append({"kind": "quantization", "record": position,
                                           "operands": operands})

    def close(self) -> None:
        """End the progress bar (``gp.compile`` calls this after the pipeline)."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
