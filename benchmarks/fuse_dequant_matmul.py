"""Packed int4 / int8 weights on CPU: graphpress's kernels and onnxruntime's MatMulNBits against
float32, one layer and a Llama-config decoder.

Usage::

    python benchmarks/fuse_dequant_matmul.py [--part layer,llama] [--repeats 10] [--threads 1]

``layer``: one 4096 x 4096 weight at M = 1 (decode) and M = 128 (prefill). Eager: torch's float32
``linear`` against ``graphpress::dequant_matmul`` (int4 g128 asymmetric, int8 per channel) and
``graphpress::dynamic_quant_matmul`` (W8A8). onnxruntime: a float32 MatMul model against
MatMulNBits on graphpress's packed int4 g128 weight (accuracy_level 0 and 4), and against what
onnxruntime's own ``MatMulNBitsQuantizer`` makes of the float32 model (same levels). ``max |diff|``
is against the fake-quant float computation (graphpress rows; W8A8: with the activations
fake-quantized per token too) or the float32 MatMul (the quantizer's rows: its quantization
error).

``llama``: a ``LlamaConfig`` decoder with random weights, hidden 2048, intermediate 5632,
4 layers, 16 heads (4 KV heads), vocabulary 4096: one token (the linears' decode cost, no KV
cache) and 128 tokens (prefill). fp32: the float model through gp.compile (eager program and the
ONNX backend); W4: ``insert_fake_quant(scheme='int4_weight_only', group_size=128),
fuse_dequant_matmul`` (every linear, the lm_head too; verification is off here, the tests check
the contracts) through eager and ONNX (MatMulNBits, ``backend_options={"accuracy_level": 0}``
and 4); ORT-Q: the fp32 ONNX model quantized by onnxruntime's ``MatMulNBitsQuantizer`` (block 128,
asymmetric). After the table: on how many weights the quantizer's 4-bit codes differ from
graphpress's and whether at those float32 ``w * (1 / s) + z`` is a half-integer (the two round
ties differently), and the quantizer's level-0 model with graphpress's codes put in, against
eager W4 (what is left of the ORT-Q difference once the codes agree).

Every pair is timed interleaved in the same rounds (benchmarks/common.py) on ``--threads``
threads (torch and onnxruntime), medians; ratios are the baseline's median over the row's.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from common import interleaved, markdown_table
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

import graphpress as gp
from graphpress.ops.dequant_matmul import DEQUANT_MATMUL, DYNAMIC_QUANT_MATMUL
from graphpress.ops.packing import PackedWeight, pack_weight, unpack_codes
from graphpress.ops.quant import choose_qparams_affine, fake_quantize_affine, quantize_affine

FUSE_W4 = "insert_fake_quant(scheme='int4_weight_only', group_size=128), fuse_dequant_matmul"


def _median_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1e3


def _pair(base: Callable[[], Any], other: Callable[[], Any], repeats: int
          ) -> tuple[float, float]:
    (base_wall, _), (other_wall, _) = interleaved(base, other, repeats)
    return _median_ms(base_wall), _median_ms(other_wall)


def _session(model: onnx.ModelProto | str, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    source = model if isinstance(model, str) else model.SerializeToString()
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


# --------------------------------------------------------------------------------- layer
def _int4(weight: torch.Tensor) -> tuple[torch.Tensor, PackedWeight]:
    scale, zero = choose_qparams_affine(weight, [1, 128], -8, 7, False, "int4")
    q = quantize_affine(weight, [1, 128], scale, zero, -8, 7, "int4")
    return (fake_quantize_affine(weight, [1, 128], scale, zero, -8, 7, "int4"),
            pack_weight(q, scale, zero, "int4"))


def _int8(weight: torch.Tensor) -> tuple[torch.Tensor, PackedWeight, torch.Tensor]:
    k = weight.shape[1]
    scale, _ = choose_qparams_affine(weight, [1, k], -128, 127, True, "int8")
    q = quantize_affine(weight, [1, k], scale, None, -128, 127, "int8")
    return (fake_quantize_affine(weight, [1, k], scale, None, -128, 127, "int8"),
            pack_weight(q, scale, None, "int8"), q)


def _per_token_int8(x: torch.Tensor) -> torch.Tensor:
    """x fake-quantized to int8 per row, asymmetric (int8_dynamic's activations)."""
    block = [1, x.shape[1]]
    scale, zero = choose_qparams_affine(x, block, -128, 127, False, "int8")
    return fake_quantize_affine(x, block, scale, zero, -128, 127, "int8")


def _matmul_model(k: int, n: int, nodes: list[onnx.NodeProto],
                  initializers: list[onnx.TensorProto]) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes, "layer", [helper.make_tensor_value_info("A", TensorProto.FLOAT, ["M", k])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["M", n])], initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21),
                                                   helper.make_opsetid("com.microsoft", 1)])


def _float_model(weight: torch.Tensor) -> onnx.ModelProto:
    b = numpy_helper.from_array(weight.t().contiguous().numpy(), "B")
    return _matmul_model(weight.shape[1], weight.shape[0],
                         [helper.make_node("MatMul", ["A", "B"], ["Y"])], [b])


def _nbits_model(packed: PackedWeight, accuracy_level: int) -> onnx.ModelProto:
    n, k, g = packed.out_features, packed.in_features, packed.group_size
    tensors = [numpy_helper.from_array(packed.qweight.reshape(n, k // g, g // 2).numpy(), "B"),
               numpy_helper.from_array(packed.scales.reshape(-1).numpy(), "scales"),
               numpy_helper.from_array(packed.zeros.reshape(-1).numpy(), "zeros")]
    node = helper.make_node("MatMulNBits", ["A", "B", "scales", "zeros"], ["Y"],
                            domain="com.microsoft", K=k, N=n, bits=4, block_size=g,
                            accuracy_level=accuracy_level)
    return _matmul_model(k, n, [node], tensors)


def _ort_quantized(model: onnx.ModelProto, accuracy_level: int) -> onnx.ModelProto:
    quantizer = MatMulNBitsQuantizer(model, bits=4, block_size=128, is_symmetric=False,
                                     accuracy_level=accuracy_level)
    quantizer.process()
    return quantizer.model.model


def _agreement(packed: PackedWeight, quantized: onnx.ModelProto) -> str:
    """How graphpress's int4 g128 packing compares with MatMulNBitsQuantizer's on one weight."""
    tensors = {t.name: numpy_helper.to_array(t) for t in quantized.graph.initializer}
    node = next(n for n in quantized.graph.node if n.op_type == "MatMulNBits")
    theirs_b, theirs_s = tensors[node.input[1]], tensors[node.input[2]]
    ours_b = packed.qweight.reshape(theirs_b.shape).numpy()
    ours_s = packed.scales.reshape(theirs_s.shape).numpy()
    same = float((ours_b == theirs_b).mean())
    scale = float(np.abs(ours_s - theirs_s).max() / np.abs(theirs_s).max())
    return (f"graphpress's packed bytes equal MatMulNBitsQuantizer's (block 128, asymmetric) on "
            f"{same:.2%} of the weight; scales differ by at most {scale:.1e} of the largest")


def layer_part(repeats: int, threads: int) -> str:
    torch.manual_seed(0)
    n = k = 4096
    weight = torch.randn(n, k) * 0.02
    fake4, packed4 = _int4(weight)
    fake8, packed8, q8 = _int8(weight)
    rows: list[tuple[str, ...]] = []
    for m in (1, 128):
        x = torch.randn(m, k)
        base = lambda x=x: torch.nn.functional.linear(x, weight)  # noqa: E731
        cases: dict[str, tuple[Callable[[], Any], torch.Tensor]] = {
            "eager dequant_matmul int4 g128": (lambda x=x: DEQUANT_MATMUL.op(
                x, packed4.qweight, packed4.scales, packed4.zeros, None, 4, 128), x @ fake4.t()),
            "eager dequant_matmul int8 per channel": (lambda x=x: DEQUANT_MATMUL.op(
                x, packed8.qweight, packed8.scales, None, None, 8, k), x @ fake8.t()),
            "eager dynamic_quant_matmul W8A8": (lambda x=x: DYNAMIC_QUANT_MATMUL.op(
                x, q8, packed8.scales, None, False), _per_token_int8(x) @ fake8.t()),
        }
        for name, (fn, want) in cases.items():
            base_ms, ms = _pair(base, fn, repeats)
            diff = float((fn() - want).abs().max())
            rows.append((f"M={m} {name}", f"{base_ms:.2f}", f"{ms:.2f}", f"{base_ms / ms:.2f}",
                         f"{diff:.2e}"))
        feed = {"A": x.numpy()}
        fp32 = _session(_float_model(weight), threads)
        fp32_run = lambda fp32=fp32, feed=feed: fp32.run(None, feed)  # noqa: E731
        for level in (0, 4):
            ours = _session(_nbits_model(packed4, level), threads)
            theirs = _session(_ort_quantized(_float_model(weight), level), threads)
            for name, session, want in (
                    (f"ORT MatMulNBits, graphpress int4 g128, level {level}", ours, x @ fake4.t()),
                    (f"ORT MatMulNBitsQuantizer int4 g128, level {level}", theirs,
                     x @ weight.t())):
                base_ms, ms = _pair(fp32_run, lambda s=session, feed=feed: s.run(None, feed),
                                    repeats)
                diff = float(np.abs(session.run(None, feed)[0] - want.numpy()).max())
                rows.append((f"M={m} {name}", f"{base_ms:.2f}", f"{ms:.2f}",
                             f"{base_ms / ms:.2f}", f"{diff:.2e}"))
    table = markdown_table(("4096 x 4096, M tokens", "fp32 ms", "packed ms", "fp32 / packed",
                            "max |diff|"), rows)
    return f"{table}\n\n{_agreement(packed4, _ort_quantized(_float_model(weight), 0))}"


# --------------------------------------------------------------------------------- llama
def _llama() -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=4,
                         num_attention_heads=16, num_key_value_heads=4, vocab_size=4096,
                         use_cache=False, attn_implementation="sdpa")
    return LlamaForCausalLM(config).eval()


def _logits(output: Any) -> torch.Tensor:
    return torch.utils._pytree.tree_leaves(output)[0]


def _onnx_session(compiled: gp.CompiledModel, folder: Path, threads: int
                  ) -> tuple[ort.InferenceSession, str]:
    compiled.save(folder)
    path = str(folder / "model.onnx")
    return _session(path, threads), path


def _packed_layers(compiled: gp.CompiledModel, model: torch.nn.Module
                   ) -> list[tuple[np.ndarray, np.ndarray]]:
    """(packed qweight, the float weight it was quantized from) of every dequant_matmul of a
    compiled program, in graph order."""
    program = compiled.program
    return [(program.weight(node.args[1]).numpy(),
             model.get_submodule(program.source_module(node)).weight.detach().numpy())
            for node in program.graph.nodes if node.target == DEQUANT_MATMUL.op]


def _with_codes(quantized: onnx.ModelProto, layers: list[tuple[np.ndarray, np.ndarray]]
                ) -> tuple[onnx.ModelProto, str]:
    """The quantizer's model with its MatMulNBits codes replaced by graphpress's (same nodes in
    graph order), and where the two sets of codes differ.

    graphpress (torch's fake-quant) computes ``round_half_even(w * (1 / s)) + z``; the
    quantizer's MLAS kernel rounds ``w * (1 / s) + z``, the zero point added in float32 first,
    half away from zero. The two differ exactly where that float32 sum is a half-integer: a
    tie of ``w / s`` itself (half to even against half away, after the shift by z) or a value
    just off a tie that the addition rounds onto it. The line counts both.
    """
    model = onnx.ModelProto()
    model.CopyFrom(quantized)
    initializers = {t.name: t for t in model.graph.initializer}
    nodes = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
    if len(nodes) != len(layers):
        raise RuntimeError(f"MatMulNBitsQuantizer made {len(nodes)} MatMulNBits, graphpress "
                           f"{len(layers)} dequant_matmul")
    differing = ties = exact = total = 0
    for node, (ours, weight) in zip(nodes, layers, strict=True):
        tensor = initializers[node.input[1]]
        theirs = numpy_helper.to_array(tensor)
        n, k = weight.shape
        codes = [unpack_codes(torch.from_numpy(np.array(a).reshape(n, -1)), 4).numpy()
                 for a in (ours, theirs)]
        rows, cols = np.nonzero(codes[0] != codes[1])
        scales = numpy_helper.to_array(initializers[node.input[2]]).reshape(n, -1)
        zeros = unpack_codes(torch.from_numpy(
            numpy_helper.to_array(initializers[node.input[3]]).reshape(n, -1).copy()), 4).numpy()
        groups = cols // node_attribute(node, "block_size")
        ratio = weight[rows, cols] * (np.float32(1) / scales[rows, groups])
        shifted = ratio + zeros[rows, groups].astype(np.float32)
        ties += int((shifted % 1 == 0.5).sum())
        exact += int((ratio % 1 == 0.5).sum())
        differing += len(rows)
        total += n * k
        tensor.CopyFrom(numpy_helper.from_array(ours.reshape(theirs.shape), tensor.name))
    return model, (f"MatMulNBitsQuantizer's 4-bit codes differ from graphpress's on {differing} "
                   f"of {total} weights; at {ties} of them float32 w * (1 / s) + z is a "
                   f"half-integer ({exact} exact ties of w * (1 / s), {ties - exact} sums "
                   f"rounded onto one)")


def node_attribute(node: onnx.NodeProto, name: str) -> Any:
    return next(helper.get_attribute_value(a) for a in node.attribute if a.name == name)


def _llama_rows(model: torch.nn.Module, tokens: int, repeats: int, threads: int
                ) -> tuple[list[tuple[str, ...]], dict[str, int], str]:
    ids = torch.randint(0, 4096, (1, tokens), generator=torch.Generator().manual_seed(0))
    start = time.perf_counter()
    fp32 = gp.compile(model, (ids,))
    w4 = gp.compile(model, (ids,), passes=FUSE_W4)
    stats = w4.report().records[-1].stats
    feed = {"input_ids": ids.numpy()}
    rows: list[tuple[str, ...]] = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        fp32_onnx = gp.compile(model, (ids,), backend="onnx",
                               backend_options={"intra_op_threads": threads})
        fp32_session, fp32_path = _onnx_session(fp32_onnx, folder / "fp32", threads)
        sessions = {}
        for level in (0, 4):
            ours = gp.compile(model, (ids,), passes=FUSE_W4, backend="onnx",
                              backend_options={"intra_op_threads": threads,
                                               "accuracy_level": level})
            sessions[f"ONNX W4 (graphpress), level {level}"] = _onnx_session(
                ours, folder / f"w4_{level}", threads)[0]
            quantized = _ort_quantized(onnx.load(fp32_path), level)
            if level == 0:  # (onnx.save moves the tensors out of the proto: before it)
                swapped, codes_line = _with_codes(quantized, _packed_layers(w4, model))
                onnx.save(swapped, str(folder / "ortq_swapped.onnx"), save_as_external_data=True)
                swapped_session = _session(str(folder / "ortq_swapped.onnx"), threads)
            onnx.save(quantized, str(folder / f"ortq_{level}.onnx"), save_as_external_data=True)
            sessions[f"ONNX ORT-Q (MatMulNBitsQuantizer), level {level}"] = _session(
                str(folder / f"ortq_{level}.onnx"), threads)
        print(f"# {tokens} tokens: compiled and exported in {time.perf_counter() - start:.0f} s")
        with torch.no_grad():
            want = _logits(w4(ids)).numpy()
            base_ms, ms = _pair(lambda: fp32(ids), lambda: w4(ids), repeats)
        rows.append((f"{tokens} tok, eager W4 g128 vs eager fp32", f"{base_ms:.1f}",
                     f"{ms:.1f}", f"{base_ms / ms:.2f}", "0 (the reference)"))
        for name, session in sessions.items():
            base_ms, ms = _pair(lambda: fp32_session.run(None, feed),
                                lambda s=session: s.run(None, feed), repeats)
            diff = float(np.abs(session.run(None, feed)[0] - want).max())
            rows.append((f"{tokens} tok, {name} vs ONNX fp32", f"{base_ms:.1f}", f"{ms:.1f}",
                         f"{base_ms / ms:.2f}", f"{diff:.3g}"))
        swapped_diff = float(np.abs(swapped_session.run(None, feed)[0] - want).max())
    agreement = (f"{tokens} tok: {codes_line}; the quantizer's level-0 model with graphpress's "
                 f"codes put in: max |logits - eager W4| = {swapped_diff:.3g}")
    return rows, stats, agreement


def llama_part(repeats: int, threads: int) -> str:
    model = _llama()
    rows: list[tuple[str, ...]] = []
    agreements = []
    for tokens in (1, 128):
        more, stats, agreement = _llama_rows(model, tokens, repeats, threads)
        rows += more
        agreements.append(agreement)
    weights = (f"linear weights {stats['weight_bytes_before'] / 2**20:.1f} MiB fp32 -> "
               f"{stats['weight_bytes_after'] / 2**20:.1f} MiB packed "
               f"({stats['weight_bytes_after'] / stats['weight_bytes_before']:.4f}x, "
               f"{stats['fused']} linears)")
    table = markdown_table(("Llama 2048x4, tokens, case", "baseline ms", "ms",
                            "baseline / case", "max |logits - eager W4|"), rows)
    return "\n\n".join([weights, table, *agreements])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", default="layer,llama")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"# {datetime.date.today()} {platform.processor() or platform.machine()}, "
          f"torch {torch.__version__}, onnxruntime {ort.__version__}, threads {args.threads}, "
          f"{args.repeats} interleaved rounds")
    parts = {"layer": layer_part, "llama": llama_part}
    for part in args.part.split(","):
        start = time.perf_counter()
        print(f"\n## {part}\n")
        print(parts[part](args.repeats, args.threads))
        print(f"\n({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
