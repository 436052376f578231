"""Saved folders that fail loudly: a manifest records each file's size and sha256.

Invariant: a folder that passes :func:`read_manifest` and :func:`verify_files` holds, byte for
byte, the files its writer recorded. Every other folder (a missing, truncated or edited file, a
missing or unparsable manifest, a manifest of a newer format) is refused with one
``ArtifactError`` that names the file and the fix, before a deserializer (``torch.export.load``,
``onnx.load``) reads it, so no third-party traceback reaches the log.

A saved program also records the op libraries it needs (:func:`op_libraries`: the namespaces
besides aten/prims and the modules that define them); :func:`import_op_libraries` imports them
at load and names the op, the module and the file when one is still unknown.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import logging
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch._library.custom_ops import OPDEFS

from graphpress._version import __version__
from graphpress.errors import ArtifactError, MissingArtifactError

__all__ = ["CORE_NAMESPACES", "file_record", "file_records", "import_op_libraries",
           "load_exported_program", "op_libraries", "read_manifest", "verify_files"]

CORE_NAMESPACES = frozenset({"aten", "prims"})
"""Op namespaces every torch has; a program's other namespaces are recorded at save."""


def _damaged(resave: str) -> str:
    return ("Fix: copy the folder again from where it was saved (an interrupted copy or "
            f"download truncates files), or save the model again with {resave}")


def file_record(path: Path) -> dict[str, Any]:
    """``{"size": bytes, "sha256": hex digest}`` of the file at ``path``."""
    with path.open("rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    return {"size": path.stat().st_size, "sha256": digest}


def file_records(folder: Path, names: Iterable[str]) -> dict[str, dict[str, Any]]:
    """The :func:`file_record` of each named file of ``folder``, by name, in sorted order."""
    return {name: file_record(folder / name) for name in sorted(set(names))}


def read_manifest(folder: Path, name: str, *, format_version: int,
                  resave: str) -> dict[str, Any]:
    """The manifest ``folder/name``; ArtifactError if missing, unparsable or of a newer format.

    ``format_version`` is the newest format this graphpress reads; ``resave`` says how the
    folder is written (named in the fix).
    """
    path = folder / name
    if not path.is_file():
        raise MissingArtifactError(
            f"{path} is missing: {folder} is not a folder written by {resave}, or an incomplete "
            f"copy of one. Fix: copy the whole folder, or save the model again with {resave}")
    try:
        manifest = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"{path} is not valid JSON ({exc}). {_damaged(resave)}") from None
    if not (isinstance(manifest, dict) and isinstance(manifest.get("format"), int)
            and isinstance(manifest.get("files"), dict | list)):
        raise ArtifactError(f"{path} is not a graphpress manifest (it needs an integer "
                            f"'format' and a 'files' entry). {_damaged(resave)}")
    if manifest["format"] > format_version:
        writer = manifest.get("graphpress", "a newer version")
        raise ArtifactError(
            f"{path} has format {manifest['format']}, written by graphpress {writer}; this "
            f"graphpress {__version__} reads formats up to {format_version}. Fix: upgrade "
            f"graphpress (pip install --upgrade 'graphpress>={writer}') to load it")
    return manifest


def verify_files(folder: Path, manifest: Mapping[str, Any], manifest_name: str, *,
                 resave: str, required: Sequence[str] = ()) -> None:
    """Check every file the manifest lists against its recorded size and sha256.

    ``required`` names files the loader reads, which the manifest must list. Manifests of
    format 1 list names without records; their files are only checked to exist.
    """
    files = manifest["files"]
    records = dict.fromkeys(files) if isinstance(files, list) else files
    manifest_path = folder / manifest_name
    for name in required:
        if name not in records:
            raise ArtifactError(f"{manifest_path} does not list {name}, which loading needs. "
                                f"{_damaged(resave)}")
    for name, record in records.items():
        path = folder / name
        if not path.is_file():
            raise MissingArtifactError(f"{path} is missing (listed in {manifest_path}). "
                                       f"{_damaged(resave)}")
        if record is None:
            continue
        if not (isinstance(record, dict) and isinstance(record.get("size"), int)
                and isinstance(record.get("sha256"), str)):
            raise ArtifactError(f"{manifest_path} has no valid size and sha256 for {name}. "
                                f"{_damaged(resave)}")
        size = path.stat().st_size
        if size < record["size"]:
            raise ArtifactError(f"{path} is truncated: {size} of {record['size']} bytes "
                                f"(recorded in {manifest_path}). {_damaged(resave)}")
        if size != record["size"] or file_record(path)["sha256"] != record["sha256"]:
            raise ArtifactError(f"{path} was modified after it was saved: its contents differ "
                                f"from the sha256 recorded in {manifest_path}. "
                                f"{_damaged(resave)}")


def _defining_module(op: torch._ops.OpOverload) -> str | None:
    """The importable module that defines a ``torch.library.custom_op``, else None."""
    opdef = OPDEFS.get(op._schema.name)
    module = getattr(getattr(opdef, "_init_fn", None), "__module__", None)
    return None if module in (None, "__main__") else module


def op_libraries(graph_module: torch.fx.GraphModule) -> dict[str, dict[str, list[str]]]:
    """``{namespace: {"ops": [...], "modules": [...]}}`` for the ops besides aten/prims.

    Covers the graph and its subgraphs (control-flow branches). ``ops`` are qualified overload
    names (``mylib::scale.default``); ``modules`` the modules that define them, where known.
    """
    found: dict[str, tuple[set[str], set[str]]] = {}
    for module in graph_module.modules():
        if not isinstance(module, torch.fx.GraphModule):
            continue
        for node in module.graph.nodes:
            target = node.target
            if node.op != "call_function" or not isinstance(target, torch._ops.OpOverload) or (
                    target.namespace in CORE_NAMESPACES):
                continue
            ops, modules = found.setdefault(target.namespace, (set(), set()))
            ops.add(f"{target._schema.name}.{target._overloadname}")
            defining = _defining_module(target)
            if defining is not None:
                modules.add(defining)
    return {namespace: {"ops": sorted(ops), "modules": sorted(modules)}
            for namespace, (ops, modules) in sorted(found.items())}


def _registered(qualified: str) -> bool:
    namespace, _, rest = qualified.partition("::")
    name, _, overload = rest.partition(".")
    try:
        getattr(getattr(getattr(torch.ops, namespace), name), overload or "default")
    except AttributeError:
        return False
    return True


def import_op_libraries(libraries: Mapping[str, Any], program_file: Path, *,
                        preload: Sequence[str] = ()) -> None:
    """Import ``preload`` (those installed) and the recorded modules; ArtifactError if an op the
    program at ``program_file`` needs is still not registered, naming the op and the module."""
    for name in preload:
        if importlib.util.find_spec(name) is not None:
            importlib.import_module(name)
    try:
        entries = {namespace: (list(entry["ops"]), list(entry["modules"]))
                   for namespace, entry in libraries.items()}
    except (AttributeError, KeyError, TypeError):
        raise ArtifactError(f"the manifest of {program_file} has an unreadable 'op_libraries' "
                            "entry. Fix: save the model again") from None
    failures: dict[str, str] = {}
    for _, modules in entries.values():
        for module in modules:
            try:
                importlib.import_module(module)
            except ImportError as exc:
                failures[module] = str(exc)
    for namespace, (ops, modules) in entries.items():
        missing = [op for op in ops if not _registered(op)]
        if not missing:
            continue
        needs = f"{program_file} needs the op {missing[0]}, which is not registered"
        broken = [m for m in modules if m in failures]
        if broken:
            raise ArtifactError(
                f"{needs}: its library, module {broken[0]!r}, cannot be imported "
                f"({failures[broken[0]]}). Fix: install the package that provides "
                f"{broken[0]!r} (or put it on sys.path), then load again")
        if modules:
            raise ArtifactError(
                f"{needs}: module {modules[0]!r}, which defined it at save, no longer does. "
                f"Fix: import the module that now defines the {namespace}:: ops before loading")
        raise ArtifactError(
            f"{needs}, and no importable module was recorded for it at save (it was defined in "
            f"a script, or not with torch.library.custom_op). Fix: import the library that "
            f"defines the {namespace}:: ops before loading")


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def load_exported_program(path: Path, saved_with: str | None) -> torch.export.ExportedProgram:
    """``torch.export.load`` without its log output; ArtifactError with torch's reason if it
    fails (``saved_with``: the torch version that wrote the file, if recorded)."""
    logger = logging.getLogger("torch.export")  # torch attaches its own stderr handler
    collect, handlers, propagate = _Collect(), logger.handlers, logger.propagate
    logger.handlers, logger.propagate = [collect], False
    try:
        return torch.export.load(path)
    except Exception as exc:
        logged = [r.exc_info[1] for r in collect.records if r.exc_info and r.exc_info[1]]
        lines = str(logged[-1] if logged else exc).strip().splitlines()
        reason = (lines[-1] if lines else type(exc).__name__)[:400]
        writer = f"torch {saved_with}" if saved_with else "the torch version that saved it"
        raise ArtifactError(
            f"torch {torch.__version__} cannot read {path} ({reason}). Fix: load it with "
            f"{writer}, or save the model again with this one") from None
    finally:
        logger.handlers, logger.propagate = handlers, propagate
