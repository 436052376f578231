"""The ONNX backend: numbers against eager, call convention, dynamic axes, save, fake-quant
translations, the translation table, and the errors (missing translation, checker, options)."""

from __future__ import annotations

import collections
import json
from pathlib import Path

import onnx
import onnxruntime as ort
import pytest
import torch
from onnxscript import opset18 as op
from onnxscript.onnx_types import TensorType
from torch import nn
from torch.export import Dim

import graphpress as gp
from graphpress.backends import onnx as gonnx
from graphpress.backends.onnx import OnnxArtifact, onnx_backend, register_translation
from graphpress.backends.onnx.artifact import check_saved_model
from graphpress.errors import ArtifactError, BackendError, InputError, MissingArtifactError
from graphpress.frontends import trace
from graphpress.ir.artifacts import file_record
from graphpress.testing import assert_equivalent
from graphpress.testing.zoo import get_model
from tests.models import ConvBNLinear, conv_inputs


@torch.library.custom_op("gp_onnx_test::twice", mutates_args=())
def twice(x: torch.Tensor) -> torch.Tensor:
    return x * 2


@twice.register_fake
def _twice_fake(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


class UsesCustomOp(nn.Module):
    """``fc(block(relu(x)))`` where ``block`` calls an op the exporter cannot translate."""

    class Block(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return twice(x)

    def __init__(self) -> None:
        super().__init__()
        self.block = self.Block()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.block(torch.relu(x)))


class KeywordsAndDict(nn.Module):
    """Positional + keyword tensors, a float baked in at export, a dict output with an alias."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor, *, y: torch.Tensor, z: torch.Tensor,
                scale: float = 2.0) -> dict[str, torch.Tensor]:
        h = self.fc(x * scale + y - z)
        return {"h": h, "h_again": h, "x": x}


@pytest.fixture(autouse=True)
def _private_table(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test registers translations in its own copy of the table."""
    monkeypatch.setattr(gonnx, "TRANSLATIONS", dict(gonnx.TRANSLATIONS))


@pytest.fixture(scope="module")
def dynamic_conv() -> tuple[nn.Module, gp.CompiledModel]:
    model = ConvBNLinear().eval()
    return model, gp.compile(model, conv_inputs(), passes="fixpoint(dce, cse, fold_constants)",
                             backend="onnx", verify=True, dynamic_batch=True)


def _op_counts(artifact: OnnxArtifact) -> collections.Counter[str]:
    return collections.Counter(n.op_type for n in artifact.onnx_program.model_proto.graph.node)


def test_compile_matches_eager_and_reports(dynamic_conv: tuple[nn.Module,
                                                                gp.CompiledModel]) -> None:
    model, compiled = dynamic_conv
    assert compiled.backend == "onnx" and isinstance(compiled.artifact, OnnxArtifact)
    assert_equivalent(compiled, model, conv_inputs(), rtol=0, atol=1e-5)
    extra = compiled.report().extra
    assert extra["onnx opset"] == str(compiled.artifact.opset)
    assert extra["onnx size on disk"].endswith("kB")
    assert float(extra["onnx vs eager max abs error"]) <= 1e-5
    assert "onnx providers: CPUExecutionProvider" in str(compiled.report())


def test_dynamic_batch_runs_two_batch_sizes(dynamic_conv: tuple[nn.Module,
                                                                 gp.CompiledModel]) -> None:
    model, compiled = dynamic_conv
    for batch in (1, 5):
        x = torch.randn(batch, 3, 8, 8)
        assert compiled(x).shape == (batch, 2)
        assert_equivalent(compiled, model, (x,), rtol=0, atol=1e-5, msg=f"batch {batch}")


class SelfAttention(nn.Module):
    """Single-head self-attention over ``[batch, seq, 4]``: both leading axes can vary."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv, self.out = nn.Linear(4, 12), nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        return self.out(torch.softmax(q @ k.transpose(1, 2) / 2, dim=-1) @ v)


def test_dynamic_batch_and_sequence_survive() -> None:
    model = SelfAttention().eval()
    shapes = ({0: Dim("batch"), 1: Dim("seq", max=64)},)
    compiled = gp.compile(model, (torch.randn(2, 5, 4),), backend="onnx", dynamic_shapes=shapes)
    axes = compiled.artifact.manifest()["dynamic_axes"]
    assert axes["x"].keys() == {"0", "1"}
    for batch, seq in ((1, 7), (3, 13)):
        x = torch.randn(batch, seq, 4)
        assert_equivalent(compiled, model, (x,), rtol=0, atol=1e-5, msg=f"{batch}x{seq}")


@pytest.mark.slow
def test_hf_bert_dynamic_batch_and_sequence() -> None:
    model, (ids, mask) = get_model("hf_bert").make()
    batch, seq = Dim("batch"), Dim("seq", max=64)
    shapes = {"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}}
    compiled = gp.compile(model, (ids, mask), backend="onnx", dynamic_shapes=shapes)
    axes = compiled.artifact.manifest()["dynamic_axes"]
    assert axes["input_ids"].keys() == {"0", "1"} and axes["input_ids"] == axes["attention_mask"]
    ids3, mask3 = torch.randint(0, 100, (3, 13)), torch.ones(3, 13, dtype=torch.long)
    mask3[0, 9:] = 0
    out = compiled(ids3, mask3)
    assert type(out).__name__ == "BaseModelOutputWithPoolingAndCrossAttentions"
    assert out.last_hidden_state.shape == (3, 13, 32)
    assert_equivalent(compiled, model, (ids3, mask3), rtol=0, atol=1e-4)


def test_call_convention_kwargs_constants_and_dict_outputs() -> None:
    model = KeywordsAndDict().eval()
    x, y, z = torch.randn(2, 4), torch.randn(2, 4), torch.randn(2, 4)
    compiled = gp.compile(model, (x,), example_kwargs={"y": y, "z": z, "scale": 3.0},
                          backend="onnx", verify=True)
    out = compiled(x, z=z, y=y, scale=3.0)  # keywords in another order
    assert isinstance(out, dict) and list(out) == ["h", "h_again", "x"]
    assert_equivalent(compiled, model, (x,), kwargs={"y": y, "z": z, "scale": 3.0}, rtol=0,
                      atol=1e-6)
    with pytest.raises(InputError, match=r"kwargs\['scale'\] was fixed to 3.0.*got 4.0"):
        compiled(x, y=y, z=z, scale=4.0)
    with pytest.raises(InputError, match="structured as"):
        compiled(x, y=y)
    with pytest.raises(InputError, match="dynamic_batch=True"):  # static axes
        compiled(torch.randn(3, 4), y=torch.randn(3, 4), z=torch.randn(3, 4), scale=3.0)


def test_save_writes_model_and_manifest(dynamic_conv: tuple[nn.Module, gp.CompiledModel],
                                        tmp_path: Path) -> None:
    model, compiled = dynamic_conv
    folder = compiled.save(tmp_path / "out")
    manifest = json.loads((folder / "onnx_manifest.json").read_text())
    assert {"model.onnx", "onnx_manifest.json"} <= set(
        json.loads((folder / "manifest.json").read_text())["files"])
    assert manifest["graphpress"] == gp.__version__ and manifest["external_data"] is None
    assert manifest["opset"] == compiled.artifact.opset
    assert [i["name"] for i in manifest["inputs"]] == ["x"]
    assert manifest["inputs"][0]["path"] == "args[0]"
    assert manifest["dynamic_axes"]["x"] == {"0": manifest["inputs"][0]["shape"][0]}
    onnx.checker.check_model(str(folder / "model.onnx"), full_check=True)
    session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    x = torch.randn(4, 3, 8, 8)
    (result,) = session.run(None, {"x": x.numpy()})
    torch.testing.assert_close(torch.from_numpy(result), model(x), rtol=0, atol=1e-5)
    assert_equivalent(gp.load(folder), model, (x,), rtol=0, atol=1e-5)


def test_saved_onnx_files_are_checked(dynamic_conv: tuple[nn.Module, gp.CompiledModel],
                                      tmp_path: Path) -> None:
    """onnx_manifest.json records model.onnx's size and sha256; check_saved_model (and gp.load,
    through manifest.json) refuse an edited or missing model, or a manifest too new or gone."""
    folder = dynamic_conv[1].save(tmp_path / "out")
    path, manifest_path = folder / "model.onnx", folder / "onnx_manifest.json"
    manifest = json.loads(manifest_path.read_text())
    assert manifest["format"] == 1 and manifest["files"] == {"model.onnx": file_record(path)}
    assert check_saved_model(folder) == path
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    for load in (check_saved_model, gp.load):
        with pytest.raises(ArtifactError, match="modified after it was saved") as info:
            load(folder)
        assert str(path) in str(info.value) and "Fix: copy the folder again" in str(info.value)
    path.unlink()
    with pytest.raises(MissingArtifactError, match="model.onnx is missing"):
        check_saved_model(folder)
    manifest_path.write_text(json.dumps(manifest | {"format": 7, "graphpress": "9.0.0"}))
    with pytest.raises(ArtifactError, match="format 7, written by graphpress 9.0.0.*upgrade"):
        check_saved_model(folder)
    manifest_path.unlink()
    with pytest.raises(MissingArtifactError, match="onnx_manifest.json is missing"):
        check_saved_model(folder)


def test_external_data_above_threshold(tmp_path: Path) -> None:
    model = ConvBNLinear().eval()
    artifact = onnx_backend(trace(model, conv_inputs()), external_data_threshold=0,
                            metadata={"owner": "tests"})
    assert artifact.info()["onnx size on disk"].endswith("(external data)")
    assert_equivalent(artifact, model, conv_inputs(), rtol=0, atol=1e-5)
    files = artifact.save(tmp_path)
    assert files == ["model.onnx", "model.onnx.data", "onnx_manifest.json"]
    manifest = json.loads((tmp_path / "onnx_manifest.json").read_text())
    assert manifest["external_data"] == "model.onnx.data"
    assert manifest["metadata"] == {"owner": "tests"}
    saved = onnx.load(str(tmp_path / "model.onnx"), load_external_data=False)
    assert {p.key: p.value for p in saved.metadata_props}["graphpress.owner"] == "tests"
    assert any(t.data_location == onnx.TensorProto.EXTERNAL for t in saved.graph.initializer)
    assert set(manifest["files"]) == {"model.onnx", "model.onnx.data"}
    assert check_saved_model(tmp_path) == tmp_path / "model.onnx"
    data = tmp_path / "model.onnx.data"
    data.write_bytes(data.read_bytes()[:-4])
    with pytest.raises(ArtifactError, match="model.onnx.data is truncated") as info:
        check_saved_model(tmp_path)
    assert "Fix: copy the folder again" in str(info.value)


class FakeQuantNet(nn.Module):
    """Every fake-quant flavour: 8-bit ranges (the exporter's translations) and narrow ranges
    (graphpress's), per tensor with Python and tensor qparams, and per channel."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 4), nn.Linear(8, 4, bias=False)
        # power-of-two scales: torch multiplies by 1/scale, ONNX divides by scale; equal here
        self.register_buffer("w_scale", torch.tensor([2.0 ** -6, 2.0 ** -5, 2.0 ** -7, 2.0 ** -4]))
        self.register_buffer("w_zero", torch.tensor([0, 1, -1, 0], dtype=torch.int32))
        self.register_buffer("a_scale", torch.tensor([0.125]))
        self.register_buffer("a_zero", torch.tensor([2], dtype=torch.int32))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        u8 = torch.fake_quantize_per_tensor_affine(x, 0.125, 3, 0, 255)
        u8t = torch.fake_quantize_per_tensor_affine(x, self.a_scale, self.a_zero, 0, 255)
        i4 = torch.fake_quantize_per_tensor_affine(x, self.a_scale, self.a_zero, -8, 7)
        sym = torch.fake_quantize_per_tensor_affine(x, 0.0625, 0, -127, 127)
        w8 = torch.fake_quantize_per_channel_affine(self.fc1.weight, self.w_scale, self.w_zero,
                                                    0, -128, 127)
        w4 = torch.fake_quantize_per_channel_affine(self.fc2.weight, self.w_scale, self.w_zero,
                                                    0, -8, 7)
        return {"u8": u8, "u8t": u8t, "i4": i4, "sym": sym,
                "y": nn.functional.linear(u8, w8, self.fc1.bias) + nn.functional.linear(i4, w4)}


def test_fake_quant_becomes_quantize_dequantize_and_matches() -> None:
    model = FakeQuantNet().eval()
    ties = (torch.arange(-40, 40, dtype=torch.float32) + 0.5) / 16  # exact .5 ties at 1/8, 1/16
    x = torch.cat([ties.reshape(10, 8), torch.randn(6, 8) * 2])
    compiled = gp.compile(model, (x,), backend="onnx", verify=True)
    counts = _op_counts(compiled.artifact)
    assert counts["QuantizeLinear"] == counts["DequantizeLinear"] == 6
    assert counts["Clip"] == 3  # the three narrow ranges
    got, expected = compiled(x), model(x)
    for name in ("u8", "u8t", "i4", "sym"):
        assert torch.equal(got[name], expected[name]), name
    torch.testing.assert_close(got["y"], expected["y"], rtol=0, atol=1e-5)


def test_fake_quant_range_wider_than_8_bits_is_named() -> None:
    class Wide(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.fake_quantize_per_tensor_affine(x, 0.01, 0, 0, 1023)

    with pytest.raises(BackendError, match=r"fake_quantize_per_tensor_affine.*node "
                                           r"'fake_quantize_per_tensor_affine'.*does not fit"):
        gp.compile(Wide(), (torch.randn(2, 3),), backend="onnx")


def test_missing_translation_names_op_node_module_and_fix() -> None:
    with pytest.raises(BackendError) as info:
        gp.compile(UsesCustomOp().eval(), (torch.randn(2, 4),), backend="onnx")
    message = str(info.value)
    for part in ("no ONNX translation for op gp_onnx_test.twice.default", "node 'twice'",
                 "module 'block'", "backend='eager'",
                 "register_translation(torch.ops.gp_onnx_test.twice.default)"):
        assert part in message, message


def test_registered_translation_is_used() -> None:
    @register_translation(torch.ops.gp_onnx_test.twice.default)
    def twice_onnx(x: TensorType) -> TensorType:
        return op.Add(x, x)

    model = UsesCustomOp().eval()
    compiled = gp.compile(model, (torch.randn(2, 4),), backend="onnx", verify=True)
    assert _op_counts(compiled.artifact)["Add"] >= 1
    assert_equivalent(compiled, model, (torch.randn(2, 4),), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="already has the ONNX translation .*twice_onnx"):
        register_translation(torch.ops.gp_onnx_test.twice.default)(lambda x: x)
    identity = register_translation(torch.ops.gp_onnx_test.twice.default, replace=True)(
        op.Identity)
    assert gonnx.TRANSLATIONS[torch.ops.gp_onnx_test.twice.default] is identity
    with pytest.raises(TypeError, match="op.default"):
        register_translation(torch.ops.gp_onnx_test.twice)


def test_checker_failure_names_onnx_node_op_and_origin() -> None:
    @register_translation(torch.ops.gp_onnx_test.twice.default)
    def broken(x: TensorType) -> TensorType:
        return op.Gemm(x, x)  # [2, 4] @ [2, 4]: shapes do not agree

    with pytest.raises(BackendError, match=r"onnx.checker rejected ONNX node 'node_twice' "
                                           r"\(op Gemm\), translated from node 'twice' in "
                                           r"module 'block'"):
        gp.compile(UsesCustomOp().eval(), (torch.randn(2, 4),), backend="onnx")


def test_bad_options_fail_before_export() -> None:
    program = trace(ConvBNLinear().eval(), conv_inputs())
    with pytest.raises(BackendError, match="unknown onnx backend option 'opest'.*'opset'"):
        onnx_backend(program, opest=17)
    with pytest.raises(BackendError, match="NoSuchExecutionProvider.*not available"):
        onnx_backend(program, providers="NoSuchExecutionProvider")
    with pytest.raises(BackendError, match="graph_optimization_level"):
        onnx_backend(program, graph_optimization_level="max")
    with pytest.raises(BackendError, match="external_data_threshold.*1 GiB"):
        onnx_backend(program, external_data_threshold=3 << 30)


def test_stateful_program_is_refused() -> None:
    program = trace(ConvBNLinear().train(), conv_inputs())
    with pytest.raises(BackendError, match=r"mutates 'bn\..*model.eval\(\)"):
        onnx_backend(program)


def test_pipeline_is_recorded_in_the_onnx_files(tmp_path: Path) -> None:
    compiled = gp.compile(ConvBNLinear().eval(), conv_inputs(), passes="dce, cse",
                          backend="onnx")
    compiled.save(tmp_path)
    manifest = json.loads((tmp_path / "onnx_manifest.json").read_text())
    assert manifest["pipeline"] == "dce, cse"
    saved = onnx.load(str(tmp_path / "model.onnx"))
    assert {p.key: p.value for p in saved.metadata_props}["graphpress.pipeline"] == "dce, cse"
