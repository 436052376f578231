"""The pipeline: the Pass base and contracts, the PassManager, the registry, verification,
instrumentation and the report."""

from graphpress.pipeline.base import Contract, Fixpoint, Pass, PassContext, PassResult, Skip
from graphpress.pipeline.manager import PassManager
from graphpress.pipeline.registry import available_passes, build_pipeline, get_pass, register_pass
from graphpress.pipeline.report import PassRecord, Report

__all__ = [
    "Contract",
    "Fixpoint",
    "Pass",
    "PassContext",
    "PassManager",
    "PassRecord",
    "PassResult",
    "Report",
    "Skip",
    "available_passes",
    "build_pipeline",
    "get_pass",
    "register_pass",
]
