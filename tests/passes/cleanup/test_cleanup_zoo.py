"""Extended tests: the cleanup pipeline over every zoo model, verified, against eager.

Acceptance of the core: export -> fixpoint(dce, cse, fold_constants) with verify=True -> eager
gives the model's outputs within 1e-5 (max abs, fp32). Also saves and reloads each result.
"""

from __future__ import annotations

from pathlib import Path

import pytest

import graphpress as gp
from graphpress.testing import assert_equivalent
from graphpress.testing.zoo import ZooModel, zoo_models

PIPELINE = "fixpoint(dce, cse, fold_constants)"


def _params(include: tuple[str, ...] = (), exclude: tuple[str, ...] = ("large",)) -> list[object]:
    return [pytest.param(m, id=m.name, marks=[pytest.mark.slow] if "slow" in m.tags else [])
            for m in zoo_models(include=include, exclude=exclude)]


@pytest.mark.parametrize("entry", _params())
def test_cleanup_pipeline_is_exact_on_zoo(entry: ZooModel, tmp_path: Path) -> None:
    model, inputs = entry.make()
    compiled = gp.compile(model, inputs, passes=PIPELINE, verify=True)
    records = compiled.report().records
    assert records and all(r.max_error == 0.0 for r in records), str(compiled.report())
    assert_equivalent(compiled, model, inputs, rtol=0, atol=1e-5, msg=entry.name)
    loaded = gp.load(compiled.save(tmp_path / entry.name))
    assert_equivalent(loaded, model, inputs, rtol=0, atol=1e-5, msg=f"{entry.name} reloaded")


@pytest.mark.slow
@pytest.mark.parametrize("entry", _params(include=("large",), exclude=()))
def test_cleanup_pipeline_on_large_zoo(entry: ZooModel) -> None:
    model, inputs = entry.make()
    compiled = gp.compile(model, inputs, passes=PIPELINE, verify=True)
    assert_equivalent(compiled, model, inputs, rtol=0, atol=1e-5, msg=entry.name)
