"""Shared fixtures: deterministic seeds and the tiny models of tests/models.py."""

from __future__ import annotations

import pytest
import torch

from graphpress.frontends import trace
from graphpress.ir.program import Program
from tests.models import ConvBNLinear, Redundant, conv_inputs, vec_inputs


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture
def conv_program() -> Program:
    return trace(ConvBNLinear().eval(), conv_inputs())


@pytest.fixture
def redundant_program() -> Program:
    return trace(Redundant().eval(), vec_inputs())
