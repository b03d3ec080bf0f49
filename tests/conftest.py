from __future__ import annotations

import pytest


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    """Run every core async test on both asyncio and trio."""
    return str(request.param)


# The sample project's tests run in their own pytest (tests/test_sample_project.py), with an upstream
# to record from, never as part of this suite.
collect_ignore = ["sample_project"]
