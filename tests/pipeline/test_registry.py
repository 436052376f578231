"""Pass registry and pipeline parsing: names, arguments, fixpoint groups, clear errors."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

import graphpress as gp
from graphpress.errors import PipelineError
from graphpress.passes import Fixpoint, Pass, PassResult, available_passes, build_pipeline
from graphpress.passes.cleanup.cse import CommonSubexpressionElimination
from graphpress.passes.cleanup.fold_constants import FoldConstants


def test_builtins_registered() -> None:
    assert {"dce", "cse", "fold_constants"} <= set(available_passes())


def test_string_pipeline_with_arguments_and_fixpoint() -> None:
    pipeline = build_pipeline("cse, fold_constants(max_new_elements=8), fixpoint(dce, cse, "
                              "max_iterations=3)")
    assert isinstance(pipeline[0], CommonSubexpressionElimination)
    assert isinstance(pipeline[1], FoldConstants) and pipeline[1].max_new_elements == 8
    assert isinstance(pipeline[2], Fixpoint) and pipeline[2].max_iterations == 3
    assert [p.name for p in pipeline[2].passes] == ["dce", "cse"]
    assert pipeline[1].describe() == "fold_constants(max_new_elements=8)"


def test_list_pipeline_mixes_objects_and_names() -> None:
    pipeline = build_pipeline([FoldConstants(), "dce", "cse,dce"])
    assert [p.name for p in pipeline] == ["fold_constants", "dce", "cse", "dce"]


def test_unknown_pass_lists_known_and_suggests() -> None:
    with pytest.raises(PipelineError, match=r"unknown pass 'csee'.*Did you mean 'cse'.*Known"):
        build_pipeline("csee")


def test_wrong_arguments_are_named() -> None:
    with pytest.raises(PipelineError, match=r"unexpected argument\(s\) max_new.*accepts: "
                                            "max_new_elements"):
        build_pipeline("fold_constants(max_new=3)")
    with pytest.raises(PipelineError, match="rejected its arguments"):
        build_pipeline("fold_constants(max_new_elements=-1)")
    with pytest.raises(PipelineError, match="must be named"):
        build_pipeline("fold_constants(3)")
    with pytest.raises(PipelineError, match="not a literal"):
        build_pipeline("fold_constants(max_new_elements=os.system)")
    with pytest.raises(PipelineError, match="cannot parse"):
        build_pipeline("dce,,(")
    with pytest.raises(PipelineError, match="not the class"):
        build_pipeline([FoldConstants])
    with pytest.raises(PipelineError, match="cannot be nested"):
        build_pipeline("fixpoint(dce, fixpoint(cse))")


def test_register_pass_decorator() -> None:
    @gp.register_pass("test_noop_registered")
    @dataclass
    class Noop(Pass):
        """Does nothing."""

        def run(self, program: gp.Program, ctx: object) -> PassResult:
            return PassResult(False)

    assert available_passes()["test_noop_registered"] is Noop
    assert build_pipeline("test_noop_registered")[0].name == "test_noop_registered"
    with pytest.raises(ValueError, match="already registered"):
        gp.register_pass("test_noop_registered")(type("Other", (Noop,), {}))
    with pytest.raises(TypeError, match="Pass subclasses"):
        gp.register_pass("test_not_a_pass")(int)
