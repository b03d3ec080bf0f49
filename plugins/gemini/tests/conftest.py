"""Fixtures: a real aiohttp server on loopback that serves scripted byte streams."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from streambus.testing import Reply, ScriptedUpstream, scripted_upstream

__all__ = ["Reply", "Upstream", "anyio_backend", "upstream"]


@pytest.fixture
def anyio_backend() -> str:
    """The producer uses aiohttp, which is asyncio-bound; trio is checked separately."""
    return "asyncio"


Upstream = ScriptedUpstream


@pytest.fixture
async def upstream() -> AsyncIterator[Upstream]:
    """Start the fake upstream on 127.0.0.1 (a free port); its base URL is ``upstream.url``."""
    async with scripted_upstream("text/event-stream") as state:
        yield state
