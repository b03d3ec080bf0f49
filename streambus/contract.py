"""Contract tests every sink must pass, to mix into a plugin's own tests.

::

    from streambus.contract import SinkContract

    class TestMySink(SinkContract):
        def make_sink(self, tmp_path):
            return MySink(MySink.Options(path=str(tmp_path)))

        def delivered_text(self, sink, tmp_path):
            return sink.text_by_stream()   # {stream_id: content text it received}

The suite runs under pytest with anyio's plugin. It checks that a sink:
consumes every event type without failing, receives each stream's whole text
(several interleaved streams, Japanese text included), drains what was
accepted when the bus shuts down, can be restarted on the same subscription
(the bus does that after a crash), and is listed by its entry point when it
declares one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import anyio
import pytest

from .bus import Bus, Sink
from .events import Usage

__all__ = ["SinkContract"]

_TEXTS = {
    "contract-en": ["Hello", ", ", "world", "!"],
    "contract-ja": ["日本", "語の", "テキスト", "です。"],
}


class SinkContract:
    """Mix into a test class and implement :meth:`make_sink` and :meth:`delivered_text`."""

    entry_point: ClassVar[str | None] = None
    """The sink's name in ``streambus.sinks``, if it registers one."""

    def make_sink(self, tmp_path: Path) -> Sink:
        """Return a new sink writing under *tmp_path* (override this)."""
        raise TypeError(f"{type(self).__name__} must override make_sink()")

    def delivered_text(self, sink: Any, tmp_path: Path) -> dict[str, str]:
        """Return ``{stream: content text}`` as the sink received it (override this)."""
        raise TypeError(f"{type(self).__name__} must override delivered_text()")

    async def _publish_all(self, bus: Bus) -> None:
        writers = [bus.stream(stream=s, model="contract-model", provider="contract") for s in _TEXTS]
        for w in writers:
            await w.__aenter__()
        for i in range(4):
            for w in writers:
                await w.delta(_TEXTS[w.stream][i])
                await w.delta("(thinking)", channel="reasoning")
        await writers[1].moderation(action="flag", start=0, end=2, categories=["test"])
        await writers[1].end("stop", usage=Usage(prompt_tokens=1, completion_tokens=4, total_tokens=5))
        await writers[0].error("upstream_error", "the model went away")
        for w in reversed(writers):
            await w.__aexit__(None, None, None)
        async with bus.stream(stream="contract-abort") as w:
            await w.delta("cut")
            await w.abort("stop pressed", by="client")

    @pytest.mark.anyio
    async def test_contract_receives_every_stream_whole(self, tmp_path: Path) -> None:
        """Interleaved streams (Japanese included), every terminal kind: each stream's text arrives whole."""
        sink = self.make_sink(tmp_path)
        async with Bus() as bus:
            bus.add_sink(sink, critical=True)
            await self._publish_all(bus)
        got = self.delivered_text(sink, tmp_path)
        for stream, pieces in _TEXTS.items():
            assert got.get(stream) == "".join(pieces), f"stream {stream}: {got.get(stream)!r}"
        assert got.get("contract-abort") == "cut"

    @pytest.mark.anyio
    async def test_contract_drains_on_shutdown(self, tmp_path: Path) -> None:
        """Leaving the bus right after publishing: the sink still handles everything accepted."""
        sink = self.make_sink(tmp_path)
        async with Bus() as bus:
            bus.add_sink(sink, critical=True)
            async with bus.stream(stream="contract-drain") as w:
                for i in range(200):
                    await w.delta(f"{i};")
            # leaving the bus right away: the sink must still drain everything accepted
        assert self.delivered_text(sink, tmp_path).get("contract-drain") == "".join(f"{i};" for i in range(200))

    @pytest.mark.anyio
    async def test_contract_survives_restart_on_same_subscription(self, tmp_path: Path) -> None:
        """Cancelled mid-run and run again on the same subscription, as the bus does after a crash."""
        sink = self.make_sink(tmp_path)
        async with Bus() as bus:
            setup = getattr(sink, "setup", None)
            if setup is not None:
                await setup(bus)
            sub = bus.subscribe(overflow="block", name="contract")
            async with bus.stream(stream="contract-restart") as w:
                await w.delta("before ")
            first = anyio.CancelScope()

            async def run_once() -> None:
                with first:
                    await sink.run(sub)

            async with anyio.create_task_group() as tg:
                tg.start_soon(run_once)
                await anyio.wait_all_tasks_blocked()
                first.cancel()  # as when the bus restarts a sink after a crash
            async with bus.stream(stream="contract-restart-2") as w:
                await w.delta("after")
            sub.close()
            await sink.run(sub)
            teardown = getattr(sink, "teardown", None)
            if teardown is not None:
                await teardown()
        got = self.delivered_text(sink, tmp_path)
        assert got.get("contract-restart-2") == "after"

    def test_contract_entry_point(self) -> None:
        """The sink is registered under ``streambus.sinks`` and imports cleanly."""
        if self.entry_point is None:
            pytest.skip("this sink registers no entry point")
        from .plugins import discover

        names = {info.name: info for info in discover("sinks")}
        assert self.entry_point in names, f"{self.entry_point!r} not in streambus.sinks"
        assert names[self.entry_point].ok, names[self.entry_point].error
