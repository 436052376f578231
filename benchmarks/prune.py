"""prune_channels: latency speedup, parameters and MACs; analysis time vs depth; Torch-Pruning
side by side; digits CNN accuracy after pruning 50% and a brief fine-tune.

Usage::

    python benchmarks/prune.py [--sections latency,depth,tp,digits,hidden,scale] [--repeats 10]
                               [--threads N] [--models a,b] [--tp-rounds 10]

* latency: ``hf_resnet50`` and ``hf_vit_base`` (zoo, batch 1, random weights), dense and pruned
  at ratios 0.3 and 0.5 (L2, per-group ratio) with ``round_to`` 1, the multiple
  ``choose_round_to`` picks from the eager layer latency, the one it picks from onnxruntime
  layer latency (``onnx_layer_seconds``), and for ResNet-50 the fixed 8 and 16 (a variant with
  the parameter count of an earlier one is the same plan and is left out). Every variant runs
  on the eager backend (the Program), for ResNet-50 also after ``fold_bn``, and on the ONNX
  backend (onnxruntime, no spin-waiting), all on ``--threads`` threads (default 1: on a shared
  2-core machine a 2-thread run measures the neighbours), in one process: one warm-up call
  each, then ``--repeats`` rounds calling every (backend, variant) in an order rotated by one
  each round; the median of the rounds, ``torch.no_grad()``. Speedups are against the dense
  program on the same backend; parameters and MACs from the ``costs`` analysis.
* depth: ``channel_groups`` time on a Llama configuration (hidden 64, 4/2 heads) at 2, 8 and 32
  layers, next to its export time.
* tp: every zoo model, the benchmark-size ``large`` ones included (or ``--models``), each side's
  failure or refusal reported; same
  L2 criterion and ratio 0.5 (Torch-Pruning ignores the last conv/linear layer): parameter
  counts after pruning, the share of channels both keep in the first conv/linear layer, and
  the time as a ratio graphpress / Torch-Pruning in the same run. graphpress's time: the
  ``PruneChannels.run`` call on a traced program (channel analysis, scores, plan, weight
  rewrite and the shape metadata refresh that keeps the IR valid), ``torch.export``
  excluded (shown in its own column: it is the IR every pass shares) and no verification.
  Torch-Pruning's: ``MagnitudePruner(...)`` (its dependency graph, which runs one forward pass
  of the module to trace it, and the groups) plus ``pruner.step()``; the channel analysis's
  propagation rounds in their own column. ``--tp-rounds`` rounds
  (default 10), each one graphpress call on a fresh copy of the program then one
  Torch-Pruning call on a fresh model: the first round's ratio (cold: FakeTensor's dispatch
  cache, process-wide, is empty for this model) and the median ratio of the other rounds. A
  Torch-Pruning call past 60 s stops the model's comparison.
* digits: the zoo's trained digits CNN pruned 50% by every criterion in turn (each on a fresh
  trace of the same model, same run), then fine-tuned 3 epochs (Adam, lr 1e-3); test accuracy
  dense, pruned, and fine-tuned. ``taylor`` and ``hessian`` take their gradients from 128
  training examples, one per batch (so the Fisher is per-sample; cross-entropy against their
  labels), ``variance`` its activation statistics from 16 training batches of 32; ``l2`` and
  ``lamp`` also with ``global_ranking=True``.
* hidden: ``prune_hidden=True`` next to the default (heads and MLP channels only) on the tiny
  Llama, ViT and BERT classifier of the zoo, and on BiT (every conv weight-standardized: with
  ``prune_hidden`` the standardization runs over the kept inputs), random weights, ratio 0.5:
  parameters and MACs before -> after, the worst error against the contract's reference
  (``verify=True``), and the deviation from the unpruned model on the example inputs (SQNR,
  cosine, top-1 agreement).
* scale: a Llama-3-70B-shaped model on the ``meta`` device: export time, ``channel_groups``
  time, a structure-only plan (``importance="random"``), the same with ``prune_hidden=True``
  (analysis included), peak RSS.
"""

from __future__ import annotations

import argparse
import signal
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

import graphpress as gp
from graphpress.frontends import trace
from graphpress.passes import PassContext, PruneChannels
from graphpress.passes.prune.rounding import Layer, choose_round_to, eager_seconds
from graphpress.testing.zoo import accuracy, digits_data, get_model, zoo_models


def _time(fns: dict[Any, Callable[[], Any]], repeats: int) -> dict[Any, float]:
    """Median seconds per call; each round calls every function once, in an order rotated by
    one from round to round, so a slow drift of the machine hits all of them alike."""
    samples: dict[Any, list[float]] = {k: [] for k in fns}
    keys = list(fns)
    with torch.no_grad():
        for fn in fns.values():
            fn()
        for round_ in range(repeats):
            shift = round_ % len(keys)
            for key in keys[shift:] + keys[:shift]:
                start = time.perf_counter()
                fns[key]()
                samples[key].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in samples.items()}


def onnx_layer_seconds(layer: Layer, repeats: int) -> float:
    """``choose_round_to``'s timer on onnxruntime: the layer alone as a one-node ONNX model
    (Conv, or MatMul against the transposed weight), one intra-op thread, every graph
    optimization on (the NCHWc layout transformer included), no spin-waiting."""
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    weight = np.random.default_rng(0).standard_normal(layer.weight, dtype=np.float32)
    if layer.op == "linear":
        init = numpy_helper.from_array(np.ascontiguousarray(weight.T), "w")
        node = helper.make_node("MatMul", ["x", "w"], ["y"])
    else:
        init = numpy_helper.from_array(weight, "w")
        pads = ([0] * len(layer.stride) if layer.padding == "valid" else list(layer.padding))
        attrs = {"auto_pad": "SAME_UPPER"} if layer.padding == "same" else {"pads": pads * 2}
        node = helper.make_node("Conv", ["x", "w"], ["y"], strides=list(layer.stride),
                                dilations=list(layer.dilation), group=layer.groups, **attrs)
    graph = helper.make_graph(
        [node], "layer", [helper.make_tensor_value_info("x", TensorProto.FLOAT, layer.input)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [init])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(model.SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    x = np.random.default_rng(1).standard_normal(layer.input, dtype=np.float32)
    session.run(None, {"x": x})
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        session.run(None, {"x": x})
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def _variants(name: str, dense: Any, ratios: tuple[float, ...], fixed: tuple[int, ...]
              ) -> dict[str, Any]:
    """Dense, and per ratio: round_to 1, the multiples ``choose_round_to`` picks from the
    eager and the onnxruntime layer latency, and ``fixed`` ones (a variant whose parameter
    count equals an earlier one's is the same plan and is left out)."""
    programs, seen = {"dense": dense}, set()
    for ratio in ratios:
        multiples = {1: "", **{m: "fixed" for m in fixed}}
        for backend, timer in (("eager", eager_seconds), ("onnx", onnx_layer_seconds)):
            choice = choose_round_to(dense, PruneChannels(ratio=ratio), timer=timer)
            print(f"{name} ratio {ratio}: round_to from the {backend} layer latency: "
                  f"{choice.best}\n{choice.table()}", flush=True)
            multiples[choice.best] = f"{backend} layers"
        for m, why in sorted(multiples.items()):
            program = dense.copy()
            PruneChannels(ratio=ratio, round_to=m).run(program, PassContext())
            params = program.analysis("costs").parameters
            if (ratio, params) not in seen:
                seen.add((ratio, params))
                programs[f"{ratio}" + (f", round_to {m} ({why})" if m > 1 else "")] = program
    return programs


def latency(repeats: int, threads: int) -> None:
    """Dense and pruned ResNet-50 / ViT-B on the eager (also after fold_bn, where the model has
    BatchNorms) and ONNX backends, every variant in the same interleaved rounds."""
    from graphpress.backends.onnx import onnx_backend
    from graphpress.passes import FoldBatchNorm

    for name, fixed in (("hf_resnet50", (8, 16)), ("hf_vit_base", ())):
        model, inputs = get_model(name).make()
        programs = _variants(name, trace(model, inputs), (0.3, 0.5), fixed)
        fns: dict[tuple[str, str], Callable[[], Any]] = {}
        for key, program in programs.items():
            fns[("eager", key)] = lambda p=program, x=inputs: p(*x)
            folded = program.copy()
            if FoldBatchNorm().run(folded, PassContext()).changed:
                fns[("eager, fold_bn", key)] = lambda p=folded, x=inputs: p(*x)
            artifact = onnx_backend(program, intra_op_threads=threads,
                                    session_config={"session.intra_op.allow_spinning": "0"})
            fns[("onnx", key)] = lambda a=artifact, x=inputs: a(*x)
        times = _time(fns, repeats)
        print("| model | ratio | params | MACs | MACs reduction | backend | threads | "
              "latency ms | speedup (same run) | speedup / MACs reduction |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        dense_macs = programs["dense"].analysis("costs").macs
        for backend, key in sorted(fns, key=lambda k: k[0]):     # stable: variants in order
            costs = programs[key].analysis("costs")
            fewer = dense_macs / costs.macs
            speedup = times[(backend, "dense")] / times[(backend, key)]
            print(f"| {name} | {key} | {costs.parameters / 1e6:.2f} M | {costs.macs / 1e9:.2f} G "
                  f"| {fewer:.2f}x | {backend} | {threads} | {times[(backend, key)] * 1e3:.1f} "
                  f"| {speedup:.2f}x | {speedup / fewer:.2f} |", flush=True)


def depth() -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    print("| layers | nodes | export s | channel_groups s | groups |")
    print("|---|---|---|---|---|")
    for layers in (2, 8, 32):
        config = LlamaConfig(vocab_size=100, hidden_size=64, num_hidden_layers=layers,
                             num_attention_heads=4, num_key_value_heads=2,
                             intermediate_size=128, use_cache=False, attn_implementation="sdpa")
        model = LlamaForCausalLM(config).eval()
        ids = torch.randint(0, 100, (1, 8))
        start = time.perf_counter()
        program = trace(model, (ids,))
        exported = time.perf_counter() - start
        start = time.perf_counter()
        analysis = gp.analysis.channel_groups(program)
        took = time.perf_counter() - start
        print(f"| {layers} | {program.num_nodes()} | {exported:.1f} | {took:.3f} | "
              f"{len(analysis.prunable())} prunable of {len(analysis.groups)} |", flush=True)


def _first_layer(model: torch.nn.Module) -> tuple[str, torch.nn.Module]:
    return next((n, m) for n, m in model.named_modules()
                if isinstance(m, torch.nn.Conv2d | torch.nn.Linear))


class _TimeLimit(Exception):
    """A call ran past the time limit (Torch-Pruning's group search can run for minutes)."""


def _limited(seconds: int, fn: Callable[..., Any], *args: Any) -> tuple[float, Any]:
    """``fn(*args)``'s seconds and result; raises ``_TimeLimit`` after ``seconds``."""
    def expire(*_: Any) -> None:
        raise _TimeLimit

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        start = time.perf_counter()
        result = fn(*args)
        return time.perf_counter() - start, result
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def _prune_ours(program: Any) -> tuple[Any, Any]:
    try:
        return program, PruneChannels(ratio=0.5).run(program, PassContext()).details["plan"]
    except ValueError as exc:       # nothing prunable: graphpress's result to report
        return None, exc


def _prune_theirs(model: torch.nn.Module, inputs: tuple[Any, ...]) -> torch.nn.Module:
    import torch_pruning as tp

    layers = [m for m in model.modules()
              if isinstance(m, torch.nn.Linear | torch.nn.Conv2d) or type(m).__name__ == "Conv1D"]
    pruner = tp.pruner.MagnitudePruner(
        model, inputs, importance=tp.importance.MagnitudeImportance(p=2),
        pruning_ratio=0.5, ignored_layers=layers[-1:])
    pruner.step()
    return model


def _kept_rows(original: torch.Tensor, pruned: torch.Tensor) -> set[int]:
    return {i for i in range(original.shape[0]) if any(torch.equal(original[i], r) for r in pruned)}


def torch_pruning(names: list[str], rounds: int = 10, limit: int = 60) -> None:
    """Per model: ``rounds`` rounds, each one graphpress call (analysis + plan + rewrite on a
    fresh copy of the traced program) then one Torch-Pruning call (dependency graph + pruner
    step on a fresh model); the first round's ratio (cold: nothing cached yet), and the
    median of the other rounds' ratios. A Torch-Pruning call past ``limit`` seconds stops the
    model's comparison."""
    print("| model | params dense | graphpress | Torch-Pruning | first layer kept, same | "
          "gp / tp ms (first call) | ratio first | ratio median | export s | analysis rounds |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name in names:
        model, inputs = get_model(name).make()
        dense = sum(p.numel() for p in model.parameters())
        layer_name, layer = _first_layer(model)
        original = layer.weight.detach().clone()
        start = time.perf_counter()
        program = trace(model, inputs)
        exported = time.perf_counter() - start
        programs = [program.copy() for _ in range(rounds)]
        models = [get_model(name).build() for _ in range(rounds)]
        ours, theirs, failed = [], [], ""
        for copy, fresh in zip(programs, models, strict=True):
            took, (pruned, plan) = _limited(limit, _prune_ours, copy)
            ours.append(took)
            if pruned is None:
                break
            try:
                took, fresh = _limited(limit, _prune_theirs, fresh, inputs)
                theirs.append(took)
            except _TimeLimit:
                failed = f"did not finish in {limit} s"
                break
            except Exception as exc:  # Torch-Pruning's own failure is the result to report
                failed = f"failed: {type(exc).__name__}"
                break
        analysis_rounds = program.analysis("channel_groups").rounds    # after the timed calls
        if pruned is None:
            print(f"| {name} | {dense} | refused: {str(plan)[:60]}... | | | | | | | |")
            continue
        ours_params = pruned.analysis("costs").parameters
        if failed:
            print(f"| {name} | {dense} | {ours_params} | {failed} | | | | | {exported:.2f} | "
                  f"{analysis_rounds} |", flush=True)
            continue
        ours_keep = next((set(g.keep) for g in plan.groups
                          if (f"{layer_name}.weight", 0, 0, 1) in g.slices), set())
        tp_keep = _kept_rows(original, dict(fresh.named_modules())[layer_name].weight.detach())
        theirs_params = sum(p.numel() for p in fresh.parameters())
        ratios = [o / t for o, t in zip(ours, theirs, strict=True)]
        print(f"| {name} | {dense} | {ours_params} | {theirs_params} | {len(ours_keep)} / "
              f"{len(tp_keep)}, {len(ours_keep & tp_keep)} same | {ours[0] * 1e3:.0f} / "
              f"{theirs[0] * 1e3:.0f} | {ratios[0]:.2f} | {statistics.median(ratios[1:]):.2f} | "
              f"{exported:.2f} | {analysis_rounds} |", flush=True)


class _LabelledLoss:
    """Cross-entropy of the i-th call's outputs against the i-th batch's labels (the pass calls
    the loss once per batch, in order)."""

    def __init__(self, labels: list[torch.Tensor]) -> None:
        self.labels, self.calls = labels, 0

    def __call__(self, outputs: torch.Tensor) -> torch.Tensor:
        target = self.labels[self.calls % len(self.labels)]
        self.calls += 1
        return F.cross_entropy(outputs, target)


_CRITERIA = [("l1", False), ("l2", False), ("bn_scale", False), ("taylor", False),
             ("hessian", False), ("variance", False), ("random", False), ("l2", True),
             ("lamp", True)]


def _fine_tune(module: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int) -> None:
    opt = torch.optim.Adam(module.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(epochs):
        for batch in torch.randperm(len(x), generator=generator).split(64):
            loss = F.cross_entropy(module(x[batch]), y[batch])
            opt.zero_grad()
            loss.backward()
            opt.step()


def digits(epochs: int = 3) -> None:
    """Every criterion on the same trained digits CNN, ratio 0.5, then ``epochs`` of Adam."""
    x_train, y_train, x_test, y_test = digits_data()
    model, inputs = get_model("digits_cnn").make()
    dense = accuracy(model, x_test, y_test)
    parts = torch.arange(512).split(32)       # calibration: 16 training batches of 32
    calibration = [((x_train[i],), {}) for i in parts]
    samples = torch.arange(128).split(1)      # gradients: 128 examples, one per batch
    batches = [(x_train[i],) for i in samples]
    print(f"digits CNN: dense {dense:.4f} ({sum(p.numel() for p in model.parameters())} params)"
          f"; ratio 0.5, then {epochs} epochs of fine-tuning (Adam, lr 1e-3)")
    print("| criterion | ranking | params | pruned | fine-tuned | prune s |")
    print("|---|---|---|---|---|---|")
    for criterion, global_ranking in _CRITERIA:
        program = trace(model, inputs, dynamic_batch=True)
        pass_ = PruneChannels(ratio=0.5, importance=criterion, global_ranking=global_ranking,
                              batches=batches, loss=_LabelledLoss([y_train[i] for i in samples]))
        start = time.perf_counter()
        pass_.run(program, PassContext(example_inputs=inputs, calibration_data=calibration))
        took = time.perf_counter() - start
        pruned = program.module()
        before = accuracy(pruned, x_test, y_test)
        _fine_tune(pruned, x_train, y_train, epochs)
        after = accuracy(pruned, x_test, y_test)
        print(f"| {criterion} | {'global' if global_ranking else 'per group'} | "
              f"{program.analysis('costs').parameters} | {before:.4f} | {after:.4f} | "
              f"{took:.2f} |", flush=True)


def hidden() -> None:
    """prune_hidden=True next to the default (heads and MLP only), ratio 0.5, verify=True."""
    print("| model | prune_hidden | params | MACs | max error vs reference | SQNR dB | cosine "
          "| top-1 agree |")
    print("|---|---|---|---|---|---|---|---|")
    for name in ("hf_llama", "hf_vit", "hf_bert_classifier", "hf_bit"):
        model, inputs = get_model(name).make()
        for wide in (False, True):
            prune = PruneChannels(ratio=0.5, prune_hidden=wide)
            record = gp.compile(model, inputs, passes=[prune], verify=True).report().records[-1]
            program = trace(model, inputs)
            result = PruneChannels(ratio=0.5, prune_hidden=wide).run(
                program, PassContext(example_inputs=inputs))
            d = result.details.get("deviation") or _deviation(model, program, inputs)
            print(f"| {name} | {wide} | {record.parameters[0]} -> {record.parameters[1]} | "
                  f"{record.macs[0]} -> {record.macs[1]} | {record.max_error:.1e} | "
                  f"{d['sqnr_db']:.1f} | {d['cosine']:.4f} | {d['top1_agreement']:.3f} |",
                  flush=True)


def _deviation(model: torch.nn.Module, program: Any, inputs: tuple[Any, ...]) -> dict[str, float]:
    from graphpress.passes.prune.hidden import deviation

    return deviation(trace(model, inputs), program, inputs, {})


def _llama(device: str, **sizes: int) -> tuple[torch.nn.Module, tuple[torch.Tensor]]:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(use_cache=False, attn_implementation="sdpa", **sizes)
    with torch.device(device):
        model = LlamaForCausalLM(config).eval()
        return model, (torch.randint(0, 100, (1, 8)),)


def scale() -> None:
    import resource

    model, inputs = _llama("meta", vocab_size=128256, hidden_size=8192, num_hidden_layers=80,
                           num_attention_heads=64, num_key_value_heads=8,
                           intermediate_size=28672)
    start = time.perf_counter()
    program = trace(model, inputs)
    exported = time.perf_counter() - start
    start = time.perf_counter()
    analysis = program.analysis("channel_groups")
    took = time.perf_counter() - start
    start = time.perf_counter()
    plan, _ = PruneChannels(ratio=0.5, importance="random").make_plan(program)
    planned = time.perf_counter() - start
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"Llama-3-70B shape on meta: export {exported:.1f} s, channel_groups {took:.1f} s "
          f"({took / exported:.2f}x export), {len(analysis.prunable())} prunable groups, "
          f"plan of {len(plan.groups)} groups {planned:.1f} s; peak RSS {rss:.2f} GiB")
    start = time.perf_counter()
    wide, _ = PruneChannels(ratio=0.5, importance="random", prune_hidden=True).make_plan(program)
    planned = time.perf_counter() - start
    stream = max(wide.groups, key=lambda g: len(g.slices))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"  prune_hidden=True: analysis + plan {planned:.1f} s ({planned / exported:.2f}x "
          f"export), {len(wide.groups)} groups, the stream {stream.size} -> {len(stream.keep)} "
          f"channels over {len(stream.slices)} weight slices; peak RSS {rss:.2f} GiB")
    small = {"vocab_size": 100, "hidden_size": 64, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 128}
    meta_plan, _ = PruneChannels(ratio=0.5, importance="random").make_plan(
        trace(*_llama("meta", **small)))
    real, real_inputs = _llama("cpu", **small)
    program = trace(real, real_inputs)
    PruneChannels(plan=meta_plan).run(program, PassContext())
    dense = sum(p.numel() for p in real.parameters())
    logits = program(*real_inputs)[0]
    print(f"plan from meta applied to real weights: params {dense} -> "
          f"{program.analysis('costs').parameters}, logits {tuple(logits.shape)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sections", default="latency,depth,tp,digits,hidden,scale")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default: 1)")
    parser.add_argument("--models", default="", help="tp: these zoo models (default: all)")
    parser.add_argument("--tp-rounds", type=int, default=10,
                        help="tp: rounds per model, the first one cold (default: 10)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    sections = args.sections.split(",")
    if "digits" in sections:
        digits()
    if "tp" in sections:
        torch_pruning(args.models.split(",") if args.models
                      else [z.name for z in zoo_models(exclude=())], rounds=args.tp_rounds)
    if "depth" in sections:
        depth()
    if "hidden" in sections:
        hidden()
    if "latency" in sections:
        latency(args.repeats, args.threads)
    if "scale" in sections:
        scale()


if __name__ == "__main__":
    main()
