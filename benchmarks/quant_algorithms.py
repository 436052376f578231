"""Weight-quantization algorithms (issue 14): GPTQ, AWQ, EoRA, SmoothQuant, cross-layer
equalization and bias correction against round-to-nearest, on a language model trained here, on
real weights and on trained CNNs, side by side with NNCF. Prints Markdown tables.

Usage::

    python benchmarks/quant_algorithms.py [--sections lm,minilm,gptq_speed,digits,awq_scales]
        [--threads 1]

Weight-only grids (``GRIDS``): W4 g128 (``int4_weight_only(group_size=128)``) and W3 g128
(``int3_weight_only(group_size=128)``), both asymmetric, each by round-to-nearest (RTN),
``algorithm='awq'`` (defaults: plain and duo scale candidates, power-of-two scales, clipping
search, 4 steps of grid refinement), AWQ with two-sided clipping (power-of-two and exact
scales), AWQ scored at the block's merge point (``loss='block'``), AWQ's scales alone (no
clipping, no refinement), AWQ without the grid refinement, ``algorithm='gptq'``
(with and without act order, and act order with ``damp='auto'``) and GPTQ + an EoRA branch.
NNCF's ``compress_weights`` has no asymmetric 3-bit mode, so at W3 its rows are ``INT3_SYM``,
next to graphpress's symmetric W3 rows (RTN, AWQ, GPTQ) on the plain symmetric grid and on the
``signed_scale=True`` grid, which is NNCF's INT3_SYM grid (and GPTQ with act order and
``damp='auto'`` there). Every graphpress row is ``gp.compile(..., verify=True)``: the contract is
checked on every run. NNCF runs on the OpenVINO model of ``torch.export.export(model,
example)`` (its torch.fx backend refuses ``gptq=True``): ``compress_weights`` with the same
group size, ``ratio=1.0, all_layers=True``, the embedding tables (Gather) left float as
graphpress leaves them, plain, ``awq=True``, ``gptq=True``, ``scale_estimation=True``, each on
the same calibration batches, and run by OpenVINO at fp32 inference precision. ``nncf.quantize``
with ``model_type=TRANSFORMER`` (its SmoothQuant, W8A8 static) runs on NNCF's torch.fx path. A
tool's error is shown in place of its figures; "quantize s" is the whole call (graphpress:
trace, calibration, algorithms, verification; NNCF: export, conversion, compression,
compilation).

* lm: a Llama-style causal LM (4 layers, width 128, 4 heads / 2 KV heads, MLP 512, byte-level
  vocabulary of 128) trained here (seed 0, 400 steps of AdamW, batches of 16 windows) on the
  docstrings of ``TEXT_MODULES`` from the standard library (every tenth 128-byte window held
  out): perplexity on the first 256 held-out windows, calibration on 64 training windows (8192
  tokens); the weight-only grids above (EoRA rank 8, and RTN + EoRA), W8A8 (int8 dynamic, int8
  static) with and without ``smooth_quant(alpha=0.5)``, NNCF's ``quantize`` with SmoothQuant.
* minilm: the zoo's ``minilm`` (all-MiniLM-L6-v2, real weights) on the 64 real sentences of
  ``benchmarks/quant.py`` (first sentences of standard-library docstrings, 48 tokens, batches of
  8; even sentences calibrate, odd ones are evaluated): cosine of the mean-pooled sentence
  embeddings with float, mean and minimum over the 32 evaluated sentences; the weight-only grids
  (EoRA rank 16); int8 static and int8 dynamic with and without ``smooth_quant`` (alpha 0.5,
  0.8, and exact scales).
* gptq_speed: one 4096 x 4096 linear weight, a Hessian from 4096 random rows; wall seconds of
  ``gptq_quantize`` (int4 g128, blocks of 128 columns) against round-to-nearest, one thread, and
  each one's output error ``tr((W - Q) H (W - Q)^T)``.
* digits: the zoo's ``digits_cnn`` (trained on scikit-learn's digits) and a depthwise-separable
  CNN trained here on the same data (seed 0, 8 epochs of Adam): test accuracy after ``fold_bn``
  and int8 static quantization (per-channel and per-tensor weights), with ``equalize`` and/or
  ``bias_correction=True``, all calibrated on the training images; NNCF's ``nncf.quantize``
  defaults (which include its bias correction) on the same batches.
* awq_scales: what AWQ's scale search finds on the two transformers above (the lm section's LM,
  trained the same way, and MiniLM, on the same calibration batches), W3 g128 with the
  defaults: per producer, the alpha it chose, its readers' output error over RTN's, and the
  spread of the input channels' magnitudes (max / median of ``mean|X_c|``), parsed from the
  pass's summary lines.
"""

from __future__ import annotations

import argparse
import re
import time
from collections.abc import Callable
from importlib.metadata import version
from typing import Any

import torch
from common import markdown_table, run_sections
from quant import DIGITS_BATCH, embeddings, minilm_batches, nncf_quantize
from torch import nn

import graphpress as gp
from graphpress.quant import QuantSpec
from graphpress.quant.algorithms.gptq import gptq_quantize
from graphpress.quant.algorithms.grid import fake_quantize, minmax_qparams
from graphpress.testing.zoo import digits_data, get_model

Batch = tuple[torch.Tensor, ...]


def _cosines(quantized: torch.Tensor, reference: torch.Tensor) -> tuple[str, str]:
    cos = torch.nn.functional.cosine_similarity(quantized, reference, dim=-1)
    return f"{cos.mean().item():.4f}", f"{cos.min().item():.4f}"


def _timed(build: Callable[[], Any]) -> tuple[Any, float, str]:
    start = time.perf_counter()
    try:
        return build(), time.perf_counter() - start, ""
    except Exception as exc:  # a peer's failure is a result, shown in its row
        return None, time.perf_counter() - start, f"{type(exc).__name__}: {str(exc)[:80]}"


def _nncf_compress(model: nn.Module, example: Batch, calibration: list[Batch], mode: str,
                   group: int, **options: Any) -> Callable[..., tuple[torch.Tensor, ...]]:
    """``nncf.compress_weights`` on the OpenVINO model of ``torch.export.export(model,
    example)`` (NNCF's backend with every data-aware option; its torch.fx backend refuses
    ``gptq``), every linear / matmul compressed (``ratio=1.0, all_layers=True``) and the
    embedding tables (Gather) left float, as graphpress leaves them; a callable that runs the
    result in OpenVINO (fp32 inference precision, the script's threads) and returns its
    outputs as torch tensors."""
    import nncf
    import openvino

    converted = openvino.convert_model(torch.export.export(model, example))
    if mode != "float":
        dataset = (nncf.Dataset([[t.numpy() for t in batch] for batch in calibration])
                   if options else None)
        converted = nncf.compress_weights(
            converted, mode=getattr(nncf.CompressWeightsMode, mode), group_size=group,
            ratio=1.0, all_layers=True, dataset=dataset, subset_size=len(calibration),
            ignored_scope=nncf.IgnoredScope(types=["Gather"]), **options)
    compiled = openvino.Core().compile_model(converted, "CPU", {
        "INFERENCE_NUM_THREADS": torch.get_num_threads(), "INFERENCE_PRECISION_HINT": "f32"})

    def run(*inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        outputs = compiled([t.numpy() for t in inputs])
        return tuple(torch.from_numpy(outputs[i]) for i in range(len(outputs)))
    return run


# (label, graphpress scheme, NNCF mode): NNCF has no asymmetric 3-bit mode, so at W3 its rows
# are INT3_SYM, next to graphpress's symmetric W3 rows
GRIDS = (("W4 g128", "int4_weight_only", "INT4_ASYM"), ("W3 g128", "int3_weight_only", "INT3_SYM"))
GROUP = 128


def _weight_runs(scheme: str, eora_rank: int, with_rtn_eora: bool
                 ) -> list[tuple[str, Any]]:
    """graphpress's weight-only rows of one grid: (label, pass), RTN first."""
    def quant(symmetric: bool = False, **options: Any) -> Any:
        config = gp.quant.scheme(scheme, group_size=GROUP, symmetric=symmetric)
        return gp.passes.InsertFakeQuant(config, **options)
    runs = [("RTN", quant()), ("AWQ", quant(algorithm="awq")),
            ("AWQ two-sided clipping", quant(algorithm="awq",
                                             algorithm_options={"two_sided": True})),
            ("AWQ two-sided clipping, exact scales", quant(
                algorithm="awq", algorithm_options={"two_sided": True, "power_of_two": False})),
            ("AWQ block objective", quant(algorithm="awq", algorithm_options={"loss": "block"})),
            ("AWQ scales only", quant(algorithm="awq", algorithm_options={
                "clip": False, "refine": 0})),
            ("AWQ without grid refinement", quant(algorithm="awq", algorithm_options={
                "refine": 0})),
            ("GPTQ", quant(algorithm="gptq")),
            ("GPTQ act order", quant(algorithm="gptq", algorithm_options={"act_order": True})),
            ("GPTQ act order, damp auto", quant(algorithm="gptq", algorithm_options={
                "act_order": True, "damp": "auto"})),
            (f"GPTQ + EoRA rank {eora_rank}", quant(algorithm="gptq", eora_rank=eora_rank))]
    if with_rtn_eora:
        runs.append((f"RTN + EoRA rank {eora_rank}", quant(eora_rank=eora_rank)))
    return runs


def _symmetric_runs(scheme: str) -> list[list[tuple[str, Any]]]:
    """graphpress's symmetric rows, RTN first in each group: the plain grid, then the signed
    scale grid (NNCF's INT3_SYM grid, so last: NNCF's rows are measured from its RTN)."""
    def quant(signed: bool, **options: Any) -> Any:
        config = gp.quant.scheme(scheme, group_size=GROUP, symmetric=True, signed_scale=signed)
        return gp.passes.InsertFakeQuant(config, **options)
    return [[(f"{name} {label}{extra}", quant(signed, **options)) for name, extra, options in (
        ("RTN", "", {}), ("AWQ", "", {"algorithm": "awq"}), ("GPTQ", "", {"algorithm": "gptq"}),
        *([("GPTQ", ", act order, damp auto", {"algorithm": "gptq", "algorithm_options": {
            "act_order": True, "damp": "auto"}})] if signed else []))]
        for signed, label in ((False, "sym"), (True, "sym signed"))]


def _closed(value: float, rtn: float | None, base: float) -> str:
    """The share of RTN's distance from float (``base``) that ``value`` recovers."""
    return "" if rtn is None or rtn == base else f"{(rtn - value) / (rtn - base) * 100:.0f}%"


class _Table:
    """Rows of (tool, scheme, figures..., gap closed, quantize s) for one model: ``measure``
    turns a quantized callable into (figures, the scalar the gap is measured on)."""

    def __init__(self, model: nn.Module, example: Batch, calibration: list[Batch],
                 measure: Callable[[Any], tuple[tuple[str, ...], float]], base: float,
                 blank: int) -> None:
        self.model, self.example, self.calibration = model, example, calibration
        self.measure, self.base, self.blank = measure, base, blank
        self.rows: list[tuple[str, ...]] = []

    def run(self, tool: str, label: str, build: Callable[[], Any],
            rtn: float | None = None) -> float:
        quantized, seconds, error = _timed(build)
        if quantized is None:
            self.rows.append((tool, label, error, *[""] * self.blank, f"{seconds:.1f}"))
            return float("nan")
        figures, value = self.measure(quantized)
        self.rows.append((tool, label, *figures, _closed(value, rtn, self.base),
                          f"{seconds:.1f}"))
        return value

    def graphpress(self, label: str, passes: Any, rtn: float | None = None) -> float:
        return self.run("graphpress", label, lambda: gp.compile(
            self.model, self.example, passes=passes if isinstance(passes, str) else [passes],
            calibration_data=self.calibration, verify=True), rtn)

    def weight_grids(self, eora_rank: int, with_rtn_eora: bool) -> None:
        """Every grid: graphpress's rows, then NNCF's (plain, awq, gptq, scale estimation)."""
        for label, scheme, mode in GRIDS:
            rtn = None
            for name, quant in _weight_runs(scheme, eora_rank, with_rtn_eora):
                value = self.graphpress(f"{label} {name}", quant, rtn)
                rtn = value if rtn is None else rtn
            if mode.endswith("_SYM"):
                for group in _symmetric_runs(scheme):
                    rtn = None
                    for name, quant in group:
                        value = self.graphpress(f"{label} {name}", quant, rtn)
                        rtn = value if rtn is None else rtn
            for option in ("", "awq", "gptq", "scale_estimation"):
                self.run("NNCF", f"{label} compress_weights {mode}" + (
                    f", {option}=True" if option else ""),
                    lambda m=mode, o=option: _nncf_compress(
                        self.model, self.example, self.calibration, m, GROUP,
                        **({o: True} if o else {})), rtn)


def minilm_section() -> None:
    model, _ = get_model("minilm").make()
    calibration, evaluation = minilm_batches()
    reference = embeddings(model, evaluation)

    def measure(quantized: Any) -> tuple[tuple[str, ...], float]:
        figures = _cosines(embeddings(quantized, evaluation), reference)
        return figures, float(figures[0])
    table = _Table(model, calibration[0], calibration, measure, base=1.0, blank=2)
    table.weight_grids(eora_rank=16, with_rtn_eora=False)
    for scheme in ("int8_static", "int8_dynamic"):
        quant = f"insert_fake_quant(scheme='{scheme}')"
        plain = table.graphpress(f"W8A8 {scheme}", quant)
        for alpha in (0.5, 0.8):
            table.graphpress(f"smooth_quant(alpha={alpha}), W8A8 {scheme}",
                             f"smooth_quant(alpha={alpha}), {quant}", plain)
        table.graphpress(f"smooth_quant(alpha=0.5, power_of_two=False), W8A8 {scheme}",
                         f"smooth_quant(alpha=0.5, power_of_two=False), {quant}", plain)
    table.run("NNCF", "quantize, model_type=TRANSFORMER (SmoothQuant, W8A8 static)",
              lambda: nncf_quantize(model, calibration[0], calibration,
                                    model_type=_nncf_transformer()))
    print(f"MiniLM (all-MiniLM-L6-v2, real weights): cosine of mean-pooled sentence embeddings vs "
          f"float; {len(calibration) * 8} calibration / {len(evaluation) * 8} evaluation "
          "sentences, 48 tokens. 'gap closed': share of the RTN row's (1 - cosine mean) "
          "recovered (NNCF's and the symmetric rows: of graphpress's RTN on the same grid; "
          "SmoothQuant rows: of the plain W8A8 row)\n")
    print(markdown_table(("tool", "scheme", "cosine mean", "cosine min", "gap closed",
                          "quantize s"), table.rows))
    print()


def _nncf_transformer() -> Any:
    import nncf

    return nncf.ModelType.TRANSFORMER


def gptq_speed_section() -> None:
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(4096, 4096, generator=generator) * 0.02
    rows_x = torch.randn(4096, 4096, generator=generator)
    hessian = rows_x.T @ rows_x
    spec = QuantSpec("int4", "per_group", group_size=128, symmetric=False)
    block = [1, 128]

    def error(q: torch.Tensor) -> float:
        d = weight - q
        return float(((d @ hessian) * d).sum())

    start = time.perf_counter()
    rtn = fake_quantize(weight, block, spec, *minmax_qparams(weight, block, spec))
    rtn_s = time.perf_counter() - start
    start = time.perf_counter()
    gptq, _, _ = gptq_quantize(weight, hessian, spec, block)
    gptq_s = time.perf_counter() - start
    rows = [("round to nearest", f"{rtn_s:.2f}", f"{error(rtn):.4g}", "1.000"),
            ("gptq_quantize (blocks of 128)", f"{gptq_s:.2f}", f"{error(gptq):.4g}",
             f"{error(gptq) / error(rtn):.3f}")]
    print("GPTQ on one 4096 x 4096 weight (int4 g128 asymmetric), Hessian of 4096 random rows, "
          f"{torch.get_num_threads()} thread(s)\n")
    print(markdown_table(("method", "seconds", "output error", "vs RTN"), rows))
    print()


class DepthwiseNet(nn.Module):
    """A depthwise-separable CNN for 8x8 digits (MobileNet-style blocks with ReLU)."""

    def __init__(self) -> None:
        super().__init__()

        def block(cin: int, cout: int, stride: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cin, 3, stride, 1, groups=cin, bias=False),
                    nn.BatchNorm2d(cin), nn.ReLU(),
                    nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]
        self.features = nn.Sequential(nn.Conv2d(1, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16),
                                      nn.ReLU(), *block(16, 32, 1), *block(32, 64, 2),
                                      *block(64, 64, 1))
        self.classifier = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).mean((2, 3)))


def _trained_depthwise(x: torch.Tensor, y: torch.Tensor) -> nn.Module:
    torch.manual_seed(0)
    model = DepthwiseNet()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(8):
        order = torch.randperm(len(x))
        for index in order.split(64):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x[index]), y[index]).backward()
            optimizer.step()
    return model.eval()


def digits_section() -> None:
    x_train, y_train, x_test, y_test = digits_data()
    usable = len(x_train) // DIGITS_BATCH * DIGITS_BATCH
    calibration = [(b,) for b in x_train[:usable].split(DIGITS_BATCH)]
    test = x_test.split(DIGITS_BATCH)
    models = {"digits_cnn": get_model("digits_cnn").make()[0],
              "depthwise-separable CNN": _trained_depthwise(x_train, y_train)}

    def logits(fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        with torch.no_grad():
            return torch.cat([fn(b) for b in test])

    rows = []

    def row(name: str, scheme: str, weights: str, built: tuple[Any, float, str],
            reference: torch.Tensor) -> None:
        quantized, seconds, error = built
        if quantized is None:
            rows.append((name, scheme, weights, error, "", "", f"{seconds:.1f}"))
            return
        out = logits(quantized)
        value = (out.argmax(-1) == y_test).float().mean().item()
        base = (reference.argmax(-1) == y_test).float().mean().item()
        sqnr = 10 * torch.log10(reference.pow(2).sum() / (out - reference).pow(2).sum())
        rows.append((name, scheme, weights, f"{value:.4f}", f"{(value - base) * 100:+.2f}",
                     f"{sqnr.item():.1f}", f"{seconds:.1f}"))

    variants = (("RTN", False, False), ("equalize", True, False),
                ("bias correction", False, True), ("equalize + bias correction", True, True))
    for name, model in models.items():
        reference = logits(model)
        rows.append((name, "float", "-",
                     f"{(reference.argmax(-1) == y_test).float().mean().item():.4f}", "", "",
                     ""))
        for weights, per_channel in (("per channel", True), ("per tensor", False)):
            for label, equalize, bias in variants:
                quant = gp.passes.InsertFakeQuant(
                    gp.quant.int8_static(per_channel_weights=per_channel), bias_correction=bias)
                passes = ["fold_bn", *(["equalize"] if equalize else []), quant]
                row(name, f"graphpress int8 static, {label}", weights, _timed(
                    lambda m=model, p=passes: gp.compile(m, calibration[0], passes=p,
                                                         calibration_data=calibration,
                                                         verify=True)), reference)
        row(name, "NNCF quantize defaults (int8 static, bias correction)", "per channel",
            _timed(lambda m=model: nncf_quantize(m, calibration[0], calibration)), reference)
    print(f"Digits CNNs (trained): test accuracy and logit SQNR vs float, {len(x_test)} test "
          f"images; calibration {usable} training images\n")
    print(markdown_table(("model", "scheme", "weights", "accuracy", "vs float (points)",
                          "logit SQNR dB", "quantize s"), rows))
    print()


# The text: docstrings of these standard-library modules and of their public members, in this
# order (bytes above 127 become 127); every tenth 128-byte window is held out.
TEXT_MODULES = (
    "os", "os.path", "re", "json", "collections", "itertools", "functools", "inspect",
    "argparse", "pathlib", "typing", "datetime", "textwrap", "string", "random", "statistics",
    "heapq", "bisect", "shutil", "subprocess", "threading", "logging", "unittest", "csv",
    "sqlite3", "zipfile", "tarfile", "gzip", "pickle", "copy", "enum", "dataclasses",
    "contextlib", "abc", "asyncio", "socket", "decimal", "fractions", "math", "operator",
    "tempfile", "glob", "fnmatch", "difflib", "pprint", "calendar", "codecs", "io", "struct",
    "queue", "sched", "selectors", "uuid", "hashlib", "hmac", "secrets", "base64", "html",
    "mimetypes", "traceback", "warnings", "weakref", "ast", "tokenize", "timeit", "doctest",
    "email.message", "http.client", "urllib.parse", "urllib.request", "xml.dom.minidom",
)
LM_SEQ = 128
LM_BATCH = 8
LM_EVAL = 256      # held-out windows evaluated (the first ones)
LM_CALIBRATION = 8  # calibration batches of LM_BATCH training windows
LM_STEPS = 400


def _stdlib_text() -> bytes:
    import importlib
    import inspect

    parts = []
    for name in TEXT_MODULES:
        module = importlib.import_module(name)
        parts.append(inspect.getdoc(module) or "")
        for attribute in sorted(vars(module)):
            value = getattr(module, attribute)
            if attribute.startswith("_") or getattr(value, "__module__", name) != name:
                continue
            parts.append(inspect.getdoc(value) or "")
    text = "\n\n".join(p for p in parts if p)
    return bytes(min(b, 127) for b in text.encode("utf-8"))


def _lm_windows() -> tuple[torch.Tensor, torch.Tensor]:
    data = torch.tensor(list(_stdlib_text()), dtype=torch.long)
    windows = data[: len(data) // LM_SEQ * LM_SEQ].view(-1, LM_SEQ)
    held_out = torch.arange(len(windows)) % 10 == 9
    return windows[~held_out], windows[held_out]


def _trained_lm(train: torch.Tensor, steps: int) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=128, intermediate_size=512,
                         num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=LM_SEQ, use_cache=False,
                         tie_word_embeddings=False, attn_implementation="sdpa")
    model = LlamaForCausalLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, 3e-3, total_steps=steps)
    generator = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(steps):
        batch = train[torch.randint(len(train), (16,), generator=generator)]
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    return model.eval()


def _perplexity(fn: Callable[..., Any], batches: list[Batch]) -> float:
    total, count = 0.0, 0
    with torch.no_grad():
        for (ids,) in batches:
            out = fn(ids)
            logits = out[0] if isinstance(out, tuple) else out
            loss = nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                               ids[:, 1:].reshape(-1), reduction="sum")
            total, count = total + float(loss), count + ids[:, 1:].numel()
    return float(torch.exp(torch.tensor(total / count)))


class _Logits(nn.Module):
    """The LM as ``ids -> logits`` (the tensor NNCF's OpenVINO model returns)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=ids).logits


def _benchmark_lm() -> tuple[nn.Module, int, float, list[Batch], list[Batch]]:
    """The lm section's LM as ``ids -> logits``, its training windows, training seconds, and
    the calibration and evaluation batches."""
    train, held_out = _lm_windows()
    start = time.perf_counter()
    model = _Logits(_trained_lm(train, steps=LM_STEPS)).eval()
    train_s = time.perf_counter() - start
    calibration = [(b,) for b in train[:LM_CALIBRATION * LM_BATCH].split(LM_BATCH)]
    evaluation = [(b,) for b in held_out[:LM_EVAL].split(LM_BATCH)]
    return model, len(train), train_s, calibration, evaluation


def lm_section() -> None:
    model, windows, train_s, calibration, evaluation = _benchmark_lm()
    base = _perplexity(model, evaluation)

    def measure(quantized: Any) -> tuple[tuple[str, ...], float]:
        value = _perplexity(quantized, evaluation)
        return (f"{value:.4f}",), value
    table = _Table(model, calibration[0], calibration, measure, base=base, blank=1)
    table.rows.append(("float", "-", f"{base:.4f}", "", ""))
    table.run("NNCF", "float, OpenVINO runtime (no compression)",
              lambda: _nncf_compress(model, calibration[0], calibration, "float", GROUP))
    table.weight_grids(eora_rank=8, with_rtn_eora=True)
    for scheme in ("int8_dynamic", "int8_static"):
        quant = f"insert_fake_quant(scheme='{scheme}')"
        plain = table.graphpress(f"W8A8 {scheme}", quant)
        table.graphpress(f"smooth_quant(alpha=0.5), W8A8 {scheme}",
                         f"smooth_quant(alpha=0.5), {quant}", plain)
    table.run("NNCF", "quantize, model_type=TRANSFORMER (SmoothQuant, W8A8 static)",
              lambda: nncf_quantize(model, calibration[0], calibration,
                                    model_type=_nncf_transformer()))
    print(f"Llama-style LM (4 layers, 128 wide, byte-level) trained {train_s:.0f} s on "
          f"standard-library docstrings ({windows} windows of {LM_SEQ} bytes), perplexity on "
          f"{len(evaluation) * LM_BATCH} held-out windows; calibration "
          f"{len(calibration) * LM_BATCH} training windows ({len(calibration) * LM_BATCH * LM_SEQ}"
          " tokens). 'gap closed': share of the RTN-to-float perplexity gap recovered (NNCF's "
          "and the symmetric rows: of graphpress's RTN on the same grid; SmoothQuant rows: of "
          "the plain W8A8 row's gap)\n")
    print(markdown_table(("tool", "scheme", "perplexity", "gap closed", "quantize s"),
                         table.rows))
    print()


_AWQ_LINE = re.compile(r"awq (?P<where>.+?) -> (?P<readers>.+?): alpha (?P<alpha>[\d.]+), "
                       r".*?/ RTN's (?P<error>[\d.]+); input channel magnitude max / median "
                       r"(?P<spread>[\d.]+)")


def _awq_scale_rows(model: nn.Module, calibration: list[Batch]) -> list[tuple[str, ...]]:
    config = gp.quant.scheme("int3_weight_only", group_size=GROUP)
    compiled = gp.compile(model, calibration[0], calibration_data=calibration, verify=True,
                          passes=[gp.passes.InsertFakeQuant(config, algorithm="awq")])
    summary = next(r for r in compiled.report().records
                   if r.name == "insert_fake_quant").details["summary"]
    return [(m["where"], m["readers"], m["alpha"], m["error"], m["spread"])
            for m in map(_AWQ_LINE.match, summary) if m]


def awq_scales_section() -> None:
    lm, _, _, lm_calibration, _ = _benchmark_lm()
    minilm, _ = get_model("minilm").make()
    minilm_calibration, _ = minilm_batches()
    for label, model, calibration in (("LM", lm, lm_calibration),
                                      ("MiniLM", minilm, minilm_calibration)):
        rows = _awq_scale_rows(model, calibration)
        spreads = sorted(float(r[-1]) for r in rows)
        print(f"{label}, AWQ W3 g128 (defaults): {len(rows)} producers, alpha 0 for "
              f"{sum(float(r[2]) == 0 for r in rows)}; channel magnitude max / median "
              f"{spreads[0]:.1f} to {spreads[-1]:.1f} (median {spreads[len(spreads) // 2]:.1f})\n")
        print(markdown_table(("producer", "readers", "alpha", "output error / RTN's",
                              "channel max / median"), rows))
        print()


SECTIONS = {"lm": lm_section, "minilm": minilm_section, "gptq_speed": gptq_speed_section,
            "digits": digits_section, "awq_scales": awq_scales_section}


def main() -> None:
    import logging

    import nncf

    nncf.set_log_level(logging.ERROR)   # its per-call tables and progress bars
    run_sections(argparse.ArgumentParser(description=__doc__.splitlines()[0]), SECTIONS,
                 f"quantization algorithms: torch {torch.__version__}, nncf {version('nncf')}, "
                 f"openvino {version('openvino')}")


if __name__ == "__main__":
    main()
