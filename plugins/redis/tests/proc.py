"""Producer and consumer processes for the multi-process and kill tests.

``python proc.py produce URL KEY STREAMS DELTAS``: publish STREAMS interleaved
streams of DELTAS deltas each through a RedisSink, then exit.

``python proc.py consume URL KEY CONSUMER OUT EXPECT``: read KEY with a
RedisSource (``start = "last"``, position saved beside OUT in
``OUT.redis-position``), record into OUT with the built-in recorder, and exit
once OUT holds EXPECT finished streams. Restarting it after a kill resumes
where it left off (the recording seeds the de-duplicator). Prints ``ready``
once reading; logs (warning and up) go to stderr.

``python proc.py paced URL PREFIX LAYOUT STREAMS DELTAS PACE TAG``: publish STREAMS
streams of DELTAS deltas (``"<i>.<j> "``), one every PACE seconds each, with
``meta = {"tag": TAG, "i": i}``, through a RedisSink in LAYOUT with a 1 s
producer heartbeat; prints ``ready`` once connected (then kill it to test
``producer_lost``).

``python proc.py edge URL PREFIX``: an edge: a RedisSource in the ``per_stream``
layout (``follow = "interested"``, index from its start) feeding a
WebSocketSink on a free loopback port; prints ``ready <ws url>``.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import anyio
import anyio.lowlevel
from streambus_redis import RedisSink, RedisSource

from streambus import Bus, Subscription, Usage, configure_logging, is_terminal
from streambus.builtins.recorder import RecorderSink
from streambus.recording import iter_recording


async def produce(url: str, key: str, streams: int, deltas: int) -> None:
    async with Bus() as bus:
        bus.add_sink(RedisSink(url=url, stream=key, batch_max_ms=1))

        async def one(i: int) -> None:
            async with bus.stream(model="m", provider="p", meta={"i": i}) as w:
                for j in range(deltas):
                    await w.delta(f"{i}.{j} ")
                    if j % 7 == 0:
                        await anyio.lowlevel.checkpoint()  # interleave the streams
                await w.end("stop", usage=Usage(completion_tokens=deltas))

        async with anyio.create_task_group() as tg:
            for i in range(streams):
                tg.start_soon(one, i)


class Finisher:
    """Stops the source once the recording holds *expect* finished streams."""

    overflow = "block"

    def __init__(self, source: RedisSource, done: int, expect: int) -> None:
        self.source, self.done, self.expect = source, done, expect

    async def run(self, events: Subscription) -> None:
        async for event in events:
            if is_terminal(event):
                self.done += 1
                if self.done >= self.expect:
                    self.source.stop()


async def consume(url: str, key: str, consumer: str, out: str, expect: int, done: int) -> None:
    source = RedisSource(
        url=url, stream=key, consumer=consumer, start="last", seed_recording=out, block_ms=200, commit_interval_ms=20
    )
    async with Bus() as bus:
        bus.add_sink(RecorderSink(path=out, fsync="stream_end"))
        bus.add_sink(Finisher(source, done, expect))
        bus.start_producer(source)
        await source.wait_ready()
        print("ready", flush=True)
        if done >= expect:
            source.stop()
    print(f"stats delivered={source.delivered} duplicates={source.duplicates} gaps={len(source.gaps)}", flush=True)


async def paced(url: str, prefix: str, layout: str, streams: int, deltas: int, pace: float, tag: str) -> None:
    sink = RedisSink(url=url, stream=prefix, batch_max_ms=1, layout=layout, producer_timeout_ms=1000)
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


async def edge(url: str, prefix: str) -> None:
    from streambus_websocket import WebSocketSink

    source = RedisSource(url=url, stream=prefix, layout="per_stream", start="0", position="none", block_ms=500)
    sink = WebSocketSink(port=0)
    async with Bus() as bus:
        bus.add_sink(sink, name="websocket")
        bus.start_producer(source)
        ws_url = await sink.wait_ready()
        await source.wait_ready()
        print(f"ready {ws_url}", flush=True)
        await anyio.sleep_forever()


def main(argv: list[str]) -> None:
    configure_logging("warning")  # to stderr: stdout carries "ready"
    command, *args = argv
    if command == "produce":
        asyncio.run(produce(args[0], args[1], int(args[2]), int(args[3])))
    elif command == "consume":
        out = args[3]
        done = sum(map(is_terminal, iter_recording(out, lenient=True))) if Path(out).exists() else 0
        asyncio.run(consume(args[0], args[1], args[2], out, int(args[4]), done))
    elif command == "paced":
        url, prefix, layout, streams, deltas, pace, tag = args
        asyncio.run(paced(url, prefix, layout, int(streams), int(deltas), float(pace), tag))
    elif command == "edge":
        asyncio.run(edge(args[0], args[1]))
    else:
        raise SystemExit(f"unknown command {command!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
