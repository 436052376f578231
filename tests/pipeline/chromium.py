"""A headless Chromium driven through chromedriver's WebDriver HTTP API (stdlib only).

Used by the report's browser test: open a local page, wait for a condition, read the
browser's console log and take screenshots. Chromium runs with a fresh profile and without
any background networking, so opening a self-contained page makes no request at all.
"""

from __future__ import annotations

import base64
import contextlib
import json
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

__all__ = ["Browser", "find_chromium"]

ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--disable-dev-shm-usage", "--hide-scrollbars"]


def find_chromium() -> tuple[str, str] | None:
    """(chromium binary, chromedriver binary), or None when either is not installed."""
    browser = next((p for name in ("chromium", "chromium-browser", "google-chrome")
                    if (p := shutil.which(name))), None)
    driver = shutil.which("chromedriver")
    return (browser, driver) if browser and driver else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Browser:
    """One chromedriver process and one browser session; use as a context manager."""

    def __init__(self, browser: str, driver: str, *, width: int = 1400,
                 height: int = 1000) -> None:
        self.profile = tempfile.mkdtemp(prefix="gp-chromium-")
        self.port = _free_port()
        self.process = subprocess.Popen([driver, f"--port={self.port}"],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.base = f"http://127.0.0.1:{self.port}"
        self._wait_ready()
        options = {"binary": browser,
                   "args": [*ARGS, f"--user-data-dir={self.profile}",
                            f"--window-size={width},{height}"]}
        capabilities = {"browserName": "chrome", "goog:chromeOptions": options,
                        "goog:loggingPrefs": {"browser": "ALL"}}
        answer = self._call("POST", "/session", {"capabilities": {"alwaysMatch": capabilities}})
        self.session = answer["sessionId"]

    def _wait_ready(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if self._call("GET", "/status").get("ready"):
                    return
            except OSError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"chromedriver did not start within {timeout:.0f} s")

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.base + path, data=data, method=method,
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                payload = json.loads(response.read())
        except urllib.error.HTTPError as exc:
            payload = json.loads(exc.read() or b"{}")
            raise RuntimeError(f"webdriver {method} {path}: {payload}") from None
        return payload.get("value", payload) if path != "/session" or method != "POST" else (
            payload["value"])

    def _session_call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        return self._call(method, f"/session/{self.session}{path}", body)

    def open(self, path: Path) -> None:
        self._session_call("POST", "/url", {"url": path.resolve().as_uri()})

    def run(self, script: str, *args: Any) -> Any:
        """The value of ``script`` (a function body: ``return ...``) run in the page."""
        return self._session_call("POST", "/execute/sync", {"script": script, "args": list(args)})

    def wait_for(self, script: str, timeout: float = 30.0) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = self.run(script)
            if value:
                return value
            time.sleep(0.1)
        raise TimeoutError(f"page condition not met within {timeout:.0f} s: {script}")

    def console(self) -> list[dict[str, Any]]:
        """Browser console entries since the last call (level, message)."""
        return self._session_call("POST", "/se/log", {"type": "browser"})

    def screenshot(self, path: Path) -> Path:
        png = base64.b64decode(self._session_call("GET", "/screenshot"))
        path.write_bytes(png)
        return path

    def close(self) -> None:
        with contextlib.suppress(OSError, RuntimeError):
            self._session_call("DELETE", "")
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
        shutil.rmtree(self.profile, ignore_errors=True)

    def __enter__(self) -> Browser:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
