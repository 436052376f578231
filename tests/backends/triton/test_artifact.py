"""The Triton artifact and its generated source: golden source for two hand-written zoo nets,
determinism, saving and dumping, the report, and clear errors."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from torch import nn

import graphpress as gp
from graphpress.backends.triton import MODULE_FILE, generate
from graphpress.backends.triton.artifact import check_fallbacks
from graphpress.errors import BackendError
from graphpress.testing.zoo import get_model

GOLDEN = Path(__file__).parents[2] / "golden"
PIPELINE = "fold_bn, fixpoint(dce, cse)"


@pytest.mark.parametrize("name", ["residual_chain", "attention_net"])
def test_golden_generated_source(name: str) -> None:
    """Regenerate with GRAPHPRESS_UPDATE_GOLDEN=1 and review the diff (see tests/test_golden.py)."""
    model, inputs = get_model(name).make()
    source = gp.compile(model, inputs, passes=PIPELINE, backend="triton").artifact.source
    path = GOLDEN / f"triton_{name}.py.txt"
    if os.environ.get("GRAPHPRESS_UPDATE_GOLDEN") == "1":
        path.write_text(source)
    assert path.exists(), f"no golden file {path}; run with GRAPHPRESS_UPDATE_GOLDEN=1"
    assert source == path.read_text(), f"generated Triton source of {name} changed"


def test_same_program_same_source() -> None:
    model, inputs = get_model("bmm_attention_net").make()
    first = gp.compile(model, inputs, passes=PIPELINE)
    second = gp.compile(model, inputs, passes=PIPELINE)
    assert generate(first.program).source == generate(second.program).source


def test_save_dump_and_report(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GRAPHPRESS_DUMP", str(tmp_path / "dump"))
    model, inputs = get_model("residual_chain").make()
    compiled = gp.compile(model, inputs, passes=PIPELINE, backend="triton", verify=True)
    compiled.save(tmp_path / "out")
    saved = (tmp_path / "out" / MODULE_FILE).read_text()
    assert saved == compiled.artifact.source == (tmp_path / "dump" / MODULE_FILE).read_text()
    assert "def call(" in saved and "@triton.jit" in saved
    text = str(compiled.report())
    for line in ("triton kernels", "triton launches per call", "triton FLOPs in kernels",
                 "triton vs eager max abs error"):
        assert line in text
    assert gp.load(tmp_path / "out").backend == "eager"  # the program is what reloads


def test_cpu_tensors_need_the_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    model, inputs = get_model("mlp_1d_bn").make()
    compiled = gp.compile(model, inputs, backend="triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(BackendError, match="TRITON_INTERPRET=1"):
        compiled(*inputs)


@torch.library.custom_op("gp_test_triton::cpu_only", mutates_args=(), device_types="cpu")
def _cpu_only(x: torch.Tensor) -> torch.Tensor:
    return x * 2


@_cpu_only.register_fake
def _(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


class _UsesCpuOnly(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.gp_test_triton.cpu_only(x + 1)


def test_fallback_without_a_gpu_kernel_names_the_node() -> None:
    compiled = gp.compile(_UsesCpuOnly(), (torch.randn(4),), backend="triton", verify=True)
    with pytest.raises(BackendError, match=r"node cpu_only: gp_test_triton\.cpu_only\.default "
                                           r"has no Triton lowering and no cuda kernel"):
        check_fallbacks(compiled.artifact.generated, torch.device("cuda"))


class _NoGrad(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            y = self.linear(x)
        return y + 1


def test_higher_order_op_is_refused_naming_the_node() -> None:
    program = gp.compile(_NoGrad(), (torch.randn(2, 4),)).program
    hops = [n for n in program.graph.nodes
            if isinstance(n.target, torch._ops.HigherOrderOperator)]
    if not hops:
        pytest.skip("torch.export inlined the no_grad region in this torch version")
    with pytest.raises(BackendError, match=f"node {hops[0].name}: the higher-order op"):
        generate(program)
