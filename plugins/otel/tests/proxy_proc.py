"""The edge process of the proxy-and-Redis trace test.

``python proxy_proc.py URL KEY TRACEPARENT``: a scripted Ollama upstream, a
bus whose streams go to Redis, and the proxy in front of the upstream; one
client request carrying TRACEPARENT goes through the proxy. Prints the
``traceparent`` the client got back as one JSON line.
"""

from __future__ import annotations

import sys

import aiohttp
import anyio
import orjson
from streambus_proxy import serve_proxy
from streambus_redis import RedisSink

from streambus import Bus, configure_logging
from streambus.testing import Reply, scripted_upstream

LINE = b'{"model":"m","created_at":"2026-01-01T00:00:00Z","message":{"role":"assistant","content":"hi"},"done":false}\n'
DONE = b'{"model":"m","created_at":"2026-01-01T00:00:00Z","message":{"role":"assistant","content":""},"done":true}\n'


async def edge(url: str, key: str, traceparent: str) -> None:
    async with scripted_upstream("application/x-ndjson") as upstream:
        upstream.replies.append(Reply(chunks=[LINE, DONE]))
        async with Bus() as bus:
            sink = RedisSink(url=url, stream=key, batch_max_ms=1)
            bus.add_sink(sink)
            await sink.wait_ready()
            async with serve_proxy(bus, upstream.url) as proxy, aiohttp.ClientSession() as http:
                body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
                async with http.post(proxy + "/api/chat", json=body, headers={"traceparent": traceparent}) as answer:
                    await answer.read()
                    returned = answer.headers.get("traceparent")
            await bus.shutdown()  # drains the Redis sink
    print(orjson.dumps({"traceparent": returned}).decode(), flush=True)


if __name__ == "__main__":
    configure_logging("warning")  # to stderr: stdout carries the result
    anyio.run(edge, sys.argv[1], sys.argv[2], sys.argv[3], backend="asyncio")
