"""A real streambus for the Node tests: a bus with the websocket and http sinks on loopback.

Run by ``test/helpers.mjs`` as ``.venv/bin/python clients/js/test/bus_server.py [--token T]
[--jwt-secret-env VAR] [--jwt-leeway S] [--history-events N] [--max-subscribe-streams N] [--per-stream N]``.
It prints one JSON line with the URLs (structlog's lines share stdout, so protocol lines start
with ``@@``), then reads commands, one JSON object per line on stdin, and answers each with one
JSON line (``{"ok": true}`` or ``{"error": "..."}``) once the command's events are published:

- ``{"cmd": "start", "id": "s1", "model": "m", "meta": {...}}`` opens a stream (writer kept open);
- ``{"cmd": "delta", "id": "s1", "text": "...", "channel": "content"}``;
- ``{"cmd": "moderation", "id": "s1", "action": "retract", "start": 0, "end": 3}``;
- ``{"cmd": "end", "id": "s1", "usage": {...}}``, ``{"cmd": "error", "id", "kind", "message"}``,
  ``{"cmd": "abort", "id", "reason"}`` close it;
- ``{"cmd": "close_clients"}`` closes every WebSocket client with 1012 (a server restart);
- ``{"cmd": "produce", "streams": 100, "tokens": 300, "rate": 50}`` starts that many streams
  (``p0``...), each publishing ``tokens`` deltas ``"t0 "``, ``"t1 "``... at ``rate`` per second,
  then ``end`` (the benchmark's load); answered at once.

Closing stdin stops the bus.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import anyio
import orjson
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
from streambus_http import HttpSink
from streambus_websocket import WebSocketSink

from streambus import Bus, StreamWriter, Usage


async def produce(bus: Bus, sid: str, tokens: int, interval: float) -> None:
    """Publish ``tokens`` deltas at a steady rate (sleeping to a schedule, so lag does not accumulate)."""
    async with bus.stream(stream=sid, model="bench") as writer:
        began = anyio.current_time()
        for i in range(tokens):
            await anyio.sleep_until(began + i * interval)
            await writer.delta(f"t{i} ")
        await writer.end()


Job = tuple[dict[str, Any], anyio.Event, list[Exception]]


async def scripted(bus: Bus, first: dict[str, Any], jobs: MemoryObjectReceiveStream[Job], ready: anyio.Event) -> None:
    """One stream, written by its own task (a writer's cancel scope must be left by the task that entered it)."""
    meta = first.get("meta")
    async with bus.stream(
        stream=first["id"], model=first.get("model", ""), provider=first.get("provider", ""), meta=meta
    ) as writer:
        ready.set()
        async with jobs:
            async for cmd, done, errors in jobs:
                try:
                    await write(writer, cmd)
                except Exception as exc:  # answered to the test
                    errors.append(exc)
                done.set()
                if cmd["cmd"] in ("end", "error", "abort") and not errors:
                    return


async def write(writer: StreamWriter, cmd: dict[str, Any]) -> None:
    """Publish one scripted event."""
    op = cmd["cmd"]
    if op == "delta":
        await writer.delta(cmd["text"], channel=cmd.get("channel", "content"))
    elif op == "moderation":
        await writer.moderation(
            action=cmd["action"], start=cmd["start"], end=cmd["end"], channel=cmd.get("channel", "content")
        )
    elif op == "end":
        usage = Usage(**cmd["usage"]) if cmd.get("usage") else None
        await writer.end(cmd.get("reason", "stop"), usage=usage)
    elif op == "error":
        await writer.error(cmd["kind"], cmd.get("message", ""))
    elif op == "abort":
        await writer.abort(cmd.get("reason", ""), by=cmd.get("by", "client"))
    else:
        raise ValueError(f"cmd: unknown command {op!r}")


async def handle(
    cmd: dict[str, Any], bus: Bus, sink: WebSocketSink, writers: dict[str, MemoryObjectSendStream[Job]]
) -> None:
    """Run one command; raises on a bad one (the caller answers with the error)."""
    op = cmd["cmd"]
    if op == "close_clients":
        sink.close_clients()
        return
    if op == "produce":
        for i in range(cmd["streams"]):
            bus.start_soon(produce, bus, f"p{i}", cmd["tokens"], 1 / cmd["rate"])
        return
    sid = cmd["id"]
    if op == "start":
        send, receive = anyio.create_memory_object_stream[Job](16)
        ready = anyio.Event()
        writers[sid] = send
        bus.start_soon(scripted, bus, cmd, receive, ready)
        await ready.wait()
        return
    done, errors = anyio.Event(), list[Exception]()
    await writers[sid].send((cmd, done, errors))
    await done.wait()
    if errors:
        raise errors[0]
    if op in ("end", "error", "abort"):
        await writers.pop(sid).aclose()


async def main() -> None:
    """Serve until stdin closes."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--token")
    parser.add_argument("--jwt-secret-env", help="accept scoped tokens signed with the secret in this variable")
    parser.add_argument("--jwt-leeway", type=float, default=5.0, help="seconds of clock skew tolerated on exp")
    parser.add_argument("--history-events", type=int, default=2000)
    parser.add_argument("--max-subscribe-streams", type=int, default=256)
    parser.add_argument("--per-stream", type=int, default=10000)
    args = parser.parse_args()
    async with Bus() as bus:
        sink = WebSocketSink(
            port=0,
            token=args.token,
            jwt_secret_env=args.jwt_secret_env,
            jwt_leeway=args.jwt_leeway,
            history_events=args.history_events,
            max_subscribe_streams=args.max_subscribe_streams,
        )
        http = HttpSink(
            port=0,
            token=args.token,
            jwt_secret_env=args.jwt_secret_env,
            jwt_leeway=args.jwt_leeway,
            per_stream=args.per_stream,
        )
        bus.add_sink(sink)
        bus.add_sink(http)
        ws_url = await sink.wait_ready()
        http_url = await http.started()
        print("@@" + orjson.dumps({"ws": ws_url, "http": http_url}).decode(), flush=True)
        writers: dict[str, MemoryObjectSendStream[Job]] = {}
        stdin = anyio.wrap_file(sys.stdin)
        async for line in stdin:
            if not line.strip():
                continue
            try:
                await handle(orjson.loads(line), bus, sink, writers)
                answer: dict[str, Any] = {"ok": True}
            except Exception as exc:  # the test reads the message
                answer = {"error": f"{type(exc).__name__}: {exc}"}
            print("@@" + orjson.dumps(answer).decode(), flush=True)
        for send in writers.values():
            await send.aclose()  # an unfinished stream ends as its writer leaves without a terminal event
        await bus.shutdown()


if __name__ == "__main__":
    anyio.run(main)
