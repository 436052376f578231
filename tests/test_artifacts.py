"""Saved folders fail loudly: ``gp.load`` checks every file against the manifest's size and
sha256, refuses manifests it cannot read or that are too new, imports the op libraries the
program needs, and raises one ArtifactError naming the file and the fix, with nothing from torch
in the log."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest
import torch

import graphpress as gp
from graphpress.errors import ArtifactError, MissingArtifactError
from graphpress.ir.artifacts import file_record, import_op_libraries
from graphpress.testing import assert_equivalent
from tests.models import Redundant, vec_inputs

DAMAGED_FIX = "Fix: copy the folder again"
REPO = Path(__file__).resolve().parents[1]


MODEL = Redundant().eval()


@pytest.fixture(scope="module")
def saved_once(tmp_path_factory: pytest.TempPathFactory) -> Path:
    compiled = gp.compile(MODEL, vec_inputs(), passes="dce, cse")
    return compiled.save(tmp_path_factory.mktemp("saved") / "out")


@pytest.fixture
def saved(saved_once: Path, tmp_path: Path) -> Path:
    """A private copy of an intact folder saved from ``MODEL``, for one test to damage."""
    return Path(shutil.copytree(saved_once, tmp_path / "out"))


def _manifest(folder: Path) -> dict:
    return json.loads((folder / "manifest.json").read_text())


def _write_manifest(folder: Path, manifest: dict) -> None:
    (folder / "manifest.json").write_text(json.dumps(manifest))


def _load_error(folder: Path, capfd: pytest.CaptureFixture[str],
                kind: type[Exception] = ArtifactError) -> str:
    """gp.load's error message; asserts that nothing was printed or logged meanwhile."""
    capfd.readouterr()
    with pytest.raises(kind) as info:
        gp.load(folder)
    out, err = capfd.readouterr()
    assert out == "" and err == "", f"gp.load printed: {out}{err}"
    return str(info.value)


def test_intact_folder_records_checksums_and_round_trips(saved: Path) -> None:
    manifest = _manifest(saved)
    assert manifest["format"] == 2 and manifest["graphpress"] == gp.__version__
    assert manifest["torch"] == torch.__version__ and manifest["op_libraries"] == {}
    assert set(manifest["files"]) == {"program.pt2", "program.txt", "report.txt", "report.html",
                                      "report.json"}
    for name, record in manifest["files"].items():
        assert record == file_record(saved / name)
        assert record["size"] == (saved / name).stat().st_size and len(record["sha256"]) == 64
    assert_equivalent(gp.load(saved), MODEL, vec_inputs(), rtol=0, atol=0)


def test_truncated_program(saved: Path, capfd: pytest.CaptureFixture[str]) -> None:
    path = saved / "program.pt2"
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])
    message = _load_error(saved, capfd)
    assert str(path) in message and "truncated" in message
    assert f"{len(data) // 2} of {len(data)} bytes" in message and DAMAGED_FIX in message


@pytest.mark.parametrize("name", ["program.pt2", "report.txt"])
def test_edited_byte(saved: Path, capfd: pytest.CaptureFixture[str], name: str) -> None:
    path = saved / name
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    message = _load_error(saved, capfd)
    assert str(path) in message and "modified after it was saved" in message
    assert "sha256" in message and DAMAGED_FIX in message


def test_deleted_file(saved: Path, capfd: pytest.CaptureFixture[str]) -> None:
    (saved / "program.pt2").unlink()
    message = _load_error(saved, capfd, MissingArtifactError)
    assert str(saved / "program.pt2") in message and "is missing" in message
    assert DAMAGED_FIX in message


def test_manifest_not_listing_the_program(saved: Path, capfd: pytest.CaptureFixture[str]) -> None:
    manifest = _manifest(saved)
    del manifest["files"]["program.pt2"]
    _write_manifest(saved, manifest)
    message = _load_error(saved, capfd)
    assert "does not list program.pt2" in message and "manifest.json" in message


def test_missing_manifest(saved: Path, capfd: pytest.CaptureFixture[str]) -> None:
    (saved / "manifest.json").unlink()
    message = _load_error(saved, capfd, FileNotFoundError)
    assert str(saved / "manifest.json") in message and "CompiledModel.save" in message


@pytest.mark.parametrize(("text", "problem"), [
    ('{"format": 2, "files": ', "is not valid JSON"),
    ("[1, 2]", "is not a graphpress manifest"),
    ('{"format": "2", "files": {}}', "is not a graphpress manifest"),
])
def test_unparsable_manifest(saved: Path, capfd: pytest.CaptureFixture[str], text: str,
                             problem: str) -> None:
    (saved / "manifest.json").write_text(text)
    message = _load_error(saved, capfd)
    assert str(saved / "manifest.json") in message and problem in message
    assert DAMAGED_FIX in message


def test_manifest_without_report(saved: Path, capfd: pytest.CaptureFixture[str]) -> None:
    manifest = _manifest(saved)
    del manifest["report"]
    _write_manifest(saved, manifest)
    message = _load_error(saved, capfd)
    assert "manifest.json lacks a readable report" in message and "save the model again" in message


def test_manifest_record_without_checksum(saved: Path,
                                          capfd: pytest.CaptureFixture[str]) -> None:
    manifest = _manifest(saved)
    manifest["files"]["program.pt2"] = {"size": 3}
    _write_manifest(saved, manifest)
    message = _load_error(saved, capfd)
    assert "no valid size and sha256 for program.pt2" in message


def test_newer_format_names_the_writer_and_upgrade(saved: Path,
                                                   capfd: pytest.CaptureFixture[str]) -> None:
    manifest = _manifest(saved)
    manifest.update(format=99, graphpress="9.1.0")
    _write_manifest(saved, manifest)
    message = _load_error(saved, capfd)
    assert str(saved / "manifest.json") in message
    assert "format 99, written by graphpress 9.1.0" in message
    assert f"graphpress {gp.__version__} reads formats up to 2" in message
    assert "upgrade graphpress" in message and "graphpress>=9.1.0" in message


def test_format_1_folder_loads_and_checks_its_files_exist(
        saved: Path, capfd: pytest.CaptureFixture[str]) -> None:
    manifest = _manifest(saved)
    manifest.update(format=1, files=sorted(manifest["files"]))
    del manifest["op_libraries"], manifest["torch"]
    _write_manifest(saved, manifest)
    assert_equivalent(gp.load(saved), MODEL, vec_inputs(), rtol=0, atol=0)
    (saved / "program.txt").unlink()
    assert str(saved / "program.txt") in _load_error(saved, capfd, MissingArtifactError)


def test_program_torch_cannot_read(saved: Path, capfd: pytest.CaptureFixture[str]) -> None:
    """A file that matches its checksum but that torch refuses (another torch version's format)
    gives torch's reason in one error, without torch's logged traceback."""
    path = saved / "program.pt2"
    path.write_bytes(b"not a zip archive" * 8)
    manifest = _manifest(saved)
    manifest["files"]["program.pt2"] = file_record(path)
    manifest["torch"] = "1.0.0"
    _write_manifest(saved, manifest)
    message = _load_error(saved, capfd)
    assert f"torch {torch.__version__} cannot read {path}" in message
    assert "zip archive" in message and "load it with torch 1.0.0" in message


def test_save_over_a_folder_replaces_its_manifest(saved: Path) -> None:
    before = _manifest(saved)["files"]["program.pt2"]
    model = torch.nn.Linear(4, 2)
    gp.compile(model, vec_inputs()).save(saved)
    after = _manifest(saved)["files"]
    assert after["program.pt2"] != before and after["program.pt2"] == file_record(
        saved / "program.pt2")
    assert_equivalent(gp.load(saved), model, vec_inputs(), rtol=0, atol=0)


# ---------------------------------------------------------------- op libraries

OP_LIBRARY = '''
import torch


@torch.library.custom_op("{namespace}::triple", mutates_args=())
def triple(x: torch.Tensor) -> torch.Tensor:
    return x * 3


@triple.register_fake
def _triple_fake(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)
'''

SAVE_SCRIPT = '''
import importlib
import sys

import torch

import graphpress as gp

{script_library}


class UsesOp(torch.nn.Module):
    def __init__(self, triple):
        super().__init__()
        self.triple = triple

    def forward(self, x):
        return self.triple(x) + 1


for module, folder in [(sys.argv[1], sys.argv[2]), (sys.argv[3], sys.argv[4])]:
    op = importlib.import_module(module).triple
    gp.compile(UsesOp(op), (torch.randn(2, 3),)).save(folder)
gp.compile(UsesOp(triple), (torch.randn(2, 3),)).save(sys.argv[5])
'''


@pytest.fixture(scope="module")
def op_folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, str, str]]:
    """Folders saved by another process from programs calling custom ops that this process
    has never imported: {case: (folder, namespace, module)}. The op library modules are
    written into a tmp dir that is on the saving process's path only."""
    root = tmp_path_factory.mktemp("oplib")
    libraries = root / "libraries"
    libraries.mkdir()
    tag = uuid.uuid4().hex[:8]
    cases: dict[str, tuple[Path, str, str]] = {}
    for case in ("gone", "importable", "script"):
        namespace, module = f"gp_art_{case}_{tag}", f"gp_art_oplib_{case}_{tag}"
        cases[case] = (root / case, namespace, module)
        if case != "script":
            (libraries / f"{module}.py").write_text(OP_LIBRARY.format(namespace=namespace))
    script = SAVE_SCRIPT.format(script_library=textwrap.dedent(
        OP_LIBRARY.format(namespace=cases["script"][1])).replace("import torch\n", ""))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(libraries), str(REPO)])}
    subprocess.run([sys.executable, "-c", script, cases["gone"][2], str(cases["gone"][0]),
                    cases["importable"][2], str(cases["importable"][0]),
                    str(cases["script"][0])], env=env, check=True, cwd=root)
    installed = root / "installed"
    installed.mkdir()
    shutil.move(libraries / f"{cases['importable'][2]}.py", installed)
    shutil.rmtree(libraries)  # the "gone" library is no longer importable
    return cases


def test_save_records_op_libraries(op_folders: dict[str, tuple[Path, str, str]]) -> None:
    folder, namespace, module = op_folders["gone"]
    assert _manifest(folder)["op_libraries"] == {
        namespace: {"ops": [f"{namespace}::triple.default"], "modules": [module]}}
    folder, namespace, _ = op_folders["script"]
    assert _manifest(folder)["op_libraries"] == {
        namespace: {"ops": [f"{namespace}::triple.default"], "modules": []}}


def test_unimportable_op_library(op_folders: dict[str, tuple[Path, str, str]],
                                 capfd: pytest.CaptureFixture[str]) -> None:
    folder, namespace, module = op_folders["gone"]
    message = _load_error(folder, capfd)
    assert f"{folder / 'program.pt2'} needs the op {namespace}::triple.default" in message
    assert f"module {module!r}, cannot be imported" in message
    assert f"Fix: install the package that provides {module!r}" in message


def test_op_defined_in_a_script(op_folders: dict[str, tuple[Path, str, str]],
                                capfd: pytest.CaptureFixture[str]) -> None:
    folder, namespace, _ = op_folders["script"]
    message = _load_error(folder, capfd)
    assert f"{folder / 'program.pt2'} needs the op {namespace}::triple.default" in message
    assert f"Fix: import the library that defines the {namespace}:: ops" in message


def test_load_imports_the_recorded_op_library(op_folders: dict[str, tuple[Path, str, str]],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    folder, _, module = op_folders["importable"]
    assert module not in sys.modules
    monkeypatch.syspath_prepend(str(folder.parent / "installed"))
    x = torch.randn(2, 3)
    torch.testing.assert_close(gp.load(folder)(x), x * 3 + 1, rtol=0, atol=0)
    assert module in sys.modules


def test_preload_imports_installed_modules_and_skips_absent_ones(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """gp.load preloads graphpress.ops this way: imported when it exists, skipped if not."""
    name = f"gp_art_preload_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text("LOADED = True\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import_op_libraries({}, tmp_path / "program.pt2",
                        preload=[f"{name}_absent", name])
    assert sys.modules[name].LOADED


def test_recorded_module_that_no_longer_defines_the_op(
        saved: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capfd: pytest.CaptureFixture[str]) -> None:
    tag = uuid.uuid4().hex[:8]
    module, namespace = f"gp_art_moved_{tag}", f"gp_art_moved_{tag}"
    (tmp_path / f"{module}.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    manifest = _manifest(saved)
    manifest["op_libraries"] = {namespace: {"ops": [f"{namespace}::triple.default"],
                                            "modules": [module]}}
    _write_manifest(saved, manifest)
    message = _load_error(saved, capfd)
    assert f"needs the op {namespace}::triple.default" in message
    assert f"module {module!r}, which defined it at save, no longer does" in message
    assert f"Fix: import the module that now defines the {namespace}:: ops" in message


def test_unreadable_op_libraries_entry(saved: Path, capfd: pytest.CaptureFixture[str]) -> None:
    manifest = _manifest(saved)
    manifest["op_libraries"] = {"mylib": 3}
    _write_manifest(saved, manifest)
    message = _load_error(saved, capfd)
    assert "unreadable 'op_libraries'" in message and "save the model again" in message
