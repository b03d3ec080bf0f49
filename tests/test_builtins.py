from __future__ import annotations

import io
from pathlib import Path

import pytest

from streambus import Bus, DeltaEvent, EndEvent, StartEvent, decode
from streambus.builtins import StdoutSink, SyntheticProducer
from streambus.contract import SinkContract


class TestStdoutContract(SinkContract):
    entry_point = "stdout"

    def make_sink(self, tmp_path: Path) -> StdoutSink:
        return StdoutSink(StdoutSink.Options(format="jsonl"), file=io.StringIO())

    def delivered_text(self, sink: object, tmp_path: Path) -> dict[str, str]:
        assert isinstance(sink, StdoutSink)
        assert isinstance(sink.file, io.StringIO)
        texts: dict[str, str] = {}
        for line in sink.file.getvalue().splitlines():
            event = decode(line)
            if isinstance(event, DeltaEvent) and event.channel == "content":
                texts[event.stream] = texts.get(event.stream, "") + event.text
        return texts


@pytest.mark.anyio
async def test_stdout_text_prints_streams_one_after_another() -> None:
    out = io.StringIO()
    async with Bus() as bus:
        bus.add_sink(StdoutSink(StdoutSink.Options(headers=False), file=out))
        a, b = bus.stream(stream="a"), bus.stream(stream="b")
        await a.__aenter__()
        await b.__aenter__()
        for i in range(3):
            await a.delta(f"a{i}")
            await b.delta(f"b{i}")
        await b.__aexit__(None, None, None)
        await a.__aexit__(None, None, None)
    assert out.getvalue() == "a0a1a2\nb0b1b2\n"


@pytest.mark.anyio
async def test_stdout_reports_error_and_abort() -> None:
    out = io.StringIO()
    async with Bus() as bus:
        bus.add_sink(StdoutSink(StdoutSink.Options(headers=False), file=out))
        async with bus.stream() as w:
            await w.delta("partial")
            await w.error("timeout", "no chunk for 5 s")
        async with bus.stream() as w:
            await w.abort("stop", by="client")
    assert out.getvalue() == "partial\n[error timeout: no chunk for 5 s]\n[aborted by client: stop]\n"


@pytest.mark.anyio
async def test_stdout_notes_of_interleaved_streams_stay_with_their_stream() -> None:
    # b fails mid-line while a still prints: b's note waits for b's turn, on its own line.
    out = io.StringIO()
    async with Bus() as bus:
        bus.add_sink(StdoutSink(file=out))
        async with bus.stream(stream="a") as a:
            await a.delta("one ")
            async with bus.stream(stream="b") as b:
                await b.delta("half")
                await b.error("upstream", "model crashed")
            await a.delta("two\n")
            await a.abort("enough", by="client")
    assert out.getvalue() == (
        "── a ──\none two\n[aborted by client: enough]\n── b ──\nhalf\n[error upstream: model crashed]\n"
    )


@pytest.mark.anyio
async def test_synthetic_streams_are_complete_and_concurrent() -> None:
    producer = SyntheticProducer(
        SyntheticProducer.Options(
            count=5, concurrency=2, tokens=20, reasoning_tokens=3, tokens_per_second=0, ttft=0, seed=7
        )
    )
    async with Bus() as bus:
        sub = bus.subscribe(overflow="block", buffer=10_000)
        bus.start_producer(producer)
    events = await sub.receive_batch()
    starts = [e for e in events if isinstance(e, StartEvent)]
    ends = [e for e in events if isinstance(e, EndEvent)]
    assert len(starts) == 5
    assert len(ends) == 5
    assert [s.stream for s in starts] == producer.stream_ids
    for end in ends:
        assert end.usage is not None
        assert end.usage.completion_tokens == 23
    for stream in producer.stream_ids:
        deltas = [e for e in events if isinstance(e, DeltaEvent) and e.stream == stream]
        assert [d.channel for d in deltas] == ["reasoning"] * 3 + ["content"] * 20
    live = 0
    peak = 0
    for e in events:
        live += isinstance(e, StartEvent) - isinstance(e, EndEvent)
        peak = max(peak, live)
    assert peak == 2  # the concurrency limit holds


def test_synthetic_rejects_bad_options() -> None:
    with pytest.raises(ValueError, match="jitter: must be at least 0 and at most 1, got 2"):
        SyntheticProducer.Options(jitter=2)
    with pytest.raises(ValueError, match="concurrency: must be at least 1"):
        SyntheticProducer.Options(concurrency=0)
