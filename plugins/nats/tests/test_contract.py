"""The guarantees every sink keeps; the nats sink's text is read back from the JetStream stream."""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import nats
import pytest
from streambus_nats import NatsSink, decode_events

from streambus import DeltaEvent
from streambus.contract import SinkContract

if TYPE_CHECKING:
    from conftest import NatsServer


async def _read_back(url: str) -> dict[str, str]:
    """Every message of the stream, in order: content text per stream."""
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        info = await js.stream_info("STREAMBUS")
        text: dict[str, str] = {}
        for seq in range(info.state.first_seq, info.state.last_seq + 1):
            msg = await js.get_msg("STREAMBUS", seq)
            events, bad = decode_events(str(seq), msg.data or b"")
            assert bad == 0
            for e in events:
                if isinstance(e, DeltaEvent) and e.channel == "content":
                    text[e.stream] = text.get(e.stream, "") + e.text
        return text
    finally:
        await nc.close()


class TestNatsSinkContract(SinkContract):
    entry_point = "nats"

    @pytest.fixture(autouse=True)
    def _server(self, nats_server: Callable[..., NatsServer]) -> None:
        self.url = nats_server().url

    def make_sink(self, tmp_path: Path) -> NatsSink:
        return NatsSink(url=self.url, batch_max_ms=0)

    def delivered_text(self, sink: Any, tmp_path: Path) -> dict[str, str]:
        # Called from inside the test's event loop: read JetStream on a loop of its own.
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            return pool.submit(asyncio.run, _read_back(self.url)).result(timeout=30)
