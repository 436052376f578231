"""Golden IR: the printed program after the standard pipeline, for the hand-written zoo models.

Any change to a pass, the printer or the frontend that alters these programs shows up as a
diff. When the change is intended, regenerate with ``GRAPHPRESS_UPDATE_GOLDEN=1 pytest
tests/test_golden.py`` and review the diff of ``tests/golden/`` in the commit. (Hugging Face
models are left out: their graphs change with the transformers version.)
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import graphpress as gp
from graphpress.ir.printer import format_program
from graphpress.testing.zoo import ZooModel, zoo_models

GOLDEN = Path(__file__).parent / "golden"
STANDARD_PIPELINE = "fixpoint(dce, cse, fold_constants)"


@pytest.mark.parametrize("entry", zoo_models(include=("handwritten",)), ids=lambda m: m.name)
def test_golden_ir(entry: ZooModel) -> None:
    model, inputs = entry.make()
    text = format_program(gp.compile(model, inputs, passes=STANDARD_PIPELINE).program)
    path = GOLDEN / f"{entry.name}.txt"
    if os.environ.get("GRAPHPRESS_UPDATE_GOLDEN") == "1":
        path.write_text(text)
    assert path.exists(), f"no golden file {path}; run with GRAPHPRESS_UPDATE_GOLDEN=1"
    assert text == path.read_text(), f"IR of {entry.name} changed; see the docstring"
