"""Token pruning, merge_tokens(mode="prune"): drop the least attended tokens instead of
merging them (the first step of Zero-TPrune's attention-graph importance).

With the attention probabilities ``A [B, H, N, N]`` of the block (the softmax output, or
``softmax(q k^T * scale + mask)`` recomputed beside SDPA, mask and all)::

    importance_j = mean_{h, i} A[h, i, j]        the attention token j receives
    drop         = the r unprotected tokens of lowest importance (ties: lower index first)
    x'           = cat(x_P, x_rest[kept])         kept tokens in their order

No sizes are carried (a kept token stands for itself), so proportional attention does not
apply; the attention masks of later blocks are gathered at the kept tokens, as for merging.
Dropped tokens have no value to copy back, so ``unmerge`` needs the merge mode.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import torch
from torch.fx import Node

from graphpress.ir.builder import GraphBuilder
from graphpress.ir.graph import get_arg
from graphpress.passes.tokens.matching import (
    TokenState,
    batch_size,
    rank_split,
    take_tokens,
    token_slice,
)

__all__ = ["attention_importance", "prune_step"]

aten = torch.ops.aten


def attention_importance(b: GraphBuilder, attention: Any, stream: Node) -> Node:
    """``[B, N]``: the attention each token receives, averaged over heads and queries
    (``stream``: the block's ``[B, N, C]`` stream, for the batch size)."""
    if attention.kind == "softmax":
        probs = attention.node
    else:
        node = attention.node
        q, k = attention.query, attention.key
        scale = get_arg(node, "scale")
        if scale is None:
            scale = 1 / math.sqrt(q.meta["val"].shape[-1])
        logits = b.call(aten.mul.Tensor, b.call(aten.matmul.default, q, b.call(
            aten.transpose.int, k, -1, -2)), scale)
        mask = get_arg(node, "attn_mask")
        if mask is not None:
            logits = (b.call(aten.where.ScalarOther, mask, logits, float("-inf"))
                      if mask.meta["val"].dtype == torch.bool
                      else b.call(aten.add.Tensor, logits, mask))
        probs = b.call(aten.softmax.int, logits, -1)
    shape = probs.meta["val"].shape
    if len(shape) == 3:  # [B * H, N, N]
        probs = b.call(aten.view.default, probs, [batch_size(b, stream), -1, shape[-2], shape[-1]])
    return b.call(aten.mean.dim, probs, [1, 2])


def prune_step(b: GraphBuilder, x: Node, importance: Node, r: int, protected: int,
               state: TokenState) -> tuple[Node, TokenState]:
    """Drop the ``r`` least important unprotected tokens of ``x``."""
    batch, tokens, p = batch_size(b, x), state.tokens, protected
    rest = tokens - p
    scores = b.call(aten.neg.default, token_slice(b, importance, p, tokens))
    _, kept = rank_split(b, scores, r, rest)   # the r lowest importances go, the rest stay

    def select(t: Node) -> Node:
        parts = [token_slice(b, t, 0, p)] if p else []
        parts.append(take_tokens(b, t, kept, batch, p))
        return b.call(aten.cat.default, parts, 1)

    new = replace(state, tokens=tokens - r, stage=state.stage + 1)
    if state.rep is not None:
        new = replace(new, rep=select(state.rep))
    if state.valid is not None:
        new = replace(new, valid=select(state.valid))
    return select(x), new
