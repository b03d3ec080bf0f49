"""Fixtures: a real aiohttp server on loopback that serves scripted byte streams."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator

import pytest

from streambus.testing import Reply, ScriptedUpstream, scripted_upstream

__all__ = ["Reply", "Upstream", "anyio_backend", "upstream"]

# LiteLLM fetches its model price list from the internet at import unless told to use its
# bundled copy; tests talk to loopback only.
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")


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
