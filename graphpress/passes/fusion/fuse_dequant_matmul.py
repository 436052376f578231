"""Replace matmuls on fake-quantized constant weights with matmuls on packed integer weights.

For a layer ``y = x @ fq(W)^T + b`` (linear, matmul, mm, addmm; see
:mod:`graphpress.passes.fusion.match`) with ``fq(W) = (q - z) * s`` per block, the pass stores
``q`` packed (docs/ops/packed_formats.md: 4-bit codes two a byte, 8-bit codes one a byte, scales
and zero codes per row and group) and calls ``graphpress::dequant_matmul(x, qweight, scales,
zeros, b, bits, group_size)``, which rebuilds ``(q - z) * s`` bit for bit (float32 scales) and
multiplies; the float weight, its scale and zero point leave the state dict once nothing else
reads them. So the program computes the same products as its input, summed in another order:
the contract is ``exact`` at float32 accumulation tolerance (``rtol = atol = 1e-5``, with the
float64 referee for deep programs). Scales stored in float16 / bfloat16 (``scale_dtype``) are
rounded, which moves the weights: the contract is then statistical against the input.

With ``w8a8=True`` (the default), a layer whose input is the dynamic per-token int8 fake-quant
of ``int8_dynamic`` and whose weight is int8, symmetric, per channel becomes
``graphpress::dynamic_quant_matmul`` on the unquantized input: the op quantizes each token with
the same formulas and sums the int8 products exactly in int32, so the activation fake-quant
nodes go too when no other node reads them.

Every layer that is not fused is reported with its reason: a float weight (activation-only
quantization), a weight type the op cannot pack (float8), a weight or qparams computed in the
graph, 4-bit codes with an odd K (two codes a byte along K), blocks across K, a batched weight.
The report's stats give the layers' weight bytes before (float) and after (packed).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch.fx import Node

from graphpress.ir.builder import GraphBuilder
from graphpress.ir.graph import erase_unused
from graphpress.ir.program import Program
from graphpress.ops.dequant_matmul import DEQUANT_MATMUL, DYNAMIC_QUANT_MATMUL
from graphpress.ops.packing import PackedWeight, pack_weight
from graphpress.ops.quant import quantize_affine
from graphpress.passes.fusion.match import Layer, WeightQuant, match_layer
from graphpress.pipeline.base import Contract, Pass, PassContext, PassResult, Skip
from graphpress.pipeline.registry import register_pass

__all__ = ["FuseDequantMatmul"]

_SCALE_DTYPES = {"float32": torch.float32, "float16": torch.float16,
                 "bfloat16": torch.bfloat16}


@dataclass
class _Stored:
    """The packed weight of one fake-quant node, as program weights."""

    nodes: tuple[Node, ...]
    bits: int
    group_size: int
    nbytes: int
    per_channel: bool


@register_pass("fuse_dequant_matmul")
@dataclass
class FuseDequantMatmul(Pass):
    """Replaces matmul(x, fake_quantize(W)) with dequant_matmul(x, packed W)."""

    scale_dtype: str = "float32"   # how scales are stored: float32, float16, bfloat16
    w8a8: bool = True              # int8_dynamic layers become the W8A8 dynamic op

    contract: ClassVar[Contract] = Contract.exact(rtol=1e-5, atol=1e-5)
    rewrites_weights = True
    runs_after = ("insert_fake_quant",)

    def __post_init__(self) -> None:
        if self.scale_dtype not in _SCALE_DTYPES:
            raise ValueError(f"scale_dtype must be one of {', '.join(_SCALE_DTYPES)}, got "
                             f"{self.scale_dtype!r}")

    def contract_for(self, program: Program) -> Contract:
        if self.scale_dtype == "float32":
            return self.contract
        return Contract.statistical(f"vs the input program ({self.scale_dtype} scales round "
                                    "the weights)", sqnr_db=35.0, cosine=0.999)

    def run(self, program: Program, ctx: PassContext) -> PassResult:
        skipped: list[Skip] = []
        packed: dict[tuple[Node, str], _Stored] = {}
        float_bytes: dict[Node, int] = {}
        summary: list[str] = []
        stats = {"fused": 0, "fused_w8a8": 0}
        for node in list(program.graph.nodes):
            layer, reason = match_layer(program, node)
            if layer is None:
                if reason:
                    skipped.append(Skip(node.name, reason))
                continue
            w8a8 = self.w8a8 and layer.activation is not None and _per_channel_int8(
                program, layer.weight)
            refusal = self._refusal(program, layer)
            if refusal:
                skipped.append(Skip(node.name, refusal))
                continue
            key = (layer.weight.node, "w8a8" if w8a8 else "packed")
            if key not in packed:
                packed[key] = self._store(program, layer, w8a8)
            stored = packed[key]
            weight = program.weight(layer.weight.weight)
            float_bytes[layer.weight.weight] = weight.numel() * weight.element_size()
            self._replace(program, layer, stored, w8a8)
            stats["fused"] += 1
            stats["fused_w8a8"] += w8a8
            module = program.source_module(node) or "<top level>"
            grain = "per channel" if stored.per_channel else f"g{stored.group_size}"
            summary.append(f"{node.name} ({module}): {layer.kind} {tuple(weight.shape)} -> "
                           f"{'w8a8 int8' if w8a8 else f'int{stored.bits}'} {grain}, "
                           f"{stored.nbytes} bytes "
                           f"({stored.nbytes / float_bytes[layer.weight.weight]:.3f}x)")
        alive = set(program.graph.nodes)  # a fake-quant read only through a transpose is gone
        erase_unused(program, [fq for fq, _ in packed if fq in alive])
        alive = set(program.graph.nodes)
        kept = [w for w in float_bytes if w in alive]
        stats["weight_bytes_before"] = sum(float_bytes.values())
        stats["weight_bytes_after"] = sum(s.nbytes for s in packed.values()) + sum(
            float_bytes[w] for w in kept)
        stats["not_fused"] = len(skipped)
        details = {"summary": summary, "float_weights_kept": [
            f"{program.weight_name(w)} (still read by "
            f"{', '.join('%' + u.name for u in w.users)})" for w in kept]}
        if stats["weight_bytes_before"]:
            ratio = stats["weight_bytes_after"] / stats["weight_bytes_before"]
            summary.append(f"fused layers' weights: {stats['weight_bytes_before']} -> "
                           f"{stats['weight_bytes_after']} bytes ({ratio:.4f}x)")
        return PassResult(stats["fused"] > 0, stats, skipped, details)

    # ------------------------------------------------------------------------------- checks
    def _refusal(self, program: Program, layer: Layer) -> str:
        wq = layer.weight
        n, k = _nk(program, wq)
        rows, group = wq.block
        if group not in range(1, k + 1) or k % group or n % rows:
            return (f"its weight's blocks {list(wq.node.args[1])} do not run along K "
                    f"(K={k}, N={n})")
        if wq.dtype in ("int4", "uint4") and k % 2:
            return (f"4-bit codes are packed two a byte along K, and K={k} is odd (pad the "
                    "layer's input features to an even number, or quantize it to int8)")
        return ""

    # ---------------------------------------------------------------------------- rewriting
    def _store(self, program: Program, layer: Layer, w8a8: bool) -> _Stored:
        wq = layer.weight
        weight, block, scale, zero_point, qmin, qmax, dtype = wq.node.args
        tensor = program.weight(weight).detach()
        scale_t = program.weight(scale).detach()
        zero_t = None if zero_point is None else program.weight(zero_point).detach()
        q = quantize_affine(tensor, list(block), scale_t, zero_t, qmin, qmax, dtype)
        if wq.transposed:
            q, scale_t = q.t(), scale_t.t()
            zero_t = None if zero_t is None else zero_t.t()
        base = program.weight_name(weight)
        if w8a8:
            rows = q.shape[0] // scale_t.shape[0]
            tensors = {"qweight": q.contiguous(),
                       "scales": scale_t.repeat_interleave(rows, 0).to(torch.float32)}
            bits, group = 8, q.shape[1]
        else:
            pw: PackedWeight = pack_weight(q, scale_t, zero_t, dtype,
                                           scale_dtype=_SCALE_DTYPES[self.scale_dtype])
            tensors = {"qweight": pw.qweight, "scales": pw.scales}
            if pw.zeros is not None:
                tensors["zeros"] = pw.zeros
            bits, group = pw.bits, pw.group_size
        with GraphBuilder(program, anchor=layer.node, pass_name=self.name) as build:
            nodes = tuple(build.weight(program.free_weight_name(f"{base}_{role}"), t,
                                       kind="buffer") for role, t in tensors.items())
        nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
        return _Stored(nodes if len(nodes) == 3 or w8a8 else (*nodes, None), bits, group,
                       nbytes, group == q.shape[1])

    def _replace(self, program: Program, layer: Layer, stored: _Stored, w8a8: bool) -> None:
        with GraphBuilder(program, anchor=layer.node, pass_name=self.name) as build:
            if w8a8:
                assert layer.activation is not None
                qweight, scales = stored.nodes
                fused = build.call(DYNAMIC_QUANT_MATMUL.op, layer.activation.source, qweight,
                                   scales, layer.bias, layer.activation.symmetric)
            else:
                qweight, scales, zeros = stored.nodes
                fused = build.call(DEQUANT_MATMUL.op, layer.x, qweight, scales, zeros,
                                   layer.bias, stored.bits, stored.group_size)
        layer.node.replace_all_uses_with(fused)
        program.graph.erase_node(layer.node)
        erase_unused(program, [*layer.weight.path,
                               *([layer.activation.node] if w8a8 and layer.activation else [])])


def _nk(program: Program, wq: WeightQuant) -> tuple[int, int]:
    rows, cols = program.weight(wq.weight).shape
    return (cols, rows) if wq.transposed else (rows, cols)


def _per_channel_int8(program: Program, wq: WeightQuant) -> bool:
    """int8, symmetric (no or all-zero zero point), one scale per row of [N, K]."""
    zero_point = wq.node.args[3]
    symmetric = zero_point is None or not bool(program.weight(zero_point).any())
    _, k = _nk(program, wq)
    return wq.dtype == "int8" and symmetric and wq.block[1] == k
