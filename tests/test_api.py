"""gp.compile / CompiledModel / gp.load: the user-facing flow and its errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

import graphpress as gp
from graphpress.errors import BackendError, InputError, PipelineError, TraceError
from graphpress.testing import assert_equivalent
from tests.models import ConvBNLinear, Redundant, conv_inputs, vec_inputs


def test_compile_verify_report_save_load(tmp_path: Path) -> None:
    model = Redundant().eval()
    x = vec_inputs()
    compiled = gp.compile(model, x, passes=["dce", "cse", "fold_constants"], verify=True)
    assert_equivalent(compiled, model, x, rtol=0, atol=0)
    text = str(compiled.report())
    for column in ("pass", "time ms", "nodes", "params", "MACs", "weight bytes", "max error"):
        assert column in text
    assert [r.name for r in compiled.report().records] == ["dce", "cse", "fold_constants"]
    assert compiled.report().records[1].nodes[1] < compiled.report().records[1].nodes[0]
    before, after = compiled.report().records[0].weight_bytes  # dce drops the unused linear
    assert after == before - 4 * (4 * 4 + 4)
    folder = compiled.save(tmp_path / "out")
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["backend"] == "eager" and manifest["pipeline"] == "dce, cse, fold_constants"
    assert (folder / "program.txt").read_text().startswith("program(")
    loaded = gp.load(folder)
    assert_equivalent(loaded, model, x, rtol=0, atol=0)
    assert str(loaded.report()) == text


def test_user_model_is_untouched() -> None:
    model = Redundant().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    compiled = gp.compile(model, vec_inputs(), passes="fold_constants, dce")
    compiled.program.replace_weight("fc.bias", torch.zeros(4))
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[name]), name


def test_dict_and_kwargs_inputs() -> None:
    class Kw(nn.Module):
        def forward(self, x: torch.Tensor, *, scale: torch.Tensor) -> dict[str, torch.Tensor]:
            return {"y": x * scale, "z": (x + scale).sum()}

    x, scale = torch.randn(2, 3), torch.randn(3)
    compiled = gp.compile(Kw(), (x,), example_kwargs={"scale": scale}, passes="cse",
                          verify=True)
    out = compiled(x, scale=scale)
    assert set(out) == {"y", "z"} and torch.equal(out["y"], x * scale)


def test_dynamic_batch() -> None:
    model = ConvBNLinear().eval()
    compiled = gp.compile(model, conv_inputs(), passes="dce,cse", dynamic_batch=True)
    bigger = torch.randn(5, 3, 8, 8)
    assert_equivalent(compiled, model, (bigger,))


def test_bad_inputs_get_clear_errors() -> None:
    model = ConvBNLinear().eval()
    with pytest.raises(InputError, match="numpy.*torch.from_numpy"):
        gp.compile(model, (conv_inputs()[0].numpy(),))
    with pytest.raises(InputError, match="must be a tuple"):
        gp.compile(model, {"x": conv_inputs()[0]})
    with pytest.raises(InputError, match="no tensor"):
        gp.compile(model, (3,))
    with pytest.raises(PipelineError, match="unknown pass 'fold_bnn'.*Known passes"):
        gp.compile(model, conv_inputs(), passes="fold_bnn")
    with pytest.raises(BackendError, match="unknown backend 'tensorrt'; available: eager, onnx, "
                                           "triton"):
        gp.compile(model, conv_inputs(), backend="tensorrt")
    with pytest.raises(InputError, match="unknown frontend 'dynamo'.*torch.compile"):
        gp.compile(model, conv_inputs(), frontend="dynamo")


def test_single_tensor_input_is_accepted() -> None:
    model = ConvBNLinear().eval()
    x = conv_inputs()[0]
    assert_equivalent(gp.compile(model, x), model, (x,))


def test_untraceable_model_names_cause_and_fix() -> None:
    class DataDependent(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.sum() > 0:
                return x * 2
            return x - 1

    with pytest.raises(TraceError, match="data-dependent control flow.*torch.cond"):
        gp.compile(DataDependent(), (torch.randn(3),))


def test_compiled_repr_and_program_access() -> None:
    compiled = gp.compile(ConvBNLinear().eval(), conv_inputs(), passes="dce")
    assert "backend='eager'" in repr(compiled)
    assert compiled.program.num_nodes() > 0
    assert compiled.backend == "eager"


def test_load_rejects_non_graphpress_folder(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        gp.load(tmp_path)


def test_backend_options_and_backend_check(monkeypatch: pytest.MonkeyPatch) -> None:
    from graphpress import backends

    class Shifted:
        """A backend that is off by a constant, to prove verify compares it with eager."""

        name = "test_shifted"
        tolerance = (0.0, 1e-6)

        def __init__(self, program: gp.Program, shift: float = 0.0) -> None:
            self.program, self.shift = program, shift

        def __call__(self, *args: object) -> torch.Tensor:
            return self.program(*args) + self.shift

        def save(self, folder: Path) -> list[str]:
            return []

        def info(self) -> dict[str, str]:
            return {"shift": str(self.shift)}

    monkeypatch.setitem(backends.BACKENDS, "test_shifted", Shifted)
    model, x = ConvBNLinear().eval(), conv_inputs()
    ok = gp.compile(model, x, backend="test_shifted", verify=True)
    assert ok.report().extra["shift"] == "0.0"
    assert "test_shifted vs eager max abs error" in str(ok.report())
    with pytest.raises(BackendError, match="differs from eager"):
        gp.compile(model, x, backend="test_shifted", verify=True, backend_options={"shift": 1.0})
    with pytest.raises(BackendError, match="rejected its options"):
        gp.compile(model, x, backend="test_shifted", backend_options={"nope": 1})
    # a quantized program: past one int8 step, a shift that eager's own float rounding does not
    # explain (eager in float64 is ~0 off) still fails, and says the referee was asked
    calibration = [conv_inputs() for _ in range(2)]
    quantized = gp.compile(model, x, passes="fold_bn, insert_fake_quant", backend="test_shifted",
                           verify=True, calibration_data=calibration)
    assert "one int8 step" in quantized.report().extra["test_shifted vs eager max abs error"]
    with pytest.raises(BackendError, match="own float rounding .* does not explain it"):
        gp.compile(model, x, passes="fold_bn, insert_fake_quant", backend="test_shifted",
                   verify=True, calibration_data=calibration, backend_options={"shift": 1.0})


def test_save_after_cse_merges_returned_values(tmp_path: Path) -> None:
    class TwoSame(nn.Module):
        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return x.relu() + 1, x.relu() + 1

    x = torch.randn(3)
    compiled = gp.compile(TwoSame(), (x,), passes="cse", verify=True)
    assert compiled.report().records[0].stats["merged"] == 2
    loaded = gp.load(compiled.save(tmp_path / "cse"))
    assert_equivalent(loaded, TwoSame(), (x,), rtol=0, atol=0)


def test_sequential_input_named_input_verifies() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    x = torch.randn(3, 4)
    compiled = gp.compile(model, (x,), passes="dce, cse", verify=True)
    assert_equivalent(compiled, model, (x,), rtol=0, atol=0)


def test_report_keeps_pass_details() -> None:
    compiled = gp.compile(Redundant().eval(), vec_inputs(), passes="dce")
    assert compiled.report().details("dce") == {}
    with pytest.raises(KeyError, match="ran: dce"):
        compiled.report().details("prune_channels")
    assert "details" not in compiled.report().to_dict()["records"][0]
