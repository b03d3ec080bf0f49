"""Hostile clients (issue 18), over loopback, bounded in count and time.

- DNS rebinding: a page on ``attacker.example`` whose name now resolves to
  127.0.0.1 sends ``Host`` and ``Origin`` that agree with each other; the
  server judges them against its own names, so it refuses.
- Duplicate ``Host``/``Origin``/``Authorization`` headers: a 400 and one log
  line, never a 500 or a close 1011.
- A ``meta`` filter nested 1,000 deep: an error frame, no traceback.
- A raw socket that never reads and sends a 61 KB ``subscribe`` naming 1,100
  ended streams with ``since`` every 0.12 s, then ``unsubscribe``: refused,
  its queue bounded by ``client_buffer_bytes``, and honest clients lose nothing.
- Replays count toward ``client_buffer_bytes``: a client that does not read
  them is closed with 4003; one replay larger than the whole budget is
  answered ``recovered: false`` instead of being queued.
"""

from __future__ import annotations

import base64
import os
import socket
import struct
from typing import Any

import anyio
import anyio.lowlevel
import anyio.to_thread
import msgspec
import pytest
from streambus_websocket import CloseCode, ErrorCode, WebSocketSink
from streambus_websocket.testing import connect, publish_text, running
from structlog.testing import capture_logs

from streambus import Bus, DeltaEvent, EndEvent, OverflowPolicy, StartEvent

pytestmark = pytest.mark.anyio


# -- a raw client that never reads -------------------------------------------------------


def _masked_text_frame(payload: bytes) -> bytes:
    """A client text frame (RFC 6455 5.2). The all-zero mask key leaves the payload as it is."""
    length = len(payload)
    if length < 126:
        header = bytes((0x81, 0x80 | length))
    elif length < 65536:
        header = struct.pack("!BBH", 0x81, 0x80 | 126, length)
    else:
        header = struct.pack("!BBQ", 0x81, 0x80 | 127, length)
    return header + b"\0\0\0\0" + payload


class RawClient:
    """A blocking loopback socket speaking just enough WebSocket to attack; it reads only in :meth:`drain`."""

    def __init__(self, port: int, *, host: str | None = None, headers: list[tuple[str, str]] | None = None) -> None:
        self.port = port
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        # A small receive window, so what the server sends backs up into its own buffers quickly.
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        self.sock.settimeout(10)
        self.host = host or f"127.0.0.1:{port}"
        self.headers = headers or []

    def connect(self) -> None:
        self.sock.connect(("127.0.0.1", self.port))
        key = base64.b64encode(os.urandom(16)).decode()
        lines = [
            "GET /ws HTTP/1.1",
            f"Host: {self.host}",
            "Upgrade: websocket",
            "Connection: Upgrade",
            f"Sec-WebSocket-Key: {key}",
            "Sec-WebSocket-Version: 13",
            *(f"{name}: {value}" for name, value in self.headers),
        ]
        self.sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())

    def send(self, message: dict[str, Any]) -> None:
        self.sock.sendall(_masked_text_frame(msgspec.json.encode(message)))

    def status(self) -> bytes:
        """Read the HTTP status line of the handshake answer (for the refusal tests)."""
        data = b""
        while b"\r\n" not in data:
            chunk = self.sock.recv(4096)
            if not chunk:
                break
            data += chunk
        return data.split(b"\r\n", 1)[0]

    def drain(self) -> tuple[list[dict[str, Any]], int | None]:
        """Read everything the server sent until it closed; return its text frames and its close code."""
        received = bytearray()
        while True:
            try:
                chunk = self.sock.recv(65536)
            except (TimeoutError, ConnectionResetError):
                break
            if not chunk:
                break
            received += chunk
        head, _, data = bytes(received).partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101"), head[:80]
        frames: list[dict[str, Any]] = []
        code: int | None = None
        pos = 0
        # Server frames (RFC 6455 5.2): unmasked, unfragmented here.
        while pos + 2 <= len(data):
            opcode, length = data[pos] & 0x0F, data[pos + 1] & 0x7F
            pos += 2
            if length == 126:
                (length,) = struct.unpack("!H", data[pos : pos + 2])
                pos += 2
            elif length == 127:
                (length,) = struct.unpack("!Q", data[pos : pos + 8])
                pos += 8
            payload = data[pos : pos + length]
            pos += length
            if opcode == 0x1:
                frames.append(msgspec.json.decode(payload))
            elif opcode == 0x8:
                code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else None
                break
        return frames, code

    def close(self) -> None:
        self.sock.close()


def _status(port: int, host: str, headers: list[tuple[str, str]]) -> bytes:
    client = RawClient(port, host=host, headers=headers)
    try:
        client.connect()
        return client.status()
    finally:
        client.close()


def _get(port: int, lines: list[str]) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(("\r\n".join(["GET / HTTP/1.1", *lines]) + "\r\n\r\n").encode())
        return sock.recv(4096).split(b"\r\n", 1)[0]


def _refusals(logs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [entry for entry in logs if entry["event"] == "websocket.refused"]


# -- Host and Origin ---------------------------------------------------------------------


async def test_dns_rebinding_is_refused() -> None:
    """The attack: attacker.example resolves to 127.0.0.1, so Host and Origin agree with each other."""
    async with running() as (_bus, sink):
        port = sink.port
        rebinding = [("Origin", f"http://attacker.example:{port}")]
        with capture_logs() as logs:
            status = await anyio.to_thread.run_sync(_status, port, f"attacker.example:{port}", rebinding)
            assert status == b"HTTP/1.1 403 Forbidden"
            # Without Origin (a script that is not a browser page) the foreign Host is refused as well.
            status = await anyio.to_thread.run_sync(_status, port, f"attacker.example:{port}", [])
            assert status == b"HTTP/1.1 403 Forbidden"
            # The live page too: a rebound page must not read it either.
            status = await anyio.to_thread.run_sync(_get, port, [f"Host: attacker.example:{port}"])
            assert status == b"HTTP/1.1 403 Forbidden"
            # A loopback Host does not make a foreign page same-origin.
            status = await anyio.to_thread.run_sync(_status, port, f"127.0.0.1:{port}", rebinding)
            assert status == b"HTTP/1.1 403 Forbidden"
        reasons = [entry["reason"] for entry in _refusals(logs)]
        assert reasons == [
            f"Host 'attacker.example:{port}' is not a name of this server (see allowed_hosts)",
            f"Host 'attacker.example:{port}' is not a name of this server (see allowed_hosts)",
            f"Host 'attacker.example:{port}' is not a name of this server (see allowed_hosts)",
            f"origin 'http://attacker.example:{port}' is not allowed (see allowed_origins)",
        ]
        # The server's own names and origins still work.
        for name in ("127.0.0.1", "localhost"):
            status = await anyio.to_thread.run_sync(
                _status, port, f"{name}:{port}", [("Origin", f"http://{name}:{port}")]
            )
            assert status == b"HTTP/1.1 101 Switching Protocols"
        assert await anyio.to_thread.run_sync(_get, port, [f"Host: localhost:{port}"]) == b"HTTP/1.1 200 OK"


async def test_allowed_hosts_names_the_server() -> None:
    async with running(allowed_hosts=["chat.example"], allowed_origins=["https://app.example"]) as (_bus, sink):
        port = sink.port
        same_origin = [("Origin", f"http://chat.example:{port}")]
        status = await anyio.to_thread.run_sync(_status, port, f"chat.example:{port}", same_origin)
        assert status == b"HTTP/1.1 101 Switching Protocols"
        status = await anyio.to_thread.run_sync(_status, port, "chat.example", [("Origin", "https://app.example")])
        assert status == b"HTTP/1.1 101 Switching Protocols"
        status = await anyio.to_thread.run_sync(_status, port, f"other.example:{port}", [])
        assert status == b"HTTP/1.1 403 Forbidden"


def test_bad_allowed_hosts_is_named() -> None:
    for value in ("http://chat.example", "chat.example:80", "a/b", ""):
        with pytest.raises(ValueError, match="allowed_hosts: .* must be '\\*' or a host name"):
            WebSocketSink(allowed_hosts=[value])


@pytest.mark.parametrize("header", ["Host", "Origin", "Authorization"])
async def test_duplicate_headers_get_400_and_one_log_line(header: str, caplog: pytest.LogCaptureFixture) -> None:
    async with running(token="s3cret") as (_bus, sink):
        port = sink.port
        values = {
            "Host": f"127.0.0.1:{port}",
            "Origin": f"http://127.0.0.1:{port}",
            "Authorization": "Bearer s3cret",
        }
        headers = [(name, value) for name, value in values.items() if name != "Host"]
        headers.append((header, values[header]))
        if header == "Host":
            headers.append(("Host", "attacker.example"))
        with capture_logs() as logs:
            status = await anyio.to_thread.run_sync(_status, port, values["Host"], headers)
        assert status == b"HTTP/1.1 400 Bad Request"
        assert [entry["reason"] for entry in _refusals(logs)] == [f"duplicate {header} header"]
        assert [entry for entry in logs if entry["log_level"] == "error"] == []
        assert [record for record in caplog.records if record.levelname == "ERROR"] == []
        # Nothing else disturbed: a well-formed client is served as before.
        async with connect(sink.url, additional_headers={"Authorization": "Bearer s3cret"}) as peer:
            await peer.send({"op": "ping", "id": 1})
            assert (await peer.expect("pong"))["id"] == 1


# -- hostile messages ----------------------------------------------------------------------


async def test_deeply_nested_meta_gets_an_error_frame_and_no_traceback() -> None:
    nested = '{"b":' * 1000 + "1" + "}" * 1000
    async with running() as (_bus, sink), connect(sink.url) as peer:
        with capture_logs() as logs:
            await peer.send('{"op":"subscribe","meta":{"a":' + nested + "}}")
            error = await peer.expect("error")
            assert error["code"] == ErrorCode.BAD_MESSAGE.value
            assert error["field"].startswith("meta")
            # Nested where msgspec skips a value (an unknown field before "op"): the parser's recursion runs out.
            await peer.send('{"x":' + "[" * 5000 + "]" * 5000 + ',"op":"subscribe"}')
            assert await peer.expect("error") == {
                "op": "error",
                "code": ErrorCode.BAD_JSON.value,
                "message": "JSON nested too deeply",
            }
            await peer.send({"op": "ping", "id": 2})
            assert (await peer.expect("pong"))["id"] == 2
        assert [entry for entry in logs if entry["log_level"] in ("error", "critical") or "exc_info" in entry] == []
    # Scalars and lists of scalars are what a meta filter compares: still accepted.
    async with running() as (bus, sink), connect(sink.url) as peer:
        await peer.subscribe(id=1, meta={"user": ["u1", "u2"], "n": 3})
        await publish_text(bus, ["hi"], model="m", meta={"user": "u2", "n": 3})
        assert "".join(e.get("text", "") for e in await peer.events_until_end()) == "hi"


async def test_a_subscribe_names_a_bounded_number_of_streams() -> None:
    async with running(max_subscribe_streams=5) as (_bus, sink), connect(sink.url) as peer:
        await peer.send({"op": "subscribe", "id": "s", "streams": [f"s{i}" for i in range(6)]})
        assert await peer.expect("error") == {
            "op": "error",
            "code": ErrorCode.TOO_MANY_STREAMS.value,
            "message": "a subscribe may name at most 5 streams (streams and since together), this one names 6",
            "field": "streams",
            "id": "s",
        }
        await peer.send({"op": "subscribe", "id": "t", "streams": ["a"], "since": {f"s{i}": 0 for i in range(5)}})
        error = await peer.expect("error")
        assert (error["code"], error["field"]) == (ErrorCode.TOO_MANY_STREAMS.value, "since")
        # The same stream in both counts once; five is the limit, not past it.
        names = [f"s{i}" for i in range(5)]
        reply = await peer.subscribe(id="u", streams=names, since=dict.fromkeys(names, 0))
        assert reply["recovered"] is False
        with pytest.raises(ValueError, match="max_subscribe_streams: must be at least 1"):
            WebSocketSink(max_subscribe_streams=0)


# -- replays count toward the client's budget ---------------------------------------------


async def test_a_replay_larger_than_the_whole_budget_is_not_queued() -> None:
    async with running(client_buffer_bytes=8192) as (bus, sink):
        ids = [await publish_text(bus, ["x" * 100] * 10, model="m") for _ in range(10)]
        async with connect(sink.url) as peer:
            reply = await peer.subscribe(id=1, since=dict.fromkeys(ids, -1))
            assert (reply["recovered"], reply["replayed"], reply["reason"]) == (False, 0, "too_large")
            assert sorted(reply["unrecovered"]) == sorted(ids)
            # Nothing was queued, and the connection goes on.
            assert max(c.queued_bytes for c in sink.connections) < 8192
            await peer.send({"op": "ping", "id": 3})
            assert (await peer.expect("pong"))["id"] == 3
            # What fits is replayed as before.
            reply = await peer.subscribe(id=2, since={ids[0]: 4})
            assert (reply["recovered"], reply["replayed"]) == (True, 7)


async def test_a_client_that_does_not_read_its_replays_is_closed_lagged() -> None:
    async with running(client_buffer_bytes=65536, socket_send_buffer=4096, close_timeout=1) as (bus, sink):
        # Ten ended streams: each subscribe replays about 37 KB (as counted), within the budget on its own.
        ids = [await publish_text(bus, ["y" * 150] * 10, model="m") for _ in range(10)]
        attacker = RawClient(sink.port)
        await anyio.to_thread.run_sync(attacker.connect)
        try:
            subscribe = {"op": "subscribe", "id": "a", "since": dict.fromkeys(ids, -1)}
            with capture_logs() as logs:
                for _round in range(40):
                    await anyio.to_thread.run_sync(attacker.send, subscribe)
                    await anyio.to_thread.run_sync(attacker.send, {"op": "unsubscribe", "id": "a"})
                    # Never past the budget, whatever the client does.
                    assert all(c.queued_bytes <= 65536 for c in sink.connections)
                    if any(entry["event"] == "websocket.closing" for entry in logs):
                        break
                    await anyio.sleep(0.12)  # the attack's own pace: under max_message_rate
                frames, code = await anyio.to_thread.run_sync(attacker.drain)
        finally:
            attacker.close()
        (closing,) = [entry for entry in logs if entry["event"] == "websocket.closing"]
        assert closing["code"] == CloseCode.LAGGED
        assert closing["reason"].startswith("replays on this connection would pass client_buffer_bytes")
        assert code == CloseCode.LAGGED
        assert frames[0]["op"] == "hello"
        assert frames[-1]["code"] == ErrorCode.LAGGED.value


# -- the attack of issue 18 ----------------------------------------------------------------


async def test_never_reading_attacker_cannot_grow_memory_or_starve_honest_clients(anyio_backend: str) -> None:
    """1,100 ended streams, a 61 KB subscribe with since every 0.12 s from a socket that never reads."""
    budget = 65536
    rounds = 16 if anyio_backend == "asyncio" else 8
    async with running(client_buffer_bytes=budget, socket_send_buffer=4096, close_timeout=1) as (bus, sink):
        ids = [await publish_text(bus, ["z" * 20] * 3, model="old") for _ in range(1100)]
        subscribe = {"op": "subscribe", "id": "a", "streams": ids, "since": dict.fromkeys(ids, -1)}
        assert 58_000 < len(msgspec.json.encode(subscribe)) < sink.options.max_message_bytes
        async with connect(sink.url) as honest:
            await honest.subscribe(id="honest", models=["live"])
            attacker = RawClient(sink.port)
            await anyio.to_thread.run_sync(attacker.connect)
            try:
                async with bus.stream(model="live") as writer:
                    for i in range(rounds):
                        await writer.delta(f"{i},")
                        await anyio.to_thread.run_sync(attacker.send, subscribe)
                        await anyio.to_thread.run_sync(attacker.send, {"op": "unsubscribe", "id": "a"})
                        assert all(c.queued_bytes <= budget for c in sink.connections)
                        await anyio.sleep(0.12)  # the attack's own pace: under max_message_rate
                events = await honest.events_until_end()
                assert "".join(e.get("text", "") for e in events) == "".join(f"{i}," for i in range(rounds))
                assert sink.clients == 2
                sink.close_clients()
                frames, code = await anyio.to_thread.run_sync(attacker.drain)
            finally:
                attacker.close()
        assert code == CloseCode.SERVICE_RESTART
        # Every subscribe was refused before any replay; nothing else reached the attacker.
        codes = [f.get("code") for f in frames[1:]]
        assert codes == [ErrorCode.TOO_MANY_STREAMS.value, ErrorCode.UNKNOWN_SUBSCRIPTION.value] * rounds


async def test_the_sink_never_holds_the_bus_back() -> None:
    """However far behind the sink is, publishing never waits for it; its clients still get every character."""
    async with running() as (bus, sink), connect(sink.url) as peer:
        await peer.subscribe(id=1)
        (sub,) = [s for s in bus.subscriptions if s.name == "websocket"]
        assert sub.overflow is OverflowPolicy.COALESCE
        count = 3 * WebSocketSink.buffer
        events: list[Any] = [StartEvent(stream="s", seq=0, ts=0.0, model="m")]
        events += [DeltaEvent(stream="s", seq=i, ts=0.0, text=f"{i},") for i in range(1, count + 1)]
        events.append(EndEvent(stream="s", seq=count + 1, ts=0.0))
        published = 0
        with anyio.CancelScope() as scope:
            # Cancelled before the first publish: any wait for a subscriber would end the loop here.
            scope.cancel()
            for event in events:
                await bus.publish(event)
                published += 1
        assert published == len(events)
        received = await peer.events_until_end()
        assert "".join(e.get("text", "") for e in received) == "".join(f"{i}," for i in range(1, count + 1))
        assert any(e.get("n", 1) > 1 for e in received)  # it fell behind: deltas coalesced, nothing lost


async def test_a_sink_that_fell_behind_starts_over_and_says_so() -> None:
    """Past the bus's byte cap the sink's subscription overflows: clients are told, nothing is silently lost."""
    async with Bus(max_bytes=4096) as bus:
        sink = WebSocketSink(port=0)
        bus.add_sink(sink, name="websocket")
        await sink.wait_ready()
        async with connect(sink.url) as before:
            await before.subscribe(id=1)
            count = 2 * WebSocketSink.buffer
            events: list[Any] = [StartEvent(stream="s", seq=0, ts=0.0, model="m")]
            events += [DeltaEvent(stream="s", seq=i, ts=0.0, text="0123456789") for i in range(1, count + 1)]
            with capture_logs() as logs:
                with anyio.CancelScope() as scope:
                    scope.cancel()  # published without ever letting the sink run
                    for event in events:
                        await bus.publish(event)
                code, _frames = await before.closed()
        assert code == CloseCode.SERVICE_RESTART
        assert [entry["event"] for entry in logs if entry["log_level"] == "error"] == ["websocket.fell_behind"]
        # The history was emptied: resuming over the gap says so, and the sink serves on.
        async with connect(sink.url) as after:
            reply = await after.subscribe(id=1, since={"s": 5})
            assert (reply["recovered"], reply["unrecovered"]) == (False, ["s"])
            await bus.publish(EndEvent(stream="s", seq=count + 1, ts=0.0))
            text = await publish_text(bus, ["still ", "here"], model="m")
            received = await after.events_until_end(text)
            assert "".join(e.get("text", "") for e in received if e["stream"] == text) == "still here"
        await bus.shutdown()


async def test_a_client_that_never_reads_is_cut_off_after_close_timeout() -> None:
    """Closing waits for the peer to read what is buffered; a peer that never does must not keep the socket."""
    async with running(client_buffer_bytes=65536, socket_send_buffer=4096, close_timeout=0.5) as (bus, sink):
        attacker = RawClient(sink.port)
        await anyio.to_thread.run_sync(attacker.connect)
        try:
            await anyio.to_thread.run_sync(attacker.send, {"op": "subscribe", "id": "a"})
            with capture_logs() as logs:
                async with bus.stream(model="m") as writer:
                    # Bounded: 4 MB at most, far past the budget and the 4 KiB socket buffers.
                    for _ in range(4000):
                        await writer.delta("v" * 1000)
                        await anyio.lowlevel.checkpoint()
                        if any(entry["event"] == "websocket.closing" for entry in logs):
                            break
                cut_off = False
                for _round in range(200):  # bounded: close_timeout is 0.5 s
                    try:
                        await anyio.to_thread.run_sync(attacker.send, {"op": "ping"})
                    except OSError:
                        cut_off = True  # the server reset the connection
                        break
                    await anyio.sleep(0.05)
            events = [entry["event"] for entry in logs]
        finally:
            attacker.close()
        assert cut_off, events
        assert sink.clients == 0


async def test_a_replay_that_does_not_fit_behind_a_backlog_closes_lagged(anyio_backend: str) -> None:
    if anyio_backend == "trio":
        # websockets' trio connection reads nothing while a send waits for the socket, so the
        # subscribe is never read: the client stays within its queue until live events lag it.
        pytest.skip("under trio a client whose socket is full is not read from")
    async with running(client_buffer_bytes=65536, socket_send_buffer=4096, close_timeout=0.5) as (bus, sink):
        ended = await publish_text(bus, ["e" * 1500] * 10, model="old")  # about 19 KB to replay
        attacker = RawClient(sink.port)
        await anyio.to_thread.run_sync(attacker.connect)
        try:
            await anyio.to_thread.run_sync(attacker.send, {"op": "subscribe", "id": "live", "models": ["live"]})
            with capture_logs() as logs:
                async with bus.stream(model="live") as writer:
                    # Bounded: a backlog of at least 50 KB builds up well within 2 MB.
                    for _ in range(2000):
                        await writer.delta("l" * 1000)
                        await anyio.lowlevel.checkpoint()
                        if any(c.queued_bytes >= 50_000 for c in sink.connections):
                            break
                    assert any(c.queued_bytes >= 50_000 for c in sink.connections)
                    await anyio.to_thread.run_sync(attacker.send, {"op": "subscribe", "id": "r", "since": {ended: -1}})
                    for _ in range(500):  # bounded poll for the server to handle it
                        if any(entry["event"] == "websocket.closing" for entry in logs):
                            break
                        await anyio.sleep(0.01)
        finally:
            attacker.close()
        (closing,) = [entry for entry in logs if entry["event"] == "websocket.closing"]
        assert closing["code"] == CloseCode.LAGGED
        assert "do not fit in what is left of client_buffer_bytes" in closing["reason"]
