"""The op registry: an op defined through it passes opcheck, survives export, compile passes,
save/load and the ONNX backend, and its purity and foldability are what the passes obey."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import onnxruntime as ort
import pytest
import torch
from torch import nn

import graphpress as gp
from graphpress.backends import onnx as gonnx
from graphpress.frontends import trace
from graphpress.ir.artifacts import op_libraries
from graphpress.ir.purity import is_foldable, is_pure
from graphpress.ops import check_op, define_op, entries, lookup
from graphpress.passes import PassContext, PassManager
from tests.ops.sample_ops import LOGGED, OPAQUE_SCALE, SCALE_ADD

gptest = torch.ops.gptest
ROOT = Path(__file__).resolve().parents[2]


class ScaleAdd(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return gptest.scale_add(self.fc(x), 2.0)


def _calls(program: gp.Program, op: torch._ops.OpOverload) -> list[torch.fx.Node]:
    return [n for n in program.graph.nodes if n.target is op]


def test_entry_fields_and_lookup() -> None:
    assert lookup("gptest::scale_add") is SCALE_ADD
    assert entries()["gptest::opaque_scale"] is OPAQUE_SCALE
    assert SCALE_ADD.op is gptest.scale_add.default
    assert SCALE_ADD.doc == "x * s + 1."
    assert (SCALE_ADD.pure, SCALE_ADD.foldable) == (True, True)
    assert (OPAQUE_SCALE.pure, OPAQUE_SCALE.foldable) == (True, False)
    assert SCALE_ADD.channel_rule is None and SCALE_ADD.triton_lowering is None
    assert lookup("gptest::missing") is None
    entries().clear()  # a copy: the registry is untouched
    assert lookup("gptest::scale_add") is SCALE_ADD


def test_lookup_is_by_namespace_qualified_name() -> None:
    assert lookup("scale_add") is None
    assert lookup("aten::scale_add") is None


@pytest.mark.parametrize("entry", [SCALE_ADD, OPAQUE_SCALE])
def test_opcheck(entry: object) -> None:
    check_op(entry, torch.randn(3, 5), 0.5)


def test_opcheck_catches_a_wrong_fake() -> None:
    wrong = define_op("gptest::wrong_fake", lambda x: x.sum(0, keepdim=True),
                      schema="(Tensor x) -> Tensor", fake=torch.empty_like)
    with pytest.raises(Exception, match="(?i)shape|size"):
        check_op(wrong, torch.randn(3, 2))


def test_eager_matches_reference_and_fake_gives_its_shape() -> None:
    x = torch.randn(2, 3)
    torch.testing.assert_close(SCALE_ADD.op(x, 3.0), x * 3.0 + 1)
    with torch._subclasses.FakeTensorMode() as mode:
        fake = SCALE_ADD.op(mode.from_tensor(x), 3.0)
    assert tuple(fake.shape) == (2, 3) and fake.dtype == torch.float32


def test_define_rejects_bad_definitions() -> None:
    with pytest.raises(ValueError, match="namespace-qualified"):
        define_op("no_namespace", lambda x: x, schema="(Tensor x) -> Tensor", fake=lambda x: x)
    with pytest.raises(ValueError, match="already defined"):
        define_op("gptest::scale_add", lambda x: x, schema="(Tensor x) -> Tensor",
                  fake=lambda x: x)
    with pytest.raises(ValueError, match="cannot be pure"):
        define_op("gptest::bad_mutation", lambda x: None, schema="(Tensor(a!) x) -> ()",
                  mutates_args=("x",), fake=lambda x: None)
    with pytest.raises(ValueError, match="cannot be foldable"):
        define_op("gptest::bad_fold", lambda x: x.clone(), schema="(Tensor x) -> Tensor",
                  fake=torch.empty_like, pure=False)
    assert lookup("gptest::bad_fold") is None  # a rejected definition leaves no entry


def test_survives_export_and_compile_with_cleanup_passes() -> None:
    model, x = ScaleAdd().eval(), torch.randn(3, 4)
    compiled = gp.compile(model, (x,), passes="cse, dce", verify=True)
    assert len(_calls(compiled.program, gptest.scale_add.default)) == 1
    torch.testing.assert_close(compiled(x), model(x))


def test_save_load_needs_the_defining_module_imported(tmp_path: Path) -> None:
    model, x = ScaleAdd().eval(), torch.randn(3, 4)
    compiled = gp.compile(model, (x,))
    libraries = op_libraries(compiled.program.graph_module)
    assert libraries["gptest"]["modules"] == ["tests.ops.sample_ops"]
    torch.export.save(compiled.program.exported_program, tmp_path / "ep.pt2")
    loaded = torch.export.load(tmp_path / "ep.pt2").module()
    torch.testing.assert_close(loaded(x), model(x))
    folder = compiled.save(tmp_path / "saved")
    torch.testing.assert_close(gp.load(folder)(x), model(x))
    # fresh interpreters: torch.export.load fails until the op library is imported; gp.load
    # imports the modules its manifest records itself
    script = (
        "import sys, torch\n"
        f"path = {str(tmp_path / 'ep.pt2')!r}\n"
        "try:\n    torch.export.load(path)\nexcept Exception:\n    print('refused')\n"
        "import tests.ops.sample_ops\n"
        "out = torch.export.load(path).module()(torch.ones(3, 4))\n"
        "print('loaded', tuple(out.shape))\n")
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert done.stdout.split("\n")[:2] == ["refused", "loaded (3, 4)"], done.stderr[-2000:]
    script = ("import sys, torch, graphpress as gp\n"
              f"compiled = gp.load({str(folder)!r})\n"
              "assert 'tests.ops.sample_ops' in sys.modules\n"
              "print(tuple(compiled(torch.ones(3, 4)).shape))\n")
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert done.stdout.strip() == "(3, 4)", done.stderr[-2000:]


def test_onnx_backend_emits_the_translation() -> None:
    model, x = ScaleAdd().eval(), torch.randn(3, 4)
    assert gonnx.translation_table()[gptest.scale_add.default] is SCALE_ADD.onnx_translation
    assert gptest.scale_add.default not in gonnx.TRANSLATIONS  # the entry brings it
    compiled = gp.compile(model, (x,), backend="onnx", verify=True)
    graph = compiled.artifact.onnx_program.model_proto.graph
    ops = [n.op_type for n in graph.node]
    assert "Mul" in ops and "Add" in ops
    session = ort.InferenceSession(compiled.artifact.onnx_program.model_proto
                                   .SerializeToString(), providers=["CPUExecutionProvider"])
    (found,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    torch.testing.assert_close(torch.from_numpy(found), model(x).detach(), rtol=1e-5,
                               atol=1e-5)


def test_register_translation_does_not_silently_override_an_entrys() -> None:
    with pytest.raises(ValueError, match="already has the ONNX translation"):
        gonnx.register_translation(gptest.scale_add.default)(lambda x, s: x)


def _program_on_weights() -> gp.Program:
    class OnWeights(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.randn(4))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * gptest.scale_add(self.w, 2.0) + gptest.opaque_scale(self.w, 3.0)

    return trace(OnWeights().eval(), (torch.randn(4),))


def test_foldability_decides_constant_folding() -> None:
    program = _program_on_weights()
    foldable, opaque = (_calls(program, op)[0] for op in (gptest.scale_add.default,
                                                          gptest.opaque_scale.default))
    assert is_foldable(foldable) and is_pure(opaque) and not is_foldable(opaque)
    ctx = PassContext(example_inputs=(torch.randn(4),))
    (record,) = PassManager("fold_constants", verify=True, context=ctx, hooks=[]).run(
        program).records
    assert not _calls(program, gptest.scale_add.default)    # folded into a weight
    assert len(_calls(program, gptest.opaque_scale.default)) == 1  # pure, never folded
    assert record.stats["folded"] == 1


def test_purity_decides_dce_and_cse() -> None:
    class Effects(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            gptest.scale_add(x, 5.0)                       # unused, pure: removable
            gptest.logged(x)                               # unused, effect: kept
            a, b = gptest.scale_add(x, 2.0), gptest.scale_add(x, 2.0)  # merged
            c, d = gptest.logged(x), gptest.logged(x)      # not merged
            return a + b + c + d

    program = trace(Effects(), (torch.randn(3),))
    assert len(_calls(program, gptest.scale_add.default)) == 3
    assert len(_calls(program, gptest.logged.default)) == 3
    ctx = PassContext(example_inputs=(torch.randn(3),))
    PassManager("cse, dce", verify=True, context=ctx, hooks=[]).run(program)
    assert len(_calls(program, gptest.scale_add.default)) == 1
    assert len(_calls(program, gptest.logged.default)) == 3
    assert not is_pure(_calls(program, gptest.logged.default)[0]) and not LOGGED.pure
