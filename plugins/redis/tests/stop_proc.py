"""Processes for the cross-host stop test: a producer host and edges, linked by the shared Redis.

``python stop_proc.py produce URL KEY CHANNEL UPSTREAM``: an ``openai``
producer streaming from the OpenAI-compatible server at UPSTREAM, through a
RedisSink on KEY, with a RedisControl on CHANNEL. Prints ``ready`` once the
control channel listens, then starts the request; exits when the stream ended.

``python stop_proc.py edge URL KEY CHANNEL KIND``: a RedisSource reading KEY
into a bus with a RedisControl and a KIND (``http`` or ``websocket``) sink on
a free loopback port. Prints ``ready <url>``; runs until stdin closes.
"""

from __future__ import annotations

import asyncio
import sys

import anyio
from streambus_http import HttpSink
from streambus_openai import OpenAIProducer
from streambus_redis import RedisControl, RedisSink, RedisSource
from streambus_websocket import WebSocketSink

from streambus import Bus, configure_logging


async def produce(url: str, key: str, channel: str, upstream: str) -> None:
    async with Bus() as bus:
        bus.add_sink(RedisSink(url=url, stream=key, batch_max_ms=0))
        control = RedisControl(url=url, channel=channel)
        bus.add_sink(control)
        await control.wait_ready()
        print("ready", flush=True)
        producer = OpenAIProducer(
            base_url=upstream, model="m", api_key_env=None, messages=[{"role": "user", "content": "go on"}]
        )
        await producer.run(bus)


async def edge(url: str, key: str, channel: str, kind: str) -> None:
    async with Bus() as bus:
        source = RedisSource(url=url, stream=key, start="last", block_ms=50)
        bus.start_producer(source)
        control = RedisControl(url=url, channel=channel)
        bus.add_sink(control)
        if kind == "http":
            http = HttpSink(port=0)
            bus.add_sink(http)
            served = await http.started()
        else:
            ws = WebSocketSink(port=0)
            bus.add_sink(ws)
            served = await ws.wait_ready()
        await source.wait_ready()
        await control.wait_ready()
        print(f"ready {served}", flush=True)
        await anyio.to_thread.run_sync(sys.stdin.read)
        source.stop()
        await bus.shutdown()


def main(argv: list[str]) -> None:
    configure_logging("info")  # to stderr: stdout carries "ready"
    command, *args = argv
    if command == "produce":
        asyncio.run(produce(*args))
    elif command == "edge":
        asyncio.run(edge(*args))
    else:
        raise SystemExit(f"unknown command {command!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
