"""How many tokens each block merges: constant, decreasing, an explicit list, or a FLOP budget.

Block ``i`` with ``N_i`` tokens merges ``r_i`` of them after its attention, so its MLP and every
later block see ``N_{i+1} = N_i - r_i`` tokens. The bipartite split of the ``N_i - P``
unprotected tokens (``P`` special tokens) allows at most ``(N_i - P) // 2`` merges.

* constant: ``r_i = r`` (ToMe's default), lowered in late blocks to what their tokens allow
  (as ToMe does: ViT-B/16 at r = 16 merges 16 in blocks 0-10 and 10 in block 11); an ``r``
  the first block cannot merge is an error;
* decreasing (``inflection=f``): ``r_i`` falls linearly from ``(1 + f) r`` at the first block to
  ``(1 - f) r`` at the last, rounded down (mean about ``r``), merging more while tokens are many;
* explicit: ``r=[r_0, r_1, ...]``, one per block, each within its block's limit (else an error
  naming the block and its token count);
* FLOP budget (``flops=b``): the estimated multiply-accumulates of the blocks must be at most
  ``b`` times the unmerged ones. Per block, with ``C`` channels and MLP width ``M``::

      MACs_i = N_i (4 C^2) + 2 N_i^2 C  +  (N_i - r_i) (2 C M)

  (q, k, v, o projections and attention at ``N_i`` tokens, the MLP after the merge). The
  schedule chosen is the smallest constant ``r`` whose schedule meets the budget, capped per
  block by what the tokens allow: ToMe's own closed-form family, searched over ``r`` (the MACs
  fall as ``r`` grows). Not a greedy per-block allocation: by FLOPs alone a merge in an earlier
  block always saves more, so greedy would pile every merge into the first blocks; and not the
  per-layer rates DiffRate learns from data, which this pass has none of.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from graphpress.errors import PassError

__all__ = ["BlockShape", "block_macs", "budget_schedule", "check_schedule", "rate_schedule"]


@dataclass(frozen=True)
class BlockShape:
    """What the schedule needs of a block."""

    name: str
    channels: int
    mlp_width: int


def rate_schedule(r: int | Sequence[int], num_blocks: int,
                  inflection: float | None = None) -> list[int]:
    """The per-block r of a constant, decreasing or explicit schedule."""
    if not isinstance(r, int):
        rates = [int(x) for x in r]
        if len(rates) != num_blocks:
            raise PassError(f"merge_tokens: r lists {len(rates)} rates, but the model has "
                            f"{num_blocks} transformer blocks; give one per block")
        return rates
    if inflection is None:
        return [r] * num_blocks
    if not 0 <= inflection <= 1:
        raise PassError(f"merge_tokens: inflection must be in [0, 1], got {inflection}")
    if num_blocks == 1:
        return [r]
    high, low = (1 + inflection) * r, (1 - inflection) * r
    return [int(high + (low - high) * i / (num_blocks - 1)) for i in range(num_blocks)]


def check_schedule(rates: Sequence[int], tokens: int, protected: int,
                   blocks: Sequence[BlockShape], *, cap: bool = False
                   ) -> tuple[list[int], list[int]]:
    """The rates and the token count before each block. A rate larger than its block's tokens
    allow is an error naming the block, except with ``cap`` (constant and decreasing schedules,
    as ToMe) for blocks after the first: there it is lowered to the limit."""
    counts, final = [], []
    for index, (rate, block) in enumerate(zip(rates, blocks)):
        if rate < 0:
            raise PassError(f"merge_tokens: r must be >= 0, got {rate} for {block.name}")
        limit = (tokens - protected) // 2
        if rate > limit and cap and index > 0:
            rate = limit
        if rate > limit:
            raise PassError(
                f"merge_tokens: {block.name} has {tokens} tokens ({protected} protected), so its "
                f"bipartite split allows at most r = {limit}; got r = {rate}. Lower r or use a "
                "decreasing schedule (inflection=...)")
        counts.append(tokens)
        final.append(rate)
        tokens -= rate
    return final, counts


def block_macs(rates: Sequence[int], tokens: int, blocks: Sequence[BlockShape]) -> int:
    total = 0
    for rate, block in zip(rates, blocks):
        c, m = block.channels, block.mlp_width
        total += tokens * 4 * c * c + 2 * tokens * tokens * c + (tokens - rate) * 2 * c * m
        tokens -= rate
    return total


def _feasible(rates: list[int], tokens: int, protected: int) -> list[int]:
    capped = []
    for rate in rates:
        rate = max(0, min(rate, (tokens - protected) // 2))
        capped.append(rate)
        tokens -= rate
    return capped


def budget_schedule(budget: float, tokens: int, protected: int,
                    blocks: Sequence[BlockShape]) -> tuple[list[int], str]:
    """The smallest constant r (capped per block) whose MACs are at most ``budget`` times the
    unmerged blocks'; the choice described in one line."""
    if not 0 < budget <= 1:
        raise PassError(f"merge_tokens: flops is a fraction of the unmerged blocks' cost in "
                        f"(0, 1], got {budget}")
    full = block_macs([0] * len(blocks), tokens, blocks)
    for r in range(0, tokens + 1):
        rates = _feasible([r] * len(blocks), tokens, protected)
        cost = block_macs(rates, tokens, blocks)
        if cost <= budget * full:
            return rates, (f"flops={budget:g}: constant r={r} (capped per block: {rates}), "
                           f"estimated block MACs {cost / full:.3f} of unmerged")
        if r > 0 and rates == _feasible([r - 1] * len(blocks), tokens, protected):
            break
    least = block_macs(_feasible([tokens] * len(blocks), tokens, protected), tokens, blocks)
    raise PassError(f"merge_tokens: a FLOP budget of {budget:g} cannot be met: merging as many "
                    f"tokens as the bipartite split allows in every block leaves "
                    f"{least / full:.3f} of the blocks' MACs ({tokens} tokens, {protected} "
                    f"protected, {len(blocks)} blocks); raise flops to at least "
                    f"{least / full:.3f}")
