"""Headless Chromium driven over the Chrome DevTools Protocol, with aiohttp's websocket client.

No playwright or selenium: the browser is the Debian `chromium` package (installed
by .ci/run), started with `--remote-debugging-port=0`; the port it chose is read
from `DevToolsActivePort` in its profile folder. One page target, one websocket;
`evaluate` runs JavaScript in the page and returns the value, `wait_for` polls an
expression until it is truthy (bounded), `screenshot` saves a PNG.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import ctypes
import itertools
import json
import os
import shutil
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp

PR_SET_PDEATHSIG = 1


class BrowserError(Exception):
    """The browser did not start, or a DevTools call failed."""


def _die_with_parent() -> None:
    """In the child, before exec: SIGKILL when the test process dies, even by kill -9
    (Linux; elsewhere nothing: the `finally` below is all there is)."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


class Page:
    """One page target over one DevTools websocket."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.ids = itertools.count(1)
        self.waiting: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self.errors: list[str] = []  # uncaught exceptions and console.error lines in the page
        self.reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for msg in self.ws:
            if msg.type != aiohttp.WSMsgType.TEXT:
                break
            data = json.loads(msg.data)
            if "id" in data:
                fut = self.waiting.pop(data["id"], None)
                if fut is not None and not fut.done():
                    fut.set_result(data)
            else:
                self._event(data.get("method", ""), data.get("params", {}))
        for fut in self.waiting.values():
            if not fut.done():
                fut.set_exception(BrowserError("the DevTools websocket closed"))

    def _event(self, method: str, params: dict[str, Any]) -> None:
        if method == "Runtime.exceptionThrown":
            details = params.get("exceptionDetails", {})
            text = details.get("exception", {}).get("description") or details.get("text", "")
            self.errors.append(f"exception: {text}")
        elif method == "Runtime.consoleAPICalled" and params.get("type") == "error":
            args = params.get("args", [])
            self.errors.append("console.error: " + " ".join(
                str(a.get("value", a.get("description", ""))) for a in args
            ))  # fmt: skip

    async def send(self, method: str, timeout: float = 15.0, **params: Any) -> dict[str, Any]:
        msg_id = next(self.ids)
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self.waiting[msg_id] = fut
        await self.ws.send_str(json.dumps({"id": msg_id, "method": method, "params": params}))
        try:
            answer = await asyncio.wait_for(fut, timeout)
        finally:
            self.waiting.pop(msg_id, None)
        if "error" in answer:
            raise BrowserError(f"{method}: {answer['error']}")
        result: dict[str, Any] = answer.get("result", {})
        return result

    async def evaluate(self, expression: str, timeout: float = 15.0) -> Any:
        """The value of a JavaScript expression in the page (a promise is awaited)."""
        result = await self.send(
            "Runtime.evaluate", timeout, expression=expression, returnByValue=True,
            awaitPromise=True,
        )  # fmt: skip
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            text = details.get("exception", {}).get("description") or details.get("text")
            raise BrowserError(f"{expression!r} threw: {text}")
        return result.get("result", {}).get("value")

    async def wait_for(self, expression: str, timeout: float = 15.0, what: str = "") -> Any:
        """The expression's value once it is truthy; fails after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        last: Any = None
        while True:
            last = await self.evaluate(expression)
            if last:
                return last
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"{what or expression} not true within {timeout} s (last value {last!r})"
                )
            await asyncio.sleep(0.1)

    async def navigate(self, url: str, timeout: float = 15.0) -> None:
        """Load `url` and wait until its document has loaded."""
        answer = await self.send("Page.navigate", timeout, url=url)
        if answer.get("errorText"):
            raise BrowserError(f"cannot load {url}: {answer['errorText']}")
        await self.wait_for("document.readyState === 'complete'", timeout, f"{url} loaded")

    async def screenshot(self, *paths: Path) -> bytes:
        result = await self.send("Page.captureScreenshot", 30.0, format="png")
        png = base64.b64decode(result["data"])
        for path in paths:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(png)
        return png

    async def close(self) -> None:
        self.reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.reader
        await self.ws.close()


async def _devtools_port(profile: Path, proc: asyncio.subprocess.Process, timeout: float) -> int:
    """The port Chromium chose, from the DevToolsActivePort file it writes (line 1)."""
    path = profile / "DevToolsActivePort"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.returncode is not None:
            raise BrowserError(f"chromium exited with {proc.returncode} while starting")
        with contextlib.suppress(FileNotFoundError, ValueError, IndexError):
            return int(path.read_text().splitlines()[0])
        await asyncio.sleep(0.05)
    raise BrowserError(f"chromium wrote no {path.name} within {timeout} s")


async def _page_target(http: aiohttp.ClientSession, port: int, timeout: float) -> str:
    """The websocket URL of the browser's first page (its about:blank tab)."""
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(aiohttp.ClientError):
            async with http.get(f"http://127.0.0.1:{port}/json/list") as res:
                targets = await res.json()
            for t in targets:
                if t.get("type") == "page" and t.get("webSocketDebuggerUrl"):
                    return str(t["webSocketDebuggerUrl"])
        if time.monotonic() > deadline:
            raise BrowserError(f"no page target on DevTools port {port} within {timeout} s")
        await asyncio.sleep(0.1)


@contextlib.asynccontextmanager
async def chromium(
    binary: str, profile: Path, log_path: Path, *, width: int = 1440, height: int = 900,
    timeout: float = 30.0,
) -> AsyncIterator[Page]:  # fmt: skip
    """Headless Chromium with a fresh profile; yields its page; killed on exit, whatever happens."""
    profile.mkdir(parents=True, exist_ok=True)
    args = [
        binary, "--headless=new", "--remote-debugging-port=0", f"--user-data-dir={profile}",
        "--no-sandbox",  # root in a container has no usable sandbox
        "--no-first-run", "--no-default-browser-check", "--disable-gpu",
        "--disable-extensions", "--disable-background-networking", "--disable-sync",
        "--disable-dev-shm-usage", "--mute-audio", f"--window-size={width},{height}",
        "about:blank",
    ]  # fmt: skip
    with open(log_path, "wb") as log:  # noqa: ASYNC230 - a local file, at once
        proc = await asyncio.create_subprocess_exec(
            *args, stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=log,
            start_new_session=True, preexec_fn=_die_with_parent,
        )  # fmt: skip
    page: Page | None = None
    try:
        async with aiohttp.ClientSession() as http:
            port = await _devtools_port(profile, proc, timeout)
            ws_url = await _page_target(http, port, timeout)
            ws = await http.ws_connect(ws_url, max_msg_size=0)
            page = Page(ws)
            await page.send("Page.enable")
            await page.send("Runtime.enable")
            await page.send(
                "Emulation.setDeviceMetricsOverride", width=width, height=height,
                deviceScaleFactor=1, mobile=False,
            )  # fmt: skip
            yield page
    finally:
        if page is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(page.close(), 5.0)
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # its own session: renderers and GPU too
        await asyncio.wait_for(proc.wait(), 10.0)
