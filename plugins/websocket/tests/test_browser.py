"""The live page in headless Chromium: a replayed recording appears token by token and survives a drop.

Debian's ``chromium`` driven by Playwright's asyncio API (so this test runs on
the asyncio backend only, in the same loop as the server). Set
``STREAMBUS_SCREENSHOT=path.png`` to save a screenshot of the page.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import anyio
import pytest
from streambus_websocket.testing import running

from streambus import DeltaEvent, EndEvent, Event, StartEvent, Usage
from streambus.recording import write_recording
from streambus.replay import ReplayProducer

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
REASONING = "The user greets me and asks about streaming. I should explain it briefly."
ANSWER = (
    "Streaming lets you read the answer while the model is still writing it. "
    "Each token travels through the bus to every subscriber, and a reconnecting "
    "page resumes exactly where it stopped."
)
SECOND = "Paris is the capital of France."
THIRD = "Once upon a time, a very patient model kept writing a long story for a slow reader... " * 6


@pytest.fixture
def anyio_backend() -> str:
    """Playwright's async API needs asyncio."""
    return "asyncio"


def _words(text: str) -> list[str]:
    import re

    return re.findall(r"\s*\S+", text)


def _recording(path: Path) -> None:
    events: list[Event] = []
    t = 1_700_000_000.0

    def stream(sid: str, model: str, provider: str, start: float, parts: list[tuple[str, str]], gap: float) -> None:
        events.append(StartEvent(stream=sid, seq=0, ts=start, model=model, provider=provider, meta={"user": "demo"}))
        ts = start + 0.1
        for seq, (channel, text) in enumerate(parts, start=1):
            events.append(DeltaEvent(stream=sid, seq=seq, ts=ts, text=text, channel=channel))  # type: ignore[arg-type]
            ts += gap
        words = sum(1 for channel, _ in parts if channel == "content")
        usage = Usage(prompt_tokens=18, completion_tokens=words, total_tokens=18 + words)
        events.append(EndEvent(stream=sid, seq=len(parts) + 1, ts=ts, reason="stop", usage=usage))

    stream(
        "answer",
        "qwen3:4b",
        "ollama",
        t,
        [("reasoning", w) for w in _words(REASONING)] + [("content", w) for w in _words(ANSWER)],
        0.04,
    )
    stream("capital", "llama3.2", "ollama", t + 0.3, [("content", w) for w in _words(SECOND)], 0.05)
    stream("story", "gpt-4o-mini", "openai", t + 1.0, [("content", w) for w in _words(THIRD)], 0.06)
    events.sort(key=lambda e: e.ts)
    write_recording(path, events)


async def test_live_page_shows_a_replayed_stream_and_resumes_after_a_drop(tmp_path: Path) -> None:
    chromium = shutil.which("chromium")
    if chromium is None:
        if os.environ.get("CI") == "true":
            pytest.fail("chromium is missing: run scripts/bootstrap.sh --browser (apt-get install chromium)")
        pytest.skip("Debian's chromium is not installed (apt-get install chromium)")
    from playwright.async_api import async_playwright

    recording = tmp_path / "demo.jsonl"
    _recording(recording)
    async with running(token="browser-token") as (bus, sink), async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS, headless=True)
        try:
            # The page's CSP forbids eval; Playwright's wait_for_function strings need it.
            page = await browser.new_page(viewport={"width": 1200, "height": 860}, bypass_csp=True)
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            await page.goto(sink.page_url + "?token=browser-token")
            await page.wait_for_function("document.querySelector('#status').dataset.state === 'live'", timeout=20_000)

            replay = ReplayProducer(path=str(recording), keep_ids=True)
            bus.start_producer(replay)
            # Text appears token by token...
            await page.wait_for_function(
                "(document.querySelector('[data-stream=answer] .content')?.textContent || '').length > 20",
                timeout=20_000,
            )
            partial = await page.text_content("[data-stream=answer] .content")
            assert partial is not None and ANSWER.startswith(partial) and partial != ANSWER
            # ... the connection drops mid-stream; the page reconnects and resumes.
            assert sink.close_clients() == 1
            await page.wait_for_function("document.body.dataset.resumes === '1'", timeout=20_000)
            await page.wait_for_function(
                "['answer', 'capital'].every("
                "s => document.querySelector(`[data-stream=${s}]`)?.dataset.state === 'end')",
                timeout=30_000,
            )
            assert await page.text_content("[data-stream=answer] .content") == ANSWER
            assert await page.text_content("[data-stream=answer] .reasoning-text") == REASONING
            assert await page.text_content("[data-stream=capital] .content") == SECOND
            assert await page.text_content("[data-stream=answer] .model") == "qwen3:4b"
            foot = await page.text_content("[data-stream=answer] .foot") or ""
            answer_words = len(_words(ANSWER))
            assert "end: stop" in foot and f"completion {answer_words}" in foot
            assert f"total {18 + answer_words} tokens" in foot
            assert await page.get_attribute("body", "data-duplicates") == "0"
            log = await page.text_content("#connlog") or ""
            assert "connection lost (code 1012" in log and "missed events recovered" in log
            assert errors == []
            screenshot = os.environ.get("STREAMBUS_SCREENSHOT")
            if screenshot:
                await page.wait_for_function(
                    "(document.querySelector('[data-stream=story] .content')?.textContent || '').length > 120",
                    timeout=20_000,
                )
                await page.set_viewport_size({"width": 1200, "height": 590})
                await page.screenshot(path=screenshot)
        finally:
            await browser.close()


async def test_page_opened_after_streams_ended_shows_them_from_history() -> None:
    chromium = shutil.which("chromium")
    if chromium is None:
        if os.environ.get("CI") == "true":
            pytest.fail("chromium is missing: run scripts/bootstrap.sh --browser (apt-get install chromium)")
        pytest.skip("Debian's chromium is not installed (apt-get install chromium)")
    from playwright.async_api import async_playwright

    async with running() as (bus, sink), async_playwright() as pw:
        async with bus.stream(stream="done", model="llama3.2", provider="ollama") as w:
            await w.delta("Paris is ")
            await w.delta("the capital.")
            await w.end("stop", usage=Usage(prompt_tokens=5, completion_tokens=2, total_tokens=7))
        async with bus.stream(stream="failed", model="qwen3", provider="ollama") as w:
            await w.delta("half")
            await w.error("upstream", "model crashed")
        for _ in range(1000):  # the broadcaster records in its own task: poll its history, bounded
            if all((log := sink.history.get(s)) is not None and log.ended for s in ("done", "failed")):
                break
            await anyio.sleep(0.01)
        live = bus.stream(stream="live", model="gpt-4o-mini", provider="openai")
        async with live as w:
            await w.delta("still ")
            browser = await pw.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS, headless=True)
            try:
                page = await browser.new_page(bypass_csp=True)
                errors: list[str] = []
                page.on("pageerror", lambda exc: errors.append(str(exc)))
                await page.goto(sink.page_url)
                await page.wait_for_function(
                    "document.querySelector('#status').dataset.state === 'live'", timeout=20_000
                )
                await w.delta("writing")
                await page.wait_for_function(
                    "document.querySelector('[data-stream=live] .content')?.textContent === 'still writing'",
                    timeout=20_000,
                )
                assert await page.get_attribute("[data-stream=done]", "data-state") == "end"
                assert await page.text_content("[data-stream=done] .content") == "Paris is the capital."
                assert await page.text_content("[data-stream=done] .model") == "llama3.2"
                assert "total 7 tokens" in (await page.text_content("[data-stream=done] .foot") or "")
                assert await page.get_attribute("[data-stream=failed]", "data-state") == "error"
                assert "model crashed" in (await page.text_content("[data-stream=failed] .foot") or "")
                # Newest on top: the live stream, then the streams in the order they ended, latest first.
                order = await page.eval_on_selector_all("article.stream", "els => els.map(e => e.dataset.stream)")
                assert order == ["live", "failed", "done"]
                log = await page.text_content("#connlog") or ""
                assert "2 recently ended from history" in log
                assert errors == []
            finally:
                await browser.close()


async def test_live_page_reloads_when_it_follows_more_streams_than_a_subscribe_may_name() -> None:
    chromium = shutil.which("chromium")
    if chromium is None:
        if os.environ.get("CI") == "true":
            pytest.fail("chromium is missing: run scripts/bootstrap.sh --browser (apt-get install chromium)")
        pytest.skip("Debian's chromium is not installed (apt-get install chromium)")
    from playwright.async_api import async_playwright

    async with running(max_subscribe_streams=1) as (bus, sink), async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS, headless=True)
        try:
            page = await browser.new_page(bypass_csp=True)
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            await page.goto(sink.page_url)
            await page.wait_for_function("document.querySelector('#status').dataset.state === 'live'", timeout=20_000)
            async with bus.stream(model="m") as one, bus.stream(model="m") as two:
                await one.delta("one")
                await two.delta("two")
                ids = f"['{one.stream}', '{two.stream}']"
                shown = ids + ".every(s => document.querySelector(`[data-stream='${s}'] .content`)"
                await page.wait_for_function(shown + "?.textContent)", timeout=20_000)
                # Two streams to resume, one allowed per subscribe: the page reloads them from their snapshot.
                assert sink.close_clients() == 1
                await page.wait_for_function(
                    "(document.querySelector('#connlog').textContent || '').includes('reloaded from snapshot')",
                    timeout=20_000,
                )
                await one.delta(" more")
                await two.delta(" more")
            await page.wait_for_function(shown + "?.closest('[data-stream]').dataset.state === 'end')", timeout=20_000)
            assert await page.text_content(f"[data-stream='{one.stream}'] .content") == "one more"
            assert await page.text_content(f"[data-stream='{two.stream}'] .content") == "two more"
            assert errors == []
        finally:
            await browser.close()
