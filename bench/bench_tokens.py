"""Scoped tokens on the WebSocket broadcaster: what a per-user token costs, next to today's filter.

The workload users run: one subscriber per user, each user's own stream generating tokens one at
a time, all streams at once. Side by side in one run, on asyncio, clients in a separate process
(``python bench/bench_tokens.py --clients ...``):

- **static + filter**: every client holds the operator's static token and subscribes with
  ``meta = {"user": "u<i>"}`` (what an app does today, trusting its clients);
- **scoped token**: every client holds its own HS256 token (``meta.user = u<i>``) and subscribes
  with no filter at all; the server narrows the subscription to the token.

Reported per system: the time to connect and subscribe every client (the handshake verifies each
token), frames delivered, frames a client got from another user's stream (must be 0), the
publish-to-client latency of every token (p50/p99; the publish time travels in the text), and the
server's CPU time per delivered frame. Each system runs twice, alternating. Writes
``bench/results/tokens.md``. Bounded: about 30 s.
"""

from __future__ import annotations

import asyncio
import json
import os
import resource
import secrets
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import msgspec

OUT = Path(__file__).resolve().parent / "results" / "tokens.md"
USERS = 200
TOKENS = 100
RATE = 20.0  # tokens/s per stream: 200 streams x 20/s = 4000 tokens/s in all
OPERATOR = "operator-" + secrets.token_hex(8)
SECRET = secrets.token_urlsafe(32)


# -- the client process -----------------------------------------------------------------------


async def _clients(url: str, mode: str, users: int, tokens: int) -> None:
    from websockets.asyncio.client import connect

    from streambus.tokens import mint_token

    decoder = msgspec.json.Decoder()
    latencies: list[float] = []
    foreign = 0
    received = 0
    subscribed = 0
    all_subscribed = asyncio.Event()

    # Minted before the clock starts: what is timed is the server's work, not the client's.
    minted = [mint_token(SECRET_FROM_ENV, meta={"user": f"u{i}"}, ttl=600) for i in range(users)]

    async def one(i: int) -> None:
        nonlocal foreign, received, subscribed
        user = f"u{i}"
        if mode == "scoped":
            token = minted[i]
            subscribe = '{"op":"subscribe","id":1}'
        else:
            token = OPERATOR_FROM_ENV
            subscribe = json.dumps({"op": "subscribe", "id": 1, "meta": {"user": user}})
        headers = {"Authorization": f"Bearer {token}"}
        async with connect(url, additional_headers=headers, proxy=None, max_size=None, open_timeout=60) as ws:
            await ws.recv()  # hello
            await ws.send(subscribe)
            await ws.recv()  # subscribed
            subscribed += 1
            if subscribed == users:
                all_subscribed.set()
            while True:
                msg = decoder.decode(await ws.recv())
                received += 1
                if msg.get("meta", {}).get("user", user) != user or not msg["stream"].endswith(f"-{user}"):
                    foreign += 1
                if msg["type"] == "delta":
                    latencies.append(time.time() - float(msg["text"].split("|", 1)[0]))
                elif msg["type"] == "end":
                    return

    began = time.perf_counter()
    tasks = [asyncio.create_task(one(i)) for i in range(users)]
    await all_subscribed.wait()
    print(json.dumps({"ready": time.perf_counter() - began}), flush=True)
    await asyncio.gather(*tasks)
    latencies.sort()
    print(
        json.dumps(
            {
                "received": received,
                "foreign": foreign,
                "p50": latencies[len(latencies) // 2] * 1000,
                "p99": latencies[int(len(latencies) * 0.99)] * 1000,
            }
        ),
        flush=True,
    )


SECRET_FROM_ENV = os.environ.get("BENCH_TOKENS_SECRET", "")
OPERATOR_FROM_ENV = os.environ.get("BENCH_TOKENS_OPERATOR", "")


# -- the server side --------------------------------------------------------------------------


async def _run(mode: str) -> dict[str, Any]:
    import anyio
    from streambus_websocket import WebSocketSink

    from streambus import Bus
    from streambus.tokens import TokenVerifier

    async with Bus() as bus:
        sink = WebSocketSink(port=0, token=OPERATOR, verifier=TokenVerifier(secret=SECRET), max_clients=USERS + 10)
        bus.add_sink(sink, name="websocket")
        url = await sink.wait_ready()
        env = {**os.environ, "BENCH_TOKENS_SECRET": SECRET, "BENCH_TOKENS_OPERATOR": OPERATOR}
        proc = await asyncio.create_subprocess_exec(
            sys.executable, __file__, "--clients", url, mode, str(USERS), str(TOKENS),
            stdout=subprocess.PIPE, env=env,
        )  # fmt: skip
        assert proc.stdout is not None
        ready = json.loads(await proc.stdout.readline())["ready"]
        cpu0 = resource.getrusage(resource.RUSAGE_SELF)

        async def produce(i: int) -> None:
            user = f"u{i}"
            async with bus.stream(stream=f"s-{user}", model="bench", meta={"user": user}) as w:
                began = anyio.current_time() + (i % 50) / (50 * RATE)  # spread the streams' phases
                for n in range(TOKENS):
                    await anyio.sleep_until(began + n / RATE)
                    await w.delta(f"{time.time():.6f}| tok")

        async with anyio.create_task_group() as tg:
            for i in range(USERS):
                tg.start_soon(produce, i)
        result = json.loads(await proc.stdout.readline())
        cpu1 = resource.getrusage(resource.RUSAGE_SELF)
        await proc.wait()
        await bus.shutdown()
    cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
    return {**result, "ready": ready, "cpu_us_per_frame": cpu / max(1, result["received"]) * 1e6}


def main() -> None:
    import anyio

    from streambus import configure_logging

    configure_logging(level="warning")
    started = time.perf_counter()
    rows = []
    systems = (("static", "static token + meta filter"), ("scoped", "scoped token (HS256), no filter"))
    # Alternating, twice: the machine is shared, so one run of each says little on its own.
    for run in (1, 2):
        for mode, label in systems:
            r = anyio.run(_run, mode)
            rows.append(
                f"| {label} | {run} | {USERS} | {r['ready'] * 1000:,.0f} | {r['received']:,} | {r['foreign']} | "
                f"{r['p50']:.1f} | {r['p99']:.1f} | {r['cpu_us_per_frame']:.1f} |"
            )
            print(rows[-1], flush=True)
    took = time.perf_counter() - started
    text = "\n".join(
        [
            "## Scoped tokens (WebSocket)",
            "",
            f"{USERS} users, one subscriber each, each user's stream publishing {TOKENS} tokens one at a time at "
            f"{RATE:g}/s (all streams at once: {USERS * RATE:,.0f} tokens/s). Clients in a separate process; "
            "latency is publish to client, per token; server CPU is the broadcasting process's, per frame.",
            "",
            "| system | run | clients | connect + subscribe all, ms | frames delivered | foreign frames | p50 ms "
            "| p99 ms | server CPU µs/frame |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
            *rows,
            "",
            f"Expected frames: {USERS * (TOKENS + 2):,} (start, {TOKENS} deltas, end per user). "
            f"(Run took {took:.0f} s; load average {os.getloadavg()[0]:.1f} at the end.)",
            "",
        ]
    )
    OUT.parent.mkdir(exist_ok=True)
    OUT.write_text(text, encoding="utf-8")
    print(text)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--clients":
        asyncio.run(_clients(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])))
    else:
        main()
