"""Producer and consumer processes for the multi-process and kill tests.

``python proc.py produce URL KEY STREAMS DELTAS``: publish STREAMS interleaved
streams of DELTAS deltas each through a RedisSink, then exit.

``python proc.py consume URL KEY CONSUMER OUT EXPECT``: read KEY with a
RedisSource (``start = "last"``, position saved beside OUT in
``OUT.redis-position``), record into OUT with the built-in recorder, and exit
once OUT holds EXPECT finished streams. Restarting it after a kill resumes
where it left off (the recording seeds the de-duplicator). Prints ``ready``
once reading; logs (warning and up) go to stderr.
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


def main(argv: list[str]) -> None:
    configure_logging("warning")  # to stderr: stdout carries "ready"
    command, *args = argv
    if command == "produce":
        asyncio.run(produce(args[0], args[1], int(args[2]), int(args[3])))
    elif command == "consume":
        out = args[3]
        done = sum(map(is_terminal, iter_recording(out, lenient=True))) if Path(out).exists() else 0
        asyncio.run(consume(args[0], args[1], args[2], out, int(args[4]), done))
    else:
        raise SystemExit(f"unknown command {command!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
