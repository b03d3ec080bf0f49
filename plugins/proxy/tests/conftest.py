"""Fixtures: a recording served by the mock model server, a scripted upstream, and a proxy on a running bus."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from streambus_proxy import serve_proxy
from streambus_stats import StatsSink

from streambus import Bus
from streambus.builtins.recorder import RecorderSink
from streambus.events import DeltaEvent, EndEvent, StartEvent, Usage
from streambus.mockserver import MockServer
from streambus.recording import write_recording
from streambus.testing import EventCapture, ScriptedUpstream, scripted_upstream

FAKE_KEY = "sk-streambus-FAKE-KEY-0123456789abcdef"
"""A recognisable fake credential: it must never appear in a recording or a log."""

OLLAMA_TEXT = ["The", " sky", " is", " blue", " because", " of", " Rayleigh", " scattering", "."]
OPENAI_TEXT = ["Hello", " there", ",", " this", " is", " forbidden", " fruit", " talk", "."]


@pytest.fixture
def anyio_backend() -> str:
    """The proxy uses aiohttp, which is asyncio-bound; trio is checked to fail clearly."""
    return "asyncio"


def _stream(stream: str, model: str, provider: str, pieces: list[str], t0: float) -> list[Any]:
    events: list[Any] = [StartEvent(stream=stream, seq=0, ts=t0, model=model, provider=provider)]
    for i, text in enumerate(pieces, 1):
        events.append(DeltaEvent(stream=stream, seq=i, ts=t0 + 0.001 * i, text=text))
    usage = Usage(prompt_tokens=7, completion_tokens=len(pieces), total_tokens=7 + len(pieces))
    events.append(EndEvent(stream=stream, seq=len(pieces) + 1, ts=t0 + 0.05, reason="stop", usage=usage))
    return events


@pytest.fixture
def recording(tmp_path: Path) -> Path:
    """One recorded stream per model: ``llama3.2`` (Ollama text) and ``gpt-4o-mini`` (OpenAI text)."""
    path = tmp_path / "upstream.jsonl"
    events = _stream("rec-llama", "llama3.2", "ollama", OLLAMA_TEXT, 1763769600.0)
    events += _stream("rec-gpt", "gpt-4o-mini", "openai", OPENAI_TEXT, 1763769700.0)
    write_recording(path, events)
    return path


@pytest.fixture
async def mock(recording: Path) -> AsyncIterator[MockServer]:
    """``serve-mock``'s server on a free loopback port in this loop (burst: no recorded pauses)."""
    async with MockServer(recording, burst=True) as server:
        yield server


@dataclass
class Env:
    """A running bus with a capture, a recorder and the stats sink behind a proxy at ``url``."""

    bus: Bus
    url: str
    capture: EventCapture
    raw: EventCapture
    recorder_path: Path
    stats: StatsSink


@pytest.fixture
def proxy_env(tmp_path: Path) -> Callable[..., Any]:
    """``async with proxy_env(upstream_url, stage=None, **options) as env``: a bus and a proxy in front of it."""

    @asynccontextmanager
    async def start(upstream: str, *, stage: Any = None, **options: Any) -> AsyncIterator[Env]:
        recorder_path = tmp_path / "proxied.jsonl"
        async with Bus() as bus:
            if stage is not None:
                bus.add_sink(stage, name="moderation")
            capture = EventCapture().attach(bus, name="capture")
            raw = EventCapture(raw=True).attach(bus, name="raw")
            bus.add_sink(RecorderSink(path=str(recorder_path), fsync="every_event"), name="recorder")
            stats = StatsSink(interval=0, tokenizer="approx", read_pause=0)
            bus.add_sink(stats, name="stats")
            async with serve_proxy(bus, upstream, **options) as url:
                yield Env(bus, url, capture, raw, recorder_path, stats)
            await bus.shutdown()

    return start


# -- a scripted upstream for the failure cases ------------------------------------------------


Upstream = ScriptedUpstream


@pytest.fixture
async def scripted() -> AsyncIterator[Upstream]:
    """Start the scripted upstream on 127.0.0.1 (a free port)."""
    async with scripted_upstream("application/x-ndjson") as state:
        yield state


@pytest.fixture
async def clients() -> AsyncIterator[Any]:
    """Factories for the official async clients, closed when the test ends."""
    import ollama
    import openai

    made: list[Any] = []

    class Clients:
        def ollama(self, url: str, **kwargs: Any) -> ollama.AsyncClient:
            client = ollama.AsyncClient(host=url, **kwargs)
            made.append(client)
            return client

        def openai(self, url: str, **kwargs: Any) -> openai.AsyncOpenAI:
            kwargs.setdefault("max_retries", 0)
            client = openai.AsyncOpenAI(base_url=url + "/v1", **kwargs)
            made.append(client)
            return client

    yield Clients()
    for client in made:
        if isinstance(client, ollama.AsyncClient):
            await client._client.aclose()
        else:
            await client.close()
