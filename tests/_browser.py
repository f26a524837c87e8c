"""Headless Chromium for the browser tests, driven over the DevTools protocol.

The browser tests skip when Chromium is not installed, unless
``BUDGET_REQUIRE_BROWSER=1`` (as in CI), where they fail.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, open_websocket_url

REQUIRE_BROWSER = os.environ.get("BUDGET_REQUIRE_BROWSER") == "1"


def chromium() -> str:
    """The chromium executable; skips (or fails, when required) without one."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        if REQUIRE_BROWSER:
            pytest.fail("BUDGET_REQUIRE_BROWSER=1 but chromium is not installed")
        pytest.skip(
            "chromium is not installed (apt-get install chromium);"
            " set BUDGET_REQUIRE_BROWSER=1 to make this a failure"
        )
    return found


class DevTools:
    """A minimal DevTools protocol client: one command at a time, on one page
    session; events are kept in ``events``."""

    def __init__(self, ws: WebSocketConnection) -> None:
        self.ws = ws
        self.next_id = 0
        self.session: str | None = None
        self.events: list[dict[str, Any]] = []

    async def send(self, method: str, **params: Any) -> dict[str, Any]:
        self.next_id += 1
        message: dict[str, Any] = {"id": self.next_id, "method": method, "params": params}
        if self.session is not None and not method.startswith(("Target.", "Browser.")):
            message["sessionId"] = self.session
        await self.ws.send_message(json.dumps(message))
        with trio.fail_after(15):
            while True:
                reply = json.loads(await self.ws.get_message())
                if reply.get("id") == self.next_id:
                    if "error" in reply:
                        raise AssertionError(f"{method}: {reply['error']}")
                    result: dict[str, Any] = reply.get("result", {})
                    return result
                if "method" in reply:
                    self.events.append(reply)

    async def evaluate(self, expression: str) -> Any:
        result = await self.send("Runtime.evaluate", expression=expression, returnByValue=True)
        if "exceptionDetails" in result:
            raise AssertionError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    async def new_page(self) -> None:
        """Open a blank page and attach this client's session to it."""
        target = await self.send("Target.createTarget", url="about:blank")
        self.session = None
        attached = await self.send(
            "Target.attachToTarget", targetId=target["targetId"], flatten=True
        )
        self.session = attached["sessionId"]
        for domain in ("Runtime", "Log", "Network"):
            await self.send(f"{domain}.enable")


async def _devtools_url(stderr: Path, proc: subprocess.Popen[bytes]) -> str:
    with trio.fail_after(20):
        while True:
            text = stderr.read_text(errors="replace") if stderr.exists() else ""
            match = re.search(r"DevTools listening on (ws://\S+)", text)
            if match:
                return match.group(1)
            if proc.poll() is not None:
                raise AssertionError(f"chromium exited with {proc.returncode}: {text[-2000:]}")
            await trio.sleep(0.05)


@contextlib.asynccontextmanager
async def browser(workdir: Path) -> AsyncIterator[DevTools]:
    """A headless chromium with one page attached; closed at the end."""
    executable = chromium()
    stderr = workdir / "chromium.stderr"
    with stderr.open("wb") as err:
        proc = subprocess.Popen(
            [
                executable,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--disable-dev-shm-usage",
                "--hide-scrollbars",
                f"--user-data-dir={workdir / 'chromium-profile'}",
                "--remote-debugging-port=0",
                "about:blank",
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
    try:
        url = await _devtools_url(stderr, proc)
        async with open_websocket_url(url, max_message_size=64 * 1024 * 1024) as ws:
            tools = DevTools(ws)
            await tools.new_page()
            yield tools
            with contextlib.suppress(ConnectionClosed):
                await tools.send("Browser.close")
    finally:
        if proc.poll() is None:
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
