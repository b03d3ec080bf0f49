from __future__ import annotations

import pytest


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    """The aggregator and sink are backend-neutral; HTTP tests pin asyncio themselves (aiohttp)."""
    return str(request.param)
