"""Schedules of merge_tokens: constant, decreasing, explicit, FLOP budget, and their errors."""

from __future__ import annotations

import pytest

from graphpress.errors import PassError
from graphpress.passes.tokens.schedule import (
    BlockShape,
    block_macs,
    budget_schedule,
    check_schedule,
    rate_schedule,
)

_VIT_B = [BlockShape(f"block {i}", 768, 3072) for i in range(12)]


def test_constant_decreasing_and_explicit_rates() -> None:
    assert rate_schedule(8, 3) == [8, 8, 8]
    assert rate_schedule(8, 3, inflection=0.5) == [12, 8, 4]
    assert rate_schedule([3, 2, 1], 3) == [3, 2, 1]
    with pytest.raises(PassError, match="lists 2 rates, but the model has 3"):
        rate_schedule([1, 2], 3)
    with pytest.raises(PassError, match="inflection must be in"):
        rate_schedule(4, 3, inflection=2.0)


def test_r_too_large_names_the_block_and_its_tokens() -> None:
    with pytest.raises(PassError, match=r"block 11 has 21 tokens \(1 protected\).*at most "
                                        r"r = 10; got r = 16"):
        check_schedule([16] * 12, 197, 1, _VIT_B)
    # a constant r is lowered in late blocks, as ToMe does; never in the first block
    rates, counts = check_schedule([16] * 12, 197, 1, _VIT_B, cap=True)
    assert rates == [16] * 11 + [10] and counts[-1] == 21
    with pytest.raises(PassError, match=r"block 0 has 9 tokens"):
        check_schedule([5, 5], 9, 1, _VIT_B[:2], cap=True)


def test_flop_budget_is_met_with_the_smallest_constant_r() -> None:
    rates, line = budget_schedule(0.6, 197, 1, _VIT_B)
    full = block_macs([0] * 12, 197, _VIT_B)
    assert block_macs(rates, 197, _VIT_B) <= 0.6 * full
    smaller = [r - 1 for r in rates]
    assert block_macs(smaller, 197, _VIT_B) > 0.6 * full
    assert line.startswith(f"flops=0.6: constant r={rates[0]}")


def test_a_budget_that_cannot_be_met_says_the_least_reachable() -> None:
    with pytest.raises(PassError, match=r"budget of 0.05 cannot be met.*at least 0\.\d+"):
        budget_schedule(0.05, 17, 1, _VIT_B[:2])
    with pytest.raises(PassError, match=r"flops is a fraction"):
        budget_schedule(1.5, 17, 1, _VIT_B[:2])
