from __future__ import annotations

import pytest


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    """The stage is backend-neutral (anyio): run its tests on asyncio and trio."""
    return str(request.param)
