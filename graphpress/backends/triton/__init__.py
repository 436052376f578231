"""Triton backend: generated, readable Triton kernels for the fused regions of a Program.

How a Program becomes a Triton module::

    Program.graph
      -> schedule (schedule.py): fusion groups (pointwise chains; row-wise reductions with their
         prologue and epilogue; matmul with an element-wise epilogue) and host nodes (views,
         ATen fallbacks, graphpress ops with a Triton implementation), in dependency order
      -> kernels (kernels.py, matmul.py, body.py): one @triton.jit function per group, its
         members' math from pointwise.py (their kinds: lowering.py), a comment naming the IR
         nodes it covers
      -> host (host.py): call(*placeholders), which binds symbolic sizes from the inputs,
         allocates outputs, launches the kernels and calls ATen for the rest
      -> artifact.py: the module imported from a file and called like the model

Options (keywords of :func:`triton_backend`): ``allow_tf32`` (float32 matmuls with TF32 tensor
cores on a GPU: faster, about 1e-3 relative error; default False: IEEE float32 products).
"""

from __future__ import annotations

from graphpress.backends.triton.artifact import MODULE_FILE, TritonArtifact
from graphpress.backends.triton.host import generate
from graphpress.errors import BackendError
from graphpress.ir.program import Program

__all__ = ["MODULE_FILE", "TritonArtifact", "generate", "triton_backend"]


def triton_backend(program: Program, *, allow_tf32: bool = False) -> TritonArtifact:
    """Generate and load the Triton module of ``program``."""
    try:
        import triton  # noqa: F401
    except ImportError as exc:
        raise BackendError("the triton backend needs the triton package: pip install triton "
                           "(on CPU the kernels run under TRITON_INTERPRET=1)") from exc
    return TritonArtifact(program, generate(program, precision="tf32" if allow_tf32 else "ieee"))
