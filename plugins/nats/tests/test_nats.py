"""The nats sink and source against a private nats-server: round trip, de-duplication, resume, gaps, options."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import anyio.lowlevel
import nats
import nats.js.errors
import pytest
from streambus_nats import AsyncioRequired, NatsGap, NatsSink, NatsSource, event_subject, message_id
from structlog.testing import capture_logs

from streambus import Bus, DeltaEvent, EndEvent, ErrorEvent, SinkFailed, StartEvent, is_terminal
from streambus.producing import RetryPolicy
from streambus.recording import read_recording

if TYPE_CHECKING:
    from conftest import Collector, NatsServer

pytestmark = pytest.mark.anyio


def texts(events: list) -> dict[str, str]:
    out: dict[str, str] = {}
    for e in events:
        if isinstance(e, DeltaEvent):
            out[e.stream] = out.get(e.stream, "") + e.text
    return out


async def produce(url: str, streams: int, deltas: int, **sink_keys: object) -> tuple[dict[str, str], NatsSink]:
    """Publish *streams* interleaved streams through a NatsSink; return their texts."""
    sink = NatsSink(url=url, **sink_keys)  # type: ignore[arg-type]
    produced: dict[str, str] = {}
    async with Bus() as bus:
        bus.add_sink(sink)

        async def one(i: int) -> None:
            async with bus.stream(model="m", provider="p", meta={"i": i}) as w:
                produced[w.stream] = ""
                for j in range(deltas):
                    await w.delta(f"{i}.{j} ")
                    produced[w.stream] += f"{i}.{j} "
                    await anyio.lowlevel.checkpoint()

        async with anyio.create_task_group() as tg:
            for i in range(streams):
                tg.start_soon(one, i)
    return produced, sink


async def test_round_trip_exactly_once_in_order(
    nats_server: Callable[..., NatsServer],
    make_collector: Callable[[], Collector],
    exactly_once: Callable[..., Any],
    count_chars: Callable[..., Any],
) -> None:
    server = nats_server()
    source = NatsSource(url=server.url, start="$", position="none")
    got = make_collector()
    async with Bus() as edge:
        edge.add_sink(got)
        edge.start_producer(source)
        await source.wait_ready()
        produced, sink = await produce(server.url, 5, 40)
        await got.wait_terminals(5)
        source.stop()
    exactly_once(got.events)
    assert texts(got.events) == produced
    assert all(isinstance(e, EndEvent) for e in got.events if is_terminal(e))
    assert sink.sent_events == 5 * 42
    assert sink.sent_messages < sink.sent_events  # consecutive events of a stream share a message
    assert source.delivered == 5 * 42
    assert source.gaps == []


async def test_subject_per_stream_and_message_id(
    nats_server: Callable[..., NatsServer],
    make_collector: Callable[[], Collector],
    exactly_once: Callable[..., Any],
    count_chars: Callable[..., Any],
) -> None:
    """Each stream has its own subject under the prefix; the Msg-Id names the stream and its seqs."""
    server = nats_server()
    produced, _ = await produce(server.url, 2, 3, prefix="tenant-a.llm", stream_name="TENANTA")
    nc = await nats.connect(server.url)
    try:
        js = nc.jetstream()
        info = await js.stream_info("TENANTA")
        assert info.config.subjects == ["tenant-a.llm.ev.>"]
        assert (info.config.max_age, info.config.max_bytes, info.config.duplicate_window) == (86_400, 1 << 30, 120)
        for stream in produced:
            msg = await js.get_last_msg("TENANTA", event_subject("tenant-a.llm", stream))
            assert msg.headers is not None
            assert msg.headers["Nats-Msg-Id"].startswith(f"{stream}:")
            assert msg.headers["Nats-Msg-Id"].endswith("-4")  # the end event, seq 4, is the last of the stream
    finally:
        await nc.close()


def test_stream_ids_cannot_escape_their_subject() -> None:
    assert event_subject("p", "abc-_~9") == "p.ev.abc-_~9"
    assert event_subject("p", "a.b") == "p.ev.a%2Eb"
    assert event_subject("p", "a*>b c") == "p.ev.a%2A%3Eb%20c"
    assert event_subject("p", "é") == "p.ev.%C3%A9"
    assert event_subject("p", "") == "p.ev.%"
    first = DeltaEvent(stream="s", seq=5, ts=0.0, text="x", first_seq=3)
    assert message_id([first, EndEvent(stream="s", seq=6, ts=0.0)]) == "s:3-6"


async def test_resent_messages_are_dropped_by_jetstream_and_the_consumer(
    nats_server: Callable[..., NatsServer],
    make_collector: Callable[[], Collector],
    exactly_once: Callable[..., Any],
    count_chars: Callable[..., Any],
) -> None:
    """A sink that re-sends what already landed (a lost acknowledgement) produces no duplicate anywhere."""
    server = nats_server()
    from streambus_nats import encode_message

    events = [
        StartEvent(stream="s1", seq=0, ts=0.0, model="m"),
        DeltaEvent(stream="s1", seq=1, ts=0.0, text="hello "),
        DeltaEvent(stream="s1", seq=2, ts=0.0, text="world"),
    ]
    nc = await nats.connect(server.url)
    try:
        js = nc.jetstream()
        await js.add_stream(name="STREAMBUS", subjects=["streambus.ev.>"], duplicate_window=60)
        headers, payload = encode_message("o", "p", events[:2])
        first = await js.publish(event_subject("streambus", "s1"), payload, headers=headers)
        again = await js.publish(event_subject("streambus", "s1"), payload, headers=headers)
        assert again.duplicate and again.seq == first.seq
        # Past JetStream's window (a different grouping): the consumer drops what it delivered.
        headers, payload = encode_message("o", "p", events[1:])
        await js.publish(event_subject("streambus", "s1"), payload, headers=headers)
        headers, payload = encode_message("o", "p", [EndEvent(stream="s1", seq=3, ts=0.0)])
        await js.publish(event_subject("streambus", "s1"), payload, headers=headers)
    finally:
        await nc.close()
    source = NatsSource(url=server.url, start="0", position="none")
    got = make_collector()
    async with Bus() as edge:
        edge.add_sink(got)
        edge.start_producer(source)
        await got.wait_terminals(1)
        source.stop()
    exactly_once(got.events)
    assert texts(got.events) == {"s1": "hello world"}
    assert source.duplicates == 1


async def test_resume_from_saved_position(
    nats_server: Callable[..., NatsServer],
    make_collector: Callable[[], Collector],
    exactly_once: Callable[..., Any],
    count_chars: Callable[..., Any],
    tmp_path: Path,
) -> None:
    """A consumer stopped and started again reads exactly what it had not delivered."""
    server = nats_server()
    state = tmp_path / "edge.nats-position"
    produced1, _ = await produce(server.url, 3, 10)
    first = make_collector()
    source = NatsSource(url=server.url, position="file", position_file=str(state), start="last")
    async with Bus() as edge:
        edge.add_sink(first)
        edge.start_producer(source)
        await first.wait_terminals(3)
        source.stop()
    assert state.exists() and source.position > 0
    produced2, _ = await produce(server.url, 2, 10)
    second = make_collector()
    again = NatsSource(url=server.url, position="file", position_file=str(state), start="last")
    async with Bus() as edge:
        edge.add_sink(second)
        edge.start_producer(again)
        await second.wait_terminals(2)
        again.stop()
    assert texts(first.events) == produced1
    assert texts(second.events) == produced2  # nothing of the first run again
    assert again.gaps == []


async def test_lost_stream_is_reported_never_silent(
    nats_server: Callable[..., NatsServer],
    make_collector: Callable[[], Collector],
    exactly_once: Callable[..., Any],
    count_chars: Callable[..., Any],
    tmp_path: Path,
) -> None:
    """The JetStream stream deleted and recreated while a stream was open: that stream ends in nats_gap."""
    server = nats_server()
    state = tmp_path / "edge.nats-position"
    got = make_collector()
    source = NatsSource(url=server.url, position="file", position_file=str(state), gap_grace_ms=200)
    sink = NatsSink(url=server.url, batch_max_ms=0)
    async with Bus() as worker, Bus() as edge:
        edge.add_sink(got)
        edge.start_producer(source)
        worker.add_sink(sink)
        async with worker.stream(model="m") as open_stream:
            await open_stream.delta("before ")
            await got.wait_for(lambda evs: any(isinstance(e, DeltaEvent) for e in evs))
            source.stop()
            await anyio.lowlevel.checkpoint()
            await open_stream.delta("lost ")  # written, then the stream is lost before the consumer reads it
            await sink.wait_ready()
            while sink.sent_events < 3:  # noqa: ASYNC110 - the sink's counter, no event to wait on
                await anyio.sleep(0.01)
            nc = await nats.connect(server.url)
            await nc.jetstream().delete_stream("STREAMBUS")
            await nc.close()
            async with worker.stream(model="m") as after:
                await after.delta("after")
            await open_stream.delta("tail")
    resumed = make_collector()
    again = NatsSource(url=server.url, position="file", position_file=str(state), gap_grace_ms=200)
    async with Bus() as edge:
        edge.add_sink(resumed)
        edge.start_producer(again)
        await resumed.wait_terminals(2)
        again.stop()
    errors = [e for e in resumed.events if isinstance(e, ErrorEvent)]
    assert [e.stream for e in errors] == [open_stream.stream]
    assert errors[0].kind == "nats_gap" and not errors[0].retryable
    assert texts(resumed.events)[after.stream] == "after"
    assert len(again.gaps) == 1 and isinstance(again.gaps[0], NatsGap)
    assert "lost and recreated" in again.gaps[0].how


@pytest.mark.parametrize("limit", ["max_bytes", "max_age_s"])
async def test_retention_removed_messages_are_a_gap(
    nats_server: Callable[..., NatsServer],
    make_collector: Callable[[], Collector],
    exactly_once: Callable[..., Any],
    count_chars: Callable[..., Any],
    tmp_path: Path,
    limit: str,
) -> None:
    """Messages removed by retention (size or age) before the consumer read them: a gap, and the open stream
    ends in nats_gap."""
    server = nats_server()
    state = tmp_path / "edge.nats-position"
    got = make_collector()
    source = NatsSource(url=server.url, position="file", position_file=str(state), gap_grace_ms=100)
    retention: dict[str, Any] = (
        {"max_bytes": 20_000} if limit == "max_bytes" else {"max_age_s": 1, "duplicate_window_s": 1}
    )
    sink = NatsSink(url=server.url, batch_max_ms=0, message_max_events=1, **retention)
    async with Bus() as worker:
        worker.add_sink(sink)
        async with worker.stream(model="m") as w:
            await w.delta("first ")
            async with Bus() as edge:
                edge.add_sink(got)
                edge.start_producer(source)
                await got.wait_for(lambda evs: any(isinstance(e, DeltaEvent) for e in evs))
                source.stop()
            if limit == "max_bytes":
                for i in range(400):  # far more than 20 kB: the oldest messages are removed
                    await w.delta(f"filler {i:04d} " * 3)
            else:
                await w.delta("expires ")
        if limit == "max_age_s":
            # The fault itself: the consumer stays away longer than max_age, so JetStream removes what it missed.
            await anyio.sleep(2.5)
    again = NatsSource(url=server.url, position="file", position_file=str(state), gap_grace_ms=100)
    resumed = make_collector()
    async with Bus() as edge:
        edge.add_sink(resumed)
        edge.start_producer(again)
        await resumed.wait_terminals(1)
        again.stop()
    assert again.gaps and again.gaps[0].lost is not None and again.gaps[0].lost > 0
    assert "retention" in again.gaps[0].how
    terminal = [e for e in resumed.events if is_terminal(e)]
    assert len(terminal) == 1 and isinstance(terminal[0], ErrorEvent) and terminal[0].kind == "nats_gap"
    assert not any(isinstance(e, DeltaEvent) for e in resumed.events)  # never text with a hole in it


async def test_recorder_restart_does_not_write_twice(
    nats_server: Callable[..., NatsServer],
    make_collector: Callable[[], Collector],
    exactly_once: Callable[..., Any],
    count_chars: Callable[..., Any],
    tmp_path: Path,
) -> None:
    """seed_recording: a recorder's own file counts as delivered; its position lives beside it."""
    from streambus.builtins.recorder import RecorderSink

    server = nats_server()
    out = tmp_path / "rec.jsonl"
    produced, _ = await produce(server.url, 2, 5)
    for _ in range(2):
        source = NatsSource(url=server.url, seed_recording=str(out), start="0")
        done = make_collector()
        async with Bus() as bus:
            bus.add_sink(RecorderSink(path=str(out)))
            bus.add_sink(done)
            bus.start_producer(source)
            await source.wait_ready()
            with anyio.move_on_after(1.0):
                await done.wait_terminals(2)
            source.stop()
        assert source.state_file == Path(f"{out}.nats-position")
    events = read_recording(out).events
    exactly_once(events)
    assert texts(events) == produced


def test_under_trio_fails_clearly() -> None:
    async def sink() -> None:
        await NatsSink().run(None)  # type: ignore[arg-type]

    async def source() -> None:
        async with Bus() as bus:
            await NatsSource().run(bus)

    for main in (sink, source):
        with pytest.raises(AsyncioRequired, match="needs asyncio .*runs under trio"):
            anyio.run(main, backend="trio")


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        ({"prefix": "a..b"}, "prefix: must be subject tokens"),
        ({"prefix": "a.>"}, "prefix: must be subject tokens"),
        ({"stream_name": "A.B"}, "stream_name: must be a non-empty name"),
        ({"max_bytes": 0}, "max_bytes: must be -1"),
        ({"max_age_s": 60, "duplicate_window_s": 120}, r"duplicate_window_s: must not exceed max_age_s \(60\)"),
        ({"max_age_s": -1}, "max_age_s"),
        ({"heartbeat_ms": 10}, "heartbeat_ms"),
        ({"storage": "disk"}, "storage"),
        ({"batches_in_flight": 0}, "batches_in_flight"),
    ],
)
def test_sink_options_are_checked(keys: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        NatsSink(**keys)  # type: ignore[arg-type]


async def test_an_error_jetstream_answers_fails_the_sink_after_max_attempts(
    nats_server: Callable[..., NatsServer],
) -> None:
    """JetStream refusing a message (here: larger than the stream's max_msg_size) is an answer, not a lost ack.

    It is retried ``max_attempts`` times, then the sink fails (logged
    ``nats.sink_failed`` with JetStream's description), holding what it
    could not send; never an endless loop of acknowledgement timeouts.
    """
    server = nats_server()
    nc = await nats.connect(server.url)
    try:
        await nc.jetstream().add_stream(name="STREAMBUS", subjects=["streambus.ev.>"], max_msg_size=64)
    finally:
        await nc.close()
    sink = NatsSink(url=server.url, max_attempts=2, ack_timeout_s=30)
    sink.retry = RetryPolicy(retries=None, backoff=0.01, max_wait=0.01)
    with capture_logs() as logs, pytest.raises(SinkFailed) as info:
        with anyio.fail_after(20):
            async with Bus() as worker:
                worker.add_sink(sink, critical=True)
                async with worker.stream(model="m") as w:
                    await w.delta("a delta whose message is larger than the 64 bytes the stream takes")
    cause = info.value.__cause__
    assert isinstance(cause, nats.js.errors.APIError) and "maximum" in str(cause)
    failed = [entry for entry in logs if entry["event"] == "nats.sink_failed"]
    assert len(failed) == 1 and failed[0]["events_held"] >= 1
    assert [entry["error"] for entry in logs if entry["event"] == "nats.sink_retry"][:1] != []
    assert sink.sent_events == 0


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        ({"position": "file"}, "position_file: required"),
        ({"position": "none", "position_file": "x"}, "position_file: only used"),
        ({"producer_timeout_ms": 100}, "producer_timeout_ms: must be 0"),
        ({"gap_grace_ms": -1}, "gap_grace_ms"),
        ({"start": "first"}, "start"),
        ({"consumer": ""}, "consumer: must not be empty"),
    ],
)
def test_source_options_are_checked(keys: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        NatsSource(**keys)  # type: ignore[arg-type]


async def test_a_stream_shared_with_other_subjects_reads_without_resync_storms(
    nats_server: Callable[..., NatsServer],
    make_collector: Callable[[], Collector],
    exactly_once: Callable[..., Any],
    count_chars: Callable[..., Any],
) -> None:
    """An operator's JetStream stream that also holds other subjects: their messages are skipped, not a gap."""
    server = nats_server()
    nc = await nats.connect(server.url)
    try:
        js = nc.jetstream()
        await js.add_stream(name="SHARED", subjects=["streambus.ev.>", "other.>"])
        source = NatsSource(url=server.url, stream_name="SHARED", start="0", position="none")
        got = make_collector()
        async with Bus() as edge, Bus() as worker:
            edge.add_sink(got)
            edge.start_producer(source)
            await source.wait_ready()
            worker.add_sink(NatsSink(url=server.url, stream_name="SHARED", batch_max_ms=0))
            produced: dict[str, str] = {}
            async with worker.stream(model="m") as w:
                produced[w.stream] = ""
                for i in range(20):
                    await js.publish(f"other.{i}", b"not ours")
                    await w.delta(f"{i} ")
                    produced[w.stream] += f"{i} "
                    await got.wait_count(i + 2)
            await got.wait_terminals(1)
            source.stop()
    finally:
        await nc.close()
    exactly_once(got.events)
    assert count_chars(produced, got.events)[w.stream] == {"lost": 0, "duplicated": 0, "terminals": 1}
    assert source.resyncs == 1 and source.gaps == []


async def test_messages_fit_the_server_payload_and_an_oversized_event_is_an_error_not_a_hole(
    nats_server: Callable[..., NatsServer],
    make_collector: Callable[[], Collector],
    exactly_once: Callable[..., Any],
    tmp_path: Path,
) -> None:
    """A server with a small max_payload: batches are split to fit; one event that cannot fit is logged and
    its stream ends in nats_gap at the consumer, while other streams arrive whole."""
    config = tmp_path / "small.conf"
    config.write_text("max_payload: 4096\n")
    server = nats_server("-c", str(config))
    got = make_collector()
    source = NatsSource(url=server.url, start="$", position="none")
    sink = NatsSink(url=server.url, batch_max_ms=50)
    async with Bus() as edge:
        edge.add_sink(got)
        edge.start_producer(source)
        await source.wait_ready()
        async with Bus() as worker:
            worker.add_sink(sink)
            async with worker.stream(model="m") as whole, worker.stream(model="m") as broken:
                for i in range(100):  # about 10 kB of one stream in one batch: split into several messages
                    await whole.delta(f"piece {i:03d} of a long answer ")
                await broken.delta("before ")
                await broken.delta("x" * 10_000)  # alone larger than max_payload
                await broken.delta("after")
        await got.wait_terminals(2)
        source.stop()
    exactly_once(got.events)
    assert sink.too_large == 1
    by_stream = {s: [e for e in got.events if e.stream == s] for s in (whole.stream, broken.stream)}
    assert "".join(e.text for e in by_stream[whole.stream] if isinstance(e, DeltaEvent)) == "".join(
        f"piece {i:03d} of a long answer " for i in range(100)
    )
    assert isinstance(by_stream[whole.stream][-1], EndEvent)
    broken_events = by_stream[broken.stream]
    assert [e.text for e in broken_events if isinstance(e, DeltaEvent)] == ["before "]
    assert isinstance(broken_events[-1], ErrorEvent) and broken_events[-1].kind == "nats_gap"


async def test_a_full_inbox_drops_and_reads_again_losing_nothing(
    nats_server: Callable[..., NatsServer],
    make_collector: Callable[[], Collector],
    exactly_once: Callable[..., Any],
    count_chars: Callable[..., Any],
) -> None:
    """A source whose bounded inbox overflows (a slow bus) drops messages on arrival and reads them again."""
    server = nats_server()
    produced, _ = await produce(server.url, 20, 30, message_max_events=1, batch_max_ms=0)
    got = make_collector()
    source = NatsSource(url=server.url, start="0", position="none", max_pending_messages=100, heartbeat_ms=100)
    async with Bus() as edge:
        edge.add_sink(got)
        edge.start_producer(source)
        await got.wait_terminals(20)
        source.stop()
    exactly_once(got.events)
    counts = count_chars(produced, got.events)
    assert {s: c for s, c in counts.items() if c != {"lost": 0, "duplicated": 0, "terminals": 1}} == {}
    assert source.dropped > 0 and source.resyncs > 1 and source.gaps == []


async def test_a_source_reading_backlog_never_declares_its_producers_lost(
    nats_server: Callable[..., NatsServer],
    make_collector: Callable[[], Collector],
    exactly_once: Callable[..., Any],
    count_chars: Callable[..., Any],
) -> None:
    """A stream whose producer is long gone, with its end still to be read behind another producer's backlog,
    ends normally, however slowly the source reads (a tiny inbox, many re-reads, longer than the timeout)."""
    server = nats_server()
    first = NatsSink(url=server.url, batch_max_ms=0, message_max_events=1)
    async with Bus() as worker:
        worker.add_sink(first)
        async with worker.stream(model="m") as w:
            await w.delta("begun ")
            await first.wait_ready()
            while first.sent_events < 2:  # noqa: ASYNC110 - the sink's counter, no event to wait on
                await anyio.sleep(0.01)
            produced, _ = await produce(server.url, 25, 40, message_max_events=1, batch_max_ms=0)
            await w.delta("ended behind a backlog")
    produced[w.stream] = "begun ended behind a backlog"
    got = make_collector()
    source = NatsSource(
        url=server.url, start="0", position="none", producer_timeout_ms=300, max_pending_messages=20, heartbeat_ms=100
    )
    async with Bus() as edge:
        edge.add_sink(got)
        edge.start_producer(source)
        await got.wait_terminals(26, seconds=30)
        source.stop()
    exactly_once(got.events)
    counts = count_chars(produced, got.events)
    assert {s: c for s, c in counts.items() if c != {"lost": 0, "duplicated": 0, "terminals": 1}} == {}
    assert source.producers_lost == 0 and source.resyncs > 5
