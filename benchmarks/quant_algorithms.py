"""Weight-quantization algorithms (issue 14): GPTQ, AWQ, SmoothQuant, cross-layer equalization and
bias correction against round-to-nearest, on real weights and trained models, side by side with
NNCF. Prints Markdown tables.

Usage::

    python benchmarks/quant_algorithms.py [--sections minilm,gptq_speed,digits] [--threads 1]

* minilm: the zoo's ``minilm`` (all-MiniLM-L6-v2, real weights) on the 64 real sentences of
  ``benchmarks/quant.py`` (first sentences of standard-library docstrings, 48 tokens, batches of
  8; even sentences calibrate, odd ones are evaluated): cosine of the mean-pooled sentence
  embeddings with float, mean and minimum over the 32 evaluated sentences. int4 weight-only
  (asymmetric, groups of 32 and 128 along K) by round-to-nearest, ``algorithm='gptq'`` (with and
  without act order, and with an EoRA branch of rank 16) and ``algorithm='awq'`` (with and
  without its clipping search); int8 static and int8 dynamic with and without
  ``smooth_quant`` before them. Every graphpress row is ``gp.compile(..., verify=True)``: the
  contract is checked on every run. NNCF on the same calibration batches and the same exported
  module: ``nncf.compress_weights`` (INT4_ASYM, the same group size, ratio 1, every layer) plain,
  with ``awq=True``, ``gptq=True``, ``scale_estimation=True``, and ``nncf.quantize`` with
  ``model_type=TRANSFORMER`` (its SmoothQuant). A tool's error is shown in place of its figures.
* lm: a Llama-style causal LM (4 layers, width 128, 4 heads / 2 KV heads, byte-level vocabulary
  of 128) trained here (seed 0, 400 steps of AdamW, batches of 16 windows) on the docstrings of
  ``TEXT_MODULES`` from the standard library (every tenth 128-byte window held out):
  perplexity on the first 256 held-out windows for float, W4 g128 and g32 by RTN, AWQ, GPTQ,
  GPTQ act order, GPTQ + EoRA and RTN + EoRA (rank 8), NNCF's ``compress_weights`` (plain, AWQ,
  scale estimation), and W8A8 (int8 dynamic, int8 static) with and without ``smooth_quant``
  and NNCF's ``quantize`` with SmoothQuant. W3 is not in the table: graphpress has no 3-bit
  grid (``QuantSpec`` dtypes are int8/uint8/int4/uint4/fp8).
* gptq_speed: one 4096 x 4096 linear weight, a Hessian from 4096 random rows; wall seconds of
  ``gptq_quantize`` (int4 g128, blocks of 128 columns) against round-to-nearest, one thread, and
  each one's output error ``tr((W - Q) H (W - Q)^T)``.
* digits: the zoo's ``digits_cnn`` (trained on scikit-learn's digits) and a depthwise-separable
  CNN trained here on the same data (seed 0, 8 epochs of Adam): test accuracy after ``fold_bn``
  and int8 static quantization (per-channel and per-tensor weights), with ``equalize`` and/or
  ``bias_correction=True``, all calibrated on the training images; NNCF's ``nncf.quantize``
  defaults (which include its bias correction) on the same batches.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import time
from collections.abc import Callable
from importlib.metadata import version
from typing import Any

import torch
from common import markdown_table
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


def _nncf_compress(model: nn.Module, example: Batch, calibration: list[Batch], group: int,
                   **options: Any) -> nn.Module:
    import nncf

    exported = torch.export.export(model, example).module()
    dataset = nncf.Dataset(calibration) if options else None
    return nncf.compress_weights(exported, mode=nncf.CompressWeightsMode.INT4_ASYM,
                                 group_size=group, ratio=1.0, all_layers=True, dataset=dataset,
                                 subset_size=len(calibration), **options)


def minilm_section() -> None:
    model, _ = get_model("minilm").make()
    calibration, evaluation = minilm_batches()
    example = calibration[0]
    reference = embeddings(model, evaluation)
    rows = []

    def graphpress(label: str, passes: str) -> None:
        compiled, seconds, error = _timed(lambda: gp.compile(
            model, example, passes=passes, calibration_data=calibration, verify=True))
        figures = _cosines(embeddings(compiled, evaluation), reference) if compiled else (
            error, "")
        rows.append(("graphpress", label, *figures, f"{seconds:.1f}"))

    def peer(label: str, build: Callable[[], Any]) -> None:
        quantized, seconds, error = _timed(build)
        figures = (_cosines(embeddings(quantized, evaluation), reference) if quantized is not None
                   else (error, ""))
        rows.append(("NNCF", label, *figures, f"{seconds:.1f}"))

    for group in (32, 128):
        w4 = f"insert_fake_quant(scheme='int4_weight_only', group_size={group}"
        graphpress(f"int4 g{group} RTN", w4 + ")")
        graphpress(f"int4 g{group} GPTQ", w4 + ", algorithm='gptq')")
        graphpress(f"int4 g{group} GPTQ act order",
                   w4 + ", algorithm='gptq', algorithm_options={'act_order': True})")
        graphpress(f"int4 g{group} AWQ (scales + clipping)", w4 + ", algorithm='awq')")
        graphpress(f"int4 g{group} AWQ scales only",
                   w4 + ", algorithm='awq', algorithm_options={'clip': False})")
        graphpress(f"int4 g{group} GPTQ + EoRA rank 16",
                   w4 + ", algorithm='gptq', eora_rank=16)")
        peer(f"compress_weights INT4_ASYM g{group}",
             lambda g=group: _nncf_compress(model, example, calibration, g))
        for option in ("awq", "gptq", "scale_estimation"):
            peer(f"compress_weights INT4_ASYM g{group}, {option}=True",
                 lambda g=group, o=option: _nncf_compress(model, example, calibration, g,
                                                          **{o: True}))
    for scheme in ("int8_static", "int8_dynamic"):
        quant = f"insert_fake_quant(scheme='{scheme}')"
        graphpress(f"{scheme}", quant)
        for alpha in (0.5, 0.8):
            graphpress(f"smooth_quant(alpha={alpha}), {scheme}",
                       f"smooth_quant(alpha={alpha}), {quant}")
        graphpress(f"smooth_quant(alpha=0.5, power_of_two=False), {scheme}",
                   f"smooth_quant(alpha=0.5, power_of_two=False), {quant}")
    peer("quantize, model_type=TRANSFORMER (SmoothQuant)",
         lambda: nncf_quantize(model, example, calibration, model_type=_nncf_transformer()))
    print(f"MiniLM (all-MiniLM-L6-v2, real weights): cosine of mean-pooled sentence embeddings vs "
          f"float; {len(calibration) * 8} calibration / {len(evaluation) * 8} evaluation "
          "sentences, 48 tokens\n")
    print(markdown_table(("tool", "scheme", "cosine mean", "cosine min", "quantize s"), rows))
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
            logits = out["logits"] if isinstance(out, dict) else out.logits
            loss = nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                               ids[:, 1:].reshape(-1), reduction="sum")
            total, count = total + float(loss), count + ids[:, 1:].numel()
    return float(torch.exp(torch.tensor(total / count)))


def lm_section() -> None:
    train, held_out = _lm_windows()
    start = time.perf_counter()
    model = _trained_lm(train, steps=LM_STEPS)
    train_s = time.perf_counter() - start
    calibration = [(b,) for b in train[:8 * LM_BATCH].split(LM_BATCH)]
    evaluation = [(b,) for b in held_out[:LM_EVAL].split(LM_BATCH)]
    example = calibration[0]
    base = _perplexity(model, evaluation)
    rows = [("float", "-", f"{base:.3f}", "", "")]

    def run(tool: str, label: str, build: Callable[[], Any], rtn: float | None = None) -> float:
        quantized, seconds, error = _timed(build)
        if quantized is None:
            rows.append((tool, label, error, "", f"{seconds:.1f}"))
            return float("nan")
        value = _perplexity(quantized, evaluation)
        closed = "" if rtn is None else f"{(rtn - value) / (rtn - base) * 100:.0f}%"
        rows.append((tool, label, f"{value:.3f}", closed, f"{seconds:.1f}"))
        return value

    def graphpress(passes: str) -> Callable[[], Any]:
        return lambda: gp.compile(model, example, passes=passes, calibration_data=calibration,
                                  verify=True)

    for group in (128, 32):
        w4 = f"insert_fake_quant(scheme='int4_weight_only', group_size={group}"
        rtn = run("graphpress", f"W4 g{group} RTN", graphpress(w4 + ")"))
        run("graphpress", f"W4 g{group} AWQ", graphpress(w4 + ", algorithm='awq')"), rtn)
        run("graphpress", f"W4 g{group} GPTQ", graphpress(w4 + ", algorithm='gptq')"), rtn)
        run("graphpress", f"W4 g{group} GPTQ act order", graphpress(
            w4 + ", algorithm='gptq', algorithm_options={'act_order': True})"), rtn)
        run("graphpress", f"W4 g{group} GPTQ + EoRA rank 8",
            graphpress(w4 + ", algorithm='gptq', eora_rank=8)"), rtn)
        run("graphpress", f"W4 g{group} RTN + EoRA rank 8",
            graphpress(w4 + ", eora_rank=8)"), rtn)
        for option in ("", "awq", "scale_estimation"):
            run("NNCF", f"compress_weights INT4_ASYM g{group}" + (f", {option}=True" if option
                                                                  else ""),
                lambda g=group, o=option: _nncf_compress(model, example, calibration, g,
                                                         **({o: True} if o else {})), rtn)
    for scheme in ("int8_dynamic", "int8_static"):
        quant = f"insert_fake_quant(scheme='{scheme}')"
        plain = run("graphpress", f"W8A8 {scheme}", graphpress(quant))
        run("graphpress", f"smooth_quant(alpha=0.5), W8A8 {scheme}",
            graphpress(f"smooth_quant(alpha=0.5), {quant}"), plain)
    run("NNCF", "quantize, model_type=TRANSFORMER (SmoothQuant, W8A8 static)",
        lambda: nncf_quantize(model, example, calibration, model_type=_nncf_transformer()))
    print(f"Llama-style LM (4 layers, 128 wide, byte-level) trained {train_s:.0f} s on "
          f"standard-library docstrings ({len(train)} windows of {LM_SEQ} bytes), perplexity on "
          f"{len(evaluation) * LM_BATCH} held-out windows; calibration "
          f"{len(calibration) * LM_BATCH} training windows. 'gap closed': share of the "
          "RTN-to-float perplexity gap recovered (for SmoothQuant rows, of the plain W8A8 "
          "row's gap)\n")
    print(markdown_table(("tool", "scheme", "perplexity", "gap closed", "quantize s"), rows))
    print()


SECTIONS = {"lm": lm_section, "minilm": minilm_section, "gptq_speed": gptq_speed_section,
            "digits": digits_section}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sections", default=",".join(SECTIONS))
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    start = time.perf_counter()
    print(f"quantization algorithms: torch {torch.__version__}, nncf {version('nncf')}; "
          f"{args.threads} threads; {platform.machine()}; {datetime.date.today()}\n")
    for name in args.sections.split(","):
        section_start = time.perf_counter()
        SECTIONS[name]()
        print(f"({name}: {time.perf_counter() - section_start:.0f} s)\n")
    print(f"wall: {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
