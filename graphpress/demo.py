"""``graphpress demo``: the whole job on a model trained on real data.

The default model is the zoo's ``digits_cnn`` (two conv-BN-ReLU blocks and a linear head,
trained for a second on scikit-learn's bundled digits, ~99% test accuracy). The job:

1. ``fold_bn, prune_channels(ratio=0.5), fixpoint(dce, cse, fold_constants)``, verified
   (folding is exact; pruning equals the masked original), traced with a dynamic batch;
2. a short fine-tune of the pruned program's module on the training set (Adam, a few
   epochs), which recovers the accuracy pruning cost;
3. ``insert_fake_quant`` with ``gp.quant.int8_static()`` (int8 weights per channel, int8
   activations per tensor, calibrated on training images), traced with a dynamic batch,
   lowered to ONNX (int8 weights stored as integers) and run by onnxruntime, which
   ``verify=True`` checks against the eager fake-quant program;
4. a table of accuracy, parameters, bytes and latency (one thread, batch 1, interleaved
   rounds, median) for the trained model and after each step, and one HTML report of both
   compiles (``Report.extend``) with the measurements.

``--model`` takes the models of :data:`DEMO_MODELS` (each one tested end to end): the
pretrained MiniLM encoder (real weights), and tiny random-weight Hugging
Face models: a ViT, whose first compile also merges 2 tokens per block (``merge_tokens``), a
ResNet, a BERT and a Llama. They run the same steps without the fine-tune (there is no task
to tune on), and the table shows the worst cosine between their outputs and the original's
on the example and 3 generated inputs instead of accuracy. Any other name is refused with
the list.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils import _pytree as pytree

import graphpress as gp
from graphpress.errors import InputError
from graphpress.ir.progress import progress_bar, progress_mode
from graphpress.pipeline.report import Report
from graphpress.pipeline.samples import generate_samples

__all__ = ["DEMO_MODEL", "DEMO_MODELS", "FINETUNE_EPOCHS", "PRUNE_PIPELINE", "QUANT_PIPELINE",
           "DemoRecipe", "DemoResult", "demo_recipe", "run_demo"]


@dataclass(frozen=True)
class DemoRecipe:
    """The demo's first compile for one model: prune ``prune_ratio`` of the channels, then
    (``merge_r`` > 0) merge that many tokens per transformer block."""

    prune_ratio: float = 0.5
    merge_r: int = 0

    def pipeline(self) -> str:
        merge = f", merge_tokens(r={self.merge_r})" if self.merge_r else ""
        return (f"fold_bn, prune_channels(ratio={self.prune_ratio}){merge}, "
                "fixpoint(dce, cse, fold_constants)")

    def stage(self) -> str:
        merge = f" + merge {self.merge_r} tokens/block" if self.merge_r else ""
        return f"fold_bn + prune {self.prune_ratio:.0%}{merge}"


DEMO_MODEL = "digits_cnn"
DEMO_MODELS: dict[str, DemoRecipe] = {
    "digits_cnn": DemoRecipe(),
    "minilm": DemoRecipe(),  # real weights; no task to fine-tune on
    "hf_vit": DemoRecipe(merge_r=2),
    "hf_resnet": DemoRecipe(),
    "hf_bert": DemoRecipe(),
    "hf_llama": DemoRecipe(),
}
"""The models ``graphpress demo --model`` runs (tests/test_cli.py runs each)."""
PRUNE_PIPELINE = DEMO_MODELS[DEMO_MODEL].pipeline()
QUANT_PIPELINE = "insert_fake_quant(scheme='int8_static')"
FINETUNE_EPOCHS = 3
CALIBRATION_IMAGES = 32
LATENCY_ROUNDS, LATENCY_CALLS = 7, 50


@dataclass
class DemoResult:
    """What the demo measured and wrote."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    report: Report = field(default_factory=Report)
    report_path: Path | None = None
    compiled: gp.CompiledModel | None = None


def _bytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def _parameters(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() for name, t in tensors.items() if t.is_floating_point()
               and "scale" not in name and "zero_point" not in name)


def _state(model: Any) -> dict[str, torch.Tensor]:
    if isinstance(model, gp.Program):
        return {**model.state_dict, **model.constants}
    return {k: v for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}


def _first_tensor(value: Any) -> torch.Tensor:
    return next(leaf for leaf in pytree.tree_leaves(value) if isinstance(leaf, torch.Tensor))


def _per_sample(fn: Callable[..., Any], x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([_first_tensor(fn(x[i: i + 1])) for i in range(len(x))])


def _latency_ms(stages: dict[str, Callable[[], Any]]) -> dict[str, float]:
    """Median ms per call, one thread, stages interleaved in every round."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    times: dict[str, list[float]] = {name: [] for name in stages}
    try:
        with torch.no_grad():
            for fn in stages.values():
                fn()  # warm-up
            for _ in progress_bar(range(LATENCY_ROUNDS), desc="latency", unit="round"):
                for name, fn in stages.items():
                    start = time.perf_counter()
                    for _ in range(LATENCY_CALLS):
                        fn()
                    times[name].append((time.perf_counter() - start) / LATENCY_CALLS * 1e3)
    finally:
        torch.set_num_threads(threads)
    return {name: statistics.median(values) for name, values in times.items()}


def _finetune(module: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int) -> None:
    generator = torch.Generator().manual_seed(0)
    optimizer = torch.optim.Adam(module.parameters(), lr=1e-3)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny batches: one thread is fastest and deterministic
    try:
        with torch.enable_grad():
            for _ in progress_bar(range(epochs), desc="fine-tuning", unit="epoch"):
                for batch in torch.randperm(len(x), generator=generator).split(64):
                    optimizer.zero_grad()
                    F.cross_entropy(module(x[batch]), y[batch]).backward()
                    optimizer.step()
    finally:
        torch.set_num_threads(threads)


def _eval_mode(module: torch.nn.Module) -> torch.nn.Module:
    """An exported program's module refuses ``.eval()``; after folding it holds no layer whose
    behaviour depends on the mode, so the flags are set directly (and the end-to-end check of
    the next compile, which skips modules in training mode, runs)."""
    for sub in module.modules():
        sub.training = False
    return module


def run_demo(model_name: str = DEMO_MODEL, *, verify: bool = True,
             output: str | Path = "graphpress-demo", epochs: int = FINETUNE_EPOCHS,
             progress: bool | None = None, log: Callable[[str], None] = print) -> DemoResult:
    """Run the demo's job (see the module docstring); return the rows and the report.
    ``progress`` shows or hides every progress bar of the job (None: on a terminal)."""
    with progress_mode(progress):
        return _run(model_name, verify=verify, output=output, epochs=epochs, log=log)


def demo_recipe(model_name: str) -> DemoRecipe:
    """The recipe of a demo model; an unknown name is an InputError listing the known ones."""
    if model_name in DEMO_MODELS:
        return DEMO_MODELS[model_name]
    from graphpress.testing.zoo import zoo_models

    known = ", ".join(DEMO_MODELS)
    in_zoo = any(entry.name == model_name for entry in zoo_models(exclude=()))
    why = (f"{model_name!r} is a zoo model, but the demo's steps are not tested on it; compile "
           "it with your own pipeline (gp.compile or graphpress compile)" if in_zoo
           else f"unknown demo model {model_name!r}")
    raise InputError(f"{why}. The demo runs: {known} (default {DEMO_MODEL})")


def _run(model_name: str, *, verify: bool, output: str | Path, epochs: int,
         log: Callable[[str], None]) -> DemoResult:
    from graphpress.testing.zoo import digits_data, get_model

    recipe = demo_recipe(model_name)
    prune_pipeline = recipe.pipeline()
    entry = get_model(model_name)
    model, inputs = entry.make()
    log(f"graphpress demo: {entry.name}: {entry.description}")
    trained = model_name == DEMO_MODEL
    if trained:
        x_train, y_train, x_test, y_test = digits_data()
        example = (x_test[:1],)
        prune_example = (x_test[:2],)  # a batch of one would be specialized by the export
        calibration = [(x_train[i: i + 1],) for i in range(CALIBRATION_IMAGES)]

        def quality(fn: Callable[..., Any], batched: bool) -> float:
            logits = _first_tensor(fn(x_test)) if batched else _per_sample(fn, x_test)
            return float((logits.argmax(-1) == y_test).float().mean())
    else:
        example = prune_example = inputs if isinstance(inputs, tuple) else (inputs,)
        probes = [example, *(a for a, _ in generate_samples((example, {}), 3, seed=1))]
        calibration = [a for a, _ in generate_samples((example, {}), 8, seed=2)]
        with torch.no_grad():
            reference = [_first_tensor(model(*p)).flatten().double() for p in probes]

        def quality(fn: Callable[..., Any], batched: bool) -> float:
            with torch.no_grad():
                got = [_first_tensor(fn(*p)).flatten().double() for p in probes]
            return min(float(F.cosine_similarity(a, b, dim=0)) for a, b in zip(got, reference))
    metric = "accuracy" if trained else "cosine"
    log(f"steps: {prune_pipeline} -> "
        f"{f'fine-tune {epochs} epochs -> ' if trained else ''}{QUANT_PIPELINE} -> onnx "
        f"(verify={verify})")

    prune = gp.compile(model, prune_example, passes=prune_pipeline, verify=verify,
                       dynamic_batch=trained)
    pruned_quality = quality(prune, True)
    tuned = _eval_mode(prune.program.module())
    if trained:
        _finetune(tuned, x_train, y_train, epochs)
    # verify=True also checks onnxruntime against the eager int8 program (gp.compile's
    # backend check: within one int8 step of each output)
    quant = gp.compile(tuned, prune_example, passes=QUANT_PIPELINE, verify=verify,
                       calibration_data=calibration, dynamic_batch=trained, backend="onnx",
                       backend_options={"intra_op_threads": 1})
    onnx = quant.artifact

    stages: dict[str, tuple[Callable[..., Any], dict[str, torch.Tensor], bool]] = {
        "trained model (fp32)" if trained else "original (fp32)": (model, _state(model), True),
        recipe.stage(): (prune, _state(prune.program), True)}
    if trained:
        stages[f"+ fine-tune {epochs} epochs"] = (tuned, _state(tuned), True)
    stages["+ int8 fake-quant (eager)"] = (quant.program, _state(quant.program), trained)
    stages["+ ONNX (onnxruntime int8)"] = (onnx, _state(quant.program), trained)
    latency = _latency_ms({name: (lambda fn=fn: fn(*example))  # batch 1
                           for name, (fn, _, _) in stages.items()})
    onnx_bytes = getattr(onnx, "size_bytes", None)
    result = DemoResult(compiled=quant)
    for name, (fn, state, batched) in stages.items():
        value = pruned_quality if name == recipe.stage() else quality(fn, batched)
        is_onnx = name.endswith("(onnxruntime int8)")
        result.rows.append({"stage": name, metric: value, "parameters": _parameters(state),
                            "bytes": onnx_bytes if is_onnx and onnx_bytes else _bytes(state),
                            "latency_ms": latency[name]})
    report = prune.report()
    report.extend(quant.report(), stage="quantize")
    report.title = f"graphpress demo: {entry.name}"
    for row in result.rows:
        report.measure(**row)
    result.report = report
    output = Path(output)
    quant.save(output / "model")  # gp.load(output / "model") restores the int8 program
    onnx.save(output / "onnx")
    result.report_path = report.save_html(output / "report.html")
    log(str(report))
    log("")
    log(format_table(result.rows, metric, base=latency[next(iter(stages))]))
    log("bytes: the state dict's tensors (the eager int8 program keeps float weights next to "
        "their scales); for ONNX, the model file (int8 weights, scales and the graph)")
    log(f"report: {result.report_path}")
    return result


def format_table(rows: list[dict[str, Any]], metric: str, base: float) -> str:
    """The before/after table the demo prints."""
    header = ("stage", metric, "params", "bytes", "latency ms (1 thread)", "speedup")
    lines = [header]
    for row in rows:
        value = row[metric]
        shown = f"{value * 100:.2f}%" if metric == "accuracy" else f"{value:.5f}"
        lines.append((row["stage"], shown, f"{row['parameters']:,}", f"{row['bytes']:,}",
                      f"{row['latency_ms']:.4f}", f"{base / row['latency_ms']:.2f}x"))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    out = []
    for i, line in enumerate(lines):
        out.append("  ".join(cell.ljust(w) if j == 0 else cell.rjust(w)
                             for j, (cell, w) in enumerate(zip(line, widths))))
        if i == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)
