"""Producer and consumer processes for the kill tests.

``python proc.py produce URL STREAMS DELTAS PACE``: publish STREAMS streams of
DELTAS deltas each (delta *j* of stream *i* is ``"i.j "``) through a NatsSink,
one delta per stream every PACE seconds, then end them. Prints
``stream <id> <i>`` for each stream once its first delta was published.

``python proc.py worker URL``: a producer host with a NatsSink and a
NatsControl and one endless stream; prints ``stream <id>``, and ``handled N``
once a stop from another host ended it.

``python proc.py paced URL STREAMS DELTAS PACE TAG``: STREAMS streams (meta
``{"tag": TAG, "i": i}``) through a NatsSink with ``index = true``; prints
``ready`` once connected.

``python proc.py edge URL``: an edge: a NatsSource with ``follow =
"interested"`` feeding a WebSocketSink; prints ``ready <ws url>``.

``python proc.py consume URL OUT EXPECT``: read with a NatsSource
(``start = "last"``, position beside OUT in ``OUT.nats-position``), record into
OUT with the built-in recorder, and exit once OUT holds EXPECT finished
streams. Restarting it after a kill resumes where it left off (the recording
seeds the de-duplicator). Prints ``ready`` once reading; logs (warning and up)
go to stderr.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import anyio
from streambus_nats import NatsControl, NatsSink, NatsSource

from streambus import Bus, Subscription, configure_logging, is_terminal
from streambus.builtins.recorder import RecorderSink
from streambus.recording import iter_recording


async def produce(url: str, streams: int, deltas: int, pace: float) -> None:
    sink = NatsSink(url=url, batch_max_ms=1, heartbeat_ms=200)
    async with Bus() as bus:
        bus.add_sink(sink)
        await sink.wait_ready()

        async def one(i: int) -> None:
            async with bus.stream(model="m", provider="p", meta={"i": i}) as w:
                await w.delta(f"{i}.0 ")
                print(f"stream {w.stream} {i}", flush=True)
                for j in range(1, deltas):
                    await anyio.sleep(pace)
                    await w.delta(f"{i}.{j} ")
                await w.end("stop")

        async with anyio.create_task_group() as tg:
            for i in range(streams):
                tg.start_soon(one, i)


async def worker(url: str) -> None:
    """One endless stream (a delta every 50 ms) until a stop from another host aborts it."""
    sink = NatsSink(url=url, batch_max_ms=1)
    control = NatsControl(url=url)
    async with Bus() as bus:
        bus.add_sink(sink)
        bus.add_sink(control)
        await sink.wait_ready()
        await control.wait_ready()
        async with bus.stream(model="m") as w:
            print(f"stream {w.stream}", flush=True)
            i = 0
            while True:
                await w.delta(f"{i} ")
                i += 1
                await anyio.sleep(0.05)
    print(f"handled {control.handled}", flush=True)


class Finisher:
    """Stops the source once the recording holds *expect* finished streams."""

    overflow = "block"

    def __init__(self, source: NatsSource, done: int, expect: int) -> None:
        self.source, self.done, self.expect = source, done, expect

    async def run(self, events: Subscription) -> None:
        async for event in events:
            if is_terminal(event):
                self.done += 1
                if self.done >= self.expect:
                    self.source.stop()


async def consume(url: str, out: str, expect: int, done: int) -> None:
    source = NatsSource(url=url, consumer="edge", start="last", seed_recording=out, commit_interval_ms=20)
    async with Bus() as bus:
        bus.add_sink(RecorderSink(path=out, fsync="stream_end"))
        bus.add_sink(Finisher(source, done, expect))
        bus.start_producer(source)
        await source.wait_ready()
        print("ready", flush=True)
        if done >= expect:
            source.stop()
    print(f"stats delivered={source.delivered} duplicates={source.duplicates} gaps={len(source.gaps)}", flush=True)


async def paced(url: str, streams: int, deltas: int, pace: float, tag: str) -> None:
    sink = NatsSink(url=url, batch_max_ms=1, heartbeat_ms=200, index=True)
    async with Bus() as bus:
        bus.add_sink(sink)
        await sink.wait_ready()
        print("ready", flush=True)

        async def one(i: int) -> None:
            async with bus.stream(model="m", provider="p", meta={"tag": tag, "i": i}) as w:
                for j in range(deltas):
                    await w.delta(f"{i}.{j} ")
                    await anyio.sleep(pace)
                await w.end("stop")

        async with anyio.create_task_group() as tg:
            for i in range(streams):
                tg.start_soon(one, i)


async def edge(url: str) -> None:
    from streambus_websocket import WebSocketSink

    source = NatsSource(url=url, follow="interested", start="$", consumer="edge")
    sink = WebSocketSink(port=0)
    async with Bus() as bus:
        bus.add_sink(sink, name="websocket")
        bus.start_producer(source)
        ws_url = await sink.wait_ready()
        await source.wait_ready()
        print(f"ready {ws_url}", flush=True)
        await anyio.sleep_forever()


def main(argv: list[str]) -> None:
    configure_logging("warning")  # to stderr: stdout carries the protocol above
    command, *args = argv
    if command == "produce":
        asyncio.run(produce(args[0], int(args[1]), int(args[2]), float(args[3])))
    elif command == "worker":
        asyncio.run(worker(args[0]))
    elif command == "consume":
        out = args[1]
        done = sum(map(is_terminal, iter_recording(out, lenient=True))) if Path(out).exists() else 0
        asyncio.run(consume(args[0], out, int(args[2]), done))
    elif command == "paced":
        asyncio.run(paced(args[0], int(args[1]), int(args[2]), float(args[3]), args[4]))
    elif command == "edge":
        asyncio.run(edge(args[0]))
    else:
        raise SystemExit(f"unknown command {command!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
