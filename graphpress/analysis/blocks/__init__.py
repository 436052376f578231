"""The transformer block finder (token merging's analysis): attention cores, the residual
stream around them, the token axis and the special tokens to protect.

``attention`` matches the attention cores (SDPA, or matmul + softmax); ``blocks`` follows the
residual stream to the MLP and registers the ``transformer_blocks`` analysis.
"""

from graphpress.analysis.blocks.attention import Attention
from graphpress.analysis.blocks.blocks import BlockAnalysis, TransformerBlock, transformer_blocks

__all__ = ["Attention", "BlockAnalysis", "TransformerBlock", "transformer_blocks"]
