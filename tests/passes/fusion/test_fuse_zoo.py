"""fuse_dequant_matmul over the model zoo: every transformer (decoders and encoders) with
int4_weight_only (group 16: the zoo's K are 32..128), int8_weight_only and int8_dynamic, each
with verify=True on eager; the packed program on the Triton kernels (TRITON_INTERPRET=1) and on
onnxruntime against the eager one. Every linear weight is packed; MiniLM runs nightly."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import pytest
import torch

if not torch.cuda.is_available():  # before anything imports triton: its kernels on CPU tensors
    os.environ.setdefault("TRITON_INTERPRET", "1")

import graphpress as gp
from graphpress.kernels import triton_available
from graphpress.ops.dequant_matmul import use_triton
from graphpress.testing import assert_equivalent
from graphpress.testing.zoo import ZooModel, zoo_models

FQ = torch.ops.graphpress.fake_quantize_affine.default
_SCHEMES = {
    "int4_weight_only": "insert_fake_quant(scheme='int4_weight_only', group_size=16)",
    "int8_weight_only": "insert_fake_quant(scheme='int8_weight_only')",
    "int8_dynamic": "insert_fake_quant(scheme='int8_dynamic')",
}
_ONNX_MODELS = ("hf_llama", "hf_bert", "hf_gpt2")
# the default run keeps a few models per case (2 CPU cores); the nightly job runs them all
_FAST = ("hf_llama", "hf_bert", "hf_gpt2", "attention_net")


def _entries(fast: tuple[str, ...] | None = None, only: tuple[str, ...] | None = None
             ) -> list[Any]:
    """Transformer zoo entries; those outside ``fast`` (and MiniLM) are marked slow."""
    return [pytest.param(e, id=e.name, marks=[pytest.mark.slow] if e.name == "minilm" or (
                fast is not None and e.name not in fast) else [])
            for e in zoo_models(include=("transformer",)) if only is None or e.name in only]


def _fused(entry: ZooModel, scheme: str, **kwargs: Any) -> tuple[gp.CompiledModel, tuple]:
    model, inputs = entry.make()
    compiled = gp.compile(model, inputs, passes=f"{_SCHEMES[scheme]}, fuse_dequant_matmul",
                          verify=True, **kwargs)
    quant, fuse = compiled.report().records[-2:]
    assert fuse.name == "fuse_dequant_matmul" and fuse.changed
    # the contract: float32 accumulation tolerance (atol = rtol = 1e-5), or, past it, float
    # rounding only by the float64 referee (the CPU kernels sum exact products in another
    # order than the fake-quant program's matmul; through a deep model with real weights,
    # MiniLM, the two orders drift apart by more than 1e-5 relative)
    with torch.no_grad():
        scale = max(t.abs().max().item() for t in torch.utils._pytree.tree_leaves(
            compiled.program(*inputs)) if isinstance(t, torch.Tensor) and t.is_floating_point())
    summary = compiled.report().details("fuse_dequant_matmul").get("summary", [])
    rounding = any("float rounding only" in line for line in summary)
    assert fuse.max_error is not None and (fuse.max_error <= 1e-5 * (1 + scale) or rounding), (
        fuse.max_error, summary)
    # every fake-quantized weight of a matmul is packed: what stays fake-quant is an
    # activation or a convolution's weight (per-channel schemes quantize those too)
    weights = [n for n in compiled.program.graph.nodes
               if n.target == FQ and compiled.program.is_weight(n.args[0])]
    assert all(u.target == torch.ops.aten.conv2d.default for n in weights for u in n.users)
    assert fuse.skipped == [] and fuse.stats["fused"] == quant.stats["weights"] - len(weights)
    assert fuse.stats["fused_w8a8"] == (fuse.stats["fused"] if scheme == "int8_dynamic" else 0)
    return compiled, inputs


def _bytes_ratio(compiled: gp.CompiledModel) -> float:
    """Packed bytes over float bytes of the fused layers whose float weight left."""
    details = compiled.report().details("fuse_dequant_matmul")
    stats = compiled.report().records[-1].stats
    if details["float_weights_kept"]:  # a tied embedding still reads its table
        return 0.0
    return stats["weight_bytes_after"] / stats["weight_bytes_before"]


@pytest.mark.parametrize("entry", _entries())
def test_zoo_int4_on_eager(entry: ZooModel) -> None:
    compiled, _ = _fused(entry, "int4_weight_only")
    # group 16: 4 bits + a float32 scale and a 4-bit zero per 16 weights (0.2 of fp32)
    assert _bytes_ratio(compiled) <= 0.21


@pytest.mark.parametrize("scheme", ["int8_weight_only", "int8_dynamic"])
@pytest.mark.parametrize("entry", _entries(_FAST))
def test_zoo_int8_on_eager(entry: ZooModel, scheme: str) -> None:
    compiled, _ = _fused(entry, scheme)
    # per channel int8 over K >= 32 weights: at most 0.25 + 4/32 of fp32
    assert _bytes_ratio(compiled) <= 0.375


def _on_triton(compiled: gp.CompiledModel) -> Callable[..., Any]:
    def run(*args: Any, **kwargs: Any) -> Any:
        with use_triton():
            return compiled(*args, **kwargs)
    return run


@pytest.mark.skipif(not triton_available(), reason="triton is not installed: the Triton "
                    "kernel path is untested (pip install triton, torch pinned)")
@pytest.mark.parametrize("scheme", ["int4_weight_only", "int8_weight_only"])
@pytest.mark.parametrize("entry", _entries(_FAST[:2]))
def test_zoo_on_the_triton_kernels(entry: ZooModel, scheme: str) -> None:
    from triton import knobs

    if not torch.cuda.is_available() and not knobs.runtime.interpret:
        pytest.skip("triton was imported before TRITON_INTERPRET=1 was set; run with "
                    "TRITON_INTERPRET=1")
    compiled, inputs = _fused(entry, scheme)
    # MiniLM (real weights, 6 layers): the float32 program itself is ~1e-3 from its float64
    # evaluation, and two kernels that sum the same exact products in other orders (Triton's
    # tiles, the CPU's AMX tiles) drift ~6e-5 apart; the random-weight zoo stays within 1e-5
    tolerance = 1e-4 if entry.name == "minilm" else 1e-5
    assert_equivalent(_on_triton(compiled), compiled, [inputs], rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("scheme", list(_SCHEMES))
@pytest.mark.parametrize("entry", _entries(_FAST[:1], only=_ONNX_MODELS))
def test_zoo_on_onnx(entry: ZooModel, scheme: str) -> None:
    # compile(verify=True) also checks onnxruntime against eager on the samples
    compiled, _ = _fused(entry, scheme, backend="onnx")
    ops = {n.op_type for n in compiled.artifact.onnx_program.model_proto.graph.node}
    # int8 per channel is MatMulNBits(bits=8) where K is a power of two, else a MatMul
    assert ("MatMulNBits" in ops) == (scheme != "int8_dynamic") or (
        scheme == "int8_weight_only" and "MatMul" in ops)
