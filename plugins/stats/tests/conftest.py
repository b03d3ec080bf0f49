from __future__ import annotations

import pytest


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    """The aggregator and sink are backend-neutral; HTTP tests pin asyncio themselves (aiohttp)."""
    return str(request.param)


@pytest.fixture(autouse=True)
def _reset_structlog():
    """The CLI configures structlog (to stderr, warnings only); later tests capture info lines again."""
    yield
    import structlog

    structlog.reset_defaults()
