"""The docs' Next.js example (clients/js/examples/nextjs) built and started, driven in Debian's chromium.

``next build`` and ``next start`` run the App Router app as a user would deploy it. Its three route
handlers proxy a real streambus http sink (``POST /api/chat``, ``GET /api/chat/{id}/stream``,
``POST /api/chat/{id}/abort``) with the sink's token, and ``startGeneration`` posts to a small
generation service in this test that starts a producer on the bus (``start.meta.chat`` = the chat
id). The page's ``useChat`` reads the stream through ``StreamBusChatTransport``. Checked: the text
arrives exact, a reload mid-stream resumes with no gap or duplicate (every text the page ever
shows is a prefix of the answer), Stop ends the stream with one ``abort`` on the bus, bad bodies
and cross-site posts are refused, and the token never reaches the browser.
"""

from __future__ import annotations

import os
import shutil
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from aiohttp import web
from anyio.abc import Process
from streambus_http import HttpSink

from streambus import AbortEvent, Bus, Event

pytestmark = [pytest.mark.anyio, pytest.mark.browser]

JS = Path(__file__).resolve().parents[1]
APP = JS / "examples" / "nextjs"
TOKEN = "next-secret-7f3a"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]
ANSWER = ["Hello", ", ", "wörld", "! ", "日本語", " ✓"]

# Every text the assistant message ever shows, kept across reloads (sessionStorage survives them).
RECORD_TEXTS = """
new MutationObserver(() => {
  const p = [...document.querySelectorAll('p[data-role=assistant]')].pop();
  if (!p) return;
  const seen = JSON.parse(sessionStorage.getItem('seen') ?? '[]');
  if (seen[seen.length - 1] !== p.textContent) {
    seen.push(p.textContent);
    sessionStorage.setItem('seen', JSON.stringify(seen));
  }
}).observe(document, { subtree: true, childList: true, characterData: true });
"""


@pytest.fixture
def anyio_backend() -> str:
    """Playwright's async API and the http sink (aiohttp) run on asyncio."""
    return "asyncio"


def _need(what: str | None) -> None:
    if what is not None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI runs the Next.js example, but {what}")
        pytest.skip(what)


def _free_port() -> int:
    # `next start` takes a port number, not 0; the kernel picks one that is free now.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@asynccontextmanager
async def generation_service(start: Callable[[str, str], Awaitable[None]]) -> AsyncIterator[tuple[str, list[Any]]]:
    """The app's "your producer" on loopback: ``POST /generate`` starts a generation, answers 202."""
    requests: list[Any] = []

    async def generate(request: web.Request) -> web.Response:
        body = await request.json()
        requests.append(body)
        await start(body["chat"], body["stream"])
        return web.Response(status=202)

    app = web.Application()
    app.router.add_post("/generate", generate)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}/generate", requests
    finally:
        await runner.cleanup()


@asynccontextmanager
async def next_server(env: dict[str, str]) -> AsyncIterator[str]:
    """``next start`` on a free loopback port; yields its origin once it answers."""
    port = _free_port()
    next_bin = str(APP / "node_modules" / ".bin" / "next")
    process: Process = await anyio.open_process(
        [next_bin, "start", "-H", "127.0.0.1", "-p", str(port)], cwd=APP, env={**os.environ, **env}
    )
    origin = f"http://127.0.0.1:{port}"
    try:
        assert process.stdout is not None
        output = b""
        with anyio.fail_after(60):
            async for chunk in process.stdout:  # it prints "Ready" when it serves
                output += chunk
                if b"Ready" in output:
                    break
        assert b"Ready" in output, output.decode(errors="replace")
        yield origin
    finally:
        process.terminate()
        with anyio.CancelScope(shield=True), anyio.move_on_after(10):
            await process.wait()
        if process.returncode is None:
            process.kill()
        await process.aclose()


async def opened(page: Any, url: str) -> None:
    """Open a chat page and wait until React runs it: ``useChat`` asks the resume route on mount."""
    async with page.expect_response(lambda r: r.url.endswith("/stream"), timeout=30_000) as resumed:
        await page.goto(url)
    assert (await resumed.value).status in (200, 204)


@pytest.mark.slow
@pytest.mark.timeout(400)
async def test_nextjs_example_streams_resumes_and_stops_in_chromium() -> None:
    """The route set and ``useChat`` page, built with ``next build``, against a real http sink."""
    chromium = shutil.which("chromium")
    npm = shutil.which("npm")
    _need(None if chromium else "Debian's chromium is not installed (apt-get install chromium)")
    _need(None if npm and (JS / "node_modules" / "typescript").exists() else "clients/js needs `npm ci` (bootstrap.sh)")
    _need(None if (APP / "node_modules" / "next").exists() else "the example needs `npm ci` (bootstrap.sh)")
    assert chromium is not None and npm is not None
    quiet = {**os.environ, "NEXT_TELEMETRY_DISABLED": "1"}
    await anyio.run_process([npm, "run", "--silent", "build"], cwd=JS)  # dist/ of @streambus/client
    with anyio.fail_after(240):
        built = await anyio.run_process([npm, "run", "--silent", "build"], cwd=APP, env=quiet, check=False)
    assert built.returncode == 0, built.stdout.decode()[-4000:] + built.stderr.decode()[-4000:]
    from playwright.async_api import async_playwright

    halfway, go, partial_written, cancelled = anyio.Event(), anyio.Event(), anyio.Event(), anyio.Event()
    stop_ended = anyio.Event()
    seen: list[Event] = []
    streams: dict[str, str] = {}  # chat id -> the stream id its route picked

    async with Bus(drain_timeout=5) as bus:
        sink = HttpSink(port=0, token=TOKEN)
        bus.add_sink(sink, name="http")
        sink_url = await sink.started()
        subscription = bus.subscribe(overflow="block")

        async def record() -> None:
            async for event in subscription:
                seen.append(event)
                if isinstance(event, AbortEvent) and event.stream == streams.get("stop"):
                    stop_ended.set()

        bus.start_soon(record)

        async def produce(chat: str, stream: str) -> None:
            streams[chat] = stream
            try:
                async with bus.stream(model="m", stream=stream, meta={"chat": chat}) as w:
                    if chat == "stop":
                        await w.delta("Partial")
                        partial_written.set()
                        await anyio.sleep_forever()  # a model that would go on generating
                    for i, token in enumerate(ANSWER):
                        if chat == "reload" and i == 3:
                            halfway.set()
                            await go.wait()
                        await w.delta(token)
                    await w.end()
            finally:
                if chat == "stop":
                    cancelled.set()

        async def start(chat: str, stream: str) -> None:
            bus.start_soon(produce, chat, stream)

        async with generation_service(start) as (generate_url, requests):
            env = {
                "NEXT_TELEMETRY_DISABLED": "1",
                "STREAMBUS_URL": sink_url,
                "STREAMBUS_TOKEN": TOKEN,
                "GENERATE_URL": generate_url,
            }
            async with next_server(env) as origin, async_playwright() as pw, httpx.AsyncClient() as http:
                browser = await pw.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS, headless=True)
                try:
                    context = await browser.new_context()
                    await context.add_init_script(RECORD_TEXTS)
                    page = await context.new_page()
                    errors: list[str] = []
                    page.on("pageerror", lambda exc: errors.append(str(exc)))
                    scripts: list[str] = []
                    page.on("response", lambda r: scripts.append(r.url) if r.url.endswith(".js") else None)
                    assistant = page.locator("p[data-role=assistant]").last

                    # 1. Send: the answer streamed through the route, exact.
                    await opened(page, f"{origin}/chat/exact")
                    await page.get_by_role("button", name="Send").click()
                    await page.wait_for_selector("div[data-status=ready] p[data-role=assistant]", timeout=30_000)
                    assert await assistant.text_content() == "".join(ANSWER)
                    assert await page.text_content("p[data-role=user]") == "Hello"
                    assert requests[0]["chat"] == "exact"
                    assert requests[0]["stream"] == streams["exact"]
                    assert requests[0]["messages"][0]["parts"] == [{"type": "text", "text": "Hello"}]

                    # 2. Reload mid-stream: the page resumes the chat's live stream, no gap, no duplicate.
                    await opened(page, f"{origin}/chat/reload")
                    await page.evaluate("sessionStorage.setItem('seen', '[]')")
                    await page.get_by_role("button", name="Send").click()
                    with anyio.fail_after(30):
                        await halfway.wait()
                    head = "".join(ANSWER[:3])
                    await page.wait_for_function(
                        f"document.querySelector('p[data-role=assistant]')?.textContent === {head!r}", timeout=30_000
                    )
                    await page.reload()
                    await page.wait_for_function(  # resumed from GET /api/chat/reload/stream
                        f"document.querySelector('p[data-role=assistant]')?.textContent === {head!r}", timeout=30_000
                    )
                    go.set()
                    await page.wait_for_selector("div[data-status=ready] p[data-role=assistant]", timeout=30_000)
                    full = "".join(ANSWER)
                    assert await assistant.text_content() == full
                    texts: list[str] = await page.evaluate("JSON.parse(sessionStorage.getItem('seen'))")
                    assert texts[-1] == full
                    assert all(full.startswith(t) for t in texts), texts  # never a hole, never a repeat
                    assert head in texts

                    # 3. Stop: the producer is cancelled and the stream ends with one abort.
                    await opened(page, f"{origin}/chat/stop")
                    await page.get_by_role("button", name="Send").click()
                    with anyio.fail_after(30):
                        await partial_written.wait()
                    await page.wait_for_function(
                        "document.querySelector('p[data-role=assistant]')?.textContent === 'Partial'", timeout=30_000
                    )
                    await page.get_by_role("button", name="Stop").click()
                    with anyio.fail_after(30):
                        await cancelled.wait()
                    await page.wait_for_selector("div[data-status=ready]", timeout=30_000)
                    assert await assistant.text_content() == "Partial"
                    with anyio.fail_after(10):
                        await stop_ended.wait()
                    aborts = [e for e in seen if isinstance(e, AbortEvent) and e.stream == streams["stop"]]
                    assert [(a.by, a.seq) for a in aborts] == [("client", 2)]
                    again = await http.post(f"{origin}/api/chat/stop/abort")  # nothing is live any more
                    assert again.json()["outcome"] == "ended"

                    # Bad input and attacks, through the same routes.
                    bad = await http.post(f"{origin}/api/chat", content=b"{not json")
                    assert bad.status_code == 400 and 'chat "id"' in bad.text
                    no_id = await http.post(f"{origin}/api/chat", json={"messages": []})
                    assert no_id.status_code == 400
                    cross = await http.post(
                        f"{origin}/api/chat/exact/abort", headers={"Origin": "https://evil.example"}
                    )
                    assert cross.status_code == 403
                    forged = await http.post(
                        f"{origin}/api/chat", headers={"Origin": "null"}, json={"id": "x", "messages": []}
                    )
                    assert forged.status_code == 403
                    assert len(requests) == 3  # neither refused post started a generation
                    assert TOKEN not in await page.content()
                    for url in set(scripts):  # the token stays on the server
                        assert TOKEN not in (await http.get(url)).text, url
                    assert scripts
                    assert errors == []
                finally:
                    await browser.close()
        await bus.shutdown()
