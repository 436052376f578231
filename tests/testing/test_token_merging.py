"""The full-length simulation of bipartite soft matching (the merge_tokens reference)."""

from __future__ import annotations

import torch

from graphpress.testing.token_merging import MergeSimulation, key_validity


def test_one_step_by_hand() -> None:
    # tokens: 0 protected; A = 1, 3; B = 2, 4. Key of 1 equals key of 4 -> 1 merges into 4.
    keys = torch.tensor([[1.0, 0], [0, 1], [1, 0.1], [1, 1], [0, 1]])[None, None]
    x = torch.arange(5.0)[None, :, None]
    simulation = MergeSimulation(1, 5, protected=1)
    out = simulation.step(x, keys, r=1)
    assert simulation.groups[0] == [[0], [3], [2], [4, 1]]
    assert out[0, :, 0].tolist() == [0.0, 2.5, 2.0, 3.0, 2.5]   # 1 and 4 average to 2.5
    proportional = simulation.key_bias(True, torch.float32)
    assert torch.allclose(proportional, torch.zeros(1, 5))    # each copy counts once: size 2
    plain = simulation.key_bias(False, torch.float32)
    assert torch.allclose(plain[0, [1, 4]].exp(), torch.tensor([0.5, 0.5]))


def test_padding_is_never_averaged_into_real_tokens() -> None:
    # token 4 is padding; its only candidate partners are real, so its score is -inf
    keys = torch.randn(1, 2, 5, 4, generator=torch.Generator().manual_seed(0))
    valid = torch.tensor([[True, True, True, True, False]])
    simulation = MergeSimulation(1, 5, protected=0, valid=valid)
    x = torch.randn(1, 5, 3)
    out = simulation.step(x, keys, r=2)   # A = 0, 2, 4 (4 padding); B = 1, 3
    padding_group = next(g for g in simulation.groups[0] if 4 in g)
    assert simulation.counts[0, 4] == 0 or padding_group == [4]
    for group in simulation.groups[0]:
        counted = [m for m in group if simulation.counts[0, m] > 0]
        assert all(bool(valid[0, m]) == bool(valid[0, group[0]]) for m in counted)
        if 4 not in counted:
            expected = x[0, counted].mean(0)
            assert torch.allclose(out[0, group[0]], expected)


def test_key_validity_of_boolean_and_additive_masks() -> None:
    boolean = torch.tensor([True, True, False])[None, None, None].expand(2, 1, 3, 3)
    assert key_validity(boolean).tolist() == [[True, True, False]] * 2
    additive = torch.where(boolean, 0.0, torch.finfo(torch.float32).min)
    assert key_validity(additive).tolist() == [[True, True, False]] * 2
