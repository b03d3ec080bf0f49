"""The docs' Next.js route + ``useChat`` example (clients/js/examples/nextjs), built and driven in chromium.

``next build`` and ``next start`` run the example on a free loopback port; its two route handlers
forward ``useChat``'s send and resume to a real ``http`` sink, holding a *scoped* token (tenant
``acme``) that the page never sees. The test is the producer: it publishes the chat's stream once
the route's request waits for it, and checks the page shows the text, resumes a live chat after a
reload, stops a chat with ``useChat``'s ``stop()`` (through the app's abort route, down to the
producer), and never shows another tenant's chat.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
from pathlib import Path

import anyio
import httpx
import pytest
from streambus_http import HttpSink

from streambus import Bus
from streambus.tokens import TokenVerifier, mint_token

pytestmark = [pytest.mark.anyio, pytest.mark.browser, pytest.mark.slow]

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "nextjs"
NEXT = EXAMPLE / "node_modules" / "next" / "dist" / "bin" / "next"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]


@pytest.fixture
def anyio_backend() -> str:
    """Playwright's async API and aiohttp run on asyncio."""
    return "asyncio"


def _need(what: str | None) -> None:
    if what is not None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI runs the Next.js example, but {what}")
        pytest.skip(what)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


async def _wait_waiting(sink: HttpSink) -> None:
    """Until a request (the Next.js route's) waits in the hub for its chat's stream to start."""
    with anyio.fail_after(30):
        while not sink.hub.waiting:
            await sink.hub.wait_changed(max_wait=0.1)


@pytest.mark.timeout(300)
async def test_nextjs_route_and_use_chat_over_a_scoped_token() -> None:
    chromium = shutil.which("chromium")
    node = shutil.which("node")
    _need(None if chromium else "Debian's chromium is not installed (apt-get install chromium)")
    _need(None if node else "Node.js is not installed")
    _need(None if NEXT.exists() else "examples/nextjs needs `npm ci` (bootstrap.sh)")
    assert chromium is not None and node is not None
    npm = shutil.which("npm")
    assert npm is not None
    env = {**os.environ, "NEXT_TELEMETRY_DISABLED": "1"}
    # The example links @streambus/client from clients/js (file:../..): its dist/ first.
    await anyio.run_process([npm, "run", "--silent", "build"], cwd=EXAMPLE.parents[1])
    await anyio.run_process([node, str(NEXT), "build"], cwd=EXAMPLE, env=env)
    from playwright.async_api import async_playwright

    secret = secrets.token_urlsafe(32)
    async with Bus() as bus:
        sink = HttpSink(port=0, verifier=TokenVerifier(secret=secret), start_timeout=30)
        bus.add_sink(sink, name="http")
        bus_url = await sink.started()
        port = _free_port()
        server_env = {
            **env,
            "STREAMBUS_HTTP": bus_url,
            "STREAMBUS_TOKEN": mint_token(secret, meta={"tenant": "acme"}, stop=True, ttl=600),
        }
        async with await anyio.open_process(
            # Node itself, not npx: terminating the process must end the server.
            [node, str(NEXT), "start", "-p", str(port), "-H", "127.0.0.1"],
            cwd=EXAMPLE,
            env=server_env,
        ) as server:
            try:
                origin = f"http://127.0.0.1:{port}"
                async with httpx.AsyncClient() as client:
                    with anyio.fail_after(60):
                        while True:
                            try:
                                if (await client.get(origin + "/?chat=probe")).status_code == 200:
                                    break
                            except httpx.TransportError:
                                pass
                            await anyio.sleep(0.2)
                async with async_playwright() as pw:
                    browser = await pw.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS, headless=True)
                    try:
                        page = await browser.new_page()
                        errors: list[str] = []
                        page.on("pageerror", lambda exc: errors.append(str(exc)))
                        # Send: the route waits for the chat's stream, which the producer starts.
                        await page.goto(f"{origin}/?chat=c1")
                        await page.wait_for_selector("output[data-status=ready]", timeout=30_000)
                        await page.click("text=Send")
                        await _wait_waiting(sink)
                        async with bus.stream(model="m", meta={"chat": "c1", "tenant": "acme"}) as w:
                            for piece in ("Hello", " from", " the bus"):
                                await w.delta(piece)
                        assistant = "p[data-role=assistant]"
                        await page.wait_for_function(
                            f"document.querySelector('{assistant}')?.textContent === 'Hello from the bus'",
                            timeout=30_000,
                        )
                        await page.wait_for_selector("output[data-status=ready]", timeout=30_000)
                        # Resume: a page opened while its chat's stream is live picks it up mid-way.
                        async with bus.stream(model="m", meta={"chat": "c2", "tenant": "acme"}) as w:
                            await w.delta("partial")
                            await page.goto(f"{origin}/?chat=c2")
                            await page.wait_for_function(
                                f"document.querySelector('{assistant}')?.textContent === 'partial'", timeout=30_000
                            )
                            await w.delta(" and the rest")
                        await page.wait_for_function(
                            f"document.querySelector('{assistant}')?.textContent === 'partial and the rest'",
                            timeout=30_000,
                        )
                        # Stop: useChat's stop() reaches the producer through the app's abort route.
                        stopped = anyio.Event()

                        async def generate() -> None:
                            try:
                                async with bus.stream(model="m", meta={"chat": "c4", "tenant": "acme"}) as w:
                                    await w.delta("generating")
                                    await anyio.sleep_forever()
                            finally:
                                stopped.set()

                        await page.goto(f"{origin}/?chat=c4")
                        await page.wait_for_selector("output[data-status=ready]", timeout=30_000)
                        await page.click("text=Send")
                        await _wait_waiting(sink)
                        bus.start_soon(generate)
                        await page.wait_for_function(
                            f"document.querySelector('{assistant}')?.textContent === 'generating'", timeout=30_000
                        )
                        await page.click("text=Stop")
                        with anyio.fail_after(30):
                            await stopped.wait()
                        # Another tenant's live chat is not there for this app's token.
                        async with bus.stream(model="m", meta={"chat": "c3", "tenant": "other"}) as w:
                            await w.delta("not yours")
                            async with httpx.AsyncClient(timeout=10) as client:
                                r = await client.get(f"{origin}/api/chat/c3/stream")
                            assert r.status_code == 204
                        assert errors == []
                    finally:
                        await browser.close()
            finally:
                server.terminate()
                with anyio.move_on_after(10):
                    await server.wait()
        await bus.shutdown()
