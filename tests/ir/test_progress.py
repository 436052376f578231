"""The one progress-bar convention (graphpress.ir.progress): off the terminal by default, on
when forced, off when asked, and never on stdout."""

from __future__ import annotations

import io
import threading
import time

import pytest

from graphpress.ir import progress
from graphpress.ir.progress import (
    progress_bar,
    progress_disabled,
    progress_mode,
    progress_status,
)


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture(autouse=True)
def _no_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GRAPHPRESS_PROGRESS", raising=False)


def test_the_rule(monkeypatch: pytest.MonkeyPatch) -> None:
    assert progress_disabled() is None  # tqdm decides: on a terminal only
    assert progress_disabled(True) is False and progress_disabled(False) is True
    with progress_mode(False):
        assert progress_disabled() is True
        assert progress_disabled(True) is False  # an explicit argument beats the mode
    assert progress_disabled() is None  # the mode ends with the block
    monkeypatch.setenv("GRAPHPRESS_PROGRESS", "1")
    assert progress_disabled() is False  # forced on, even off a terminal
    assert progress_disabled(False) is True
    monkeypatch.setenv("GRAPHPRESS_PROGRESS", "0")
    assert progress_disabled(True) is True  # the kill switch beats everything
    with progress_mode(True):
        assert progress_disabled() is True


def test_off_a_terminal_nothing_is_written(capsys: pytest.CaptureFixture[str]) -> None:
    assert list(progress_bar(range(3), desc="counting", delay=0.0)) == [0, 1, 2]
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""


def test_on_a_terminal_the_bar_goes_to_stderr(capsys: pytest.CaptureFixture[str],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    terminal = _Terminal()
    monkeypatch.setattr("sys.stderr", terminal)
    list(progress_bar(range(3), desc="counting", delay=0.0))
    assert "counting" in terminal.getvalue() and "/3 [" in terminal.getvalue()
    assert capsys.readouterr().out == ""
    terminal.seek(0)
    terminal.truncate(0)
    with progress_mode(False):  # the command line's --quiet
        list(progress_bar(range(3), desc="counting", delay=0.0))
    assert terminal.getvalue() == ""


def test_forced_bars_write_stderr_only(capsys: pytest.CaptureFixture[str],
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GRAPHPRESS_PROGRESS", "1")
    list(progress_bar(range(4), desc="counting", unit="item", delay=0.0))
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "counting" in captured.err and "/4 [" in captured.err


def test_a_quick_loop_prints_nothing_before_the_delay(capsys: pytest.CaptureFixture[str]
                                                      ) -> None:
    list(progress_bar(range(100), desc="quick", progress=True, delay=30.0))
    assert capsys.readouterr().err == ""


def test_status_shows_the_stage_and_elapsed_time(capsys: pytest.CaptureFixture[str]) -> None:
    with progress_status("tracing Big", progress=True, delay=0.0, interval=0.05) as bar:
        bar.set_postfix_str("torch.export", refresh=False)
        time.sleep(0.3)
        bar.set_postfix_str("shapes", refresh=False)
        time.sleep(0.3)
    err = capsys.readouterr().err
    assert "tracing Big, torch.export [00:00]" in err and "tracing Big, shapes" in err
    assert err.endswith("\r")  # erased at the end
    assert not any(t.name == "graphpress-progress" for t in threading.enumerate())


def test_status_off_starts_no_thread(capsys: pytest.CaptureFixture[str]) -> None:
    with progress_status("tracing Big", progress=False, delay=0.0, interval=0.01):
        assert not any(t.name == "graphpress-progress" for t in threading.enumerate())
        time.sleep(0.05)
    assert capsys.readouterr().err == ""


def test_the_delay_is_read_at_each_call(capsys: pytest.CaptureFixture[str],
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(progress, "DELAY", 0.0)
    list(progress_bar(range(2), desc="now", progress=True))
    assert "now" in capsys.readouterr().err
