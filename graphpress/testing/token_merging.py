"""An independent reference of bipartite soft matching (ToMe), simulated at full length.

Merging tokens and computing on the shorter sequence equals computing on the *original*
sequence where every token holds the value of the merged token it belongs to: norms and MLPs
act on each token alone, and identical queries attend identically. Attention is the one place
the two differ, and a bias on the keys makes them equal: a merged token of size ``s`` appears
``s`` times at full length, which is exactly proportional attention (``log s`` added to its
logits); without proportional attention each copy gets ``-log s``. So this reference never
changes a tensor's shape. It keeps, per batch row, the current sequence as a list of groups of
original positions (the first is the token the group is named after) and, per original
position, whether it still counts (a padding token averaged into a real one would not).

One step on a sequence of ``N`` current tokens with ``P`` protected ones (plain Python over the
tokens, written from the algorithm):

1. similarity: the keys averaged over heads, divided by their norm (at least 1e-12, so a
   zero key has similarity 0), at each group's first
   position; tokens ``P, P+2, ...`` form set A, ``P+1, P+3, ...`` set B; a pair whose key
   validity (attended by some query) differs scores ``-inf``, a pair of padding tokens
   ``+inf``;
2. each A token's partner is its most similar B token (the first on ties); the ``r`` A tokens
   with the highest best score (ties: lower index first) merge into their partners;
3. the new sequence: the protected tokens, the A tokens left (in their order), the B tokens;
4. a B token's new value is the size-weighted mean of itself and what merged into it; a merged
   token of another validity than its partner adds nothing (its positions stop counting).

:meth:`MergeSimulation.prune_step` is the pruning variant: the ``r`` unprotected tokens that
receive the least attention stop counting (their keys get ``-inf``).
"""

from __future__ import annotations

import torch

__all__ = ["MergeSimulation", "key_validity"]


def key_validity(mask: torch.Tensor) -> torch.Tensor:
    """``[B, N]``: whether each key is attended by some query, from a 4-D boolean or additive
    attention mask."""
    if mask.dtype == torch.bool:
        return mask.any(dim=2).any(dim=1)
    return mask.amax(dim=(1, 2)) > torch.finfo(mask.dtype).min / 2


class MergeSimulation:
    """The merged state of one batch, at full length."""

    def __init__(self, batch: int, tokens: int, protected: int,
                 valid: torch.Tensor | None = None) -> None:
        self.protected = protected
        self.groups = [[[i] for i in range(tokens)] for _ in range(batch)]
        self.counts = torch.ones(batch, tokens, dtype=torch.float64)
        self.valid = valid if valid is not None else torch.ones(batch, tokens, dtype=torch.bool)
        self.merged = False

    def step(self, x: torch.Tensor, keys: torch.Tensor, r: int) -> torch.Tensor:
        """Merge ``r`` tokens; ``x`` is ``[B, N0, C]`` at full length, ``keys`` ``[B, H, N0,
        D]`` (or ``[B * H, N0, D]``). Returns the new full-length values."""
        batch, n0 = x.shape[0], x.shape[1]
        if keys.dim() == 3:
            keys = keys.reshape(batch, -1, n0, keys.shape[-1])
        metric = keys.to(torch.float64).mean(dim=1)
        out = x.clone()
        for b in range(batch):
            self.groups[b] = self._step_row(b, x[b], metric[b], r, out[b])
        self.merged = True
        return out

    def _step_row(self, b: int, x: torch.Tensor, metric: torch.Tensor, r: int,
                  out: torch.Tensor) -> list[list[int]]:
        groups, p = self.groups[b], self.protected
        set_a, set_b = groups[p::2], groups[p + 1::2]
        first = [g[0] for g in groups]
        unit = metric[first] / metric[first].norm(dim=-1, keepdim=True).clamp_min(1e-12)
        unit_a, unit_b = unit[p::2], unit[p + 1::2]
        valid = self.valid[b]
        valid_a = valid[[g[0] for g in set_a]]
        valid_b = valid[[g[0] for g in set_b]]
        scores = unit_a @ unit_b.T
        same = valid_a[:, None] == valid_b[None, :]
        padding = ~valid_a[:, None] & ~valid_b[None, :]
        scores = torch.where(same, scores, float("-inf"))
        scores = torch.where(padding, float("inf"), scores)   # two padding tokens: merge first
        best_score = scores.max(dim=1).values.tolist()
        partner = [row.index(top) for row, top in zip(scores.tolist(), best_score)]
        order = sorted(range(len(set_a)), key=lambda i: -best_score[i])
        sources, kept = order[:r], sorted(order[r:])
        merged_b = [list(g) for g in set_b]
        for i in sources:
            ga, target = set_a[i], merged_b[partner[i]]
            if bool(valid[ga[0]]) != bool(valid[target[0]]):
                self.counts[b, ga] = 0.0
            target.extend(ga)
        for group in merged_b:
            weights = self.counts[b, group].to(x.dtype)
            value = (x[group] * weights[:, None]).sum(0) / weights.sum()
            out[group] = value
        return groups[:p] + [set_a[i] for i in kept] + merged_b

    def prune_step(self, probs: torch.Tensor, r: int) -> None:
        """Drop the ``r`` unprotected tokens that receive the least attention (mean over heads
        and current queries of ``probs``, ``[B, H, N0, N0]`` at full length; ties: the earlier
        token goes first). Dropped positions stop counting; values are unchanged."""
        batch = len(self.groups)
        if probs.dim() == 3:
            probs = probs.reshape(batch, -1, *probs.shape[-2:])
        p = self.protected
        for b in range(batch):
            current = [g[0] for g in self.groups[b]]
            received = probs[b][:, current][:, :, current].to(torch.float64).mean(dim=(0, 1))
            rest = list(range(p, len(current)))
            order = sorted(rest, key=lambda i: float(received[i]))
            dropped = set(order[:r])
            for i in dropped:
                self.counts[b, self.groups[b][i]] = 0.0
            self.groups[b] = [g for i, g in enumerate(self.groups[b]) if i not in dropped]
        self.merged = True

    def key_bias(self, proportional: bool, dtype: torch.dtype) -> torch.Tensor:
        """``[B, N0]`` to add to the attention logits of every key position (``-inf`` where a
        token was pruned)."""
        bias = torch.full_like(self.counts, float("-inf"))
        for b, groups in enumerate(self.groups):
            for group in groups:
                counts = self.counts[b, group]
                share = counts if proportional else counts / counts.sum()
                bias[b, group] = share.log()
        return bias.to(dtype)
