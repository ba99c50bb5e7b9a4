"""Headless Chromium for the dashboard tests: one-shot runs (`chromium`: --dump-dom,
--screenshot) and a page driven over the Chrome DevTools Protocol (`DevToolsPage`: type
into a form, click, read the rendered text), as a user's browser would be.

Chromium comes from Debian's package (`apt-get install chromium`; .ci/run installs it
when it can); the tests that need it skip, naming this, when it is missing. The
protocol is spoken over aiohttp's websocket client (aiohttp comes with ray[default]).
"""

from __future__ import annotations

import asyncio
import base64
import json
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

CHROMIUM = shutil.which("chromium")  # Debian's package: /usr/bin/chromium
NO_CHROMIUM = "no chromium on PATH (Debian: apt-get install chromium; .ci/run tries)"
# Keep Chromium from calling home: on a closed network those calls are refused and slow it.
QUIET = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--window-size=1400,900"]


def chromium(url: str, *out: str, budget_ms: int = 10000) -> subprocess.CompletedProcess:
    """Headless Chromium on `url` (`--screenshot=PNG` or `--dump-dom` in `out`)."""
    with tempfile.TemporaryDirectory() as profile:
        return subprocess.run(
            [CHROMIUM, *QUIET, f"--user-data-dir={profile}", f"--virtual-time-budget={budget_ms}", *out, url],
            capture_output=True, text=True, timeout=180,
        )


class DevToolsPage:
    """One Chromium tab driven over the DevTools Protocol; use as an async context manager."""

    def __init__(self) -> None:
        # Chromium's helper processes may still write to the profile as it is removed
        self._profile = tempfile.TemporaryDirectory(ignore_cleanup_errors=True)
        self._process: subprocess.Popen | None = None
        self._http = self._socket = None
        self._next_id = 0

    async def __aenter__(self) -> "DevToolsPage":
        import aiohttp

        self._process = subprocess.Popen(
            [CHROMIUM, *QUIET, f"--user-data-dir={self._profile.name}", "--remote-debugging-port=0", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        port_file = Path(self._profile.name, "DevToolsActivePort")  # Chromium writes its port here
        deadline = time.monotonic() + 60
        while not (port_file.is_file() and port_file.read_text().strip()):
            if time.monotonic() > deadline or self._process.poll() is not None:
                raise RuntimeError("chromium did not open its DevTools port")
            await asyncio.sleep(0.2)
        port = int(port_file.read_text().split()[0])
        self._http = aiohttp.ClientSession()
        async with self._http.get(f"http://127.0.0.1:{port}/json/list") as response:
            targets = await response.json()
        page = next(t for t in targets if t["type"] == "page")
        self._socket = await self._http.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=0)
        return self

    async def __aexit__(self, *exc) -> None:
        if self._http is not None:
            await self._http.close()
        if self._process is not None:
            self._process.terminate()
            self._process.wait(timeout=30)
        self._profile.cleanup()

    async def send(self, method: str, **params) -> dict:
        """One protocol command; its result (events in between are skipped)."""
        self._next_id += 1
        await self._socket.send_str(json.dumps({"id": self._next_id, "method": method, "params": params}))
        while True:
            message = json.loads((await self._socket.receive()).data)
            if message.get("id") == self._next_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})

    async def goto(self, url: str) -> None:
        await self.send("Page.navigate", url=url)

    async def evaluate(self, expression: str):
        result = await self.send("Runtime.evaluate", expression=expression, returnByValue=True)
        return result.get("result", {}).get("value")

    async def text(self) -> str:
        """The page's rendered text; empty while it navigates (the dashboard reloads itself
        once the token is accepted, and the protocol then answers 'target navigated')."""
        try:
            return await self.evaluate("document.body ? document.body.innerText : ''") or ""
        except RuntimeError as err:
            if "navigated" in str(err) or "context" in str(err).lower():
                return ""
            raise

    async def wait_for_text(self, *needles: str, timeout_s: float = 90.0, absent: bool = False) -> str:
        """Poll the rendered text until it holds every needle (or none of them, `absent`)."""
        deadline = time.monotonic() + timeout_s
        while True:
            text = await self.text()
            if all((needle in text) != absent for needle in needles):
                return text
            if time.monotonic() > deadline:
                state = "still shows" if absent else "never showed"
                raise AssertionError(f"the page {state} {needles!r}; it reads:\n{text[-3000:]}")
            await asyncio.sleep(0.5)

    async def type_into(self, selector: str, value: str) -> None:
        """Focus the element and type `value` as keyboard input (React sees its input events)."""
        found = await self.evaluate(f"(e => e ? (e.focus(), true) : false)(document.querySelector({json.dumps(selector)}))")
        if not found:
            raise AssertionError(f"no element matches {selector}")
        await self.send("Input.insertText", text=value)

    async def click_button(self, label: str) -> None:
        """Click the button showing `label` (any case: Material UI shows labels upper-cased)."""
        clicked = await self.evaluate(
            f"(b => b ? (b.click(), true) : false)([...document.querySelectorAll('button')]"
            f".find(b => b.innerText.trim().toLowerCase() === {json.dumps(label.lower())}))")
        if not clicked:
            raise AssertionError(f"no button labelled {label!r}")

    async def screenshot(self, path: Path) -> None:
        shot = await self.send("Page.captureScreenshot", format="png")
        path.write_bytes(base64.b64decode(shot["data"]))
