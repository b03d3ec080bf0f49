"""The broadcaster runs on both websockets implementations, so every test runs on asyncio and trio."""

from __future__ import annotations

import pytest


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    """The broadcaster runs on both websockets implementations (asyncio and trio)."""
    return str(request.param)
