from __future__ import annotations

import anyio
import anyio.to_thread
import pytest
from streambus_transformers import Handoff

pytestmark = pytest.mark.anyio


async def test_every_piece_arrives_in_order_in_bounded_batches() -> None:
    handoff = Handoff(capacity=3)
    pieces = [f"p{i}" for i in range(200)]

    def worker() -> None:
        for piece in pieces:
            assert handoff.put(piece)
        handoff.close()

    received: list[str] = []
    batches: list[int] = []
    async with anyio.create_task_group() as tg:
        tg.start_soon(anyio.to_thread.run_sync, worker)
        while (batch := await handoff.take()) is not None:
            batches.append(len(batch))
            received.extend(batch)
    assert received == pieces
    assert max(batches) <= 3


async def test_cancel_releases_a_blocked_worker() -> None:
    handoff = Handoff(capacity=1)
    results: list[bool] = []

    def worker() -> None:
        for piece in ("a", "b", "c"):
            results.append(handoff.put(piece))

    async with anyio.create_task_group() as tg:
        tg.start_soon(anyio.to_thread.run_sync, worker)
        assert await handoff.take() == ["a"]
        handoff.cancel()
    # Nothing is accepted after cancel, and the worker did not hang on a full handoff.
    assert results[0] is True
    assert results[-1] is False


async def test_capacity_must_be_positive() -> None:
    with pytest.raises(ValueError, match="capacity must be at least 1"):
        Handoff(0)
