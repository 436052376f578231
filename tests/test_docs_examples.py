"""The Python blocks of docs/writing-passes.md run, in order, as one script: the guide's
examples (and the facts they assert) cannot drift from the code."""

from __future__ import annotations

import re
import sys
import types
from pathlib import Path

GUIDE = Path(__file__).resolve().parents[1] / "docs" / "writing-passes.md"
_BLOCK = re.compile(r"^```python\n(.*?)^```", re.DOTALL | re.MULTILINE)


def python_blocks(text: str) -> list[str]:
    return _BLOCK.findall(text)


def test_extracts_every_python_block() -> None:
    text = GUIDE.read_text()
    blocks = python_blocks(text)
    assert len(blocks) == text.count("```python") >= 8
    assert python_blocks("x\n```python\na = 1\n```\n```toml\nb = 2\n```\n") == ["a = 1\n"]


def test_guide_examples_run() -> None:
    module = types.ModuleType("writing_passes_guide")  # dataclasses look their module up
    sys.modules[module.__name__] = module
    try:
        for index, block in enumerate(python_blocks(GUIDE.read_text())):
            code = compile(block, f"{GUIDE.name} [python block {index + 1}]", "exec")
            exec(code, module.__dict__)
    finally:
        del sys.modules[module.__name__]
