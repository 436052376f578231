"""Pass registry and pipeline parsing.

Passes register by name with ``@register_pass("name")``; third-party packages expose theirs in
the entry-point group ``graphpress.passes`` (``name = "module:PassClass"``), loaded on first
lookup. A pipeline is data: a list of Pass objects, names, or a string parsed as a Python-like
list of calls, ``"fold_bn, prune_channels(ratio=0.5), fixpoint(dce, cse, max_iterations=5)"``,
where arguments must be literals.
"""

from __future__ import annotations

import ast
import difflib
import inspect
from collections.abc import Callable, Iterable
from importlib.metadata import entry_points
from typing import Any, TypeVar

from graphpress.errors import PipelineError
from graphpress.pipeline.base import Fixpoint, Pass

__all__ = ["available_passes", "build_pipeline", "get_pass", "make_pass", "register_pass"]

ENTRY_POINT_GROUP = "graphpress.passes"
_REGISTRY: dict[str, type[Pass]] = {}
_entry_points_loaded = False
P = TypeVar("P", bound=type[Pass])
PipelineSpec = str | Iterable[Any] | None


def register_pass(name: str) -> Callable[[P], P]:
    """Class decorator: register a Pass subclass under ``name``."""
    if not name.isidentifier():
        raise ValueError(f"pass name must be an identifier, got {name!r}")

    def decorate(cls: P) -> P:
        if not (isinstance(cls, type) and issubclass(cls, Pass)):
            raise TypeError(f"@register_pass({name!r}) decorates Pass subclasses, got {cls!r}")
        existing = _REGISTRY.get(name)
        if existing is not None and existing.__qualname__ != cls.__qualname__:
            raise ValueError(f"a pass named {name!r} is already registered ({existing!r})")
        cls.name = name
        _REGISTRY[name] = cls
        return cls
    return decorate


def _load_entry_points() -> None:
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            obj = ep.load()
        except Exception as exc:
            raise PipelineError(
                f"the plugin pass {ep.name!r} ({ep.value}) failed to import: {exc}") from exc
        if isinstance(obj, type) and issubclass(obj, Pass) and ep.name not in _REGISTRY:
            register_pass(ep.name)(obj)


def available_passes() -> dict[str, type[Pass]]:
    """Every registered pass by name, built-in and plugin."""
    _load_entry_points()
    return dict(sorted(_REGISTRY.items()))


def get_pass(name: str) -> type[Pass]:
    known = available_passes()
    if name not in known:
        close = difflib.get_close_matches(name, known, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise PipelineError(f"unknown pass {name!r}.{hint} Known passes: {', '.join(known)}")
    return known[name]


def make_pass(name: str, kwargs: dict[str, Any] | None = None) -> Pass:
    """Instantiate a registered pass, with a clear error for wrong arguments."""
    cls = get_pass(name)
    kwargs = kwargs or {}
    params = inspect.signature(cls).parameters
    accepts_any = any(p.kind == p.VAR_KEYWORD for p in params.values())
    unknown = [k for k in kwargs if k not in params and not accepts_any]
    if unknown:
        accepted = ", ".join(params) or "no arguments"
        raise PipelineError(
            f"pass {name!r} got unexpected argument(s) {', '.join(unknown)}; "
            f"it accepts: {accepted}")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise PipelineError(f"pass {name!r} rejected its arguments {kwargs}: {exc}") from exc


def _literal(node: ast.AST, text: str) -> Any:
    try:
        return ast.literal_eval(node)
    except ValueError as exc:
        raise PipelineError(
            f"pipeline argument {ast.get_source_segment(text, node)!r} is not a literal "
            "(numbers, strings, booleans, None, lists, tuples, dicts)") from exc


def _from_ast(node: ast.AST, text: str) -> Pass | Fixpoint:
    if isinstance(node, ast.Name):
        return make_pass(node.id)
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
        if node.func.id == "fixpoint":
            inner = [_from_ast(a, text) for a in node.args]
            options = {k.arg: _literal(k.value, text) for k in node.keywords}
            return _fixpoint(inner, **options)
        if node.args:
            raise PipelineError(
                f"pass arguments must be named: write {node.func.id}(name=value), not "
                f"{ast.get_source_segment(text, node)!r}")
        return make_pass(node.func.id, {k.arg: _literal(k.value, text) for k in node.keywords})
    raise PipelineError(
        f"cannot read {ast.get_source_segment(text, node)!r} as a pass; write name or "
        "name(arg=value)")


def _fixpoint(inner: list[Any], max_iterations: int = 10) -> Fixpoint:
    flat: list[Pass] = []
    for item in inner:
        if isinstance(item, Fixpoint):
            raise PipelineError("fixpoint(...) groups cannot be nested")
        flat.append(item)
    if not isinstance(max_iterations, int) or max_iterations < 1:
        raise PipelineError(
            f"fixpoint max_iterations must be a positive int, got {max_iterations!r}")
    return Fixpoint(flat, max_iterations)


def parse_pipeline(text: str) -> list[Pass | Fixpoint]:
    text = text.strip()
    if not text:
        return []
    try:
        tree = ast.parse(f"[{text}]", mode="eval")
    except SyntaxError as exc:
        raise PipelineError(f"cannot parse pipeline {text!r}: {exc.msg}") from exc
    return [_from_ast(elt, f"[{text}]") for elt in tree.body.elts]


def build_pipeline(spec: PipelineSpec) -> list[Pass | Fixpoint]:
    """Turn a pipeline given as a string, or a list of passes/names/strings, into objects."""
    if spec is None:
        return []
    if isinstance(spec, str):
        return parse_pipeline(spec)
    items: list[Pass | Fixpoint] = []
    for item in spec:
        if isinstance(item, Pass | Fixpoint):
            items.append(item)
        elif isinstance(item, str):
            items.extend(parse_pipeline(item))
        elif isinstance(item, type) and issubclass(item, Pass):
            raise PipelineError(f"pass the instance {item.__name__}(), not the class")
        else:
            raise PipelineError(
                f"pipeline entries are Pass objects or names; got {type(item).__name__}")
    return items
