"""Every zoo model on the Triton backend under the interpreter, checked against eager by
``verify=True`` (1e-4 relative in float32), traced as it comes and after the standard folding
pipeline; the generated module launches fewer kernels than eager runs ATen ops."""

from __future__ import annotations

import pytest
import torch

import graphpress as gp
from graphpress.backends.triton.lowering import node_kind
from graphpress.testing.zoo import ZooModel, zoo_models

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

# the interpreter runs these for 20 s or more each: nightly
SLOW = {"minilm", "hf_levit"}
# every element-wise op of these sits alone between ATen convolutions and pools (after fold_bn):
# there is nothing to fuse, so the module launches as many kernels as eager
NOTHING_TO_FUSE = {"digits_cnn", "transposed_conv_net"}
MODELS = [pytest.param(m, id=m.name, marks=[pytest.mark.slow] if m.name in SLOW else [])
          for m in zoo_models(exclude=("large",))]


def _eager_launches(program) -> int:
    """ATen ops eager PyTorch runs that compute (views and shape queries launch nothing)."""
    return sum(1 for n in program.graph.nodes
               if n.op == "call_function" and node_kind(n) != "view")


@pytest.mark.parametrize("entry", MODELS)
def test_zoo_model_runs_on_triton(entry: ZooModel) -> None:
    model, inputs = entry.make()
    compiled = gp.compile(model, inputs, passes="fold_bn, fixpoint(dce, cse)", backend="triton",
                          verify=True)
    stats = compiled.artifact.stats()
    assert stats["kernels"] >= 1
    eager = _eager_launches(compiled.program)
    assert stats["eager_ops"] == eager
    if entry.name in NOTHING_TO_FUSE:
        assert stats["launches"] == eager and stats["kernels"] == stats["ops_in_kernels"]
    else:
        assert stats["launches"] < eager and stats["kernels"] < stats["ops_in_kernels"]
    assert "triton vs eager max abs error" in compiled.report().extra
    with torch.no_grad():
        torch.testing.assert_close(compiled(*inputs), compiled.program(*inputs), rtol=1e-4,
                                   atol=1e-5)


@pytest.mark.parametrize("name", ["hf_vit", "hf_bert", "residual_chain"])
def test_dynamic_batch_zoo(name: str) -> None:
    from graphpress.testing.zoo import get_model

    model, inputs = get_model(name).make()
    compiled = gp.compile(model, inputs, backend="triton", dynamic_batch=True, verify=True)
    bigger = tuple(torch.cat([t, t[:1]]) if isinstance(t, torch.Tensor) else t for t in inputs)
    with torch.no_grad():
        torch.testing.assert_close(compiled(*bigger), compiled.program(*bigger), rtol=1e-4,
                                   atol=1e-5)


@pytest.mark.parametrize("name", ["hf_llama", "attention_net"])
@pytest.mark.parametrize("scheme", ["int4_weight_only", "int8_weight_only"])
def test_packed_weights_run_the_dequant_matmul_kernel(name: str, scheme: str) -> None:
    from graphpress.testing.zoo import get_model

    model, inputs = get_model(name).make()
    group = ", group_size=32" if scheme == "int4_weight_only" else ""
    compiled = gp.compile(model, inputs, backend="triton", verify=True,
                          passes=f"insert_fake_quant(scheme='{scheme}'{group}), "
                                 "fuse_dequant_matmul")
    calls = compiled.artifact.generated.library_calls
    assert calls and all(str(n.target) == "graphpress.dequant_matmul.default" for n in calls)
    assert "lowered_graphpress_dequant_matmul = triton_lowering('graphpress::dequant_matmul')" \
        in compiled.artifact.source


def test_fake_quant_program_runs_with_its_ops_as_fallbacks() -> None:
    from graphpress.testing.zoo import get_model

    model, inputs = get_model("hf_bert").make()
    compiled = gp.compile(model, inputs, backend="triton", verify=True,
                          passes="insert_fake_quant(scheme='int8_dynamic')")
    fallbacks = {str(n.target) for n in compiled.artifact.generated.fallbacks}
    assert any(t.startswith("graphpress.") for t in fallbacks)
