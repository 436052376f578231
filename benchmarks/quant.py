"""Quantization quality (issue 9): graphpress's ``insert_fake_quant`` on real weights and a
trained model, side by side with torchao's PT2E flow and NNCF, and how many zoo models each tool
quantizes with no code changes. Prints Markdown tables.

Usage::

    python benchmarks/quant.py [--sections minilm,digits,zoo] [--threads 1]

* minilm: the zoo's ``minilm`` (all-MiniLM-L6-v2, real weights) on 64 real sentences: the first
  sentence of the docstrings of a fixed list of standard-library functions and classes,
  tokenized with the model's tokenizer and padded to one length (48 tokens), in batches of 8
  (every tool traces static shapes). The even-numbered sentences calibrate, the odd-numbered
  ones are evaluated. A sentence embedding is the mean of ``last_hidden_state`` over the
  attention mask (sentence-transformers' pooling); the table gives the cosine similarity of
  each quantized embedding with the float one, mean and minimum over the 32 evaluated
  sentences, per scheme (``gp.compile(..., verify=True)``; int8 static with each observer and
  with layers kept float by ``skip``), then torchao and NNCF on the same calibration batches
  (NNCF also with ``model_type=TRANSFORMER``, its documented setting for transformers). "quantize
  s" is the whole quantization call (trace, calibration, verification where the tool has it).
* digits: the zoo's ``digits_cnn`` (trained on scikit-learn's digits): test accuracy float, after
  ``fold_bn, insert_fake_quant(scheme='int8_static')`` and after ``fold_bn`` + int4 per-channel
  weights with int8 per-tensor activations (PTQ; the QAT figures are benchmarks/qat_digits.py's),
  all calibrated on the training images (14 batches of 90; the test set is 5 batches of 90), and
  torchao and NNCF on the same batches.
* zoo: every default zoo model through each tool's default int8 static flow, calibrated on 8
  generated batches (``generate_samples((inputs, {}), 8, seed=1)``): graphpress ``fold_bn`` (on
  models with BatchNorm) + ``insert_fake_quant(scheme='int8_static')`` with ``verify=True``;
  torchao ``prepare_pt2e`` / ``convert_pt2e`` with ``X86InductorQuantizer`` and its default
  config on ``torch.export.export(model, inputs).module()``; ``nncf.quantize`` with defaults on
  the same exported module (NNCF's torch.fx path). A model counts as quantized when the flow
  finishes, the result runs on the example inputs and holds at least one quantize op; the table
  gives the number of quantize ops ("q": graphpress's fake-quantize ops, weights and activations;
  torchao's and NNCF's ``quantize_per_*`` ops, activations only, as both store weights as int8
  constants) and the cosine of the flattened outputs against float on the example inputs
  (random weights: a sanity check, not a quality figure), or the error's class, with its first
  line under the table. Extra rows (``EXTRA_ROWS``, outside the count) run graphpress with other
  observers where its default is behind a peer.

torchao's flow ends in a reference Q/DQ graph (``quantize_per_tensor`` / ``dequantize_...``
around float ops), NNCF's in Q/DQ activations and dequantized constant weights, graphpress's in
``graphpress::fake_quantize_affine``: all three run the quantized values in float, so the
figures compare the quantization decisions (placement, ranges, granularity), not kernels.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import inspect
import re
import time
from collections.abc import Callable
from importlib.metadata import version
from typing import Any

import torch
from common import markdown_table, run_sections
from torch.utils import _pytree as pytree

import graphpress as gp
from graphpress.pipeline.samples import generate_samples
from graphpress.quant import QuantConfig, QuantSpec
from graphpress.testing.zoo import digits_data, get_model, zoo_models

Batch = tuple[torch.Tensor, ...]

# The sentences: the first sentence of each docstring (Python 3.11), in this order.
DOCSTRING_SOURCES = (
    "os.path.join", "os.path.splitext", "os.path.normpath", "os.path.basename", "os.walk",
    "shutil.copytree", "shutil.rmtree", "shutil.which", "json.dumps", "json.loads", "re.sub",
    "re.findall", "re.escape", "math.isclose", "math.gcd", "math.sqrt", "os.path.getsize",
    "itertools.groupby", "shutil.copyfile", "functools.lru_cache", "json.dump", "re.split",
    "functools.wraps", "collections.Counter", "collections.namedtuple",
    "collections.OrderedDict", "textwrap.dedent", "textwrap.wrap", "textwrap.fill",
    "random.shuffle", "random.choice", "random.sample", "statistics.median", "statistics.stdev",
    "heapq.heappush", "heapq.nlargest", "bisect.insort_left", "datetime.timedelta",
    "calendar.isleap", "heapq.heappop", "statistics.mean", "glob.glob", "fnmatch.fnmatch",
    "tempfile.mkdtemp", "zipfile.ZipFile", "random.randint", "base64.b64encode",
    "hashlib.sha256", "uuid.uuid4", "tempfile.mkstemp", "urllib.parse.urlparse",
    "subprocess.run", "threading.Thread", "queue.Queue", "logging.getLogger",
    "argparse.ArgumentParser", "pickle.dumps", "copy.deepcopy", "inspect.getsource",
    "abc.abstractmethod", "dataclasses.dataclass", "os.path.exists", "shutil.move", "sorted",
)
SEQ_LEN = 48
MINILM_BATCH = 8
DIGITS_BATCH = 90


# --------------------------------------------------------------------------------------------------
# The three tools, each as its users call it
# --------------------------------------------------------------------------------------------------


def graphpress_quantize(model: torch.nn.Module, example: Batch, passes: list[Any],
                        calibration: list[Batch]) -> gp.CompiledModel:
    return gp.compile(model, example, passes=passes, calibration_data=calibration, verify=True)


def torchao_quantize(model: torch.nn.Module, example: Batch,
                     calibration: list[Batch]) -> torch.nn.Module:
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
        X86InductorQuantizer,
        get_default_x86_inductor_quantization_config,
    )

    quantizer = X86InductorQuantizer().set_global(get_default_x86_inductor_quantization_config())
    prepared = prepare_pt2e(torch.export.export(model, example).module(), quantizer)
    with torch.no_grad():
        for batch in calibration:
            prepared(*batch)
    return convert_pt2e(prepared)


def nncf_quantize(model: torch.nn.Module, example: Batch, calibration: list[Batch],
                  **options: Any) -> torch.nn.Module:
    import nncf

    exported = torch.export.export(model, example).module()
    # subset_size counts dataset items (our batches): use them all, as the other tools do
    return nncf.quantize(exported, nncf.Dataset(calibration), subset_size=len(calibration),
                         **options)


def _fold(model_tags: frozenset[str]) -> list[str]:
    return ["fold_bn"] if "batchnorm" in model_tags else []


# --------------------------------------------------------------------------------------------------
# MiniLM
# --------------------------------------------------------------------------------------------------


def sentences() -> list[str]:
    """The first sentence of each docstring of DOCSTRING_SOURCES."""
    result = []
    for name in DOCSTRING_SOURCES:
        module, _, attribute = name.rpartition(".")
        doc = inspect.getdoc(getattr(importlib.import_module(module or "builtins"), attribute))
        paragraph = " ".join(doc.split("\n\n")[0].split())
        result.append(re.split(r"(?<=[.!?])\s", paragraph)[0])
    return result


def minilm_batches() -> tuple[list[Batch], list[Batch]]:
    """(calibration, evaluation): batches of (input_ids, attention_mask), even / odd sentences."""
    from transformers import AutoTokenizer

    from graphpress.testing.zoo import _minilm_path

    tokenizer = AutoTokenizer.from_pretrained(_minilm_path(), local_files_only=True)
    texts = sentences()

    def batches(part: list[str]) -> list[Batch]:
        encoding = tokenizer(part, padding="max_length", max_length=SEQ_LEN, truncation=True,
                             return_tensors="pt")
        ids, mask = encoding["input_ids"], encoding["attention_mask"]
        return list(zip(ids.split(MINILM_BATCH), mask.split(MINILM_BATCH), strict=True))
    return batches(texts[0::2]), batches(texts[1::2])


def embeddings(model: Callable[..., Any], batches: list[Batch]) -> torch.Tensor:
    """Mean pooling of last_hidden_state over the attention mask, per sentence."""
    rows = []
    with torch.no_grad():
        for ids, mask in batches:
            output = model(ids, mask)
            hidden = output["last_hidden_state"] if isinstance(output, dict) else output[0]
            weights = mask.unsqueeze(-1).to(hidden.dtype)
            rows.append((hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9))
    return torch.cat(rows)


def _cosines(quantized: torch.Tensor, reference: torch.Tensor) -> tuple[str, str]:
    cos = torch.nn.functional.cosine_similarity(quantized, reference, dim=-1)
    return f"{cos.mean().item():.4f}", f"{cos.min().item():.4f}"


def minilm_section() -> None:
    entry = get_model("minilm")
    model, _ = entry.make()
    calibration, evaluation = minilm_batches()
    example = calibration[0]
    reference = embeddings(model, evaluation)
    gp_runs: list[tuple[str, str, Any]] = [
        ("graphpress", "int8_weight_only", "insert_fake_quant(scheme='int8_weight_only')"),
        ("graphpress", "int8_dynamic", "insert_fake_quant(scheme='int8_dynamic')"),
        ("graphpress", "int8_static (minmax)", "insert_fake_quant(scheme='int8_static')"),
        ("graphpress", "int8_static (percentile 99.999, default)",
         gp.passes.InsertFakeQuant(gp.quant.int8_static(observer="percentile"))),
        ("graphpress", "int8_static (mse)",
         gp.passes.InsertFakeQuant(gp.quant.int8_static(observer="mse"))),
        ("graphpress", "int8_static (entropy)",
         gp.passes.InsertFakeQuant(gp.quant.int8_static(observer="entropy"))),
        ("graphpress", "int8_static (percentile 99.99)",
         gp.passes.InsertFakeQuant(gp.quant.int8_static(observer="percentile",
                                                        percentile=99.99))),
        ("graphpress", "int8_static (moving_average)",
         gp.passes.InsertFakeQuant(gp.quant.int8_static(observer="moving_average"))),
        ("graphpress", "int8_static (minmax), FFN down-projections float",
         gp.passes.InsertFakeQuant(gp.quant.int8_static(skip=["encoder.layer.*.output.dense"]))),
        ("graphpress", "int8_static (minmax), first layer float",
         gp.passes.InsertFakeQuant(gp.quant.int8_static(skip=["encoder.layer.0.*"]))),
        ("graphpress", "int4_weight_only(group_size=32)",
         "insert_fake_quant(scheme='int4_weight_only', group_size=32)"),
        ("graphpress", "int4_weight_only(group_size=128)",
         "insert_fake_quant(scheme='int4_weight_only', group_size=128)"),
        ("graphpress", "fp8 (e4m3, dynamic)", "insert_fake_quant(scheme='fp8')"),
        ("graphpress", "w4a8(group_size=32)", "insert_fake_quant(scheme='w4a8', group_size=32)"),
        ("graphpress", "w4a8(group_size=128)",
         "insert_fake_quant(scheme='w4a8', group_size=128)"),
    ]
    rows = []
    for tool, scheme, quant in gp_runs:
        start = time.perf_counter()
        compiled = graphpress_quantize(model, example, [quant], calibration)
        rows.append((tool, scheme, *_cosines(embeddings(compiled, evaluation), reference),
                     f"{time.perf_counter() - start:.1f}"))
    peers: list[tuple[str, str, Callable[[], Any]]] = [
        ("torchao PT2E", "X86InductorQuantizer default (int8 static)",
         lambda: torchao_quantize(model, example, calibration)),
        ("NNCF", "nncf.quantize defaults (int8 static)",
         lambda: nncf_quantize(model, example, calibration)),
        ("NNCF", "nncf.quantize, model_type=TRANSFORMER",
         lambda: nncf_quantize(model, example, calibration, model_type=_nncf_transformer())),
    ]
    for tool, scheme, build in peers:
        start = time.perf_counter()
        quantized = build()
        rows.append((tool, scheme, *_cosines(embeddings(quantized, evaluation), reference),
                     f"{time.perf_counter() - start:.1f}"))
    print(f"MiniLM (all-MiniLM-L6-v2, real weights): cosine of mean-pooled sentence embeddings vs "
          f"float; {len(calibration) * MINILM_BATCH} calibration / "
          f"{len(evaluation) * MINILM_BATCH} evaluation sentences, {SEQ_LEN} tokens\n")
    print(markdown_table(("tool", "scheme", "cosine mean", "cosine min", "quantize s"), rows))
    print()


def _nncf_transformer() -> Any:
    import nncf

    return nncf.ModelType.TRANSFORMER


# --------------------------------------------------------------------------------------------------
# Digits
# --------------------------------------------------------------------------------------------------


def digits_section() -> None:
    entry = get_model("digits_cnn")
    model, _ = entry.make()
    x_train, _, x_test, y_test = digits_data()
    usable = len(x_train) // DIGITS_BATCH * DIGITS_BATCH
    calibration = [(b,) for b in x_train[:usable].split(DIGITS_BATCH)]
    test = x_test.split(DIGITS_BATCH)
    assert sum(len(b) for b in test) == len(x_test) and len(test[-1]) == DIGITS_BATCH
    example = calibration[0]

    def accuracy(fn: Callable[[torch.Tensor], torch.Tensor]) -> float:
        with torch.no_grad():
            predictions = torch.cat([fn(b).argmax(-1) for b in test])
        return (predictions == y_test).float().mean().item()

    w4a8 = QuantConfig(weight=QuantSpec("int4", "per_channel"),
                       activation=QuantSpec("int8", "per_tensor", symmetric=False), name="w4a8")
    float_accuracy = accuracy(model)
    runs: list[tuple[str, str, Callable[[], Any]]] = [
        ("float", "-", lambda: model),
        ("graphpress", "fold_bn, int8_static (minmax)", lambda: graphpress_quantize(
            model, example, ["fold_bn", "insert_fake_quant(scheme='int8_static')"],
            calibration)),
        ("graphpress", "fold_bn, int4 per-channel weights / int8 activations (PTQ)",
         lambda: graphpress_quantize(model, example,
                                     ["fold_bn", gp.passes.InsertFakeQuant(w4a8)], calibration)),
        ("torchao PT2E", "X86InductorQuantizer default (int8 static)",
         lambda: torchao_quantize(model, example, calibration)),
        ("NNCF", "nncf.quantize defaults (int8 static)",
         lambda: nncf_quantize(model, example, calibration)),
    ]
    rows = []
    for tool, scheme, build in runs:
        value = accuracy(build())
        rows.append((tool, scheme, f"{value:.4f}", f"{(value - float_accuracy) * 100:+.2f}"))
    print(f"Digits CNN (trained): test accuracy, {len(x_test)} test images; calibration "
          f"{usable} training images\n")
    print(markdown_table(("tool", "scheme", "accuracy", "vs float (points)"), rows))
    print()


# --------------------------------------------------------------------------------------------------
# Zoo coverage
# --------------------------------------------------------------------------------------------------

_GP_QUANT = {torch.ops.graphpress.fake_quantize_affine.default}
_PEER_QUANT = ("quantize_per_tensor", "quantize_per_channel")


def _flat(output: Any) -> torch.Tensor:
    leaves = [t.detach().flatten().double() for t in pytree.tree_leaves(output)
              if isinstance(t, torch.Tensor) and t.is_floating_point()]
    return torch.cat(leaves)


def _count_quant(quantized: Any) -> int:
    if isinstance(quantized, gp.CompiledModel):
        return sum(n.target in _GP_QUANT for n in quantized.program.graph.nodes)
    return sum(n.op == "call_function" and any(q in str(n.target) for q in _PEER_QUANT)
               for n in quantized.graph.nodes)


def _attempt(flow: Callable[..., Any], model: torch.nn.Module, inputs: Batch,
             calibration: list[Batch], tags: frozenset[str]) -> tuple[str, str | None]:
    """Run one tool's flow on a copy of the model: (table cell, the error's first line)."""
    try:
        quantized = flow(copy.deepcopy(model), inputs, calibration, tags)
        with torch.no_grad():
            cos = torch.nn.functional.cosine_similarity(
                _flat(quantized(*inputs)), _flat(model(*inputs)), dim=0).item()
    except Exception as exc:  # the table reports every failure
        first = (str(exc).strip().splitlines() or [""])[0]
        return f"FAIL {type(exc).__name__}", f"{type(exc).__name__}: {first}"
    count = _count_quant(quantized)
    return (f"ok ({count} q, cos {cos:.4f})", None) if count else ("no quantize op", None)


INT8_STATIC = "insert_fake_quant(scheme='int8_static')"
# graphpress with other observers where its default is behind a peer: extra rows, outside the count
EXTRA_ROWS = {"hf_mobilenet_v2": ("moving_average", "mse", "percentile")}
ZOO_FLOWS: dict[str, Callable[[torch.nn.Module, Batch, list[Batch], frozenset[str]], Any]] = {
    "graphpress": lambda model, inputs, calibration, tags: graphpress_quantize(
        model, inputs, [*_fold(tags), INT8_STATIC], calibration),
    "torchao": lambda model, inputs, calibration, _: torchao_quantize(model, inputs, calibration),
    "nncf": lambda model, inputs, calibration, _: nncf_quantize(model, inputs, calibration),
}


ZOO_ONLY: set[str] = set()  # --zoo-models: run these zoo models only (and their extra rows)


def zoo_section() -> None:
    rows = []
    failures: list[str] = []
    ok = dict.fromkeys(ZOO_FLOWS, 0)
    entries = [e for e in zoo_models() if not ZOO_ONLY or e.name in ZOO_ONLY]
    for entry in entries:
        model, inputs = entry.make()
        calibration = [args for args, _ in generate_samples((inputs, {}), 8, seed=1)]
        cells = []
        for tool, flow in ZOO_FLOWS.items():
            cell, error = _attempt(flow, model, inputs, calibration, entry.tags)
            ok[tool] += cell.startswith("ok")
            cells.append(cell)
            if error:
                failures.append(f"- {entry.name}, {tool}: {error}")
        rows.append((entry.name, *cells))
    for name, observers in EXTRA_ROWS.items():
        if ZOO_ONLY and name not in ZOO_ONLY:
            continue
        entry = get_model(name)
        model, inputs = entry.make()
        calibration = [args for args, _ in generate_samples((inputs, {}), 8, seed=1)]
        for observer in observers:
            passes = [*_fold(entry.tags),
                      f"insert_fake_quant(scheme='int8_static', observer='{observer}')"]
            cell, error = _attempt(lambda model, inputs, calibration, _: graphpress_quantize(
                model, inputs, passes, calibration), model, inputs, calibration, entry.tags)  # noqa: B023
            rows.append((f"{name} (observer={observer})", cell, "-", "-"))
            if error:
                failures.append(f"- {name} (observer={observer}), graphpress: {error}")
    counts = ", ".join(f"{tool} {count}/{len(entries)}" for tool, count in ok.items())
    print(f"Zoo: default int8 static flow per tool, 8 generated calibration batches; quantized: "
          f"{counts}\n")
    print(markdown_table(("model", "graphpress", "torchao PT2E", "NNCF"), rows))
    print("\nfailures (the error's first line):\n" + "\n".join(failures) + "\n")


SECTIONS = {"minilm": minilm_section, "digits": digits_section, "zoo": zoo_section}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zoo-models", default="", help="comma-separated zoo names (zoo only)")
    run_sections(parser, SECTIONS,
                 f"quantization: torch {torch.__version__}, torchao {version('torchao')}, nncf "
                 f"{version('nncf')}",
                 lambda args: ZOO_ONLY.update(filter(None, args.zoo_models.split(","))))


if __name__ == "__main__":
    main()
