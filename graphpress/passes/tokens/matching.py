"""The graph of one bipartite soft matching step (ToMe), built with the GraphBuilder.

With ``x`` the stream ``[B, N, C]`` after a block's attention, ``k`` its keys ``[B, H, N, D]``
(or ``[B * H, N, D]``), ``P`` protected tokens and ``r`` merges::

    m      = mean_h k / max(||mean_h k||, 1e-12)      similarity metric, one row per token
    A, B   = tokens P, P+2, ...  |  P+1, P+3, ...      alternating bipartite split
    S      = m_A m_B^T    (-inf where a pair's key-padding validity differs, +inf for two
                           padding tokens: padding merges first, so which real tokens merge
                           never depends on what the padding holds)
    best_j = argmax_j S_ij, score_i = max_j S_ij       each A token's best B partner
    rank_i = #{j: score_j > score_i} + #{j < i: score_j = score_i}   (a stable descending sort)
    src    = the r tokens of rank < r, by rank;  kept A = the others, in their order
    dst    = best_j[src]
    s'_B   = s_B + scatter_add(dst, s_src * same_validity)        s: token sizes [B, N, 1]
    x'     = cat(x_P, x_A[kept], x_B)   protected tokens keep positions 0..P-1
    x'_B  += scatter_add(dst, (x_src - x_dst) * s_src * same_validity / s'_dst)
    s'     = cat(s_P, s_A[kept], s'_B)

so a merged token is the size-weighted average of what it absorbed,
``x_j + sum_i s_i (x_i - x_j) / s'_j = (s_j x_j + sum_i s_i x_i) / s'_j`` (ToMe's
``merge_wavg``, up to float rounding; scatter-adds throughout: ``scatter_reduce(mean)`` exports
to ONNX but onnxruntime computes it wrongly), and a padding token is never averaged into a real
one. The form is chosen for its cost: arithmetic only on the ``r`` moved rows, and two copies of
the ``[B, N, C]`` stream (one row copy, :func:`take_tokens`, and the out-of-place scatter-add),
where ``merge_wavg`` multiplies, scatters, concatenates and divides all of it.

Beside ``x`` the step carries, per current token, its representative's original index
(``rep``: to gather the attention mask), its key validity, and, for ``unmerge``, the current
position of every original token (``source``).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch.fx import Node

from graphpress.ir.builder import GraphBuilder

__all__ = ["TokenState", "attention_bias", "batch_size", "initial_state", "key_validity",
           "merge_step", "rank_split", "take_tokens", "token_slice"]

aten = torch.ops.aten
_NEG_INF = float("-inf")
_EPS = 1e-12  # the smallest key norm divided by (as F.normalize)


@dataclass(frozen=True)
class TokenState:
    """The per-token values carried between merges (None where not needed)."""

    tokens: int
    stage: int
    size: Node | None = None      # [B, N, 1], x's dtype
    rep: Node | None = None       # [B, N] int64
    valid: Node | None = None     # [B, N] bool
    source: Node | None = None    # [B, N0] int64


def batch_size(b: GraphBuilder, x: Node) -> Any:
    size = x.meta["val"].shape[0]
    return size if isinstance(size, int) else b.call(aten.sym_size.int, x, 0)


def _positions(b: GraphBuilder, like: Node, offset: int) -> Node:
    """``offset + [0, 1, ..., n-1]`` for every row of the ``[B, n]`` ``like``."""
    ones = b.call(aten.ones_like.default, like, dtype=torch.int64)
    return b.call(aten.add.Scalar, b.call(aten.cumsum.default, ones, 1), offset - 1)


def token_slice(b: GraphBuilder, t: Node, start: int, end: int, step: int = 1) -> Node:
    return b.call(aten.slice.Tensor, t, 1, start, end, step)


def take_tokens(b: GraphBuilder, t: Node, index: Node, batch: Any, start: int = 0,
                step: int = 1) -> Node:
    """``t[b, start + step * index[b, i], ...]`` for a ``[B, n]`` index into ``[B, N]`` or
    ``[B, N, c]``. Rows wider than one value are copied whole, by ``index_select`` on the
    flattened ``[B * N, c]`` (row ``b N + start + step index``): ``gather`` reads one index
    per element and is several times slower on CPU. Pure data movement either way."""
    shape = t.meta["val"].shape
    count = index.meta["val"].shape[1]
    if len(shape) == 3 and not (isinstance(shape[2], int) and shape[2] == 1):
        offsets = b.call(aten.mul.Tensor, b.call(aten.arange.default, batch, dtype=torch.int64,
                                                 device=t.meta["val"].device), shape[1])
        if step != 1:
            index = b.call(aten.mul.Tensor, index, step)
        if start:
            index = b.call(aten.add.Tensor, index, start)
        rows = b.call(aten.add.Tensor, index, b.call(aten.unsqueeze.default, offsets, 1))
        flat = b.call(aten.reshape.default, t, [-1, shape[2]])
        picked = b.call(aten.index_select.default, flat, 0,
                        b.call(aten.reshape.default, rows, [-1]))
        return b.call(aten.view.default, picked, [batch, count, shape[2]])
    if (start, step) != (0, 1):
        t = token_slice(b, t, start, shape[1], step)
    if len(shape) == 2:
        return b.call(aten.gather.default, t, 1, index)
    wide = b.call(aten.expand.default, b.call(aten.unsqueeze.default, index, -1),
                  [batch, count, shape[2]])
    return b.call(aten.gather.default, t, 1, wide)


def initial_state(b: GraphBuilder, x: Node, valid: Node | None, unmerge: bool,
                  sizes: bool, need_rep: bool) -> TokenState:
    """The state before the first merge: sizes 1 (when carried), each token its own
    representative (when a mask must be gathered), every token at its own position."""
    tokens = x.meta["val"].shape[1]
    first = b.call(aten.select.int, x, -1, 0)
    size = (b.call(aten.ones_like.default, b.call(aten.unsqueeze.default, first, -1))
            if sizes else None)
    index = _positions(b, first, 0) if (need_rep or unmerge) else None
    return TokenState(tokens, 0, size, index if need_rep else None, valid,
                      index if unmerge else None)


def key_validity(b: GraphBuilder, mask: Node, x: Node) -> Node | None:
    """``[B, N]``: whether a key may be attended by any query (padding is not), from a 4-D
    boolean or additive mask; None when the mask does not vary over keys."""
    shape = mask.meta["val"].shape
    if shape[-1] == 1:
        return None
    dims = list(range(1, len(shape) - 1))
    if mask.meta["val"].dtype == torch.bool:
        valid = b.call(aten.any.dims, mask, dims) if dims else mask
    else:
        floor = torch.finfo(mask.meta["val"].dtype).min / 2
        valid = b.call(aten.gt.Scalar, b.call(aten.amax.default, mask, dims), floor)
    if valid.meta["val"].shape[0] == 1 and x.meta["val"].shape[0] != 1:
        valid = b.call(aten.expand.default, valid, [batch_size(b, x), shape[-1]])
    return valid


def _metric(b: GraphBuilder, key: Node, batch: Any, tokens: int) -> Node:
    shape = key.meta["val"].shape
    if len(shape) == 3:  # [B * H, N, D], batch-major
        key = b.call(aten.view.default, key, [batch, -1, tokens, shape[-1]])
    mean = b.call(aten.mean.dim, key, [1])
    norm = b.call(aten.linalg_vector_norm.default, mean, 2, [-1], True)
    # a zero key (a register token initialised to zeros) has similarity 0, not NaN
    return b.call(aten.div.Tensor, mean, b.call(aten.clamp_min.default, norm, _EPS))


def merge_step(b: GraphBuilder, x: Node, key: Node, r: int, protected: int,
               state: TokenState) -> tuple[Node, TokenState]:
    """Merge ``r`` tokens of ``x``; returns the merged stream and the new state."""
    batch, tokens, channels = batch_size(b, x), state.tokens, x.meta["val"].shape[2]
    p = protected
    n_a, n_b = (tokens - p + 1) // 2, (tokens - p) // 2
    metric = _metric(b, key, batch, tokens)
    m_a, m_b = token_slice(b, metric, p, tokens, 2), token_slice(b, metric, p + 1, tokens, 2)
    scores = b.call(aten.matmul.default, m_a, b.call(aten.transpose.int, m_b, -1, -2))
    if state.valid is not None:
        v_a = token_slice(b, state.valid, p, tokens, 2)
        v_b = token_slice(b, state.valid, p + 1, tokens, 2)
        same = b.call(aten.eq.Tensor, b.call(aten.unsqueeze.default, v_a, 2),
                      b.call(aten.unsqueeze.default, v_b, 1))
        scores = b.call(aten.where.ScalarOther, same, scores, _NEG_INF)
        padding = b.call(aten.logical_and.default,
                         b.call(aten.unsqueeze.default, b.call(aten.logical_not.default, v_a), 2),
                         b.call(aten.unsqueeze.default, b.call(aten.logical_not.default, v_b), 1))
        scores = b.call(aten.where.ScalarOther, b.call(aten.logical_not.default, padding),
                        scores, float("inf"))
    best = b.call(aten.max.dim, scores, -1)
    score, partner = b.call(operator.getitem, best, 0), b.call(operator.getitem, best, 1)
    src, kept = rank_split(b, score, r, n_a)
    dst = b.call(aten.gather.default, partner, 1, src)

    def select(t: Node) -> Node:
        """The kept tokens of a per-token value, in the merged order (B keeps its own)."""
        parts = [token_slice(b, t, 0, p)] if p else []
        if kept is not None:
            parts.append(take_tokens(b, t, kept, batch, p, 2))
        parts.append(token_slice(b, t, p + 1, tokens, 2))
        return b.call(aten.cat.default, parts, 1)

    # the size-weighted average, written as an update of each B token by what it absorbs:
    # x'_j = x_j + sum_{i -> j} (s_i / s'_j) (x_i - x_j),  s'_j = s_j + sum_{i -> j} s_i
    # (equal to ToMe's (s_j x_j + sum s_i x_i) / s'_j). Only the r moved rows are computed on;
    # the output is one row copy of the kept tokens plus a scatter-add of the r updates.
    moved_size = take_tokens(b, state.size, src, batch, p, 2)
    if state.valid is not None:  # a padding token is never averaged into a real one
        same_src = b.call(aten.eq.Tensor, take_tokens(b, state.valid, src, batch, p, 2),
                          take_tokens(b, state.valid, dst, batch, p + 1, 2))
        keep = b.call(aten._to_copy.default, b.call(aten.unsqueeze.default, same_src, -1),
                      dtype=x.meta["val"].dtype)
        moved_size = b.call(aten.mul.Tensor, moved_size, keep)
    dst_column = b.call(aten.unsqueeze.default, dst, -1)
    b_sizes = b.call(aten.scatter_add.default, token_slice(b, state.size, p + 1, tokens, 2), 1,
                     dst_column, moved_size)
    share = b.call(aten.div.Tensor, moved_size,
                   b.call(aten.gather.default, b_sizes, 1, dst_column))
    update = b.call(aten.mul.Tensor,
                    b.call(aten.sub.Tensor, take_tokens(b, x, src, batch, p, 2),
                           take_tokens(b, x, dst, batch, p + 1, 2)), share)
    out = take_tokens(b, x, _merged_order(b, kept, batch, p, n_b), batch)
    out_dst = b.call(aten.add.Scalar, dst, p + n_a - r)
    out = b.call(aten.scatter_add.default, out, 1,
                 b.call(aten.expand.default, b.call(aten.unsqueeze.default, out_dst, -1),
                        [batch, r, channels]), update)
    size_parts = [token_slice(b, state.size, 0, p)] if p else []
    if kept is not None:
        size_parts.append(take_tokens(b, state.size, kept, batch, p, 2))
    size = b.call(aten.cat.default, [*size_parts, b_sizes], 1)
    # sizes are counts: no gradient (SDPA picks a slower kernel for a mask that needs one)
    size = b.call(aten.detach.default, size)
    new = replace(state, tokens=tokens - r, stage=state.stage + 1, size=size)
    if state.rep is not None:
        new = replace(new, rep=select(state.rep))
    if state.valid is not None:
        new = replace(new, valid=select(state.valid))
    if state.source is not None:
        new = replace(new, source=_moved_sources(b, state.source, src, kept, dst, score, p,
                                                 n_a, n_b, r, tokens))
    return out, new


def _merged_order(b: GraphBuilder, kept: Node | None, batch: Any, p: int, n_b: int) -> Node:
    """``[B, N - r]``: the token each merged position copies: ``0..P-1``, then ``P + 2 k`` for
    each kept A token ``k``, then every B token ``P + 1 + 2 j``."""
    def fixed(name: str, tokens: list[int]) -> Node:
        row = b.weight(b.program.free_weight_name(name),
                       torch.tensor([tokens], dtype=torch.int64), kind="constant")
        return b.call(aten.expand.default, row, [batch, len(tokens)])

    parts = [fixed("merge_tokens_protected", list(range(p)))] if p else []
    if kept is not None:
        parts.append(b.call(aten.add.Scalar, b.call(aten.mul.Tensor, kept, 2), p))
    parts.append(fixed("merge_tokens_b", [p + 1 + 2 * j for j in range(n_b)]))
    return b.call(aten.cat.default, parts, 1)


def rank_split(b: GraphBuilder, score: Node, r: int, n_a: int) -> tuple[Node, Node | None]:
    """The ``r`` highest scores (ties: lower index first) by rank, and the rest in index order.

    Ranks come from pairwise comparisons, not a sort: ``torch.sort`` is not stable by default,
    its stable overload has no ONNX translation, and ``n_a^2`` comparisons cost nothing next to
    the block (``n_a`` is at most half the tokens)."""
    column = b.call(aten.unsqueeze.default, score, 2)   # score_i
    row = b.call(aten.unsqueeze.default, score, 1)      # score_j
    index = _positions(b, b.call(aten.zeros_like.default, score, dtype=torch.int64), 0)
    earlier = b.call(aten.lt.Tensor, b.call(aten.unsqueeze.default, index, 1),
                     b.call(aten.unsqueeze.default, index, 2))
    # j is ahead of i when score_j > score_i, or when j < i and score_j >= score_i
    ahead = b.call(aten.logical_or.default, b.call(aten.gt.Tensor, row, column),
                   b.call(aten.logical_and.default, earlier, b.call(aten.ge.Tensor, row, column)))
    rank = b.call(aten.sum.dim_IntList, ahead, [2])
    order = b.call(aten.scatter.src, b.call(aten.zeros_like.default, index), 1, rank, index)
    src = b.call(aten.slice.Tensor, order, 1, 0, r)
    if r == n_a:
        return src, None
    rest = b.call(aten.ge.Scalar, rank, r)
    slot = b.call(aten.sub.Tensor, b.call(aten.cumsum.default, rest, 1), 1)
    slot = b.call(aten.where.ScalarOther, rest, slot, n_a - r)  # sources go to a spare slot
    wide = b.call(aten.cat.default, [index, b.call(aten.slice.Tensor, index, 1, 0, 1)], 1)
    kept = b.call(aten.scatter.src, b.call(aten.zeros_like.default, wide), 1, slot, index)
    return src, b.call(aten.slice.Tensor, kept, 1, 0, n_a - r)


def _moved_sources(b: GraphBuilder, source: Node, src: Node, kept: Node | None, dst: Node,
                   like_a: Node, p: int, n_a: int, n_b: int, r: int, tokens: int) -> Node:
    """Where every original token is after the step: the merged position of its token."""
    pos_a = b.call(aten.zeros_like.default, like_a, dtype=torch.int64)
    if kept is not None:
        pos_a = b.call(aten.scatter.src, pos_a, 1, kept, _positions(b, kept, p))
    pos_a = b.call(aten.scatter.src, pos_a, 1, src,
                   b.call(aten.add.Scalar, dst, p + n_a - r))
    first = b.call(aten.select.int, source, 1, 0)
    row = b.call(aten.unsqueeze.default, first, 1)
    parts = []
    if p:
        parts.append(_positions(b, b.call(aten.expand.default, row, [-1, p]), 0))
    parts.append(pos_a)
    parts.append(_positions(b, b.call(aten.expand.default, row, [-1, n_b]), p + n_a - r))
    grouped = b.call(aten.cat.default, parts, 1)
    order = list(range(p)) + [p + (t // 2 if t % 2 == 0 else n_a + t // 2)
                              for t in range(tokens - p)]
    index = b.weight(b.program.free_weight_name("merge_tokens_order"),
                     torch.tensor(order, dtype=torch.int64), kind="constant")
    current = b.call(aten.index_select.default, grouped, 1, index)
    return b.call(aten.gather.default, current, 1, source)


def attention_bias(b: GraphBuilder, mask: Node | None, state: TokenState, batch: Any,
                   proportional: bool, heads: int | None = None) -> Node | None:
    """The attention mask of a block after merges: the original mask gathered at each token's
    representative (queries and keys), plus ``log size`` on the keys when proportional
    (``heads``: the logits are ``[B * heads, N, N]``)."""
    out = mask
    if mask is not None and state.rep is not None:
        shape = list(mask.meta["val"].shape)
        if shape[0] == 1 and batch != 1:
            mask = b.call(aten.expand.default, mask, [batch, *shape[1:]])
            shape[0] = batch
        tokens = state.tokens
        if shape[-1] != 1:
            index = b.call(aten.expand.default, b.call(aten.view.default, state.rep,
                                                       [batch, 1, 1, tokens]),
                           [batch, shape[1], shape[2], tokens])
            mask = b.call(aten.gather.default, mask, 3, index)
            shape[-1] = tokens
        if shape[-2] != 1:
            index = b.call(aten.expand.default, b.call(aten.view.default, state.rep,
                                                       [batch, 1, tokens, 1]),
                           [batch, shape[1], tokens, shape[-1]])
            mask = b.call(aten.gather.default, mask, 2, index)
        out = mask
    if not proportional or state.size is None:
        return out
    log_size = b.call(aten.view.default, b.call(aten.log.default, state.size),
                      [batch, 1, 1, state.tokens])
    if heads is not None:  # [B * H, N, N] logits (bmm attention): one row of keys per head
        log_size = b.call(aten.reshape.default, b.call(aten.expand.default, log_size,
                                                       [batch, heads, 1, state.tokens]),
                          [-1, 1, state.tokens])
    if out is None:
        return log_size
    if out.meta["val"].dtype == torch.bool:
        return b.call(aten.where.ScalarOther, out, log_size, _NEG_INF)
    return b.call(aten.add.Tensor, out, log_size)
