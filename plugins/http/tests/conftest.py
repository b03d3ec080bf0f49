from __future__ import annotations

import os

# Gradio and Hugging Face libraries must never reach the internet from the tests.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("GRADIO_SERVER_NAME", "127.0.0.1")
os.environ.setdefault("STREAMLIT_BROWSER_GATHER_USAGE_STATS", "false")

from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import pytest
from streambus_http import HttpSink

from streambus import Bus, StreamWriter, Usage


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    """Backend-neutral code runs under both; modules bound to asyncio override this."""
    return str(request.param)


@dataclass
class Served:
    bus: Bus
    sink: HttpSink
    url: str


@pytest.fixture
async def served(request: pytest.FixtureRequest) -> AsyncIterator[Served]:
    """A bus with the ``http`` sink listening on a free loopback port (asyncio only)."""
    marker = request.node.get_closest_marker("sink_options")
    options: dict[str, Any] = dict(marker.kwargs) if marker else {}
    async with Bus(drain_timeout=5) as bus:
        sink = HttpSink(port=0, **options)
        bus.add_sink(sink, name="http")
        url = await sink.started()
        yield Served(bus, sink, url)
        await bus.shutdown()


Parts = Sequence[tuple[str, str] | str]


async def write(
    bus: Bus,
    stream: str,
    parts: Parts,
    *,
    model: str = "m",
    ending: str = "end",
    meta: dict[str, Any] | None = None,
    between: Callable[[int], Awaitable[None]] | None = None,
) -> None:
    """Publish one stream: *parts* are texts or (channel, text); *ending* is end | error | abort."""
    async with bus.stream(model=model, provider="test", stream=stream, meta=meta) as w:
        await _write_parts(w, parts, between)
        if ending == "end":
            await w.end("stop", usage=Usage(prompt_tokens=3, completion_tokens=len(parts), total_tokens=3 + len(parts)))
        elif ending == "error":
            await w.error("upstream", "model crashed", retryable=True)
        elif ending == "abort":
            await w.abort("unsafe content", by="moderation")
        elif ending == "abort-client":
            await w.abort("user pressed stop", by="client")


async def _write_parts(w: StreamWriter, parts: Parts, between: Callable[[int], Awaitable[None]] | None) -> None:
    for i, part in enumerate(parts):
        channel, text = ("content", part) if isinstance(part, str) else part
        await w.delta(text, channel=channel)  # type: ignore[arg-type]
        if between is not None:
            await between(i)


@pytest.fixture
def writer() -> Callable[..., Awaitable[None]]:
    """The :func:`write` helper."""
    return write


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "sink_options(**options): options of the `served` fixture's HttpSink")
