"""The docs' ten-line browser example (clients/js/examples/browser.html) in Debian's chromium.

The page imports the built package (``dist/``) as an ES module from a static server on loopback
and follows a broadcaster whose ``allowed_origins`` lists that server; a stream published
through the bus appears in the page, and a dropped connection is resumed without a gap.
"""

from __future__ import annotations

import functools
import os
import shutil
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import anyio
import pytest
from streambus_websocket.testing import running

from streambus import Usage

pytestmark = [pytest.mark.anyio, pytest.mark.browser]

JS = Path(__file__).resolve().parents[1]
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run"]


@pytest.fixture
def anyio_backend() -> str:
    """Playwright's async API runs on asyncio."""
    return "asyncio"


class _Quiet(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        """Keep the test output clean."""


@contextmanager
def static_server() -> Iterator[str]:
    """Serve clients/js on a free loopback port; yields its origin."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(JS)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def _need(what: str | None) -> None:
    if what is not None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI runs the browser example, but {what}")
        pytest.skip(what)


async def test_ten_line_example_follows_a_stream_across_a_drop() -> None:
    """The example shows a stream's text as it arrives and keeps it exact across a server restart."""
    chromium = shutil.which("chromium")
    npm = shutil.which("npm")
    _need(None if chromium else "Debian's chromium is not installed (apt-get install chromium)")
    _need(None if npm and (JS / "node_modules" / "typescript").exists() else "clients/js needs `npm ci` (bootstrap.sh)")
    assert chromium is not None and npm is not None
    await anyio.run_process([npm, "run", "--silent", "build"], cwd=JS)
    from playwright.async_api import async_playwright

    with static_server() as origin:
        async with running(allowed_origins=[origin]) as (bus, sink), async_playwright() as pw:
            browser = await pw.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS, headless=True)
            try:
                page = await browser.new_page()
                errors: list[str] = []
                page.on("pageerror", lambda exc: errors.append(str(exc)))
                await page.goto(f"{origin}/examples/browser.html?ws={sink.url}")
                await page.wait_for_function("window.bus && window.bus.state === 'live'", timeout=20_000)
                async with bus.stream(model="demo", stream="example") as w:
                    await w.delta("Hello, ")
                    await page.wait_for_function(
                        "document.querySelector('[data-stream=example]')?.textContent === 'Hello, '", timeout=20_000
                    )
                    sink.close_clients()  # a server restart: the client reconnects and resumes
                    await w.delta("wörld")
                    await w.end()
                await page.wait_for_function(
                    "document.querySelector('[data-stream=example]')?.dataset.status === 'end'", timeout=20_000
                )
                assert await page.text_content("[data-stream=example]") == "Hello, wörld"
                assert await page.evaluate("window.bus.stats.duplicates") == 0
                assert await page.evaluate("window.bus.stats.resumes") == 1
                assert errors == []
            finally:
                await browser.close()


async def test_react_example_renders_with_the_hooks() -> None:
    """``useStream``, ``useStreams`` and ``useConnectionState`` re-render as a stream arrives."""
    chromium = shutil.which("chromium")
    npm = shutil.which("npm")
    _need(None if chromium else "Debian's chromium is not installed (apt-get install chromium)")
    _need(None if npm and (JS / "node_modules" / "react-dom").exists() else "clients/js needs `npm ci` (bootstrap.sh)")
    assert chromium is not None and npm is not None
    await anyio.run_process([npm, "run", "--silent", "examples"], cwd=JS)
    from playwright.async_api import async_playwright

    with static_server() as origin:
        async with running(allowed_origins=[origin]) as (bus, sink), async_playwright() as pw:
            browser = await pw.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS, headless=True)
            try:
                page = await browser.new_page()
                errors: list[str] = []
                page.on("pageerror", lambda exc: errors.append(str(exc)))
                await page.goto(f"{origin}/examples/react.html?ws={sink.url}")
                await page.wait_for_selector("main[data-state=live]", timeout=20_000)
                assert await page.text_content("#watched") == "(waiting)"
                async with bus.stream(model="demo", stream="watched") as w:
                    await w.delta("Paris ")
                    await page.wait_for_function(
                        "document.querySelector('#watched')?.textContent === 'Paris '", timeout=20_000
                    )
                    await w.delta('{"index":0,"name":"get_weather","arguments":"{}"}\n', channel="tool")
                    await w.delta("is sunny.")
                    await w.end(usage=Usage(prompt_tokens=2, completion_tokens=3, total_tokens=5))
                await page.wait_for_selector("#watched[data-status=end]", timeout=20_000)
                assert await page.text_content("#watched") == "Paris is sunny."
                assert await page.text_content("article[data-stream=watched] code") == "get_weather({})"
                assert await page.text_content("article[data-stream=watched] footer") == "5 tokens"
                assert errors == []
            finally:
                await browser.close()
