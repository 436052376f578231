"""Shared fixtures: deterministic seeds and the tiny models of tests/models.py.

Without CUDA, Triton kernels run in its CPU interpreter, which Triton reads from
``TRITON_INTERPRET`` when it is first imported: set here, before any test module (or a library
like torch's inductor or transformers) imports it, so the suite's order does not matter."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

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
