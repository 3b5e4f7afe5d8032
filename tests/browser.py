"""A real headless Chromium driven over the DevTools protocol (a websocket, through
aiohttp): open a page, collect what its console and its uncaught exceptions say,
evaluate expressions in it, take a screenshot. Started on a free loopback port with its
own profile directory, and stopped by its PID."""

from __future__ import annotations

import asyncio
import base64
import itertools
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import aiohttp
import httpx

from loadgen.local import free_port

# Console messages at these levels, and uncaught exceptions, are the page's errors.
ERROR_LEVELS = frozenset({"error", "assert"})


class Chromium:
    def __init__(self, profile: Path) -> None:
        program = shutil.which("chromium") or shutil.which("chromium-browser")
        if program is None:
            raise RuntimeError("chromium is not installed (make debian-tools)")
        self.port = free_port()
        self.proc = subprocess.Popen(
            [program, "--headless=new", "--no-sandbox", "--disable-gpu",
             "--no-first-run", "--no-default-browser-check", "--disable-extensions",
             "--disable-background-networking", "--window-size=1280,900",
             f"--remote-debugging-port={self.port}", "--remote-debugging-address=127.0.0.1",
             f"--user-data-dir={profile}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        self.errors: list[str] = []
        self._ids = itertools.count(1)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def _page_socket(self, timeout_s: float = 30) -> str:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"chromium exited with {self.proc.returncode}")
            try:
                targets = httpx.get(f"http://127.0.0.1:{self.port}/json/list", timeout=2).json()
                pages = [t for t in targets if t.get("type") == "page"]
                if pages:
                    return str(pages[0]["webSocketDebuggerUrl"])
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise RuntimeError("chromium's DevTools endpoint did not come up")

    async def visit(self, url: str, settle_s: float, checks: dict[str, str],
                    screenshot: Path) -> dict[str, Any]:
        """Open `url`, wait `settle_s` (the page refreshes itself), evaluate each of
        `checks` (name -> JS expression) and save a PNG screenshot. Errors the page logged
        meanwhile are in `self.errors`."""
        async with aiohttp.ClientSession() as session, \
                session.ws_connect(self._page_socket(), max_msg_size=0) as ws:
            pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
            loaded = asyncio.Event()

            async def listen() -> None:
                async for message in ws:
                    data = message.json()
                    if "id" in data and data["id"] in pending:
                        pending.pop(data["id"]).set_result(data)
                    else:
                        self._event(data, loaded)

            listener = asyncio.create_task(listen())

            async def call(method: str, **params: Any) -> dict[str, Any]:
                ident = next(self._ids)
                future = asyncio.get_running_loop().create_future()
                pending[ident] = future
                await ws.send_json({"id": ident, "method": method, "params": params})
                reply = await asyncio.wait_for(future, 30)
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                result: dict[str, Any] = reply.get("result", {})
                return result

            try:
                for domain in ("Runtime", "Log", "Page"):
                    await call(f"{domain}.enable")
                await call("Page.navigate", url=url)
                await asyncio.wait_for(loaded.wait(), 30)
                await asyncio.sleep(settle_s)
                results = {}
                for name, expression in checks.items():
                    value = await call("Runtime.evaluate", expression=expression,
                                       returnByValue=True)
                    if "exceptionDetails" in value:
                        self.errors.append(f"check {name}: {value['exceptionDetails']}")
                    results[name] = value.get("result", {}).get("value")
                shot = await call("Page.captureScreenshot", format="png")
                screenshot.parent.mkdir(parents=True, exist_ok=True)
                screenshot.write_bytes(base64.b64decode(shot["data"]))
                return results
            finally:
                listener.cancel()

    def _event(self, data: dict[str, Any], loaded: asyncio.Event) -> None:
        method, params = data.get("method"), data.get("params", {})
        if method == "Page.loadEventFired":
            loaded.set()
        elif method == "Runtime.consoleAPICalled" and params.get("type") in ERROR_LEVELS:
            args = params.get("args", [])
            self.errors.append("console: " + " ".join(
                str(a.get("value", a.get("description", ""))) for a in args))
        elif method == "Runtime.exceptionThrown":
            details = params.get("exceptionDetails", {})
            self.errors.append("exception: " + str(
                details.get("exception", {}).get("description", details.get("text"))))
        elif method == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
            entry = params["entry"]
            self.errors.append(f"log: {entry.get('text')} {entry.get('url', '')}")
