"""Recovery with ``since`` (all or nothing), snapshots for late joiners, and the history behind them."""

from __future__ import annotations

from typing import Any

import anyio
import pytest
from streambus_websocket import CloseCode, History, WebSocketSink
from streambus_websocket.testing import connect, running

from streambus import Bus, DeltaEvent, EndEvent, StartEvent, encode

pytestmark = pytest.mark.anyio


def _text(events: list[dict[str, Any]], channel: str = "content") -> str:
    return "".join(e["text"] for e in events if e["type"] == "delta" and e.get("channel", "content") == channel)


def _assert_in_order_without_duplicates(events: list[dict[str, Any]]) -> None:
    seqs = [e["seq"] for e in events]
    assert seqs == sorted(set(seqs)), seqs


async def _read(peer: Any, count: int) -> list[dict[str, Any]]:
    return [await peer.frame() for _ in range(count)]


async def test_reconnect_with_since_gets_every_missed_event_once() -> None:
    async with running() as (bus, sink):
        async with bus.stream(model="m") as w:
            async with connect(sink.url) as peer:
                await peer.subscribe(id=1)
                await w.delta("The ")
                await w.delta("quick ")
                seen = await _read(peer, 2)  # delta seq 1, 2 (the client joined after start)
                assert [e["seq"] for e in seen] == [1, 2]
            # The client is gone; the stream goes on without it.
            await w.delta("brown ")
            await w.delta("fox")
            async with connect(sink.url) as peer:
                subscribed = await peer.subscribe(id=1, since={w.stream: seen[-1]["seq"]})
                assert subscribed["recovering"] and subscribed["recovered"]
                assert subscribed["replayed"] == 2
                # Live events continue right after the replayed ones, without a gap or a repeat.
                await w.delta(" jumps")
                await w.end("stop")
                rest = await peer.events_until_end(w.stream)
        events = seen + rest
        _assert_in_order_without_duplicates(events)
        assert [e["seq"] for e in events] == [1, 2, 3, 4, 5, 6]
        assert _text(events) == "The quick brown fox jumps"


async def test_server_restart_close_code_then_resume() -> None:
    async with running() as (bus, sink):
        async with bus.stream(model="m") as w:
            async with connect(sink.url) as peer:
                await peer.subscribe(id=1, snapshot=True)
                await w.delta("one ")
                first = await _read(peer, 2)
                assert [e["type"] for e in first] == ["start", "delta"]
                assert sink.close_clients() == 1
                code, _ = await peer.closed()
                assert code == CloseCode.SERVICE_RESTART
            await w.delta("two")
        async with connect(sink.url) as peer:
            subscribed = await peer.subscribe(id=1, since={w.stream: first[-1]["seq"]})
            assert subscribed["recovered"] and subscribed["replayed"] == 2
            rest = await peer.events_until_end(w.stream)
        assert _text(first + rest) == "one two"
        _assert_in_order_without_duplicates(first + rest)


async def test_recovery_fails_as_a_whole_beyond_history_and_snapshot_reloads() -> None:
    async with running(history_events=3) as (bus, sink):
        async with bus.stream(model="m") as w, bus.stream(model="m") as short:
            async with connect(sink.url) as peer:
                await peer.subscribe(id=1)
                await w.delta("a")
                await short.delta("x")
                seen = await _read(peer, 2)
            for piece in "bcdefg":
                await w.delta(piece)
            async with connect(sink.url) as peer:
                subscribed = await peer.subscribe(id=1, since={w.stream: 1, short.stream: 1}, snapshot=True)
                # `short` alone would be recoverable, but recovery is all or nothing.
                assert subscribed["recovering"] and not subscribed["recovered"]
                assert subscribed["unrecovered"] == [w.stream]
                assert subscribed["replayed"] == 0 and subscribed["snapshot"] == 2
                frames = await _read(peer, 4)
                by_stream: dict[str, list[dict[str, Any]]] = {}
                for frame in frames:
                    by_stream.setdefault(frame["stream"], []).append(frame)
                start, snap = by_stream[w.stream]
                assert start["type"] == "start"
                assert snap == {**snap, "type": "delta", "text": "abcdefg", "seq": 7, "first_seq": 1, "n": 7}
                assert _text(by_stream[short.stream]) == "x"
        assert [e["stream"] for e in seen] == [w.stream, short.stream]


async def test_unknown_stream_or_seq_ahead_of_history_is_not_recovered() -> None:
    async with running() as (bus, sink), connect(sink.url) as peer:
        async with bus.stream(model="m") as w:
            await w.delta("x")
            sub = await peer.subscribe(id=1, since={"never-seen": 3})
            assert (sub["recovered"], sub["unrecovered"]) == (False, ["never-seen"])
        async with connect(sink.url) as fresh:
            sub = await fresh.subscribe(id=2, since={w.stream: 99})
            assert (sub["recovered"], sub["unrecovered"]) == (False, [w.stream])


async def test_ended_stream_recoverable_until_its_ttl() -> None:
    async with running() as (bus, sink), connect(sink.url) as peer:
        async with bus.stream(model="m") as w:
            await w.delta("abc")
        sub = await peer.subscribe(id=1, since={w.stream: 0})
        assert sub["recovered"] and sub["replayed"] == 2
        events = await peer.events_until_end(w.stream)
        assert [e["type"] for e in events] == ["delta", "end"]
        sub = await peer.subscribe(id=2, since={w.stream: 2})
        assert sub["recovered"] and sub["replayed"] == 0
    async with running(history_ttl=0) as (bus, sink), connect(sink.url) as peer:
        async with bus.stream(model="m") as w:
            await w.delta("abc")
        await anyio.wait_all_tasks_blocked()
        sub = await peer.subscribe(id=1, since={w.stream: 0})
        assert not sub["recovered"]


async def test_streams_started_while_away_are_replayed_whole() -> None:
    async with running() as (bus, sink):
        async with bus.stream(model="m") as w:
            await w.delta("while away")
            async with connect(sink.url) as peer:
                sub = await peer.subscribe(id=1, since={})
                assert sub["recovered"] and sub["replayed"] == 2 and sub["streams"] == [w.stream]
                await w.delta("!")
                await w.end()
                events = await peer.events_until_end(w.stream)
        assert [e["seq"] for e in events] == [0, 1, 2, 3]
        assert _text(events) == "while away!"


async def test_snapshot_gives_late_joiners_the_text_so_far_per_channel() -> None:
    async with running() as (bus, sink):
        async with bus.stream(model="m", provider="p") as w:
            for piece in ("Let ", "me ", "think"):
                await w.delta(piece, channel="reasoning")
            for piece in ("The ", "answer"):
                await w.delta(piece)
            async with connect(sink.url) as peer:
                sub = await peer.subscribe(id=1, snapshot=True)
                assert sub["snapshot"] == 1 and not sub["recovering"]
                start, reasoning, content = await _read(peer, 3)
                assert start == {**start, "type": "start", "model": "m", "provider": "p", "seq": 0}
                assert reasoning == {
                    **reasoning,
                    "channel": "reasoning",
                    "text": "Let me think",
                    "first_seq": 1,
                    "seq": 3,
                    "n": 3,
                }
                assert content == {**content, "text": "The answer", "first_seq": 4, "seq": 5, "n": 2}
                await w.delta(" is 42")
                await w.end()
                rest = await peer.events_until_end(w.stream)
        assert _text([content, *rest]) == "The answer is 42"
        assert [e["seq"] for e in rest] == [6, 7]


async def test_streams_that_started_before_the_sink_are_routed_by_their_start() -> None:
    async with Bus() as bus:
        async with bus.stream(model="early") as w:
            await w.delta("before")
            sink = WebSocketSink(port=0)
            bus.add_sink(sink)
            await sink.wait_ready()
            async with connect(sink.url) as peer:
                await peer.subscribe(id=1, models=["early"])
                await w.delta("after")
                await w.end()
                events = await peer.events_until_end(w.stream)
        assert _text(events) == "after"
        await bus.shutdown()


# -- the history on its own ------------------------------------------------------------


def _delta(seq: int, text: str, first: int | None = None) -> DeltaEvent:
    return DeltaEvent(stream="s", seq=seq, ts=0.0, text=text, first_seq=first)


def test_history_missed_is_all_or_nothing() -> None:
    now = [0.0]
    history = History(events_per_stream=4, ttl=10, max_streams=2, clock=lambda: now[0])
    for event in [StartEvent(stream="s", seq=0, ts=0.0), _delta(1, "a"), _delta(3, "bc", first=2), _delta(4, "d")]:
        history.record(event, encode(event))
    assert history.missed("s", 0) is not None and len(history.missed("s", 0) or []) == 3
    assert history.missed("s", 4) == []
    # seq 2 is inside the coalesced delta 2..3: it cannot be split.
    assert history.missed("s", 2) is None
    history.record(_delta(5, "e"), encode(_delta(5, "e")))  # pushes the start out (4 kept)
    assert history.missed("s", -1) is None  # a client that saw nothing needs the start
    assert len(history.missed("s", 0) or []) == 4
    assert history.replay_all("s") is None
    end = EndEvent(stream="s", seq=6, ts=0.0)
    history.record(end, encode(end))
    now[0] = 9.9
    history.expire()
    assert history.get("s") is not None
    now[0] = 10.0
    history.expire()
    assert history.get("s") is None and history.missed("s", 6) is None


def test_history_evicts_ended_streams_first() -> None:
    history = History(events_per_stream=4, ttl=100, max_streams=2, clock=lambda: 0.0)
    for stream in ("live", "done"):
        start = StartEvent(stream=stream, seq=0, ts=0.0)
        history.record(start, encode(start))
    end = EndEvent(stream="done", seq=1, ts=0.0)
    history.record(end, encode(end))
    newer = StartEvent(stream="new", seq=0, ts=0.0)
    history.record(newer, encode(newer))
    assert history.get("done") is None
    assert history.get("live") is not None and history.get("new") is not None
    assert [log.start.stream for log in history.live() if log.start] == ["live", "new"]


async def test_recovery_counts_toward_the_client_buffer() -> None:
    """Replayed frames are queued bytes like any other (issue 18): a replay that can never fit is not queued."""
    piece = "x" * 200
    async with running(client_buffer_bytes=4096) as (bus, sink):
        async with bus.stream(model="m") as w:
            for _ in range(50):  # 10 KB missed, more than the 4 KiB client buffer
                await w.delta(piece)
            async with connect(sink.url) as peer:
                sub = await peer.subscribe(id=1, since={w.stream: 0})
                assert (sub["recovered"], sub["reason"], sub["unrecovered"]) == (False, "too_large", [w.stream])
    async with running(client_buffer_bytes=32768) as (bus, sink):
        async with bus.stream(model="m") as w:
            for _ in range(50):
                await w.delta(piece)
            async with connect(sink.url) as peer:
                sub = await peer.subscribe(id=1, since={w.stream: 0})
                assert sub["recovered"] and sub["replayed"] == 50
                await w.end()
                events = await peer.events_until_end(w.stream)
        assert _text(events) == piece * 50
