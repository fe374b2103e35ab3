"""Screenshots of `mlflow ui` pages in headless Chromium, driven over the DevTools pipe.

    python docs/screenshot.py <origin> <out.png> <url> [<out.png> <url> ...]

Chromium's own ``--screenshot`` cannot close the MLflow Assistant panel that MLflow 3 opens
on a local server's first visit (it takes a third of the window). Here the browser is driven
through ``--remote-debugging-pipe`` (no port is opened): a first visit to ``origin`` stores in
the page's localStorage that the panel was opened once and is closed, then each page is
loaded, given time to fetch its runs and draw its charts, and captured. Standard library only.
The window is 1400x900 (``SHOT_WIDTH``, ``SHOT_HEIGHT`` change it).
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WIDTH, HEIGHT = int(os.environ.get("SHOT_WIDTH", 1400)), int(os.environ.get("SHOT_HEIGHT", 900))
SETTLE_SECONDS = 8.0  # the UI fetches runs, then metric histories, then draws
# MLflow 3.17's UI keeps these in localStorage (useLocalStorage: "<key>_v<version>")
CLOSED_ASSISTANT = {
    "mlflow.assistant.fab.autoOpenedOnFirstLoad_v1": "true",
    "mlflow.assistant.panelOpen_v1": "false",
}
FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--hide-scrollbars", "--remote-debugging-pipe", f"--window-size={WIDTH},{HEIGHT}",
]


class Browser:
    """Headless Chromium and one page of it, spoken to in DevTools messages over a pipe."""

    def __init__(self, profile: Path) -> None:
        to_browser_r, self._to_browser = os.pipe()
        self._from_browser, from_browser_w = os.pipe()
        chromium = shutil.which("chromium") or shutil.which("chromium-browser") or "chromium"
        # Chromium reads the protocol from fd 3 and writes it to fd 4
        self.process = subprocess.Popen(
            ["bash", "-c", 'exec "$@" 3<&"$IN" 4>&"$OUT"', "_", chromium, *FLAGS,
             f"--user-data-dir={profile}", "about:blank"],
            env={**os.environ, "IN": str(to_browser_r), "OUT": str(from_browser_w)},
            pass_fds=(to_browser_r, from_browser_w),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        os.close(to_browser_r)
        os.close(from_browser_w)
        self._buffer = b""
        self._next_id = 0
        target = self.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        self.session = self.call(
            "Target.attachToTarget", {"targetId": target, "flatten": True}
        )["sessionId"]
        self.call("Page.enable", session=True)
        self.call(
            "Emulation.setDeviceMetricsOverride",
            {"width": WIDTH, "height": HEIGHT, "deviceScaleFactor": 1, "mobile": False},
            session=True,
        )

    def call(self, method: str, params: dict | None = None, session: bool = False) -> dict:
        """Send one command and return its result (events on the way are dropped)."""
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = self.session
        os.write(self._to_browser, json.dumps(message).encode() + b"\0")
        while True:
            while b"\0" not in self._buffer:
                chunk = os.read(self._from_browser, 1 << 20)
                if not chunk:
                    raise RuntimeError("chromium closed the DevTools pipe")
                self._buffer += chunk
            raw, self._buffer = self._buffer.split(b"\0", 1)
            reply = json.loads(raw)
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})

    def open(self, url: str, settle: float = SETTLE_SECONDS) -> None:
        self.call("Page.navigate", {"url": url}, session=True)
        time.sleep(settle)

    def evaluate(self, expression: str) -> object:
        result = self.call(
            "Runtime.evaluate", {"expression": expression, "returnByValue": True}, session=True
        )
        return result.get("result", {}).get("value")

    def screenshot(self, out: Path) -> None:
        data = self.call("Page.captureScreenshot", {"format": "png"}, session=True)["data"]
        out.write_bytes(base64.b64decode(data))

    def close(self) -> None:
        try:
            self.call("Browser.close")
        except (OSError, RuntimeError):
            pass
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        os.close(self._to_browser)
        os.close(self._from_browser)


def shoot(origin: str, shots: list[tuple[Path, str]]) -> None:
    """Capture each ``(png, url)`` of ``shots`` with the Assistant panel closed."""
    with tempfile.TemporaryDirectory(prefix="mlflow-shots-") as profile:
        browser = Browser(Path(profile))
        try:
            browser.open(origin.rstrip("/") + "/", settle=3.0)
            for key, value in CLOSED_ASSISTANT.items():
                browser.evaluate(f"localStorage.setItem({json.dumps(key)}, {json.dumps(value)})")
            for out, url in shots:
                browser.open("about:blank", settle=0.2)  # a fresh load of each page
                browser.open(url)
                browser.screenshot(out)
        finally:
            browser.close()


def main(argv: list[str]) -> None:
    if len(argv) < 3 or len(argv) % 2 == 0:
        sys.exit(__doc__.strip().splitlines()[2].strip())
    origin, rest = argv[0], argv[1:]
    shoot(origin, [(Path(rest[i]), rest[i + 1]) for i in range(0, len(rest), 2)])


if __name__ == "__main__":
    main(sys.argv[1:])
