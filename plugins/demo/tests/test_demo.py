"""``streambus demo`` as a user runs it: a real process, real HTTP, a real WebSocket client, a real browser."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import orjson
import pytest
from anyio.abc import Process

from streambus import DeltaEvent, EndEvent, ErrorEvent, ModerationEvent, StartEvent
from streambus.recording import read_recording
from streambus.wire import ToolCall, merge_tool_calls, parse_tool_text

pytestmark = pytest.mark.anyio

CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]


@asynccontextmanager
async def demo(*args: str) -> AsyncIterator[tuple[Process, str, list[str]]]:
    """Start ``streambus demo`` and yield (process, page URL, output lines so far)."""
    process = await anyio.open_process(
        [sys.executable, "-m", "streambus", "demo", "--port", "0", "--no-live", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    lines: list[str] = []
    assert process.stdout is not None
    buffer = b""
    with anyio.fail_after(60):
        while "open http" not in "".join(lines):
            chunk = await process.stdout.receive()
            buffer += chunk
            *done, buffer = buffer.split(b"\n")
            lines.extend(line.decode() for line in done)
    page = re.search(r"open (http://\S+/)", "".join(lines))
    assert page is not None, lines

    async def drain() -> None:
        nonlocal buffer
        assert process.stdout is not None
        async for chunk in process.stdout:
            buffer += chunk
            *done, buffer = buffer.split(b"\n")
            lines.extend(line.decode() for line in done)

    async with anyio.create_task_group() as tg:
        tg.start_soon(drain)
        try:
            yield process, page.group(1), lines
        finally:
            with anyio.fail_after(90):
                await process.wait()
            tg.cancel_scope.cancel()


async def test_bounded_demo_exercises_every_component(tmp_path: Path) -> None:
    from websockets.asyncio.client import connect

    received: dict[str, str] = {}
    async with demo("--duration", "4", "--record-dir", str(tmp_path)) as (process, page, lines):
        ws_url = page.replace("http://", "ws://").rstrip("/") + "/ws"
        async with connect(ws_url) as ws:
            hello = orjson.loads(await ws.recv())
            assert hello["op"] == "hello"
            await ws.send(orjson.dumps({"op": "subscribe", "id": "t", "snapshot": True}).decode())
            with anyio.move_on_after(60):
                async for message in ws:
                    frame = orjson.loads(message)
                    if frame.get("type") == "delta" and frame.get("channel", "content") == "content":
                        received[frame["stream"]] = received.get(frame["stream"], "") + frame["text"]
                    if len(received) >= 3 and all(len(t) > 20 for t in received.values()):
                        break
    assert process.returncode == 0, "\n".join(lines)
    output = "\n".join(lines)
    assert f"WebSocket: {ws_url} " in output  # the demo says where to attach clients
    # a WebSocket client received text
    assert len(received) >= 3
    # the final stats are printed and non-empty
    assert re.search(r"final stats after [2-9] round\(s\)", output), output
    assert re.search(r"overall\s*│\s*1\d\s*│", output), output  # 10+ streams counted overall
    assert "flag=" in output  # moderation acted
    # a recording was written, and it holds whole streams
    recordings = [p async for p in anyio.Path(tmp_path).glob("*.jsonl")]
    assert len(recordings) == 1
    events = read_recording(Path(recordings[0])).events
    starts = [e for e in events if isinstance(e, StartEvent)]
    assert len(starts) >= 10
    assert {s.provider for s in starts} == {"ollama", "openai"}
    assert any(isinstance(e, EndEvent) for e in events)
    assert any(isinstance(e, ErrorEvent) for e in events)  # the recorded failure, as the producers saw it
    # the recorder subscribes to the moderated stream, so the verdicts are recorded too
    assert any(isinstance(e, ModerationEvent) for e in events)
    recorded: dict[str, str] = {}
    for e in events:
        if isinstance(e, DeltaEvent) and e.channel == "content":
            recorded[e.stream] = recorded.get(e.stream, "") + e.text
    assert sum(map(len, recorded.values())) > 1000
    # what the WebSocket client saw is exactly what was recorded for those streams
    for stream, text in received.items():
        assert text in recorded[stream]
    # the recorded tool call reached the bus whole (the demo asks qwen3 through the Ollama API)
    ends = {e.stream: e for e in events if isinstance(e, EndEvent)}
    providers = {s.stream: s.provider for s in starts}
    calls: dict[str, list[ToolCall]] = {}
    for stream, end in ends.items():
        if end.reason == "tool_calls":
            tool = [e for e in events if isinstance(e, DeltaEvent) and e.stream == stream and e.channel == "tool"]
            calls[providers[stream]] = merge_tool_calls(f for d in tool for f in parse_tool_text(d.text))
    assert set(calls) == {"ollama"}, calls
    for provider_calls in calls.values():
        (call,) = provider_calls
        assert call.name == "get_weather"
        assert orjson.loads(call.arguments) == {"city": "Kyoto", "unit": "celsius"}


async def test_demo_page_in_chromium_shows_streams_complete(tmp_path: Path) -> None:
    chromium = shutil.which("chromium")
    if chromium is None:
        if os.environ.get("CI") == "true":
            pytest.fail("chromium is missing: run scripts/bootstrap.sh --browser (apt-get install chromium)")
        pytest.skip("Debian's chromium is not installed (apt-get install chromium)")
    from playwright.async_api import async_playwright

    async with demo("--rounds", "3", "--record-dir", str(tmp_path)) as (_, page_url, _lines):
        async with async_playwright() as pw:
            browser = await pw.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS, headless=True)
            try:
                page = await browser.new_page(viewport={"width": 1280, "height": 900}, bypass_csp=True)
                errors: list[str] = []
                page.on("pageerror", lambda exc: errors.append(str(exc)))
                await page.goto(page_url)
                await page.wait_for_function(
                    "document.querySelectorAll('[data-stream][data-state=end]').length >= 3", timeout=60_000
                )
                await page.wait_for_function(
                    "[...document.querySelectorAll('.tool-text')].some(e => e.textContent.includes('get_weather('))",
                    timeout=60_000,
                )
                tool_call = await page.eval_on_selector_all(
                    ".tool-text", "els => els.map(e => e.textContent).find(t => t.includes('get_weather(')) || ''"
                )
                ended = await page.eval_on_selector_all(
                    "[data-stream][data-state=end]",
                    "els => els.map(e => e.querySelector('.content')?.textContent || '')",
                )
                shot = os.environ.get("STREAMBUS_SCREENSHOT")
                if shot:
                    await page.screenshot(path=shot, full_page=False)
            finally:
                await browser.close()
    assert errors == []
    name, _, arguments = tool_call.partition("(")
    assert name == "get_weather"
    assert orjson.loads(arguments.removesuffix(")")) == {"city": "Kyoto", "unit": "celsius"}
    assert len(ended) >= 3
    assert sum(len(text) > 20 for text in ended) >= 2


def test_openai_without_model_is_a_usage_error() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "streambus", "demo", "--openai", "http://127.0.0.1:9/v1"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "--openai needs --model" in result.stderr


@pytest.mark.parametrize("columns", [80, 130])
def test_live_table_fits_the_terminal_and_keeps_the_key_columns(columns: int, tmp_path: Path) -> None:
    from rich.cells import cell_len

    argv = ["demo", "--port", "0", "--live", "--rounds", "1", "--speed", "20", "--record-dir", str(tmp_path)]
    result = subprocess.run(
        [sys.executable, "-m", "streambus", *argv],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "COLUMNS": str(columns)},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    # Without a terminal, rich prints the live table once, in its final state, before the final stats.
    first = lines.index(next(line for line in lines if line.startswith("streambus demo — live streams")))
    table = lines[first : lines.index(next(line for line in lines if line.startswith("final stats")))]
    assert max(cell_len(line) for line in table) <= columns, "\n".join(table)
    header = [cell.strip() for cell in table[2].strip("┃").split("┃")]
    assert {"stream", "model", "status", "chars"} <= set(header), header
    assert ("latest text" in header) == (columns > 100)
    rows = [line for line in table if line.startswith("│")]
    assert len(rows) == 5  # one round of the bundled recording: 3 Ollama + 2 OpenAI streams
    statuses = [[cell.strip() for cell in row.strip("│").split("│")][header.index("status")] for row in rows]
    assert all(status.startswith(("end: ", "error: ")) for status in statuses), statuses


def test_port_in_use_is_a_clear_error(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "streambus",
                "demo",
                "--port",
                str(port),
                "--rounds",
                "1",
                "--no-live",
                "--record-dir",
                str(tmp_path),
            ],
            capture_output=True,
            text=True,
            timeout=90,
        )
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"error: port {port} on 127.0.0.1 is in use: try --port 0" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(("flag", "what"), [("--ollama", "Ollama"), ("--openai", "the OpenAI-compatible server")])
def test_unreachable_server_is_said_once(flag: str, what: str, tmp_path: Path) -> None:
    with socket.socket() as closed:  # a port nobody listens on
        closed.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{closed.getsockname()[1]}"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "streambus",
            "demo",
            flag,
            url,
            "--model",
            "m",
            "--port",
            "0",
            "--no-live",
            "--duration",
            "5",
            "--record-dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert result.stderr.count(f"error: cannot reach {what} at {url}: ") == 1, result.stderr
    assert "connect" not in result.stdout  # no rounds were played, no per-stream errors
    assert "Traceback" not in result.stderr


def _recordings(directory: Path) -> list[Path]:
    return sorted(directory.glob("*.jsonl"))


def _recorded_sizes(directory: Path) -> list[int]:
    return [p.stat().st_size for p in _recordings(directory)]


async def test_ctrl_c_stops_cleanly_and_prints_final_stats(tmp_path: Path) -> None:
    import signal

    async with demo("--record-dir", str(tmp_path)) as (process, _page, lines):
        with anyio.fail_after(60):
            while True:
                # wait until a stream has been recorded, then press Ctrl-C
                if any(size > 500 for size in _recorded_sizes(tmp_path)):
                    break
                await anyio.sleep(0.1)
        process.send_signal(signal.SIGINT)
    output = "\n".join(lines)
    assert process.returncode == 0, output
    assert "stopping" in output
    assert "final stats after" in output
    assert "Traceback" not in output
    events = read_recording(_recordings(tmp_path)[0], lenient=True).events
    # streams cut by Ctrl-C end with abort by shutdown, never without a terminal event
    starts = {e.stream for e in events if isinstance(e, StartEvent)}
    ended = {e.stream for e in events if type(e).__name__ in ("EndEvent", "ErrorEvent", "AbortEvent")}
    assert starts == ended
