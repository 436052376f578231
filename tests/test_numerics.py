"""compare_outputs and assert_equivalent: worst element, structure mismatches, NaN/inf."""

from __future__ import annotations

import pytest
import torch

from graphpress.numerics import compare_outputs
from graphpress.testing import assert_equivalent


def test_worst_element_is_located() -> None:
    expected = {"a": torch.zeros(2, 3), "b": torch.ones(4)}
    actual = {"a": torch.zeros(2, 3), "b": torch.tensor([1.0, 1.0, 1.5, 1.0])}
    found = compare_outputs(actual, expected, rtol=1e-5, atol=1e-5)
    assert not found.ok
    assert found.worst_path == "['b']" and found.worst_index == (2,)
    assert found.max_abs_error == pytest.approx(0.5)
    assert "got 1.5, expected 1" in found.describe()


def test_tolerances_follow_assert_close_rule() -> None:
    expected = torch.tensor([1000.0, 0.0])
    assert compare_outputs(torch.tensor([1000.005, 0.0]), expected, rtol=1e-5, atol=0).ok
    assert not compare_outputs(torch.tensor([1000.02, 0.0]), expected, rtol=1e-5, atol=0).ok


def test_structure_shape_nan_inf() -> None:
    assert "structure" in compare_outputs((torch.ones(1),), (torch.ones(1), torch.ones(1)),
                                          rtol=0, atol=0).problem
    assert "shape" in compare_outputs(torch.ones(2), torch.ones(3), rtol=0, atol=0).problem
    nan_inf = torch.tensor([float("nan"), float("inf")])
    assert compare_outputs(nan_inf, nan_inf.clone(), rtol=0, atol=0).ok
    assert not compare_outputs(torch.tensor([float("nan"), 1.0]), torch.ones(2), rtol=1,
                               atol=1).ok


def test_assert_equivalent_reports() -> None:
    assert_equivalent(torch.sin, torch.sin, (torch.randn(3),), rtol=0, atol=0)
    with pytest.raises(AssertionError, match="relu vs sigmoid: outputs differ on input set 1"):
        assert_equivalent(torch.relu, torch.sigmoid, [(torch.zeros(0),), (torch.ones(2),)],
                          msg="relu vs sigmoid")
