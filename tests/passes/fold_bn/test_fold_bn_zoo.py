"""Extended tests: fold_bn over every zoo model with BatchNorm, verified, in fp32 and fp64.

Every BatchNorm folds, its weights leave the program, and ``verify=True`` checks the contract
at its default tolerance (rtol = atol = 1e-5; where deep nets exceed it by fp32 rounding, the
float64 referee of :mod:`graphpress.pipeline.rounding` rules on it, which
``test_mobilenet_needs_the_referee_and_passes_it`` pins), and in fp64 at 1e-12, against the
unfolded program.
"""

from __future__ import annotations

import copy
import functools
from pathlib import Path
from typing import Any

import pytest
import torch

import graphpress as gp
from graphpress.testing import assert_equivalent
from graphpress.testing.zoo import ZooModel, get_model, zoo_models

_BN = (torch.ops.aten.batch_norm.default,
       torch.ops.aten._native_batch_norm_legit_no_training.default)


def _params(large: bool = False) -> list[Any]:
    models = (zoo_models(include=("batchnorm", "large"), exclude=()) if large
              else zoo_models(include=("batchnorm",)))
    return [pytest.param(m, id=m.name) for m in models]


@functools.cache
def _built(name: str) -> tuple[torch.nn.Module, tuple[Any, ...]]:
    """One build per model for both dtypes (compile clones the weights; never modified)."""
    return get_model(name).make()


def _make(entry: ZooModel, dtype: torch.dtype) -> tuple[torch.nn.Module, tuple[Any, ...]]:
    model, inputs = _built(entry.name)
    if dtype == torch.float64:
        model = copy.deepcopy(model).double()
        inputs = tuple(x.double() if x.is_floating_point() else x for x in inputs)
    return model, inputs


def _check(entry: ZooModel, dtype: torch.dtype, tmp_path: Path | None = None) -> None:
    model, inputs = _make(entry, dtype)
    batchnorms = [name for name, m in model.named_modules()
                  if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    compiled = gp.compile(model, inputs, passes=[gp.passes.FoldBatchNorm()], verify=True)
    (record,) = compiled.report().records
    assert record.stats["folded_batchnorm"] == len(batchnorms) > 0, str(compiled.report())
    assert record.stats["not_folded"] == 0, str(compiled.report())
    assert record.max_error is not None
    assert not {n.target for n in compiled.program.graph.nodes} & set(_BN)
    left = [w for w in compiled.program.weights() if any(w.startswith(f"{bn}.")
                                                        for bn in batchnorms)]
    assert left == []
    if dtype == torch.float64:
        assert_equivalent(compiled, model, inputs, rtol=1e-12, atol=1e-12, msg=entry.name)
    if tmp_path is not None:
        loaded = gp.load(compiled.save(tmp_path / entry.name))
        assert_equivalent(loaded, compiled, inputs, rtol=0, atol=0, msg=f"{entry.name} reloaded")


@pytest.mark.parametrize("entry", _params())
def test_fold_bn_on_zoo_fp32(entry: ZooModel, tmp_path: Path) -> None:
    _check(entry, torch.float32, tmp_path)


@pytest.mark.parametrize("entry", _params())
def test_fold_bn_on_zoo_fp64(entry: ZooModel) -> None:
    _check(entry, torch.float64)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("entry", _params(large=True))
def test_fold_bn_on_large_zoo(entry: ZooModel, dtype: torch.dtype) -> None:
    _check(entry, dtype)


def test_mobilenet_needs_the_referee_and_passes_it() -> None:
    """hf_mobilenet_v2 (52 BatchNorms, random weights) folds beyond 1e-5 of its logits' scale
    on a generated sample; the float64 referee finds that no more than the unfolded program's
    own fp32 rounding, and says so in the report, the pass's and the end-to-end line."""
    model, inputs = _built("hf_mobilenet_v2")
    compiled = gp.compile(model, inputs, passes="fold_bn", verify=True)
    report = compiled.report()
    (record,) = report.records
    assert record.max_error is not None and record.max_error > 1e-5
    assert any("float rounding only" in line for line in record.details["summary"]), str(report)
    assert "float rounding only" in report.extra["end-to-end vs model"]


@pytest.mark.parametrize(("name", "stat", "folded", "suffix"), [
    ("hf_convnext", "folded", 2, "layer_scale_parameter"),
    ("hf_llama", "folded_input_side", 5, "norm.weight"),
])
def test_fold_bn_folds_layer_scale_and_norm_weights(name: str, stat: str, folded: int,
                                                    suffix: str) -> None:
    """ConvNeXt's LayerScale (after a linear) and Llama's RMSNorm weights (before the
    projections) are constant per-channel multiplies: they fold too, verified."""
    model, inputs = get_model(name).make()
    compiled = gp.compile(model, inputs, passes="fold_bn", verify=True)
    (record,) = compiled.report().records
    assert record.stats[stat] == folded
    assert not [w for w in compiled.program.weights() if w.endswith(suffix)]
    assert_equivalent(compiled, model, inputs, rtol=1e-5, atol=1e-5)
