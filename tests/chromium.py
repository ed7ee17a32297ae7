"""A small headless-Chromium driver over the DevTools protocol, for the MLflow UI tests.

It starts Debian's `/usr/bin/chromium` (never a downloaded browser) with the
flags that keep it off the network, on a fresh profile, with the DevTools
endpoint on 127.0.0.1. Pages are driven with JavaScript: wait for text,
click an element by its text, type into the focused field, take a screenshot.
"""

import base64
import itertools
import json
import os
import shutil
import subprocess
import time

import requests

from conftest import free_port

# Flags that keep a headless Chromium from contacting outside hosts on a
# machine without internet access.
OFFLINE_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)


def find_chromium() -> str | None:
    """Return the path of Debian's Chromium, or None if it is not installed."""
    return shutil.which("chromium") or (
        "/usr/bin/chromium" if os.path.exists("/usr/bin/chromium") else None
    )


class Chromium:
    """One headless Chromium process with one page, driven over the DevTools protocol."""

    def __init__(self, executable: str, profile_dir, width: int = 1400, height: int = 1000):
        self.port = free_port()
        self.process = subprocess.Popen(
            [
                executable, *OFFLINE_FLAGS,
                f"--user-data-dir={profile_dir}",
                f"--window-size={width},{height}",
                "--remote-debugging-address=127.0.0.1",
                f"--remote-debugging-port={self.port}",
                "about:blank",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self._ids = itertools.count(1)
        self._socket = self._connect()
        self.send("Page.enable")
        self.send("Runtime.enable")
        # --window-size includes the browser's frame, so set the page's own size.
        self.send("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1, mobile=False)

    def _connect(self):
        import websocket

        deadline = time.monotonic() + 30
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"Chromium exited with code {self.process.returncode}")
            try:
                targets = requests.get(f"http://127.0.0.1:{self.port}/json", timeout=2).json()
                pages = [t for t in targets if t.get("type") == "page"]
                if pages:
                    # Chromium rejects WebSocket clients that send an Origin it does not allow.
                    return websocket.create_connection(
                        pages[0]["webSocketDebuggerUrl"], timeout=60, suppress_origin=True
                    )
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError("Chromium's DevTools endpoint did not come up within 30 s")
            time.sleep(0.2)

    def send(self, method: str, **params) -> dict:
        """Send one DevTools command and return its result, skipping the events in between."""
        message_id = next(self._ids)
        self._socket.send(json.dumps({"id": message_id, "method": method, "params": params}))
        while True:
            message = json.loads(self._socket.recv())
            if message.get("id") != message_id:
                continue
            if "error" in message:
                raise RuntimeError(f"{method} failed: {message['error']}")
            return message.get("result", {})

    def evaluate(self, expression: str):
        """Evaluate JavaScript in the page and return its value."""
        result = self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"JavaScript failed: {result['exceptionDetails']}")
        return result["result"].get("value")

    def open(self, url: str) -> None:
        self.send("Page.navigate", url=url)

    def text(self) -> str:
        """Return the visible text of the page."""
        return self.evaluate("document.body ? document.body.innerText : ''") or ""

    def wait_for_text(self, *needles: str, timeout: float = 60) -> str:
        """Wait until every one of `needles` is in the page text, and return the text."""
        deadline = time.monotonic() + timeout
        while True:
            text = self.text()
            if all(needle in text for needle in needles):
                return text
            if time.monotonic() > deadline:
                missing = [n for n in needles if n not in text]
                raise TimeoutError(f"page never showed {missing}; it shows:\n{text[:3000]}")
            time.sleep(0.5)

    def click_text(self, text: str, selector: str = "button, a, [role=button], [role=tab], [role=option], span") -> None:
        """Click the innermost element matching `selector` whose text is exactly `text`."""
        clicked = self.evaluate(
            f"""(() => {{
                const matches = [...document.querySelectorAll({json.dumps(selector)})]
                    .filter(e => e.innerText && e.innerText.trim() === {json.dumps(text)});
                const target = matches[matches.length - 1];
                if (!target) return false;
                target.scrollIntoView({{block: "center"}});
                target.click();
                return true;
            }})()"""
        )
        if not clicked:
            raise LookupError(f"no element with text {text!r} to click; the page shows:\n{self.text()[:3000]}")

    def scroll_to_text(self, text: str) -> None:
        """Scroll the innermost element whose text starts with `text` to the top of its view."""
        found = self.evaluate(
            f"""(() => {{
                const matches = [...document.querySelectorAll("*")]
                    .filter(e => e.innerText && e.innerText.trim().startsWith({json.dumps(text)}));
                const target = matches[matches.length - 1];
                if (!target) return false;
                target.scrollIntoView({{block: "start"}});
                return true;
            }})()"""
        )
        if not found:
            raise LookupError(f"no element with text {text!r} to scroll to")

    def type_into(self, selector: str, text: str) -> None:
        """Focus the first element matching `selector` and type `text` as keyboard input."""
        found = self.evaluate(
            f"(() => {{ const e = document.querySelector({json.dumps(selector)}); "
            "if (!e) return false; e.focus(); return true; })()"
        )
        if not found:
            raise LookupError(f"no element matches {selector!r}")
        self.send("Input.insertText", text=text)

    def screenshot(self, path) -> None:
        data = self.send("Page.captureScreenshot", format="png")["data"]
        with open(path, "wb") as f:
            f.write(base64.b64decode(data))

    def close(self) -> None:
        try:
            self._socket.close()
        finally:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
