from __future__ import annotations

import pytest


@pytest.fixture
def anyio_backend() -> str:
    """The demo runs aiohttp servers and Playwright's async API: asyncio only."""
    return "asyncio"
