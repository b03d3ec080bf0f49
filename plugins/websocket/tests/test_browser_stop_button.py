"""The live page's stop button in Debian's chromium: a click stops the stream on the bus (the ``abort`` op)."""

from __future__ import annotations

import os
import shutil

import anyio
import pytest
from streambus_websocket.testing import running

from streambus import AbortEvent

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


@pytest.fixture
def anyio_backend() -> str:
    """Playwright's async API needs asyncio."""
    return "asyncio"


async def test_the_stop_button_stops_a_live_stream() -> None:
    chromium = shutil.which("chromium")
    if chromium is None:
        if os.environ.get("CI") == "true":
            pytest.fail("chromium is missing: run scripts/bootstrap.sh --browser (apt-get install chromium)")
        pytest.skip("Debian's chromium is not installed (apt-get install chromium)")
    from playwright.async_api import async_playwright

    async with running(token="button-token") as (bus, sink), async_playwright() as pw:
        seen = bus.subscribe()
        cancelled = anyio.Event()
        written = anyio.Event()

        async def produce() -> None:
            try:
                async with bus.stream(model="m", stream="long-answer") as w:
                    await w.delta("Once upon a time")
                    written.set()
                    await anyio.sleep_forever()  # a model that would go on and on
            finally:
                cancelled.set()

        browser = await pw.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS, headless=True)
        try:
            # The page's CSP forbids eval; Playwright's wait_for_function strings need it.
            page = await browser.new_page(bypass_csp=True)
            await page.goto(sink.page_url + "?token=button-token")
            await page.wait_for_function("document.querySelector('#status').dataset.state === 'live'", timeout=20_000)
            bus.start_soon(produce)
            await written.wait()
            card = "[data-stream=long-answer]"
            await page.wait_for_function(
                f"(document.querySelector('{card} .content')?.textContent || '') === 'Once upon a time'",
                timeout=20_000,
            )
            await page.click(f"{card} button.stop")
            await page.wait_for_function(f"document.querySelector('{card}').dataset.state === 'abort'", timeout=20_000)
            assert await page.is_hidden(f"{card} button.stop")  # only live streams offer it
            assert await page.text_content(f"{card} .foot") == "aborted by client: stopped from the live page"
            assert await page.text_content(f"{card} .content") == "Once upon a time"
        finally:
            await browser.close()
        with anyio.fail_after(5):
            await cancelled.wait()
            async for event in seen:
                if isinstance(event, AbortEvent):
                    assert (event.stream, event.by) == ("long-answer", "client")
                    break
