"""Headless Chromium driven over the DevTools protocol (aiohttp's websocket client: no extra
package), run by test_lab_dashboard.py inside the lab controller's netns, where the API listens.

    ip netns exec NETNS python cdp_driver.py URL TOKEN OUT_DIR HOST PLANE

Line protocol on stdout/stdin (times are unix seconds of this machine's clock):
    -> "ready"                 the page shows HOST's PLANE up (screenshot 1-before.png)
    <- "go"                    the test injected the fault
    -> "shown STATE T"         the page first shows the plane not up (2-fault-shown.png)
    -> "down T"                the page shows it DOWN (3-down.png)
    -> "task VM PHASE T"       a recovery shows on the page (4-recovery.png)
    -> "timeline T"            its timeline is open, with its evidence (5-timeline.png)
    -> "error TEXT"            anything else: the test fails with TEXT
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp


class Page:
    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.ids = itertools.count(1)

    async def call(self, method: str, **params: Any) -> dict[str, Any]:
        n = next(self.ids)
        await self.ws.send_json({"id": n, "method": method, "params": params})
        while True:
            msg = json.loads((await self.ws.receive(timeout=30)).data)
            if msg.get("id") == n:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg["result"]  # type: ignore[no-any-return]

    async def js(self, expression: str) -> Any:
        r = await self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        return r["result"].get("value")

    async def until(self, expression: str, timeout: float, every: float = 0.02) -> Any:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            value = await self.js(expression)
            if value:
                return value
            await asyncio.sleep(every)
        raise TimeoutError(f"not within {timeout} s: {expression}")

    async def shot(self, path: Path) -> None:
        r = await self.call("Page.captureScreenshot", format="png")
        path.write_bytes(base64.b64decode(r["data"]))


def say(*words: object) -> None:
    print(*words, flush=True)


async def drive(url: str, token: str, out: Path, host: str, plane: str) -> None:
    profile = Path(tempfile.mkdtemp(prefix="vmha-chromium-"))
    chromium = subprocess.Popen(
        ["chromium", "--headless=new", "--no-sandbox", "--disable-gpu", "--ignore-certificate-errors",
         "--remote-debugging-port=0", f"--user-data-dir={profile}", "--window-size=1400,1000", "about:blank"],
        stdout=subprocess.DEVNULL, stderr=(out / "chromium.log").open("w"),
    )  # fmt: skip
    try:
        port_file = profile / "DevToolsActivePort"
        for _ in range(300):
            if port_file.exists() and port_file.read_text().strip():
                break
            await asyncio.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://127.0.0.1:{port}/json/list") as r:
                target = next(t for t in await r.json() if t["type"] == "page")
            async with http.ws_connect(target["webSocketDebuggerUrl"], max_msg_size=64 << 20) as ws:
                page = Page(ws)
                await page.call("Page.enable")
                await page.call("Page.navigate", url=f"{url}/#token={token}")
                cell = f'document.querySelector(\'tr[data-host="{host}"] td[data-plane="{plane}"]\')'
                await page.until(f'{cell} && {cell}.dataset.state === "up"', timeout=90, every=0.2)
                await page.shot(out / "1-before.png")
                say("ready")
                line = await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
                if line.strip() != "go":
                    raise RuntimeError(f"expected go, got {line!r}")
                state = await page.until(f'{cell}.dataset.state !== "up" && {cell}.dataset.state', timeout=30)
                say("shown", state, f"{time.time():.3f}")
                await page.shot(out / "2-fault-shown.png")
                await page.until(f'{cell}.dataset.state === "down"', timeout=30)
                say("down", f"{time.time():.3f}")
                await page.shot(out / "3-down.png")
                task = await page.until('(e => e && [e.dataset.task, e.dataset.phase])'
                                        '(document.querySelector("[data-task]"))', timeout=60)
                say("task", task[0], task[1], f"{time.time():.3f}")
                await page.shot(out / "4-recovery.png")
                await page.js('document.querySelector("[data-task] button").click()')
                await page.until('(e => e && e.textContent.includes("fence proof"))'
                                 '(document.querySelector("[data-timeline]"))', timeout=60, every=0.2)
                t_timeline = time.time()
                await page.shot(out / "5-timeline.png")
                (out / "page.txt").write_text(str(await page.js("document.body.innerText")))
                say("timeline", f"{t_timeline:.3f}")  # last: the test reads page.txt once told
    finally:
        chromium.terminate()
        try:
            chromium.wait(10)
        except subprocess.TimeoutExpired:
            chromium.kill()
        shutil.rmtree(profile, ignore_errors=True)


def main() -> None:
    url, token, out, host, plane = sys.argv[1:6]
    try:
        asyncio.run(drive(url, token, Path(out), host, plane))
    except Exception as e:  # the test reads the reason from this line
        say("error", f"{type(e).__name__}: {e}")
        sys.exit(1)


if __name__ == "__main__":
    main()
