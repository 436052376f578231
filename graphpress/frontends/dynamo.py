"""Dynamo frontend: graphpress as a ``torch.compile`` backend.

``torch.compile(model, backend="graphpress", options={"passes": "dce, cse"})`` sends every graph
Dynamo captures to :func:`graphpress_backend`, which exports it with ``torch.export``
(non-strict) into a Program, runs the pass pipeline and returns a callable that Dynamo calls
with the graph's positional arguments. Options: ``passes`` (a pipeline), ``verify`` (check each
pass's contract on the example inputs), ``freeze`` and ``fallback`` (see below).

Invariants:

* Dynamo passes the module's parameters and buffers as runtime inputs. Without ``freeze`` they
  stay user inputs of the Program, so later weight updates are seen, and passes that rewrite
  weights (``Pass.rewrites_weights``) are refused with a PipelineError.
* With ``freeze=True`` they become weights of the Program (copies, named by module path such as
  ``l.weight``), weight-rewriting passes see them, and the returned callable ignores those
  runtime inputs: later updates to the model's weights are not seen (inference only, like
  Inductor's freezing). The model's own tensors are never modified.
* Sizes Dynamo made symbolic (it does so when it recompiles for another shape) are exported as
  dynamic dimensions, so a compiled graph runs at every size Dynamo's guards send to it; a
  symbolic int read off an input's size is recomputed from that input.
* Each graph is compiled on its own: a graph break gives several graphs, a recompile a new one,
  and each returned callable carries its own Report as ``.graphpress_report``.
* A graph that cannot be exported raises TraceError, unless ``fallback=True``: then the graph
  runs as Dynamo captured it, without passes.
"""

from __future__ import annotations

import inspect
import keyword
import logging
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.export import Dim
from torch.fx.experimental.symbolic_shapes import is_concrete_int

from graphpress.errors import PipelineError, TraceError
from graphpress.frontends.export import program_from_exported
from graphpress.ir.program import Program
from graphpress.passes.base import Fixpoint, Pass, PassContext
from graphpress.passes.manager import PassManager
from graphpress.passes.registry import build_pipeline
from graphpress.passes.report import Report

__all__ = ["OPTIONS", "DynamoCompiled", "graphpress_backend"]

log = logging.getLogger(__name__)

OPTIONS: dict[str, Any] = {"passes": None, "verify": False, "freeze": False, "fallback": False}
_GRAPH = "_dynamo_graph"
_ROOT = re.compile(r"(L|G)\['([^']*)'\]")
_PART = re.compile(r"\._(?:modules|parameters|buffers)\['([^']*)'\]|\.(\w+)|\[(\d+)\]")


def _name(source: Any) -> str | None:
    name = getattr(source, "name", None)
    return str(name() if callable(name) else name) if name is not None else None


def _weight(source: str | None) -> tuple[str, str] | None:
    """``L['self']._modules['l']._parameters['weight']`` -> ``("l.weight", "parameter")``."""
    root = _ROOT.match(source or "")
    leaf = re.search(r"\._(parameters|buffers)\['[^']*'\]$", source or "")
    if root is None or leaf is None:
        return None
    parts = [] if root.group(1) == "L" else [root.group(2)]
    for match in _PART.finditer(source or "", root.end()):
        parts.append(next(g for g in match.groups() if g is not None))
    return ".".join(re.sub(r"\W", "_", p) or "_" for p in parts), leaf.group(1)[:-1]


@dataclass
class _Plan:
    """How the wrapper feeds each placeholder of the Dynamo graph."""

    count: int
    user: list[int] = field(default_factory=list)                 # from the wrapper's args
    weights: dict[int, tuple[str, str]] = field(default_factory=dict)   # (path, kind)
    sizes: dict[int, tuple[int, str, int]] = field(default_factory=dict)  # (tensor, method, dim)


def _make_plan(gm: torch.fx.GraphModule, freeze: bool) -> _Plan:
    nodes = [n for n in gm.graph.nodes if n.op == "placeholder"]
    sources = [getattr(n.meta.get("grapharg"), "source", None) for n in nodes]
    index = {_name(s): i for i, s in enumerate(sources) if s is not None}
    plan, paths = _Plan(len(nodes)), set()
    for i, source in enumerate(sources):
        weight = _weight(_name(source)) if freeze else None
        prop = getattr(getattr(source, "prop", None), "name", "")
        base = index.get(_name(getattr(source, "base", None)))
        if weight is not None:
            path, suffix = weight[0], 1
            while path in paths or any(p.startswith(path + ".") for p in paths):
                path, suffix = f"{weight[0]}_{suffix}", suffix + 1
            paths.add(path)
            plan.weights[i] = (path, weight[1])
        elif prop in ("SIZE", "STRIDE") and base is not None and base != i:
            plan.sizes[i] = (base, prop.lower(), int(source.idx))
        else:
            plan.user.append(i)
    plan.sizes = {i: s for i, s in plan.sizes.items() if s[0] not in plan.sizes}
    return plan


class _Wrapper(torch.nn.Module):
    """Runs the Dynamo graph: user inputs from arguments, frozen weights from attributes."""

    def __init__(self, gm: torch.fx.GraphModule, plan: _Plan,
                 example_inputs: Sequence[Any]) -> None:
        super().__init__()
        self.add_module(_GRAPH, gm)
        self.plan = plan
        for i, (path, kind) in plan.weights.items():
            *parents, leaf = path.split(".")
            owner: torch.nn.Module = self
            for part in parents:
                if not isinstance(getattr(owner, part, None), torch.nn.Module):
                    owner.add_module(part, torch.nn.Module())
                owner = getattr(owner, part)
            value = example_inputs[i]
            tensor = value.detach().clone()
            if kind == "parameter":
                owner.register_parameter(
                    leaf, torch.nn.Parameter(tensor, requires_grad=value.requires_grad))
            else:
                owner.register_buffer(leaf, tensor)

        params = [inspect.Parameter(name, inspect.Parameter.POSITIONAL_ONLY)
                  for name in _input_names(gm, plan)]

        def forward(*args: Any) -> Any:  # with a signature naming the graph's inputs
            return self.run(*args)
        forward.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
        self.forward = forward

    def run(self, *args: Any) -> Any:
        values: list[Any] = [None] * self.plan.count
        for i, value in zip(self.plan.user, args, strict=True):
            values[i] = value
        for i, (path, kind) in self.plan.weights.items():
            values[i] = self.get_parameter(path) if kind == "parameter" else self.get_buffer(path)
        for i, (tensor, method, dim) in self.plan.sizes.items():
            values[i] = getattr(values[tensor], method)(dim)
        with torch.fx.traceback.preserve_node_meta():  # keep Dynamo's stack traces
            return torch.fx.Interpreter(getattr(self, _GRAPH)).run(*values)


def _input_names(gm: torch.fx.GraphModule, plan: _Plan) -> list[str]:
    """Readable, unique names for the user inputs: ``x`` for ``L['x']``."""
    nodes = [n for n in gm.graph.nodes if n.op == "placeholder"]
    names: list[str] = []
    for i in plan.user:
        source = _name(getattr(nodes[i].meta.get("grapharg"), "source", None)) or ""
        local = re.fullmatch(r"L\['(\w+)'\]", source)
        name = local.group(1) if local else re.sub(r"\W", "_", nodes[i].name).strip("_").lower()
        name = name if name.isidentifier() and not keyword.iskeyword(name) else f"arg_{name}"
        while name in names or name == "self":
            name += "_"
        names.append(name)
    return names


def _concrete(value: Any) -> Any:
    """A real example value for export: SymInts from Dynamo become their hint."""
    if isinstance(value, torch.SymInt | torch.SymFloat | torch.SymBool):
        return value.node.hint
    return value


def _dynamic_shapes(gm: torch.fx.GraphModule, plan: _Plan) -> tuple[Any, ...] | None:
    nodes = [n for n in gm.graph.nodes if n.op == "placeholder"]
    specs: list[Any] = []
    for i in plan.user:
        val = nodes[i].meta.get("example_value", nodes[i].meta.get("val"))
        if isinstance(val, torch.Tensor):
            dims = {d: Dim.DYNAMIC for d, s in enumerate(val.shape) if not is_concrete_int(s)}
            specs.append(dims or None)
        else:
            specs.append(Dim.DYNAMIC if isinstance(val, torch.SymInt) else None)
    return tuple(specs) if any(s is not None for s in specs) else None


class DynamoCompiled:
    """What the backend returns: called by Dynamo with the graph's positional arguments.

    ``program`` is the rewritten Program (None after a fallback), ``graphpress_report`` what
    the pipeline did (its ``extra["fallback"]`` says why a graph was not compiled).
    """

    def __init__(self, fn: Callable[..., Any], user: list[int], report: Report,
                 program: Program | None = None) -> None:
        self.program = program
        self.graphpress_report = report
        self._fn = fn
        self._user = user

    def __call__(self, *args: Any) -> Any:
        return self._fn(*(args[i] for i in self._user))


def _check_options(options: dict[str, Any] | None) -> dict[str, Any]:
    options = dict(options or {})
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise PipelineError(
            f"unknown graphpress backend option(s) {', '.join(map(repr, unknown))}; accepted "
            f"keys: {', '.join(OPTIONS)}")
    return {**OPTIONS, **options}


def _check_weight_passes(pipeline: list[Pass | Fixpoint], freeze: bool) -> None:
    flat = [p for item in pipeline
            for p in (item.passes if isinstance(item, Fixpoint) else [item])]
    rewriting = sorted({p.name for p in flat if p.rewrites_weights})
    if rewriting and not freeze:
        raise PipelineError(
            f"pass(es) {', '.join(rewriting)} rewrite weights, but under torch.compile the "
            "module's parameters and buffers are runtime inputs, so their values are unknown "
            "here. Use gp.compile(model, ...) for weight rewrites, or options={'freeze': True} "
            "to treat the module's parameters and buffers as constants (inference only: later "
            "updates to the weights are not seen, like Inductor's freezing).")


def graphpress_backend(gm: torch.fx.GraphModule, example_inputs: Sequence[Any],
                       options: dict[str, Any] | None = None) -> Any:
    """The ``torch.compile`` backend ``"graphpress"``; see the module docstring."""
    # Dynamo's TracingContext carries its fake mode and shape env; export and the passes must
    # use their own, or their guards would end up among Dynamo's guards for the frame.
    with torch._guards.tracing(None):
        return _compile(gm, example_inputs, options)


def _compile(gm: torch.fx.GraphModule, example_inputs: Sequence[Any],
             options: dict[str, Any] | None) -> Any:
    opts = _check_options(options)
    pipeline = build_pipeline(opts["passes"])
    _check_weight_passes(pipeline, bool(opts["freeze"]))
    plan = _make_plan(gm, bool(opts["freeze"]))
    args = tuple(_concrete(example_inputs[i]) for i in plan.user)
    start = time.perf_counter()
    try:
        wrapper = _Wrapper(gm, plan, example_inputs)
        ep = torch.export.export(wrapper, args, dynamic_shapes=_dynamic_shapes(gm, plan),
                                 strict=False)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        if opts["fallback"]:
            log.debug("graphpress: export failed (%s); running the Dynamo graph as is", exc)
            report = Report(frontend="dynamo", backend="eager", extra={
                "fallback": f"export failed: {type(exc).__name__}: {first}"})
            return DynamoCompiled(gm, list(range(len(example_inputs))), report)
        raise TraceError(
            f"torch.export could not trace a graph Dynamo captured ({len(gm.graph.nodes)} "
            f"nodes), so graphpress cannot rewrite it. Pass options={{'fallback': True}} to run "
            f"such graphs as captured (without passes), or use gp.compile(model, ...).\n"
            f"cause: {type(exc).__name__}: {first}") from exc
    program = program_from_exported(ep, frontend="dynamo", inplace=bool(opts["freeze"]))
    report = Report(frontend="dynamo", backend="eager",
                    trace_seconds=time.perf_counter() - start)
    context = PassContext(example_inputs=args, frontend="dynamo", options=opts)
    manager = PassManager(pipeline, verify=bool(opts["verify"]), samples=[(args, {})],
                          context=context)
    manager.run(program, report)
    log.debug("graphpress: compiled a Dynamo graph\n%s", report)
    return DynamoCompiled(program, plan.user, report, program)
