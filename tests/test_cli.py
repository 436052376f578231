"""The ``graphpress`` command line, run in-process through ``main([...])``."""

from __future__ import annotations

import json
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import graphpress as gp
from graphpress.cli import DEFAULT_REPORT, main, parse_inputs
from graphpress.demo import DEMO_MODELS, PRUNE_PIPELINE, QUANT_PIPELINE

FACTORY_MODULE = "graphpress_cli_test_models"
FACTORY_SOURCE = textwrap.dedent('''
    """Factories for the CLI tests (written to a temporary folder by the test)."""
    import torch
    from torch import nn


    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.bn = nn.BatchNorm2d(4)
            self.fc = nn.Linear(4, 2)
            self.register_buffer("scale", torch.full((2,), 0.5))

        def forward(self, x):
            h = torch.relu(self.bn(self.conv(x))).mean((2, 3))
            unused = torch.sin(h)  # dead: dce removes it
            return self.fc(h) * (self.scale * 2) + self.fc(h)


    class Embed(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(100, 8)

        def forward(self, ids, x):
            return self.emb(ids).sum(1) + x


    def make():
        torch.manual_seed(0)
        return Net()


    def make_with_inputs():
        torch.manual_seed(0)
        return Net(), (torch.randn(2, 3, 8, 8),)


    def make_embed():
        torch.manual_seed(0)
        return Embed()


    class Branchy(nn.Module):
        def forward(self, x):
            return x * 2 if x.sum() > 0 else x - 1


    def make_branchy():
        return Branchy(), (torch.randn(4),)


    def broken():
        raise RuntimeError("no weights here")
''')


@pytest.fixture
def factory_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A folder holding the factory module, as the working directory (graphpress imports from
    the current directory)."""
    (tmp_path / f"{FACTORY_MODULE}.py").write_text(FACTORY_SOURCE)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    yield tmp_path
    sys.modules.pop(FACTORY_MODULE, None)


def _error(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    """Run ``argv``, which must fail with status 2 and one error line, without a traceback;
    return that line. (torch may log above it: export prints the graph of a failed trace.)"""
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err, err
    line = err.splitlines()[-1]
    assert line.startswith("graphpress: error: "), err
    return line


def _table(out: str) -> dict[str, list[str]]:
    """The demo's before/after table: stage -> its figures."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("stage "))
    rows = {}
    for line in lines[start + 2:]:
        if not line.strip() or line.startswith("bytes:"):
            break
        stage, *figures = line.rsplit(None, 5)
        rows[stage.strip()] = figures
    return rows


def test_demo_runs_the_whole_job_on_the_trained_model(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "-o", str(tmp_path / "demo"), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert PRUNE_PIPELINE in out and QUANT_PIPELINE in out and "verify=True" in out
    for name in ("fold_bn", "prune_channels", "dce", "quantize/insert_fake_quant"):
        assert f"\n{name} " in out
    rows = _table(out)
    assert list(rows) == ["trained model (fp32)", "fold_bn + prune 50%",
                          "+ fine-tune 3 epochs", "+ int8 fake-quant (eager)",
                          "+ ONNX (onnxruntime int8)"]
    accuracy = {stage: float(figures[0].rstrip("%")) for stage, figures in rows.items()}
    params = {stage: int(figures[1].replace(",", "")) for stage, figures in rows.items()}
    assert accuracy["trained model (fp32)"] > 95
    assert accuracy["+ fine-tune 3 epochs"] > 93          # fine-tuning recovers pruning's loss
    assert accuracy["+ fine-tune 3 epochs"] > accuracy["fold_bn + prune 50%"]
    assert abs(accuracy["+ ONNX (onnxruntime int8)"] - accuracy["+ fine-tune 3 epochs"]) < 3
    assert params["fold_bn + prune 50%"] < params["trained model (fp32)"] / 2
    report = tmp_path / "demo" / "report.html"
    assert out.strip().splitlines()[-1] == f"report: {report}"
    page = report.read_text()
    assert "graphpress demo: digits_cnn" in page and "channels kept per group" in page
    assert "quantization error and ranges" in page and "latency ms" in page
    assert (tmp_path / "demo" / "onnx" / "model.onnx").is_file()
    assert gp.load(tmp_path / "demo" / "model").report().title == ""  # the quantize compile


def test_demo_unknown_model_lists_zoo(capsys: pytest.CaptureFixture[str]) -> None:
    err = _error(capsys, ["demo", "--model", "no_such_model", "--no-verify"])
    assert "unknown demo model 'no_such_model'" in err
    assert f"The demo runs: {', '.join(DEMO_MODELS)} (default digits_cnn)" in err
    # a zoo model the demo was never tested on is refused with the way forward
    err = _error(capsys, ["demo", "--model", "hf_swin"])
    assert "'hf_swin' is a zoo model, but the demo's steps are not tested on it" in err
    assert "graphpress compile" in err


@pytest.mark.slow
@pytest.mark.parametrize("name", [m for m in DEMO_MODELS if m != "digits_cnn"])
def test_demo_runs_every_model_it_accepts(name: str, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    """Each --model value runs the whole job, verified: table, saved model, ONNX, report."""
    recipe = DEMO_MODELS[name]
    assert main(["demo", "--model", name, "-o", str(tmp_path / "demo"), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert recipe.pipeline() in out and "verify=True" in out
    rows = _table(out)
    assert list(rows) == ["original (fp32)", recipe.stage(), "+ int8 fake-quant (eager)",
                          "+ ONNX (onnxruntime int8)"]
    cosine = {stage: float(figures[0]) for stage, figures in rows.items()}
    params = {stage: int(figures[1].replace(",", "")) for stage, figures in rows.items()}
    assert cosine["original (fp32)"] == 1.0
    assert all(-1.0 <= value <= 1.0 for value in cosine.values())
    # onnxruntime runs the same int8 program: its outputs follow the eager fake-quant ones
    assert abs(cosine["+ ONNX (onnxruntime int8)"] - cosine["+ int8 fake-quant (eager)"]) < 0.01
    assert params[recipe.stage()] < params["original (fp32)"]
    page = (tmp_path / "demo" / "report.html").read_text()
    assert f"graphpress demo: {name}" in page and "channels kept per group" in page
    assert "quantization error and ranges" in page and "latency ms" in page
    if recipe.merge_r:
        assert "merge_tokens: tokens per block after merging" in page
    assert (tmp_path / "demo" / "onnx" / "model.onnx").is_file()
    assert gp.load(tmp_path / "demo" / "model").program.num_nodes() > 0


def test_passes_lists_name_description_contract(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["passes"]) == 0
    out = capsys.readouterr().out
    assert "cse" in out and "Replaces repeated pure computations" in out
    assert "fold_constants" in out and "max_new_elements=1024" in out
    assert out.count("contract: exact (rtol=0, atol=0)") >= 3


def test_compile_saves_a_loadable_folder(factory_dir: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    out_dir = factory_dir / "out"
    argv = ["compile", f"{FACTORY_MODULE}:make", "--inputs", "2x3x8x8", "--verify",
            "-o", str(out_dir)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "graphpress report" in out and f"saved to {out_dir}" in out
    assert "compiled vs original output: max abs error" in out
    manifest = json.loads((out_dir / "manifest.json").read_text())
    assert "dce" in manifest["pipeline"] and "cse" in manifest["pipeline"]
    nodes = manifest["report"]["records"]
    assert nodes[0]["nodes"][0] > nodes[-1]["nodes"][1]  # the dead sin and repeated fc went

    loaded = gp.load(out_dir)
    model = sys.modules[FACTORY_MODULE].make().eval()
    (x,) = parse_inputs("2x3x8x8")
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=1e-5, atol=1e-6)
        other = torch.randn(2, 3, 8, 8)
        torch.testing.assert_close(loaded(other), model(other), rtol=1e-5, atol=1e-6)


def test_compile_on_the_triton_backend_saves_the_generated_module(
        factory_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out_dir = factory_dir / "triton"
    argv = ["compile", f"{FACTORY_MODULE}:make", "--inputs", "2x3x8x8", "--verify",
            "--backend", "triton", "-o", str(out_dir)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "triton vs eager max abs error" in out and "triton kernels" in out
    assert "def call(" in (out_dir / "triton_module.py").read_text()


def test_compile_uses_factory_inputs_and_passes(factory_dir: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["compile", f"{FACTORY_MODULE}:make_with_inputs", "--passes", "dce"]) == 0
    out = capsys.readouterr().out
    assert "inputs 2x3x8x8:float32" in out
    assert "\ndce " in out and "\ncse " not in out


def test_compile_integer_inputs(factory_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["compile", f"{FACTORY_MODULE}:make_embed", "--inputs", "2x5:int64,2x8", "--verify"]
    assert main(argv) == 0
    assert "inputs 2x5:int64, 2x8:float32" in capsys.readouterr().out


def test_parse_inputs_is_seeded_with_small_ints() -> None:
    ids, x, mask = parse_inputs("2x8:int64, 3x4x5 ,4:bool")
    assert ids.dtype == torch.int64 and ids.shape == (2, 8)
    assert int(ids.min()) >= 0 and int(ids.max()) < 100
    assert x.dtype == torch.float32 and x.shape == (3, 4, 5)
    assert mask.dtype == torch.bool
    again = parse_inputs("2x8:int64, 3x4x5 ,4:bool")
    assert all(torch.equal(a, b) for a, b in zip(again, (ids, x, mask), strict=True))
    assert not torch.equal(parse_inputs("3x4x5", seed=1)[0], parse_inputs("3x4x5")[0])


def test_unknown_pass_lists_known_passes(factory_dir: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    err = _error(capsys, ["compile", f"{FACTORY_MODULE}:make", "--inputs", "2x3x8x8",
                          "--passes", "dce, csee"])
    assert "unknown pass 'csee'" in err and "Did you mean 'cse'?" in err
    known = err.split("Known passes: ")[1].split(", ")
    assert {"cse", "dce", "fold_constants"} <= set(known)


@pytest.mark.parametrize(("target", "message"), [
    ("no_colon_here", "expected MODULE:FACTORY"),
    ("graphpress_no_such_module:make", "cannot import module 'graphpress_no_such_module'"),
    (f"{FACTORY_MODULE}:missing", f"module '{FACTORY_MODULE}' has no attribute 'missing'"),
    (f"{FACTORY_MODULE}:broken", "broken() raised RuntimeError: no weights here"),
    (f"{FACTORY_MODULE}:torch", "not a callable factory"),
])
def test_bad_factory(factory_dir: Path, capsys: pytest.CaptureFixture[str], target: str,
                     message: str) -> None:
    assert message in _error(capsys, ["compile", target, "--inputs", "2x3x8x8"])


def test_factory_without_inputs_needs_inputs_spec(factory_dir: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    assert "give --inputs SPEC" in _error(capsys, ["compile", f"{FACTORY_MODULE}:make"])


@pytest.mark.parametrize(("spec", "message"), [
    ("2xax8", "bad --inputs entry '2xax8'"),
    ("2x0x8", "bad --inputs entry '2x0x8'"),
    ("", "bad --inputs entry ''"),
    ("2x3:floaty", "unknown dtype 'floaty'"),
    ("2x3:Size", "unknown dtype 'Size'"),
])
def test_bad_inputs_spec(factory_dir: Path, capsys: pytest.CaptureFixture[str], spec: str,
                         message: str) -> None:
    assert message in _error(capsys, ["compile", f"{FACTORY_MODULE}:make", "--inputs", spec])


def test_bad_command_line_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert "required" in _error(capsys, ["report"])
    assert "invalid choice" in _error(capsys, ["compile", "m:f", "--frontend", "nope"])
    assert "invalid choice" in _error(capsys, ["frobnicate"])


def test_unknown_backend(factory_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    err = _error(capsys, ["compile", f"{FACTORY_MODULE}:make", "--inputs", "2x3x8x8",
                          "--backend", "no_such_backend"])
    assert "unknown backend 'no_such_backend'" in err and "eager" in err


def test_multiline_trace_error_is_one_line(factory_dir: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    err = _error(capsys, ["compile", f"{FACTORY_MODULE}:make_branchy"])
    assert "could not trace Branchy" in err and "data-dependent control flow" in err
    assert "; cause: " in err


def test_debug_shows_the_traceback(capsys: pytest.CaptureFixture[str],
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GRAPHPRESS_DEBUG", "1")
    assert main(["demo", "--model", "no_such_model"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("Traceback")
    assert err.splitlines()[-1].startswith(
        "graphpress: error: unknown demo model 'no_such_model'")


def test_help_returns_zero(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    assert "demo" in capsys.readouterr().out


def test_compile_writes_the_html_report(factory_dir: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["compile", f"{FACTORY_MODULE}:make_with_inputs"]) == 0
    assert capsys.readouterr().out.strip().endswith(f"report: {DEFAULT_REPORT}")
    page = (factory_dir / DEFAULT_REPORT).read_text()
    assert '"views"' in page and "fold_bn" in page
    assert main(["compile", f"{FACTORY_MODULE}:make_with_inputs", "--report", "r.html"]) == 0
    assert (factory_dir / "r.html").is_file()


def test_report_rebuilds_the_html_of_a_saved_folder(factory_dir: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    out_dir = factory_dir / "out"
    assert main(["compile", f"{FACTORY_MODULE}:make_with_inputs", "-o", str(out_dir)]) == 0
    first = (out_dir / "report.html").read_text()
    (out_dir / "report.html").unlink()
    capsys.readouterr()
    assert main(["report", str(out_dir)]) == 0
    assert capsys.readouterr().out.strip() == f"report: {out_dir / 'report.html'}"
    assert (out_dir / "report.html").read_text() == first
    gp.load(out_dir)  # the manifest still matches the folder
    assert main(["report", str(out_dir), "-o", "elsewhere.html"]) == 0
    assert (factory_dir / "elsewhere.html").read_text() == first


def test_report_of_a_damaged_folder_names_the_file(factory_dir: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    out_dir = factory_dir / "out"
    assert main(["compile", f"{FACTORY_MODULE}:make_with_inputs", "-o", str(out_dir)]) == 0
    (out_dir / "report.json").write_text("{}")
    assert "report.json" in _error(capsys, ["report", str(out_dir)])
    assert "manifest.json" in _error(capsys, ["report", str(factory_dir)])


_BERT_CONFIG = {"model_type": "bert", "vocab_size": 128, "hidden_size": 16,
                "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 32,
                "max_position_embeddings": 32}


def test_compile_a_hugging_face_config(factory_dir: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    (factory_dir / "bert.json").write_text(json.dumps(_BERT_CONFIG))
    argv = ["compile", "--hf-config", "bert.json", "--hf-class", "BertModel", "--verify",
            "--passes", "fixpoint(dce, cse)"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "compiling BertModel from bert.json on inputs 1x16:int64" in out
    assert "compiled vs original output: max abs error 0.00e+00" in out


def test_compile_a_local_hugging_face_folder(factory_dir: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    import transformers

    torch.manual_seed(0)
    config = transformers.BertConfig(**{k: v for k, v in _BERT_CONFIG.items()
                                        if k != "model_type"})
    transformers.BertForSequenceClassification(config).save_pretrained(factory_dir / "bert")
    argv = ["compile", "--hf", "bert", "--hf-class", "BertForSequenceClassification",
            "--passes", "dce", "--inputs", "2x8:int64"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "compiling BertForSequenceClassification from bert on inputs 2x8:int64" in out


@pytest.mark.parametrize(("argv", "message"), [
    (["compile", "--hf-config", "bert.json"], "--hf-config needs --hf-class"),
    (["compile", "--hf", "."], "has no config.json"),
    (["compile"], "give exactly one model"),
    (["compile", "m:f", "--hf", "."], "give exactly one model"),
    (["compile", "--hf-config", "missing.json", "--hf-class", "BertModel"],
     "cannot read a transformers config from missing.json"),
    (["compile", "--hf-config", "bert.json", "--hf-class", "NoSuchModel"],
     "is not a transformers model class"),
])
def test_bad_hugging_face_arguments(factory_dir: Path, capsys: pytest.CaptureFixture[str],
                                    argv: list[str], message: str) -> None:
    (factory_dir / "bert.json").write_text(json.dumps(_BERT_CONFIG))
    assert message in _error(capsys, argv)


def test_progress_bars_go_to_stderr_and_quiet_turns_them_off(
        factory_dir: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Forced bars (GRAPHPRESS_PROGRESS=1, no delay) cover tracing, the passes, verification
    and the end-to-end check, all on stderr: stdout holds the same lines as a quiet run."""
    from graphpress.ir import progress

    monkeypatch.setenv("GRAPHPRESS_PROGRESS", "1")
    monkeypatch.setattr(progress, "DELAY", 0.0)
    argv = ["compile", f"{FACTORY_MODULE}:make_with_inputs", "--verify"]
    assert main([*argv, "--report", str(factory_dir / "a.html")]) == 0
    shown = capsys.readouterr()
    for bar in ("tracing Net", "passes", "verifying fold_bn", "end-to-end: the model",
                "lowering to eager"):
        assert bar in shown.err, bar
    assert "\r" not in shown.out and "it/s" not in shown.out
    assert main([*argv, "--report", str(factory_dir / "b.html"), "--quiet"]) == 0
    quiet = capsys.readouterr()
    assert quiet.err == ""
    lines, quiet_lines = shown.out.splitlines(), quiet.out.splitlines()
    assert len(lines) == len(quiet_lines) and lines[0] == quiet_lines[0]
    assert [line.split()[:1] for line in lines] == [line.split()[:1] for line in quiet_lines]
