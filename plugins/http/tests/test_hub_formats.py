"""Sans-I/O parts: the hub's history and cursors, and each format's encoder (both backends)."""

from __future__ import annotations

from typing import Any

import anyio
import orjson
import pytest
import streambus_http
from streambus_http import (
    HttpSink,
    OpenAIChunkEncoder,
    ResumeError,
    StreamHub,
    UIMessageStreamEncoder,
    make_encoder,
    parse_event_id,
)

from streambus import AbortEvent, Bus, DeltaEvent, EndEvent, Filter, StartEvent, Usage
from streambus.wire import ToolCallFragment, tool_text

pytestmark = pytest.mark.anyio


def test_exports_are_sorted_and_public() -> None:
    names = streambus_http.__all__
    assert names == sorted(names, key=lambda n: (not n.isupper(), n))
    for name in names:
        obj = getattr(streambus_http, name)
        if callable(obj) and isinstance(obj, type | type(parse_event_id)):
            assert obj.__doc__, name


def _events(stream: str, texts: list[str], *, model: str = "m", end: bool = True) -> list[Any]:
    out: list[Any] = [StartEvent(stream=stream, seq=0, ts=1.0, model=model)]
    out += [DeltaEvent(stream=stream, seq=i + 1, ts=1.0, text=t) for i, t in enumerate(texts)]
    if end:
        out.append(EndEvent(stream=stream, seq=len(texts) + 1, ts=1.0))
    return out


def test_parse_event_id_names_bad_values() -> None:
    assert parse_event_id("abc-1:17") == ("abc-1", 17)
    assert parse_event_id("a:b:3") == ("a:b", 3)
    for bad in ("", "x", "x:", ":3", "x:-1", "x:1.5"):
        with pytest.raises(ResumeError, match="Last-Event-ID") as info:
            parse_event_id(bad)
        assert info.value.status == 400


def test_bad_options_are_named() -> None:
    with pytest.raises(ValueError, match="per_stream: must be at least 1"):
        StreamHub(per_stream=0)
    with pytest.raises(ValueError, match="unknown format 'xml'"):
        make_encoder("xml")
    with pytest.raises(ValueError, match="keepalive: must be positive"):
        HttpSink(keepalive=0)
    with pytest.raises(ValueError, match="token: must not be empty"):
        HttpSink(token="")
    with pytest.raises(TypeError, match="either an Options or keywords"):
        HttpSink(HttpSink.Options(), port=1)
    assert HttpSink(HttpSink.Options(port=9000)).options.port == 9000


async def test_stream_cursor_reads_history_then_live_and_ends() -> None:
    hub = StreamHub()
    hub.record_many(_events("s", ["a", "b"], end=False))
    cursor = hub.stream_cursor("s", after=1)
    assert [e.seq for e in await cursor.next_batch()] == [2]
    assert await cursor.next_batch(max_wait=0.01) == []
    assert not cursor.done

    async def later() -> None:
        await anyio.wait_all_tasks_blocked()
        hub.record_many([EndEvent(stream="s", seq=3, ts=1.0)])

    async with anyio.create_task_group() as tg:
        tg.start_soon(later)
        assert [e.seq for e in await cursor.next_batch()] == [3]
    assert cursor.done and cursor.complete
    assert await cursor.next_batch() == []


async def test_per_stream_history_is_bounded_and_resume_before_it_fails() -> None:
    hub = StreamHub(per_stream=8)
    hub.record_many(_events("s", [str(i) for i in range(30)]))
    with pytest.raises(ResumeError, match="no longer in the history") as info:
        hub.stream_cursor("s", after=2)
    assert info.value.status == 409
    cursor = hub.stream_cursor("s", after=28)
    assert [e.seq for e in await cursor.next_batch()] == [29, 30, 31]


async def test_a_stream_first_seen_mid_way_is_read_from_its_first_recorded_event() -> None:
    # A hub attached to a running bus follows live streams from their next event.
    hub = StreamHub(per_stream=8)
    hub.record_many([DeltaEvent(stream="m", seq=5, ts=1.0, text="x"), EndEvent(stream="m", seq=6, ts=1.0)])
    cursor = hub.stream_cursor("m")
    assert [e.seq for e in await cursor.next_batch()] == [5, 6]
    assert cursor.done and cursor.complete


async def test_resume_inside_a_coalesced_delta_is_refused_not_duplicated() -> None:
    hub = StreamHub()
    hub.record_many(
        [
            StartEvent(stream="c", seq=0, ts=1.0, model="m"),
            DeltaEvent(stream="c", seq=3, ts=1.0, text="abc", n=3, first_seq=1),
            DeltaEvent(stream="c", seq=4, ts=1.0, text="d"),
        ]
    )
    assert [e.seq for e in await hub.stream_cursor("c", after=3).next_batch()] == [4]
    with pytest.raises(ResumeError, match="inside a coalesced delta") as info:
        hub.stream_cursor("c", after=2)  # holds "ab" of "abc": the delta cannot be split
    assert info.value.status == 409


async def test_filter_cursor_follows_matching_streams_and_is_lost_past_the_log() -> None:
    hub = StreamHub(max_events=6)
    cursor = hub.filter_cursor(Filter.of(models="x"))
    hub.record_many(_events("a", ["1"], model="x") + _events("b", ["2"], model="y"))
    assert [(e.stream, e.seq) for e in await cursor.next_batch()] == [("a", 0), ("a", 1), ("a", 2)]
    hub.record_many(_events("c", [str(i) for i in range(10)], model="x"))  # more than max_events
    assert await cursor.next_batch() == []
    assert cursor.lost and cursor.done
    with pytest.raises(ResumeError) as info:
        hub.filter_cursor(Filter(), resume="a:1")
    assert info.value.status == 409


async def test_ended_streams_beyond_max_streams_are_forgotten() -> None:
    hub = StreamHub(max_streams=2)
    for name in ("a", "b", "c"):
        hub.record_many(_events(name, ["t"]))
    assert [s.stream for s in hub.streams()] == ["b", "c"]
    assert not hub.known("a")


async def test_hub_attached_to_a_bus_closes_with_it() -> None:
    async with Bus() as bus:
        hub = StreamHub.attach(bus)
        async with bus.stream(model="m", stream="z") as w:
            await w.delta("q")
        cursor = hub.stream_cursor("z")
        seqs = [e.seq for e in await cursor.next_batch()]
        while not cursor.done:
            seqs += [e.seq for e in await cursor.next_batch()]
        assert seqs == [0, 1, 2]
        live = hub.filter_cursor(Filter())
    assert hub.closed
    assert await live.next_batch() == []
    assert live.done and not live.lost


def _ui(events: list[Any], **options: Any) -> list[dict[str, Any]]:
    raw = UIMessageStreamEncoder(**options).encode(events).decode()
    return [orjson.loads(b[6:]) for b in raw.split("\n\n") if b.startswith("data: {")]


def test_ui_encoder_tool_parts_metadata_and_finish_reasons() -> None:
    events = [
        StartEvent(stream="s", seq=0, ts=1.0, model="m", provider="p"),
        DeltaEvent(stream="s", seq=1, ts=1.0, text=tool_text(ToolCallFragment(arguments='{"q": 1}')), channel="tool"),
        EndEvent(stream="s", seq=2, ts=1.0, reason="tool_calls", usage=Usage(prompt_tokens=1, completion_tokens=2)),
    ]
    chunks = _ui(events, tool_name="search", message_metadata=True)
    assert chunks[0] == {
        "type": "start",
        "messageId": "s",
        "messageMetadata": {"stream": "s", "model": "m", "provider": "p"},
    }
    assert chunks[2] == {"type": "tool-input-start", "toolCallId": "s-tool-1-0", "toolName": "search", "dynamic": True}
    assert chunks[4]["type"] == "tool-input-available" and chunks[4]["input"] == {"q": 1}
    assert chunks[-1]["finishReason"] == "tool-calls"
    assert chunks[-1]["messageMetadata"]["usage"] == {"prompt_tokens": 1, "completion_tokens": 2}
    odd = _ui([*events[:2], EndEvent(stream="s", seq=2, ts=1.0, reason="weird")])
    assert odd[-1]["finishReason"] == "other"
    assert UIMessageStreamEncoder().finish("closed").endswith(b"data: [DONE]\n\n")


def test_openai_encoder_tool_calls_and_client_abort() -> None:
    enc = OpenAIChunkEncoder(tool_name="lookup", model="override")
    raw = enc.encode(
        [
            StartEvent(stream="s", seq=0, ts=5.0, model="m"),
            DeltaEvent(stream="s", seq=1, ts=5.0, text=tool_text(ToolCallFragment(arguments='{"a"')), channel="tool"),
            DeltaEvent(stream="s", seq=2, ts=5.0, text=tool_text(ToolCallFragment(arguments=": 1}")), channel="tool"),
            AbortEvent(stream="s", seq=3, ts=5.0, reason="stop", by="client"),
        ]
    ).decode()
    bodies = [orjson.loads(b[6:]) for b in raw.split("\n\n") if b.startswith("data: {")]
    assert bodies[0]["model"] == "override" and bodies[0]["created"] == 5
    first, second = bodies[1]["choices"][0]["delta"]["tool_calls"][0], bodies[2]["choices"][0]["delta"]["tool_calls"][0]
    assert first == {
        "index": 0,
        "id": "call_s",
        "type": "function",
        "function": {"name": "lookup", "arguments": '{"a"'},
    }
    assert second == {"index": 0, "function": {"arguments": ": 1}"}}
    assert bodies[-1] == {"error": {"message": "stream aborted by client: stop", "type": "aborted", "code": "aborted"}}


class _Archive:
    """A StreamArchive stand-in: one live stream the edge does not read yet; records what it is asked to follow."""

    def __init__(self, *starts: StartEvent) -> None:
        self.starts = list(starts)
        self.followed: list[str] = []

    async def fetch(self, stream: str) -> list[Any] | None:
        return None

    def follow(self, stream: str) -> None:
        self.followed.append(stream)

    def live_starts(self) -> list[StartEvent]:
        return list(self.starts)


async def test_filter_readers_and_waits_are_the_hub_s_interest_while_they_last() -> None:
    """What makes an interest edge read a stream: an open filter reader or a filter wait; gone when they end."""
    import gc

    from streambus.archive import add_interest, attach_archive, interested

    hub = StreamHub()
    bus = Bus()
    hub.bus = bus
    live = StartEvent(stream="live", seq=0, ts=1.0, model="a")
    archive = _Archive(live, StartEvent(stream="other", seq=0, ts=1.0, model="b"))
    attach_archive(bus, archive)
    add_interest(bus, hub)
    a = StartEvent(stream="s1", seq=0, ts=1.0, model="a")
    b = StartEvent(stream="s2", seq=0, ts=1.0, model="b")
    assert not interested(bus, a)
    cursor = hub.filter_cursor(Filter.of(models="a"))
    assert archive.followed == ["live"], "a live match the edge did not read is followed from its start"
    assert interested(bus, a) and not interested(bus, b)
    cursor.close()
    assert not interested(bus, a), "a reader that ended wants nothing"
    hub.filter_cursor(Filter.of(models="a"))  # never read: dropped with the response that made it
    gc.collect()
    assert not interested(bus, a)
    assert hub.pick(Filter.of(models="b")) == "other", "a one-stream route picks a live stream the engine holds"
    with anyio.move_on_after(0.05):
        waiting = anyio.Event()

        async def wait() -> None:
            waiting.set()
            await hub.wait_stream(flt=Filter.of(models="c"), max_wait=10)

        async with anyio.create_task_group() as tg:
            tg.start_soon(wait)
            await waiting.wait()  # set right before the wait registers its filter, without a checkpoint between
            assert interested(bus, StartEvent(stream="s3", seq=0, ts=1.0, model="c"))
    assert not interested(bus, StartEvent(stream="s3", seq=0, ts=1.0, model="c")), "the wait ended"
