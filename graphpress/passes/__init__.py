"""Passes: the Pass base and contract, the PassManager, the registry, and built-in passes."""

from graphpress.passes.base import Contract, Fixpoint, Pass, PassContext, PassResult, Skip
from graphpress.passes.cse import CommonSubexpressionElimination
from graphpress.passes.dce import DeadCodeElimination
from graphpress.passes.fold_bn import FoldBatchNorm
from graphpress.passes.fold_constants import FoldConstants
from graphpress.passes.manager import PassManager
from graphpress.passes.prune_channels import PruneChannels
from graphpress.passes.registry import available_passes, build_pipeline, get_pass, register_pass
from graphpress.passes.report import PassRecord, Report

__all__ = [
    "CommonSubexpressionElimination",
    "Contract",
    "DeadCodeElimination",
    "Fixpoint",
    "FoldBatchNorm",
    "FoldConstants",
    "Pass",
    "PassContext",
    "PassManager",
    "PassRecord",
    "PassResult",
    "PruneChannels",
    "Report",
    "Skip",
    "available_passes",
    "build_pipeline",
    "get_pass",
    "register_pass",
]
