"""The Triton artifact: the generated module imported from a file (Triton reads a kernel's
source to compile it), called like the model, saved as ``triton_module.py``.

Where it runs: on CUDA tensors, the kernels compile for the GPU (the weights are copied to the
inputs' device once); on CPU tensors only under ``TRITON_INTERPRET=1`` (set before triton is
imported), Triton's interpreter, which is how the tests run it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
import tempfile
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch.export.graph_signature import InputKind
from torch.fx.experimental.symbolic_shapes import optimization_hint

from graphpress.backends.triton.host import GeneratedModule
from graphpress.backends.triton.runtime import interpreting
from graphpress.errors import BackendError
from graphpress.ir.costs import node_macs
from graphpress.ir.program import Program

__all__ = ["MODULE_FILE", "TritonArtifact", "check_fallbacks", "kernel_stats"]

MODULE_FILE = "triton_module.py"


def _import(source: str) -> ModuleType:
    digest = hashlib.sha256(source.encode()).hexdigest()[:16]
    folder = Path(tempfile.gettempdir()) / "graphpress-triton" / digest
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / MODULE_FILE
    if not path.exists() or path.read_text() != source:
        partial = folder / f".{MODULE_FILE}.{os.getpid()}"
        partial.write_text(source)
        partial.replace(path)
    name = f"graphpress_triton_{digest}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules[name] = module
    return module


_DEVICE_KEYS = {"cuda": "CUDA"}
_PORTABLE_KEYS = ("CompositeImplicitAutograd", "CompositeExplicitAutograd",
                  "CompositeExplicitAutogradNonFunctional")


def check_fallbacks(generated: GeneratedModule, device: torch.device) -> None:
    """Raise BackendError naming the first ATen fallback with no kernel for ``device``."""
    key = _DEVICE_KEYS.get(device.type)
    if key is None:
        return
    for node in generated.fallbacks:
        target = node.target
        if not isinstance(target, torch._ops.OpOverload):
            continue
        name = target.name()
        if not any(torch._C._dispatch_has_kernel_for_dispatch_key(name, k)
                   for k in (key, *_PORTABLE_KEYS)):
            raise BackendError(
                f"node {node.name}: {target} has no Triton lowering and no {device.type} kernel "
                f"to fall back to; run it on a device it supports or replace it before "
                f"backend='triton'")


def _flops(node: torch.fx.Node) -> int:
    """2 per multiply-accumulate of a contraction, else 1 per element of the largest tensor."""
    macs = node_macs(node)
    if macs:
        return 2 * macs
    vals = [node.meta.get("val"), *(a.meta.get("val") for a in node.all_input_nodes)]
    sizes = [optimization_hint(v.numel(), fallback=1) for v in vals
             if isinstance(v, torch.Tensor)]
    return max(sizes, default=0)


def kernel_stats(generated: GeneratedModule) -> dict[str, int]:
    """Counts behind the report: kernels, launches per call, nodes and FLOPs by where they run."""
    groups = generated.schedule.groups
    in_kernels = [n for g in groups for n in g.nodes] + generated.library_calls
    return {
        "kernels": len(groups), "distinct_kernels": generated.distinct_kernels,
        "library_kernels": len(generated.library_calls),
        # every node outside the views is an ATen op eager PyTorch runs
        "eager_ops": len(in_kernels) + len(generated.fallbacks),
        "fallbacks": len(generated.fallbacks),
        "launches": len(groups) + len(generated.library_calls) + len(generated.fallbacks),
        "ops_in_kernels": sum(len(g.nodes) for g in groups),
        "nodes_in_kernels": len(in_kernels),
        "flops_in_kernels": sum(_flops(n) for n in in_kernels),
        "flops_in_fallbacks": sum(_flops(n) for n in generated.fallbacks),
    }


class TritonArtifact:
    """The generated Triton module of a Program; ``save`` writes its source."""

    name = "triton"

    def __init__(self, program: Program, generated: GeneratedModule) -> None:
        self.program, self.generated = program, generated
        self.module = _import(generated.source)
        self._weights: dict[torch.device, dict[int, Any]] = {}
        self._user = {i for i, spec in enumerate(program.signature.input_specs)
                      if spec.kind == InputKind.USER_INPUT}
        dump = os.environ.get("GRAPHPRESS_DUMP", "")
        if dump:
            Path(dump).mkdir(parents=True, exist_ok=True)
            (Path(dump) / MODULE_FILE).write_text(generated.source)

    @property
    def tolerance(self) -> tuple[float, float]:
        """(rtol, atol) against eager: 1e-4 relative in float32; two steps of the narrowest
        floating output dtype otherwise (an op computed in float32 by both sides may still
        round to a neighbour in float16)."""
        dtypes = {getattr(n.meta.get("val"), "dtype", None)
                  for n in self.program.output_node().all_input_nodes}
        if torch.bfloat16 in dtypes:
            return 1.6e-2, 1e-2
        if torch.float16 in dtypes:
            return 2e-3, 1e-3
        return 1e-4, 1e-5

    @property
    def source(self) -> str:
        return self.generated.source

    def _on_device(self, flat: list[Any]) -> list[Any]:
        device = next((flat[i].device for i in sorted(self._user)
                       if isinstance(flat[i], torch.Tensor)), torch.device("cpu"))
        if device.type == "cpu" and not interpreting():
            raise BackendError("the triton backend runs on CUDA tensors, or on CPU tensors "
                               "with TRITON_INTERPRET=1 set before triton is imported")
        if device not in self._weights:
            check_fallbacks(self.generated, device)
        moved = self._weights.setdefault(device, {})
        out = []
        for i, value in enumerate(flat):
            if i not in self._user and isinstance(value, torch.Tensor) and (
                    value.device != device):
                if i not in moved or moved[i][0] is not value:
                    moved[i] = (value, value.to(device))
                value = moved[i][1]
            out.append(value)
        return out

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        def run(*flat: Any) -> Any:
            return self.module.call(*self._on_device(list(flat)))

        with torch.no_grad():
            return self.program.call_flat(run, args, kwargs)

    def stats(self) -> dict[str, int]:
        return kernel_stats(self.generated)

    def info(self) -> dict[str, str]:
        """Facts for the compile report: kernels, what they cover, the ATen fallbacks."""
        s = self.stats()
        total_nodes = s["nodes_in_kernels"] + s["fallbacks"]
        total_flops = s["flops_in_kernels"] + s["flops_in_fallbacks"]
        counts: dict[str, int] = {}
        for node in self.generated.fallbacks:
            counts[str(node.target)] = counts.get(str(node.target), 0) + 1
        return {
            "triton kernels": f"{s['kernels']} generated + {s['library_kernels']} library, "
                              f"covering {s['ops_in_kernels']} ATen ops",
            "triton launches per call": f"{s['launches']} ({s['fallbacks']} ATen fallbacks)",
            "triton compute nodes in kernels":
                f"{s['nodes_in_kernels']}/{total_nodes} "
                f"({100 * s['nodes_in_kernels'] / max(total_nodes, 1):.0f}%)",
            "triton FLOPs in kernels": f"{100 * s['flops_in_kernels'] / max(total_flops, 1):.0f}%",
            "triton ATen fallbacks": ", ".join(f"{k} x{v}" for k, v in sorted(counts.items()))
                                     or "none",
        }

    def save(self, folder: Path) -> list[str]:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / MODULE_FILE).write_text(self.generated.source)
        return [MODULE_FILE]
