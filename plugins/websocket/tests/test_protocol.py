"""Protocol conformance over real loopback WebSocket connections: every op and every error frame."""

from __future__ import annotations

import contextlib
import socket

import anyio
import pytest
from streambus_websocket import PROTOCOL_VERSION, CloseCode, ErrorCode, WebSocketSink
from streambus_websocket.testing import connect, publish_text, running
from websockets.exceptions import ConnectionClosed

from streambus import Filter, StartEvent, Usage

pytestmark = pytest.mark.anyio


async def test_hello_subscribe_and_events_in_wire_form() -> None:
    async with running() as (bus, sink), connect(sink.url, hello=False) as peer:
        hello = await peer.expect("hello")
        assert hello["protocol"] == PROTOCOL_VERSION
        assert hello["limits"]["max_subscriptions"] == sink.options.max_subscriptions
        assert hello["history"] == {"events": sink.options.history_events, "ttl": sink.options.history_ttl}
        subscribed = await peer.subscribe(id="all")
        assert subscribed == {
            "op": "subscribed",
            "id": "all",
            "recovering": False,
            "recovered": False,
            "replayed": 0,
            "snapshot": 0,
            "recent": 0,
            "streams": [],
        }
        async with bus.stream(model="m1", provider="p1", meta={"user": "u1"}) as w:
            await w.delta("Hel")
            await w.delta("thinking", channel="reasoning")
            await w.delta("lo")
            await w.end("stop", usage=Usage(prompt_tokens=3, completion_tokens=2, total_tokens=5))
        events = await peer.events_until_end()
        assert [e["type"] for e in events] == ["start", "delta", "delta", "delta", "end"]
        assert [e["seq"] for e in events] == [0, 1, 2, 3, 4]
        assert events[0]["model"] == "m1" and events[0]["meta"] == {"user": "u1"}
        assert events[2] == {**events[2], "channel": "reasoning", "text": "thinking"}
        assert events[4]["usage"] == {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"models": ["wanted"]}, {"model": "wanted"}),
        ({"providers": ["p2"]}, {"provider": "p2"}),
        ({"meta": {"session": "s1"}}, {"meta": {"session": "s1"}}),
        ({"meta": {"session": ["s0", "s1"]}}, {"meta": {"session": "s1"}}),
    ],
)
async def test_filters_select_streams(fields: dict[str, object], match: dict[str, object]) -> None:
    async with running() as (bus, sink), connect(sink.url) as peer:
        await peer.subscribe(id=1, **fields)
        await publish_text(bus, ["nope"], model="other", provider="other", meta={"session": "x"})
        wanted = await publish_text(bus, ["yes"], **match)
        events = await peer.events_until_end()
        assert {e["stream"] for e in events} == {wanted}
        assert "".join(e.get("text", "") for e in events) == "yes"


async def test_stream_id_filter_and_unsubscribe() -> None:
    async with running() as (bus, sink), connect(sink.url) as peer:
        await peer.subscribe(id="a", models=["a"])
        await peer.subscribe(id="b", models=["b"])
        first = await publish_text(bus, ["1"], model="a")
        assert (await peer.events_until_end())[0]["stream"] == first
        await peer.send({"op": "unsubscribe", "id": "a"})
        assert await peer.expect("unsubscribed") == {"op": "unsubscribed", "id": "a"}
        await publish_text(bus, ["gone"], model="a")
        second = await publish_text(bus, ["2"], model="b")
        # The first frame after unsubscribing belongs to the stream still subscribed.
        events = await peer.events_until_end()
        assert {e["stream"] for e in events} == {second}
        # A subscription by stream id gets exactly that stream.
        async with bus.stream(model="c", stream="fixed-id") as w:
            await peer.subscribe(id="c", streams=["fixed-id"])
            await w.delta("x")
        events = await peer.events_until_end("fixed-id")
        assert [e["type"] for e in events] == ["delta", "end"]


async def test_one_delivery_when_two_subscriptions_match() -> None:
    async with running() as (bus, sink), connect(sink.url) as peer:
        await peer.subscribe(id=1)
        await peer.subscribe(id=2, models=["m"])
        await publish_text(bus, ["a", "b"], model="m")
        events = await peer.events_until_end()
        assert [e["seq"] for e in events] == [0, 1, 2, 3]


async def test_ping_pong() -> None:
    async with running() as (_bus, sink), connect(sink.url) as peer:
        await peer.send({"op": "ping", "id": 7})
        assert await peer.expect("pong") == {"op": "pong", "id": 7}


@pytest.mark.parametrize(
    ("frame", "code", "field"),
    [
        ("{not json", ErrorCode.BAD_JSON, None),
        ("[1, 2]", ErrorCode.BAD_JSON, None),
        ('{"op": "explode"}', ErrorCode.UNKNOWN_OP, "op"),
        ('{"id": 1}', ErrorCode.BAD_MESSAGE, "op"),
        ('{"op": "subscribe", "streams": "abc"}', ErrorCode.BAD_MESSAGE, "streams"),
        ('{"op": "subscribe", "since": {"s": "x"}}', ErrorCode.BAD_MESSAGE, "since[...]"),
        ('{"op": "subscribe", "colour": "red"}', ErrorCode.BAD_MESSAGE, "colour"),
        ('{"op": "subscribe", "recent": -1}', ErrorCode.BAD_MESSAGE, "recent"),
        (b"\x00binary", ErrorCode.BINARY_FRAME, None),
    ],
)
async def test_malformed_frames_get_error_frames_and_the_connection_lives(
    frame: str | bytes, code: ErrorCode, field: str | None
) -> None:
    async with running() as (_bus, sink), connect(sink.url) as peer:
        await peer.send(frame)
        error = await peer.expect("error")
        assert error["code"] == code.value
        assert error.get("field") == field
        assert error["message"] and "Traceback" not in error["message"]
        await peer.send({"op": "ping"})
        await peer.expect("pong")


async def _until_ended(sink: WebSocketSink, stream: str) -> None:
    # The broadcaster records what the bus published in its own task: poll its history, bounded.
    for _ in range(1000):
        log = sink.history.get(stream)
        if log is not None and log.ended:
            return
        await anyio.sleep(0.01)
    raise AssertionError(f"{stream} never ended in the broadcaster's history")


async def test_recent_replays_recently_ended_streams_whole_in_the_order_they_ended() -> None:
    async with running() as (bus, sink):
        old = await publish_text(bus, ["old"], model="a")
        other = await publish_text(bus, ["other"], model="b")
        new = await publish_text(bus, ["new ", "one"], model="a")
        await _until_ended(sink, new)
        async with connect(sink.url) as peer:
            subscribed = await peer.subscribe(id="a", models=["a"], recent=1)
            assert (subscribed["recent"], subscribed["streams"]) == (1, [])
            events = await peer.events_until_end()
            assert [(e["stream"], e["type"]) for e in events] == [
                (new, "start"),
                (new, "delta"),
                (new, "delta"),
                (new, "end"),
            ]
            # A second subscription asking for all of them gets each ended stream once, oldest first.
            assert (await peer.subscribe(id="all", recent=10))["recent"] == 3
            whole = [e for _ in range(3) for e in await peer.events_until_end()]
            assert [e["stream"] for e in whole if e["type"] == "start"] == [old, other, new]
            # A resuming client (since) gets what it missed, not the ended streams again.
            assert (await peer.subscribe(id="resume", since={}, recent=10))["recent"] == 0
            await peer.send({"op": "ping", "id": 1})
            assert await peer.expect("pong") == {"op": "pong", "id": 1}


async def test_recent_streams_count_toward_the_client_buffer_newest_kept() -> None:
    """Recently ended streams are queued like a replay: only those that fit the client's budget, the newest."""
    big = "x" * 3000
    async with running(client_buffer_bytes=8192) as (bus, sink):
        first = await publish_text(bus, [big], model="a")
        second = await publish_text(bus, [big], model="a")
        third = await publish_text(bus, [big], model="a")
        await _until_ended(sink, third)
        async with connect(sink.url) as peer:
            subscribed = await peer.subscribe(id="a", recent=3)
            assert subscribed["recent"] == 2  # three would pass 8 KiB: the oldest is left out
            whole = [e for _ in range(2) for e in await peer.events_until_end()]
            assert [e["stream"] for e in whole if e["type"] == "start"] == [second, third]
            assert first not in {e["stream"] for e in whole}
            await peer.send({"op": "ping", "id": 1})
            assert await peer.expect("pong") == {"op": "pong", "id": 1}  # not closed as lagged


async def test_subscription_errors() -> None:
    async with running(max_subscriptions=2) as (_bus, sink), connect(sink.url) as peer:
        await peer.subscribe(id="x")
        await peer.send({"op": "subscribe", "id": "x"})
        error = await peer.expect("error")
        assert (error["code"], error["id"]) == (ErrorCode.DUPLICATE_SUBSCRIPTION.value, "x")
        await peer.subscribe(id="y")
        await peer.send({"op": "subscribe", "id": "z"})
        error = await peer.expect("error")
        assert (error["code"], error["id"]) == (ErrorCode.TOO_MANY_SUBSCRIPTIONS.value, "z")
        await peer.send({"op": "unsubscribe", "id": "nope"})
        error = await peer.expect("error")
        assert (error["code"], error["id"]) == (ErrorCode.UNKNOWN_SUBSCRIPTION.value, "nope")


async def test_a_server_bug_is_an_internal_error_frame_without_internals(monkeypatch: pytest.MonkeyPatch) -> None:
    async with running() as (_bus, sink), connect(sink.url) as peer:

        def broken(client: object, message: object) -> None:
            raise RuntimeError("secret path /etc/something")

        monkeypatch.setattr(sink, "_on_message", broken)
        await peer.send({"op": "ping"})
        error = await peer.expect("error")
        assert error["code"] == ErrorCode.INTERNAL.value
        assert "secret" not in error["message"] and "Traceback" not in error["message"]
        monkeypatch.undo()
        await peer.send({"op": "ping"})
        await peer.expect("pong")


async def test_oversize_frame_closes_with_1009() -> None:
    async with running(max_message_bytes=1024) as (_bus, sink), connect(sink.url) as peer:
        await peer.send({"op": "subscribe", "streams": ["x" * 2000]})
        code, frames = await peer.closed()
        assert code == CloseCode.MESSAGE_TOO_BIG
        assert frames == []


async def test_flooding_client_is_warned_then_closed() -> None:
    # One message per second, bursts of two: the third message in a row is over the limit.
    async with running(max_message_rate=1) as (_bus, sink), connect(sink.url) as peer:
        with contextlib.suppress(ConnectionClosed):  # the server may close before the loop ends
            for _ in range(60):
                await peer.send({"op": "ping"})
        code, frames = await peer.closed()
        assert code == CloseCode.RATE_LIMITED
        assert frames[0] == {"op": "pong"}
        assert any(f.get("code") == ErrorCode.RATE_LIMITED.value for f in frames)


async def _http_get(port: int, path: str, headers: str = "") -> tuple[int, bytes]:
    stream = await anyio.connect_tcp("127.0.0.1", port)
    async with stream:
        await stream.send(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n{headers}\r\n".encode())
        data = b""
        with anyio.fail_after(10):
            try:
                while chunk := await stream.receive():
                    data += chunk
            except anyio.EndOfStream:
                pass
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


async def test_http_routes() -> None:
    async with running() as (_bus, sink):
        status, body = await _http_get(sink.port, "/")
        assert status == 200 and b"<title>streambus" in body and b'"/ws"' in body
        assert (await _http_get(sink.port, "/healthz")) == (200, b"ok\n")
        assert (await _http_get(sink.port, "/nothing"))[0] == 404
        upgrade = "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        assert (await _http_get(sink.port, "/elsewhere", upgrade + "Sec-WebSocket-Version: 13\r\n"))[0] == 404
    async with running(page=False) as (_bus, sink):
        assert (await _http_get(sink.port, "/"))[0] == 404


async def test_port_in_use_is_a_clear_error() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        from streambus_websocket import BroadcasterError

        from streambus import Bus

        async with Bus() as bus:
            sink = WebSocketSink(port=port)
            bus.add_sink(sink, max_restarts=0)
            with pytest.raises(BroadcasterError, match=f"cannot listen on 127.0.0.1:{port}"):
                await sink.wait_ready()


@pytest.mark.parametrize("compression", [False, True])
async def test_compression_is_negotiated_only_when_enabled(compression: bool) -> None:
    async with running(compression=compression) as (bus, sink), connect(sink.url) as peer:
        extensions = peer.ws.response.headers.get("Sec-WebSocket-Extensions", "")
        assert ("permessage-deflate" in extensions) is compression
        await peer.subscribe(id=1)
        await publish_text(bus, ["compressed " * 20])
        events = await peer.events_until_end()
        assert events[1]["text"] == "compressed " * 20


async def test_wants_answers_as_the_clients_filters_do_as_they_subscribe_and_leave() -> None:
    """``wants`` (what an interest edge asks for every start) agrees with the filters, through every change."""
    starts = [
        StartEvent(stream=f"s{i}", seq=0, ts=0.0, model=model, provider="p", meta=meta)
        for i, (model, meta) in enumerate(
            [
                ("m", {"user": 7}),
                ("m", {"user": "7"}),
                ("m", {"user": 7.0}),
                ("m", {"user": True}),
                ("m", {"user": 1}),
                ("m", {"user": [7]}),
                ("m", {"user": {"id": 7}}),
                ("m", {}),
                ("other", {"user": 8}),
                ("m", {"user": 9, "team": "a"}),
                ("m", {"user": 10, "team": "b"}),
            ]
        )
    ]

    def expected(*filters: dict[str, object]) -> list[bool]:
        built = [Filter.of(**{k: v for k, v in f.items() if k != "id"}) for f in filters]
        return [any(flt.matches(start) for flt in built) for start in starts]

    async with running() as (_bus, sink), connect(sink.url) as one, connect(sink.url) as two:
        assert [sink.wants(start) for start in starts] == [False] * len(starts)
        first = {"id": "a", "meta": {"user": 7}}
        await one.subscribe(**first)
        assert [sink.wants(start) for start in starts] == expected(first)
        assert [sink.wants(start) for start in starts][:5] == [True, False, True, False, False]
        others = [
            {"id": "b", "meta": {"user": True}},
            {"id": "c", "meta": {"user": [9, 10], "team": "a"}},
            {"id": "d", "models": ["other"]},
        ]
        for fields in others:
            await two.subscribe(**fields)
        assert [sink.wants(start) for start in starts] == expected(first, *others)
        await two.send({"op": "unsubscribe", "id": "d"})
        await two.expect("unsubscribed")
        assert [sink.wants(start) for start in starts] == expected(first, *others[:2])
    async with running() as (_bus, sink):
        async with connect(sink.url) as peer:
            await peer.subscribe(id="a", meta={"user": 7})
            assert sink.wants(starts[0])
        with anyio.fail_after(10):
            while sink.clients:  # noqa: ASYNC110 - the server notices the close; no event says so
                await anyio.sleep(0.01)
        assert not sink.wants(starts[0])
