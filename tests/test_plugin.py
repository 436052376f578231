"""The example plugin of examples/plugin: found by entry point, removes no-op ATen ops exactly.

CI installs the plugin (``pip install --no-deps -e examples/plugin``); without it these tests
fail and say so, they never skip.
"""

from __future__ import annotations

import tempfile
from importlib.metadata import PackageNotFoundError, distribution, entry_points

import pytest
import torch
from torch import nn

import graphpress as gp
from graphpress.cli import main
from graphpress.passes import available_passes

INSTALL = "pip install --no-deps -e examples/plugin"


def _plugin() -> type:
    """The plugin's pass class; fails the test (never skips) when the plugin is not installed.
    Called inside each test, not as a fixture, so that pytest reports a failure, not an error."""
    try:
        distribution("graphpress-example-plugin")
    except PackageNotFoundError:
        pytest.fail(f"the example plugin is not installed: run `{INSTALL}`", pytrace=False)
    names = {ep.name: ep.value for ep in entry_points(group="graphpress.passes")}
    assert names.get("remove_identity_ops") == "graphpress_example_plugin:RemoveIdentityOps", (
        f"unexpected graphpress.passes entry points {names}; reinstall with `{INSTALL}`")
    from graphpress_example_plugin import RemoveIdentityOps

    return RemoveIdentityOps


class Identities(nn.Module):
    """Removable no-ops, and look-alikes the pass must keep (comments say which rule)."""

    def forward(self, x: torch.Tensor, n: torch.Tensor) -> tuple[torch.Tensor, ...]:
        y = torch.relu(x)
        a = y.clone() * 1                                  # copy, arithmetic
        b = torch.dropout(a, 0.5, False) - 0               # view (train=False), arithmetic
        c = (b / 1).to(torch.float32)                      # arithmetic, view (same dtype)
        d = torch.ops.aten.alias(c)                        # view
        e = d.permute(1, 0).contiguous().view(-1)          # kept: contiguous changes the layout
        f = (y + 0) * 2                                    # kept: -0.0 + 0 = +0.0
        g = n * 1.0                                        # kept: int64 * 1.0 is float32
        h = (n + 0) * 3                                    # arithmetic (integer: exact)
        k = x.clone()                                      # kept: the output would alias x
        return e, f, g, h, k, d.sum()


def _inputs() -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(3, 4), torch.randint(0, 10, (3,))


def test_plugin_is_listed_by_the_registry_and_cli(capsys: pytest.CaptureFixture[str]) -> None:
    assert available_passes()["remove_identity_ops"] is _plugin()
    assert main(["passes"]) == 0
    out = capsys.readouterr().out
    assert "remove_identity_ops" in out and "[plugin: graphpress_example_plugin" in out


def test_removes_identities_exactly() -> None:
    _plugin()
    model = Identities()
    compiled = gp.compile(model, _inputs(), passes="remove_identity_ops", verify=True)
    (record,) = compiled.report().records
    assert record.name == "remove_identity_ops" and record.max_error == 0.0
    assert record.stats == {"nodes_removed": 8, "views": 3, "copies": 1, "arithmetic": 4}
    assert record.nodes[0] - record.nodes[1] == 8
    reasons = " | ".join(why for _, why in record.skipped)
    assert "changes the memory layout" in reasons
    assert "ignore_signed_zero=True" in reasons
    assert "promotes torch.int64 to torch.float32" in reasons
    assert "share storage with %x" in reasons
    targets = {str(n.target) for n in compiled.program.nodes("call_function")}
    assert not targets & {"aten.dropout.default", "aten.alias.default", "aten.div.Tensor",
                          "aten.sub.Tensor", "aten.to.dtype"}

    for _ in range(3):
        x, n = _inputs()
        with torch.no_grad():
            for got, want in zip(compiled(x, n), model(x, n), strict=True):
                assert torch.equal(got, want)
    with tempfile.TemporaryDirectory() as folder:  # renamed output specs still save and load
        compiled.save(folder)
        x, n = _inputs()
        for got, want in zip(gp.load(folder)(x, n), model(x, n), strict=True):
            assert torch.equal(got, want)


class WritesInPlace(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(x)
        before = y.clone()        # in eager, protects y's value from the add_ below
        same = y * 1              # a copy too
        y.add_(1)
        return before + same + y


def test_copies_are_removable_once_the_frontend_functionalized_the_write() -> None:
    """The frontend rewrites ``y.add_(1)`` into ``y1 = y + 1`` (the functional IR), so the two
    copies no longer protect anything: removing them is exact, over repeated calls too."""
    _plugin()
    x = torch.randn(4)
    compiled = gp.compile(WritesInPlace(), (x,), passes="remove_identity_ops", verify=True)
    (record,) = compiled.report().records
    assert record.stats["nodes_removed"] == 2
    for _ in range(2):
        torch.testing.assert_close(compiled(x), WritesInPlace()(x), rtol=0, atol=0)


class SignedZero(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x + 0) - 0.0


def test_signed_zero_option() -> None:
    _plugin()
    x = torch.tensor([-0.0, -1.0, 2.0])
    strict = gp.compile(SignedZero(), (x,), passes="remove_identity_ops", verify=True)
    assert strict.report().records[0].stats["arithmetic"] == 1  # only x - 0.0
    loose = gp.compile(SignedZero(), (x,), passes="remove_identity_ops(ignore_signed_zero=True)",
                       verify=True)
    assert loose.report().records[0].stats["arithmetic"] == 2
    assert torch.equal(loose(x), SignedZero()(x))


def test_hugging_face_bert_drops_eval_dropout() -> None:
    _plugin()
    from graphpress.testing.zoo import get_model

    model, inputs = get_model("hf_bert").make()
    compiled = gp.compile(model, inputs, passes="remove_identity_ops", verify=True)
    record = compiled.report().records[0]
    assert record.stats["views"] >= 5 and record.max_error == 0.0
    assert not any(str(n.target) == "aten.dropout.default"
                   for n in compiled.program.nodes("call_function"))
