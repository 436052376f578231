"""Dynamo frontend: graphpress as the ``torch.compile`` backend ``"graphpress"``.

Each graph Dynamo captures is exported (``torch.export``, non-strict) into a Program, rewritten
by the pipeline, and returned as a callable taking the graph's positional arguments. Options:
``passes``, ``verify`` (check each pass's contract on the example inputs), ``freeze`` and
``fallback``. Nothing is logged above DEBUG. Invariants:

* Dynamo passes the module's parameters and buffers as runtime inputs. Without ``freeze`` they
  stay user inputs of the Program (weight updates are seen) and passes with
  ``rewrites_weights`` are refused with a PipelineError.
* ``freeze=True`` (inference only, like Inductor's freezing) makes copies of them weights of
  the Program, named by module path (``l.weight``); the callable ignores those runtime inputs,
  so later weight updates, and running statistics updated in training mode, are not seen. The
  model's own tensors are never modified.
* Sizes Dynamo made symbolic (on a recompile for another shape, or ``dynamic=True``) are
  exported as dynamic dimensions; a symbolic int read off an input's size is recomputed from
  it. Python scalars Dynamo passes as tensors (floats under ``dynamic=True``) are specialized:
  another value builds another Program (at most ``MAX_SCALAR_VARIANTS``).
* Graphs are compiled independently (a graph break gives several, a recompile a new one); each
  callable carries its ``.program`` and its Report as ``.graphpress_report``.
* A graph that cannot be exported raises TraceError, or with ``fallback=True`` runs as Dynamo
  captured it, without passes (the report's ``extra["fallback"]`` says why).
"""

from __future__ import annotations

import inspect
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
from graphpress.pipeline.base import Fixpoint, Pass, PassContext
from graphpress.pipeline.manager import PassManager
from graphpress.pipeline.registry import build_pipeline
from graphpress.pipeline.report import Report

__all__ = ["MAX_SCALAR_VARIANTS", "OPTIONS", "DynamoCompiled", "graphpress_backend"]

log = logging.getLogger(__name__)

OPTIONS: dict[str, Any] = {"passes": None, "verify": False, "freeze": False, "fallback": False}
MAX_SCALAR_VARIANTS = 8
_ROOT = re.compile(r"(L|G)\['([^']*)'\]")
_PART = re.compile(r"\._(?:modules|parameters|buffers)\['([^']*)'\]|\.(\w+)|\[(\d+)\]")


def _name(source: Any) -> str:
    """Dynamo's name of a source (``L['x']``); a node stands for the source of its input."""
    if isinstance(source, torch.fx.Node):
        source = getattr(source.meta.get("grapharg"), "source", None)
    name = getattr(source, "name", "")
    return str(name() if callable(name) else name)


def _weight(source: str) -> tuple[str, str] | None:
    """``L['self']._modules['l']._parameters['weight']`` -> ``("l.weight", "parameter")``."""
    root, leaf = _ROOT.match(source), re.search(r"\._(parameters|buffers)\['[^']*'\]$", source)
    if root is None or leaf is None:
        return None
    parts = [] if root.group(1) == "L" else [root.group(2)]
    parts += [next(g for g in m.groups() if g is not None)
              for m in _PART.finditer(source, root.end())]
    return ".".join(re.sub(r"\W", "_", p) or "_" for p in parts), leaf.group(1)[:-1]


@dataclass
class _Plan:
    """How the wrapper feeds each placeholder of the Dynamo graph."""

    nodes: list[torch.fx.Node]
    user: list[int] = field(default_factory=list)                        # wrapper arguments
    weights: dict[int, tuple[str, str]] = field(default_factory=dict)    # (path, kind)
    sizes: dict[int, tuple[int, str, int]] = field(default_factory=dict)  # (tensor, method, dim)
    scalars: list[int] = field(default_factory=list)                     # specialized scalars


def _make_plan(gm: torch.fx.GraphModule, freeze: bool) -> _Plan:
    plan = _Plan([n for n in gm.graph.nodes if n.op == "placeholder"])
    index = {_name(n): i for i, n in enumerate(plan.nodes) if _name(n)}
    paths: set[str] = set()
    for i, node in enumerate(plan.nodes):
        source = getattr(node.meta.get("grapharg"), "source", None)
        weight = _weight(_name(node)) if freeze else None
        prop = getattr(getattr(source, "prop", None), "name", "")
        base = index.get(_name(getattr(source, "base", None)))
        if weight is not None:
            path, n = weight[0], 0
            while any(f"{p}.".startswith(f"{path}.") or f"{path}.".startswith(f"{p}.")
                      for p in paths):
                n += 1
                path = f"{weight[0]}_{n}"
            paths.add(path)
            plan.weights[i] = (path, weight[1])
        elif prop in ("SIZE", "STRIDE") and base is not None and base != i:
            plan.sizes[i] = (base, prop.lower(), int(source.idx))
        elif getattr(node.meta.get("grapharg"), "pass_arg_as_tensor", False):
            plan.scalars.append(i)
        else:
            plan.user.append(i)
    return plan


def _input_names(plan: _Plan) -> list[str]:
    """Readable, unique names for the user inputs: ``x`` for ``L['x']``, ``l_weight``."""
    names: list[str] = []
    for i in plan.user:
        source = _name(plan.nodes[i])
        local, weight = re.fullmatch(r"L\['(\w+)'\]", source), _weight(source)
        name = local.group(1) if local else weight[0] if weight else plan.nodes[i].name
        name = re.sub(r"\W", "_", name).strip("_")
        name = name if name.isidentifier() else f"arg_{name}"
        while name in names or name == "self":
            name += "_"
        names.append(name)
    return names


class _Wrapper(torch.nn.Module):
    """Runs the Dynamo graph: user inputs from arguments, frozen weights from attributes."""

    def __init__(self, gm: torch.fx.GraphModule, plan: _Plan, inputs: Sequence[Any]) -> None:
        super().__init__()
        self._gp_graph, self._gp_plan = gm, plan
        self._gp_scalars = {i: (inputs[i].item(), inputs[i].dtype) for i in plan.scalars}
        for i, (path, kind) in plan.weights.items():
            *parents, leaf = path.split(".")
            owner: torch.nn.Module = self
            for part in parents:
                if not isinstance(getattr(owner, part, None), torch.nn.Module):
                    owner.add_module(part, torch.nn.Module())
                owner = getattr(owner, part)
            tensor = inputs[i].detach().clone()
            if kind == "parameter":
                owner.register_parameter(
                    leaf, torch.nn.Parameter(tensor, requires_grad=inputs[i].requires_grad))
            else:
                owner.register_buffer(leaf, tensor)

        def forward(*args: Any) -> Any:  # its signature names the graph's inputs
            return self._gp_run(*args)
        forward.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
            [inspect.Parameter(n, inspect.Parameter.POSITIONAL_ONLY) for n in _input_names(plan)])
        self.forward = forward

    def _gp_run(self, *args: Any) -> Any:
        plan = self._gp_plan
        values: list[Any] = [None] * len(plan.nodes)
        for i, value in zip(plan.user, args, strict=True):
            values[i] = value
        for i, (path, kind) in plan.weights.items():
            values[i] = self.get_parameter(path) if kind == "parameter" else self.get_buffer(path)
        for i, (value, dtype) in self._gp_scalars.items():  # a constant: export folds .item()
            values[i] = torch.tensor(value, dtype=dtype)
        for i, (tensor, method, dim) in plan.sizes.items():
            values[i] = getattr(values[tensor], method)(dim)
        with torch.fx.traceback.preserve_node_meta():  # keep Dynamo's stack traces
            return _Runner(self._gp_graph).run(*values)


class _Runner(torch.fx.Interpreter):
    """Runs Dynamo's autocast enter/exit nodes as ``torch.autocast``, which export traces."""

    def call_function(self, target: Any, args: Any, kwargs: dict[str, Any]) -> Any:
        if target is torch.amp.autocast_mode._enter_autocast:
            mode = torch.autocast(*args, **kwargs)
            mode.__enter__()
            return mode
        if target is torch.amp.autocast_mode._exit_autocast:
            return args[0].__exit__(None, None, None)
        return super().call_function(target, args, kwargs)


def _tidy_module_stacks(graph: torch.fx.Graph) -> None:
    """Module paths as in the model: ``L['self'].blocks.0`` -> ``blocks.0``, ``G['m'].l`` ->
    ``m.l`` (what :meth:`Program.source_module` reports)."""
    for node in graph.nodes:
        for key, (path, kind) in list(node.meta.get("nn_module_stack", {}).items()):
            path = re.sub(r"^G\['([^']*)'\]", r"\1", re.sub(r"^L\['[^']*'\]\.?", "", path))
            node.meta["nn_module_stack"][key] = (path, kind)


def _dynamic_shapes(plan: _Plan) -> tuple[Any, ...] | None:
    specs: list[Any] = []
    for i in plan.user:
        val = plan.nodes[i].meta.get("example_value")
        if isinstance(val, torch.Tensor):
            dims = {d: Dim.DYNAMIC for d, s in enumerate(val.shape) if not is_concrete_int(s)}
            specs.append(dims or None)
        else:
            specs.append(Dim.DYNAMIC if isinstance(val, torch.SymInt) else None)
    return tuple(specs) if any(s is not None for s in specs) else None


class DynamoCompiled:
    """What the backend returns: Dynamo calls it with the graph's positional arguments.

    ``program`` is the rewritten Program (None after a fallback), ``graphpress_report`` what
    the pipeline did, ``variants`` the callables built for other values of scalar inputs.
    """

    def __init__(self, fn: Callable[..., Any], user: list[int], report: Report,
                 program: Program | None = None, scalars: dict[int, Any] | None = None,
                 rebuild: Callable[[tuple[Any, ...]], DynamoCompiled] | None = None) -> None:
        self.program, self.graphpress_report = program, report
        self.variants: dict[tuple[Any, ...], DynamoCompiled] = {}
        self._fn, self._user, self._scalars, self._rebuild = fn, user, scalars or {}, rebuild

    def __call__(self, *args: Any) -> Any:
        key = tuple(args[i].item() for i in self._scalars)
        if self._rebuild is not None and key != tuple(self._scalars.values()):
            if key not in self.variants:
                if len(self.variants) >= MAX_SCALAR_VARIANTS:
                    raise TraceError(
                        f"a scalar input of a graphpress-compiled graph took more than "
                        f"{MAX_SCALAR_VARIANTS} values; compile without dynamic=True so Dynamo "
                        "specializes it, or pass it as a tensor")
                self.variants[key] = self._rebuild(key)
            return self.variants[key](*args)
        return self._fn(*(args[i] for i in self._user))


def graphpress_backend(gm: torch.fx.GraphModule, example_inputs: Sequence[Any],
                       options: dict[str, Any] | None = None) -> DynamoCompiled:
    """The ``torch.compile`` backend ``"graphpress"``; see the module docstring."""
    unknown = sorted(set(options or {}) - set(OPTIONS))
    if unknown:
        raise PipelineError(f"unknown graphpress backend option(s) {', '.join(unknown)}; "
                            f"accepted keys: {', '.join(OPTIONS)}")
    opts = {**OPTIONS, **(options or {})}
    pipeline = build_pipeline(opts["passes"])
    flat = [p for item in pipeline for p in (item.passes if isinstance(item, Fixpoint) else [item])]
    rewriting = sorted({p.name for p in flat if p.rewrites_weights})
    if rewriting and not opts["freeze"]:
        raise PipelineError(
            f"pass(es) {', '.join(rewriting)} rewrite weights, which under torch.compile are "
            "runtime inputs of unknown value. Use gp.compile(model, ...) for weight rewrites, or "
            "options={'freeze': True} to treat the module's parameters and buffers as constants "
            "(inference only: later updates to the weights are not seen, like Inductor's "
            "freezing).")
    plan = _make_plan(gm, bool(opts["freeze"]))
    inputs = list(example_inputs)
    if plan.scalars and opts["freeze"]:  # variants must freeze the same weights
        inputs = [x.detach().clone() if i in plan.weights else x for i, x in enumerate(inputs)]
    return _build(gm, plan, inputs, opts, pipeline)


def _build(gm: torch.fx.GraphModule, plan: _Plan, inputs: list[Any], opts: dict[str, Any],
           pipeline: list[Pass | Fixpoint]) -> DynamoCompiled:
    args = tuple(x.node.hint if isinstance(x, torch.SymInt) else x
                 for x in (inputs[i] for i in plan.user))
    start = time.perf_counter()
    # Dynamo's TracingContext carries its fake mode and shape env: export and the passes must
    # use their own, or their guards would end up among Dynamo's guards for the frame.
    with torch._guards.tracing(None):
        try:
            wrapper = _Wrapper(gm, plan, inputs)
            ep = torch.export.export(wrapper, args, dynamic_shapes=_dynamic_shapes(plan),
                                     strict=False)
        except Exception as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            if not opts["fallback"]:
                raise TraceError(
                    f"torch.export could not trace a graph Dynamo captured "
                    f"({len(gm.graph.nodes)} nodes), so graphpress cannot rewrite it. Pass "
                    "options={'fallback': True} to run such graphs as captured (without "
                    f"passes), or use gp.compile(model, ...).\ncause: {type(exc).__name__}: "
                    f"{first}") from exc
            log.debug("graphpress: export failed (%s); running the Dynamo graph as is", exc)
            report = Report(frontend="dynamo", backend="eager",
                            extra={"fallback": f"export failed: {type(exc).__name__}: {first}"})
            return DynamoCompiled(gm, list(range(len(inputs))), report)
        _tidy_module_stacks(ep.graph)
        program = program_from_exported(ep, frontend="dynamo", inplace=bool(opts["freeze"]))
        report = Report(frontend="dynamo", backend="eager",
                        trace_seconds=time.perf_counter() - start)
        context = PassContext(example_inputs=args, frontend="dynamo", options=dict(opts))
        PassManager(pipeline, verify=bool(opts["verify"]), samples=[(args, {})],
                    context=context).run(program, report)
    log.debug("graphpress: compiled a Dynamo graph\n%s", report)

    def rebuild(values: tuple[Any, ...]) -> DynamoCompiled:
        new = list(inputs)
        for i, value in zip(plan.scalars, values, strict=True):
            new[i] = torch.tensor(value, dtype=inputs[i].dtype)
        return _build(gm, plan, new, opts, pipeline)
    scalars = {i: value for i, (value, _) in wrapper._gp_scalars.items()}
    return DynamoCompiled(program, plan.user, report, program, scalars,
                          rebuild if scalars else None)
