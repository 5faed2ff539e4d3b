"""Headless Chromium driven over the DevTools protocol (aiohttp's websocket client): load a page, wait
for a condition with a deadline, evaluate JavaScript, capture a full-page screenshot.

Debian's ``chromium`` package; launched with its network services, updates and sync off, in a
throw-away profile, in its own process group (the caller's :class:`ProcessGroup` kills it).
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import shutil
import time
from pathlib import Path

import aiohttp

CHROMIUM_PATHS = ("/usr/bin/chromium", "/usr/bin/chromium-browser")


def find_chromium() -> str | None:
    for path in CHROMIUM_PATHS:
        if Path(path).exists():
            return path
    return shutil.which("chromium") or shutil.which("chromium-browser")


def chromium_args(binary: str, profile: Path, width: int, height: int) -> list[str]:
    return [
        binary,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--disable-dev-shm-usage",
        f"--user-data-dir={profile}",
        "--remote-debugging-address=127.0.0.1",
        "--remote-debugging-port=0",
        f"--window-size={width},{height}",
        "about:blank",
    ]


def devtools_port(profile: Path, proc, timeout: float = 60.0) -> int:
    """The port Chromium wrote to ``DevToolsActivePort`` in its profile once it listens."""
    deadline = time.monotonic() + timeout
    marker = profile / "DevToolsActivePort"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"chromium exited with status {proc.returncode}")
        try:
            return int(marker.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            time.sleep(0.1)
    raise TimeoutError(f"chromium wrote no DevToolsActivePort within {timeout:.0f}s")


class Page:
    """One page target's DevTools session."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse):
        self.ws = ws
        self._ids = itertools.count(1)
        self.exceptions: list[str] = []  # uncaught JavaScript exceptions and console errors

    async def send(self, method: str, **params):
        call_id = next(self._ids)
        await self.ws.send_str(json.dumps({"id": call_id, "method": method, "params": params}))
        while True:
            message = await self.ws.receive(timeout=120)
            if message.type != aiohttp.WSMsgType.TEXT:
                raise RuntimeError(f"devtools connection ended: {message.type}")
            data = json.loads(message.data)
            if data.get("id") == call_id:
                if "error" in data:
                    raise RuntimeError(f"{method}: {data['error']}")
                return data.get("result", {})
            self._event(data)

    def _event(self, data: dict) -> None:
        method, params = data.get("method"), data.get("params", {})
        if method == "Runtime.exceptionThrown":
            details = params.get("exceptionDetails", {})
            self.exceptions.append(details.get("exception", {}).get("description") or details.get("text", ""))
        elif method == "Runtime.consoleAPICalled" and params.get("type") == "error":
            self.exceptions.append(
                " ".join(str(a.get("value", a.get("description", ""))) for a in params["args"])
            )

    async def evaluate(self, expression: str):
        result = await self.send(
            "Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True
        )
        if "exceptionDetails" in result:
            raise RuntimeError(f"evaluate failed: {result['exceptionDetails']}")
        return result["result"].get("value")

    async def wait_for(self, expression: str, timeout: float, what: str):
        """Evaluate ``expression`` until it is truthy; returns its value."""
        deadline = time.monotonic() + timeout
        value = None
        while time.monotonic() < deadline:
            value = await self.evaluate(expression)
            if value:
                return value
            await asyncio.sleep(0.2)
        raise TimeoutError(f"{what} within {timeout:.0f}s (last: {value!r})")

    async def screenshot(self, path: Path, width: int) -> None:
        height = int(await self.evaluate("document.documentElement.scrollHeight"))
        await self.send(
            "Emulation.setDeviceMetricsOverride",
            width=width,
            height=height,
            deviceScaleFactor=1,
            mobile=False,
        )
        await self.evaluate("new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)))")
        shot = await self.send("Page.captureScreenshot", format="png", captureBeyondViewport=True)
        path.write_bytes(base64.b64decode(shot["data"]))


async def open_page(session: aiohttp.ClientSession, port: int, width: int, height: int) -> Page:
    async with session.get(f"http://127.0.0.1:{port}/json/list") as resp:
        targets = await resp.json(content_type=None)
    page_target = next(t for t in targets if t.get("type") == "page")
    ws = await session.ws_connect(page_target["webSocketDebuggerUrl"], max_msg_size=64 * 1024 * 1024)
    page = Page(ws)
    await page.send("Page.enable")
    await page.send("Runtime.enable")
    await page.send(
        "Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1, mobile=False
    )
    return page


async def load(page: Page, url: str, timeout: float = 60.0) -> None:
    await page.send("Page.navigate", url=url)
    await page.wait_for("document.readyState === 'complete'", timeout, f"{url} loaded")
