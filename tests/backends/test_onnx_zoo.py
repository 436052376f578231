"""Extended tests: every zoo model through the ONNX backend, onnxruntime against eager.

Acceptance of issue 4: after the cleanup pipeline (and ``fold_bn`` first for models with batch
norm), onnxruntime's outputs are within 1e-4 (max abs, fp32) of the eager program's. Three models
run by default; the rest are marked slow (an export takes seconds). Every model is held to the
same bound.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

import graphpress as gp
from graphpress.numerics import compare_outputs
from graphpress.testing.zoo import ZooModel, zoo_models

CLEANUP = "fixpoint(dce, cse, fold_constants)"
FOLD_BN = f"fold_bn, {CLEANUP}"
ATOL = 1e-4
DEFAULT = {("concat_net", FOLD_BN), ("attention_net", CLEANUP), ("hf_bert", CLEANUP)}


def _cases() -> list[Any]:
    cases = []
    for entry in zoo_models():
        for pipeline in [CLEANUP] + ([FOLD_BN] if "batchnorm" in entry.tags else []):
            marks = [] if (entry.name, pipeline) in DEFAULT else [pytest.mark.slow]
            label = "fold_bn" if pipeline == FOLD_BN else "cleanup"
            cases.append(pytest.param(entry, pipeline, id=f"{entry.name}-{label}", marks=marks))
    return cases


@pytest.mark.parametrize(("entry", "pipeline"), _cases())
def test_onnxruntime_matches_eager(entry: ZooModel, pipeline: str) -> None:
    model, inputs = entry.make()
    compiled = gp.compile(model, inputs, passes=pipeline, backend="onnx")
    with torch.no_grad():
        eager = compiled.program(*inputs)
    found = compare_outputs(compiled(*inputs), eager, rtol=0, atol=ATOL)
    assert found.ok, f"{entry.name} with {pipeline}: {found.describe()}"
