"""Built-in passes, one folder a family: ``cleanup/`` (dce, cse, fold_constants),
``fold_bn/``, ``prune/``, ``quant/`` (insert_fake_quant), ``fusion/`` (fuse_dequant_matmul),
``tokens/`` (merge_tokens).
Importing this package registers them; the Pass base, the manager and the registry live in
:mod:`graphpress.pipeline` and are re-exported here for convenience."""

from graphpress.passes.cleanup.cse import CommonSubexpressionElimination
from graphpress.passes.cleanup.dce import DeadCodeElimination
from graphpress.passes.cleanup.fold_constants import FoldConstants
from graphpress.passes.fold_bn.fold_bn import FoldBatchNorm
from graphpress.passes.fusion.fuse_dequant_matmul import FuseDequantMatmul
from graphpress.passes.prune.prune_channels import PruneChannels
from graphpress.passes.quant.equalize import Equalize
from graphpress.passes.quant.insert_fake_quant import InsertFakeQuant
from graphpress.passes.quant.smooth_quant import SmoothQuant
from graphpress.passes.tokens.merge_tokens import MergeTokens
from graphpress.pipeline import (
    Contract,
    Fixpoint,
    Pass,
    PassContext,
    PassManager,
    PassRecord,
    PassResult,
    Report,
    Skip,
    available_passes,
    build_pipeline,
    get_pass,
    register_pass,
)

__all__ = [
    "CommonSubexpressionElimination",
    "Contract",
    "DeadCodeElimination",
    "Equalize",
    "Fixpoint",
    "FoldBatchNorm",
    "FoldConstants",
    "FuseDequantMatmul",
    "InsertFakeQuant",
    "MergeTokens",
    "Pass",
    "PassContext",
    "PassManager",
    "PassRecord",
    "PassResult",
    "PruneChannels",
    "Report",
    "Skip",
    "SmoothQuant",
    "available_passes",
    "build_pipeline",
    "get_pass",
    "register_pass",
]
