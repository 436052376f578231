"""Analyses over the IR that passes share: the channel dependency graph of pruning, the
transformer block finder of token merging.

Each analysis registers itself with the IR's analysis cache (``Program.analysis(name)``) when
its module is imported, so the IR never imports this package.
"""

from graphpress.analysis.blocks import transformer_blocks
from graphpress.analysis.channels import channel_groups

__all__ = ["channel_groups", "transformer_blocks"]
