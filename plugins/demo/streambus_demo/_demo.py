"""``streambus demo``: every part of streambus working together, on loopback.

A mock model server replays the bundled recording in the Ollama and OpenAI
wire formats; the real ``ollama`` and ``openai`` producers read several
concurrent streams from it over HTTP; the bus fans them out to moderation
(observe mode, a demo word list), stats, the recorder and the WebSocket
broadcaster with its live page; the terminal shows a live table, fitted to
the terminal's width: columns that do not fit go, least important first
(provider, flags, chunks/s, TTFC ...; stream, status and model stay), and
the latest text takes what room is left.
"""

from __future__ import annotations

import dataclasses
import signal
import sys
import tempfile
import time
from importlib.resources import as_file, files
from pathlib import Path
from typing import Any, TextIO

import anyio
import structlog

from streambus import (
    AbortEvent,
    Bus,
    DeltaEvent,
    EndEvent,
    ErrorEvent,
    ModerationEvent,
    StartEvent,
    StreamBusError,
    Subscription,
)
from streambus.plugins import build

__all__ = ["DemoError", "DemoOptions", "run_demo"]

log = structlog.get_logger("streambus.demo")

# Words the demo's keyword moderator flags (observe mode): common enough in
# the bundled answers that flags show up on the page and in the stats.
DEMO_WATCHLIST = {"demo-watchlist": ["memory", "slow", "disconnect", "遅い"]}

PROMPTS = {
    "llama3.2": "What is a streaming event bus?",
    "qwen3": "How does resuming a dropped WebSocket work?",
    "gpt-4o-mini": "ストリーミングとは何ですか？",
}


class DemoError(StreamBusError):
    """The demo could not start (a port in use, a server that does not answer)."""


@dataclasses.dataclass
class DemoOptions:
    """What ``streambus demo`` was asked to do."""

    duration: float | None = None
    host: str = "127.0.0.1"
    port: int = 8765
    record_dir: str | None = None
    speed: float = 1.0
    ollama_url: str | None = None
    openai_url: str | None = None
    model: str | None = None
    live: bool | None = None
    rounds: int | None = None


@dataclasses.dataclass
class _Row:
    stream: str
    model: str
    provider: str
    started: float
    status: str = "streaming"
    chars: int = 0
    chunks: int = 0
    first: float | None = None
    last: float | None = None
    flags: int = 0
    tail: str = ""


class LiveView:
    """A sink that keeps one row per stream for the terminal view."""

    overflow = "coalesce"  # a slow terminal must never slow the bus

    def __init__(self) -> None:
        self.rows: dict[str, _Row] = {}
        self.delivered_chars = 0
        self._changed: anyio.Event | None = None

    async def settled(self) -> None:
        """Wait until every stream the view has seen has ended."""
        while any(row.status == "streaming" for row in self.rows.values()):
            self._changed = anyio.Event()
            await self._changed.wait()

    async def run(self, events: Subscription) -> None:
        """Update rows from events until the subscription ends."""
        while batch := await events.receive_batch():
            now = time.monotonic()
            for event in batch:
                if isinstance(event, StartEvent):
                    self.rows[event.stream] = _Row(event.stream, event.model, event.provider, now)
                    continue
                row = self.rows.get(event.stream)
                if row is None:
                    continue
                if isinstance(event, DeltaEvent):
                    if event.text and row.first is None:
                        row.first = now
                    row.chars += len(event.text)
                    row.chunks += event.n
                    row.last = now
                    self.delivered_chars += len(event.text)
                    if event.channel == "content":
                        row.tail = (row.tail + event.text)[-40:]
                elif isinstance(event, ModerationEvent):
                    row.flags += 1
                elif isinstance(event, EndEvent):
                    row.status = f"end: {event.reason}"
                elif isinstance(event, ErrorEvent):
                    row.status = f"error: {event.kind}"
                elif isinstance(event, AbortEvent):
                    row.status = f"abort: {event.by}"
            if self._changed is not None:
                self._changed.set()

    def _cells(self, row: _Row) -> dict[str, str]:
        rate = ""
        if row.first and row.last and row.last > row.first:
            rate = f"{row.chunks / (row.last - row.first):.1f}"
        return {
            "stream": row.stream[-10:],
            "model": row.model,
            "provider": row.provider,
            "status": row.status,
            "chars": str(row.chars),
            "chunks/s": rate,
            "TTFC": f"{(row.first - row.started) * 1000:.0f} ms" if row.first else "…",
            "flags": str(row.flags or ""),
            "latest text": row.tail.replace("\n", " "),
        }

    def table(self, width: int = 120) -> Any:
        """A rich Table of the most recent streams that fits in *width* terminal columns.

        Columns that do not fit are left out, least important first (see
        ``_COLUMNS``); the latest text takes the room that is left, if any.
        """
        from rich.cells import cell_len
        from rich.table import Table
        from rich.text import Text

        rows = [self._cells(row) for row in list(self.rows.values())[-12:]]
        chosen: set[str] = set()
        used = 1  # the table's right border
        for name in _COLUMNS:
            need = max([cell_len(name), *(cell_len(cells[name]) for cells in rows)]) + 3  # padding and border
            if used + need <= width:
                chosen.add(name)
                used += need
        text_width = width - used - 3
        if text_width >= 8:
            chosen.add("latest text")
        table = Table(title="streambus demo — live streams", title_justify="left")
        for name, justify in _DISPLAY:
            if name in chosen:
                table.add_column(
                    name,
                    justify=justify,  # type: ignore[arg-type]
                    no_wrap=True,
                    overflow="ellipsis",
                    width=text_width if name == "latest text" else None,
                )
        for cells in rows:
            status = cells["status"]
            style = "green" if status.startswith("end") else "red" if "error" in status else ""
            table.add_row(
                *(Text(cells[name], style=style if name == "status" else "") for name, _ in _DISPLAY if name in chosen)
            )
        return table


# The live table's columns, most important first: at 80 columns the last ones go.
_COLUMNS = ("stream", "status", "model", "chars", "TTFC", "chunks/s", "flags", "provider")
_DISPLAY = (
    ("stream", "left"),
    ("model", "left"),
    ("provider", "left"),
    ("status", "left"),
    ("chars", "right"),
    ("chunks/s", "right"),
    ("TTFC", "right"),
    ("flags", "right"),
    ("latest text", "left"),
)


def _producers(opts: DemoOptions, ollama_url: str | None, openai_url: str | None) -> list[Any]:
    producers = []
    if ollama_url:
        models = [opts.model] if opts.model and opts.ollama_url else ["llama3.2", "qwen3", "llama3.2"]
        producers.append(
            build(
                "producers",
                "ollama",
                {
                    "url": ollama_url,
                    "requests": [
                        {
                            "model": m,
                            "messages": [{"role": "user", "content": PROMPTS.get(m, PROMPTS["llama3.2"])}],
                            **({"think": True} if m == "qwen3" else {}),
                            "meta": {"demo": True},
                        }
                        for m in models
                    ],
                    "concurrency": 3,
                    "retries": 0,
                },
                location="demo.ollama",
            )
        )
    if openai_url:
        models = [opts.model] if opts.model and opts.openai_url else ["gpt-4o-mini", "gpt-4o-mini"]
        producers.append(
            build(
                "producers",
                "openai",
                {
                    "base_url": openai_url,
                    "api_key_env": None,
                    "requests": [
                        {
                            "model": m,
                            "messages": [{"role": "user", "content": PROMPTS.get(m, PROMPTS["gpt-4o-mini"])}],
                            "meta": {"demo": True},
                        }
                        for m in models
                    ],
                    "concurrency": 2,
                    "retries": 0,
                },
                location="demo.openai",
            )
        )
    return producers


async def run_demo(opts: DemoOptions, out: TextIO | None = None) -> dict[str, Any]:
    """Run the demo; return a summary (stats snapshot, recording paths, page URL)."""
    from streambus.mockserver import MockServer

    out = out or sys.stdout
    live = opts.live if opts.live is not None else out.isatty()
    record_dir = Path(opts.record_dir) if opts.record_dir else Path(tempfile.mkdtemp(prefix="streambus-demo-"))
    record_dir.mkdir(parents=True, exist_ok=True)

    mock: MockServer | None = None
    ollama_url, openai_url = opts.ollama_url, opts.openai_url
    # A real server that does not answer is said once, before anything starts (not one error per round).
    if ollama_url:
        await _reachable("Ollama", ollama_url, ollama_url.rstrip("/") + "/api/version")
    if openai_url:
        await _reachable("the OpenAI-compatible server", openai_url, openai_url.rstrip("/") + "/models")
    if not ollama_url and not openai_url:
        with as_file(files("streambus") / "data" / "recordings" / "demo.jsonl") as recording:
            mock = MockServer(Path(recording), speed=opts.speed)
        base = await mock.start("127.0.0.1", 0)
        ollama_url, openai_url = base, f"{base}/v1"

    moderation = build(
        "sinks",
        "moderation",
        {
            "mode": "observe",
            "action": "flag",
            "moderator": {"type": "keywords", "words": DEMO_WATCHLIST},
            "window_chars": 64,
        },
        location="demo.moderation",
    )
    stats = build("sinks", "stats", {"interval": 3600.0, "tokenizer": "approx"}, location="demo.stats")
    recorder = build("sinks", "recorder", {"path": str(record_dir / "{date}.jsonl")}, location="demo.recorder")
    websocket = build("sinks", "websocket", {"host": opts.host, "port": opts.port}, location="demo.websocket")
    view = LiveView()

    started = time.monotonic()
    rounds = 0
    summary: dict[str, Any] = {}
    try:
        async with Bus() as bus:
            bus.add_sink(moderation, name="moderation")
            bus.add_sink(stats, name="stats")
            bus.add_sink(recorder, name="recorder")
            bus.add_sink(websocket, name="websocket", critical=True)
            bus.add_sink(view, name="live-view")
            await _wait_listening(websocket, opts.host, opts.port)
            page = websocket.page_url
            print(f"streambus demo: open {page} to watch the streams live", file=out, flush=True)
            print(f"  WebSocket: {websocket.url} (streambus tail {websocket.url})", file=out, flush=True)
            print(f"  recordings: {record_dir}", file=out, flush=True)
            if mock is not None:
                print(f"  mock model server: {mock.url} (Ollama API) and {mock.url}/v1 (OpenAI API)", file=out)
            print("  Ctrl-C stops and prints the final stats.\n", file=out, flush=True)

            async def play() -> None:
                nonlocal rounds
                while True:
                    async with anyio.create_task_group() as tg:
                        for producer in _producers(opts, ollama_url, openai_url):
                            tg.start_soon(producer.run, bus)
                    rounds += 1
                    elapsed = time.monotonic() - started
                    if opts.rounds is not None and rounds >= opts.rounds:
                        return
                    if opts.duration is not None and elapsed >= opts.duration:
                        return
                    await anyio.sleep(0.5)

            async with anyio.create_task_group() as tg:

                async def stop_on_signal() -> None:
                    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                        async for _ in signals:
                            print("\nstopping…", file=out, flush=True)
                            await bus.shutdown("demo stopped")
                            tg.cancel_scope.cancel()
                            return

                async def main() -> None:
                    await play()
                    # Every stream has ended on the bus; let the live view catch up (bounded) before it is drawn last.
                    with anyio.move_on_after(2):
                        await view.settled()
                    tg.cancel_scope.cancel()

                tg.start_soon(stop_on_signal)
                tg.start_soon(main)
                if live:
                    tg.start_soon(_render_live, view, out)
    finally:
        if mock is not None:
            await mock.close()

    from streambus_stats import render_tables

    print(f"\nfinal stats after {rounds} round(s), {time.monotonic() - started:.1f} s:", file=out)
    render_tables(stats.aggregator, out)
    paths = sorted(str(p) for p in record_dir.glob("*.jsonl"))
    print(f"recorded: {', '.join(paths) or 'nothing'}", file=out, flush=True)
    summary = {
        "rounds": rounds,
        "page": page,
        "recordings": paths,
        "stats": stats.snapshot(streams=False),
        "delivered_chars": view.delivered_chars,
    }
    return summary


async def _reachable(what: str, url: str, probe: str) -> None:
    """Raise :class:`DemoError` "cannot reach WHAT at URL: reason" when *probe* gets no HTTP answer at all.

    Any HTTP status counts as reachable (a 401 or 404 is the server's answer,
    which the producers then report per stream); only a connection that fails
    or times out stops the demo.
    """
    import aiohttp

    try:
        timeout = aiohttp.ClientTimeout(total=10)
        async with aiohttp.ClientSession(timeout=timeout) as session, session.get(probe) as response:
            await response.read()
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
        reason = str(exc) or type(exc).__name__
        raise DemoError(f"cannot reach {what} at {url}: {reason}") from None


async def _wait_listening(websocket: Any, host: str, port: int) -> None:
    # The sink binds in setup(); the page URL is known once it listens.
    try:
        with anyio.fail_after(15):
            await websocket.wait_ready()
    except TimeoutError:
        raise DemoError(
            f"the WebSocket broadcaster did not start on {host}:{port} (port in use? try --port 0)"
        ) from None


async def _render_live(view: LiveView, out: TextIO) -> None:
    from rich.console import Console
    from rich.live import Live

    console = Console(file=out)
    with Live(view.table(console.width), console=console, refresh_per_second=4, transient=False) as live:
        try:
            while True:
                await anyio.sleep(0.25)
                live.update(view.table(console.width))  # the terminal may have been resized
        finally:
            live.update(view.table(console.width))  # what stays on screen (or in the file) is the final state
