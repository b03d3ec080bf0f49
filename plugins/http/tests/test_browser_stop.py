"""A page in Debian's chromium stops streams: with fetch (POST /streams/{id}/abort) and with the WebSocket op.

The page is an app's own page on a third origin, allowed by both sinks
(``cors_origins``, ``allowed_origins``), so the fetch is a real cross-origin
request with its CORS preflight. Playwright's asyncio API: asyncio only.
"""

from __future__ import annotations

import os
import shutil
from typing import Any

import anyio
import pytest
from aiohttp import web
from streambus_http import HttpSink
from streambus_websocket import WebSocketSink

from streambus import AbortEvent, Bus

pytestmark = [pytest.mark.anyio, pytest.mark.browser]

CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]

STOP_WITH_FETCH = """async ([url, token]) => {
  const r = await fetch(url, {
    method: "POST",
    headers: { "Content-Type": "application/json", Authorization: `Bearer ${token}` },
    body: JSON.stringify({ reason: "stopped with fetch" }),
  });
  return { status: r.status, body: await r.json() };
}"""

STOP_WITH_WEBSOCKET = """([url, stream]) => new Promise((resolve, reject) => {
  const ws = new WebSocket(url);
  ws.onmessage = (m) => {
    const frame = JSON.parse(m.data);
    if (frame.op === "hello") ws.send(JSON.stringify({ op: "abort", id: "b", stream, reason: "stopped with the op" }));
    else if (frame.op === "aborted" || frame.op === "error") { ws.close(); resolve(frame); }
  };
  ws.onerror = () => reject(new Error("websocket error"));
})"""


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def test_a_page_stops_streams_with_fetch_and_with_the_websocket_op() -> None:
    chromium = shutil.which("chromium")
    if chromium is None:
        if os.environ.get("CI") == "true":
            pytest.fail("chromium is missing: run scripts/bootstrap.sh --browser (apt-get install chromium)")
        pytest.skip("Debian's chromium is not installed (apt-get install chromium)")
    from playwright.async_api import async_playwright

    async def home(_: web.Request) -> web.Response:
        return web.Response(text="<!doctype html><title>chat</title><p>a chat app", content_type="text/html")

    app = web.Application()
    app.router.add_get("/", home)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    origin = f"http://127.0.0.1:{runner.addresses[0][1]}"
    async with Bus() as bus:
        ws_sink = WebSocketSink(port=0, token="page-token", allowed_origins=[origin])
        bus.add_sink(ws_sink)
        await ws_sink.wait_ready()
        http = HttpSink(port=0, token="page-token", cors_origins=[origin])
        bus.add_sink(http)
        http_url = await http.started()
        seen = bus.subscribe()
        cancelled: list[str] = []
        written = {"a": anyio.Event(), "b": anyio.Event()}

        async def produce(stream: str) -> None:
            try:
                async with bus.stream(model="m", stream=stream) as w:
                    await w.delta("partial")
                    written[stream].set()
                    await anyio.sleep_forever()
            finally:
                cancelled.append(stream)

        bus.start_soon(produce, "a")
        bus.start_soon(produce, "b")
        for event in written.values():
            await event.wait()
        async with async_playwright() as pw:
            browser = await pw.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS, headless=True)
            try:
                page = await browser.new_page()
                await page.goto(origin + "/")
                by_fetch: dict[str, Any] = await page.evaluate(
                    STOP_WITH_FETCH, [f"{http_url}/streams/a/abort", "page-token"]
                )
                assert by_fetch == {"status": 200, "body": {"stream": "a", "outcome": "stopped"}}
                by_op: dict[str, Any] = await page.evaluate(
                    STOP_WITH_WEBSOCKET, [ws_sink.url + "?token=page-token", "b"]
                )
                assert by_op == {"op": "aborted", "id": "b", "stream": "b", "outcome": "stopped"}
                again: dict[str, Any] = await page.evaluate(
                    STOP_WITH_WEBSOCKET, [ws_sink.url + "?token=page-token", "b"]
                )
                assert again["outcome"] == "ended"
            finally:
                await browser.close()
        aborts: list[AbortEvent] = []
        with anyio.fail_after(5):
            async for seen_event in seen:
                if isinstance(seen_event, AbortEvent):
                    aborts.append(seen_event)
                    if len(aborts) == 2:
                        break
        assert sorted((e.stream, e.reason, e.by) for e in aborts) == [
            ("a", "stopped with fetch", "client"),
            ("b", "stopped with the op", "client"),
        ]
        assert sorted(cancelled) == ["a", "b"]
        await bus.shutdown()
    await runner.cleanup()
