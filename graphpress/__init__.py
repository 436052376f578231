"""graphpress: a compiler-style graph transformation framework for PyTorch models.

Trace a model into one IR (a torch.export ATen graph), rewrite it with composable, numerically
verified passes, and lower it with a backend::

    import graphpress as gp
    compiled = gp.compile(model, example_inputs=(x,), passes="dce, cse, fold_constants",
                          verify=True)
    print(compiled.report())
"""

from graphpress import analysis, ops, passes, pipeline
from graphpress._version import __version__
from graphpress.api import CompiledModel, compile, load
from graphpress.errors import (
    ArtifactError,
    BackendError,
    ContractViolation,
    GraphpressError,
    InputError,
    MetadataError,
    MissingArtifactError,
    PassError,
    PipelineError,
    TraceError,
)
from graphpress.ir.program import Program
from graphpress.passes import PassManager, register_pass

__all__ = [
    "ArtifactError",
    "BackendError",
    "CompiledModel",
    "ContractViolation",
    "GraphpressError",
    "InputError",
    "MetadataError",
    "MissingArtifactError",
    "PassError",
    "PassManager",
    "PipelineError",
    "Program",
    "TraceError",
    "__version__",
    "analysis",
    "compile",
    "load",
    "ops",
    "passes",
    "pipeline",
    "register_pass",
]
