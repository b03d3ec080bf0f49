"""HTTP streaming outputs: events/s and per-event cost of each format, 1 client and 100 clients.

Server: a bus with a :class:`streambus_http.StreamHub` behind aiohttp (the
``http`` sink's routes) in this process. Clients: aiohttp clients in a separate
process, all reading one stream. A producer publishes N deltas (yielding to
the event loop after each, as a network-fed producer does) after every client
is waiting; the clock runs from the first publish to the last client's last
byte. Peer: a hand-written handler per client with its own bus subscription
(``async for event in bus.subscribe(...)``) writing plain text, which is what
one writes without this plugin. Also: the sans-I/O encoding cost per event.

Run: ``.venv/bin/python bench/bench_http.py`` (writes ``bench/results/http.md``).
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results" / "http.md"
FORMATS = ["sse", "text", "ndjson", "ui", "openai"]
TOKEN = "tok "
ARRIVAL_RATE = 50_000  # tokens/s offered by the producer: above what one core can serve


# -- client process --------------------------------------------------------
async def _client_main(url: str, clients: int, expect_chars: int, fmt: str) -> None:
    import aiohttp

    async def one(session: aiohttp.ClientSession) -> dict[str, Any]:
        total = 0
        tail = b""
        async with session.get(url, timeout=aiohttp.ClientTimeout(total=120)) as resp:
            async for chunk in resp.content.iter_any():
                total += len(chunk)
                tail = (tail + chunk)[-200:]
        done = time.time()
        if fmt in ("sse", "ndjson"):
            ok = b'"type":"end"' in tail
        elif fmt in ("text", "naive"):
            ok = total == expect_chars
        else:
            ok = tail.endswith(b"data: [DONE]\n\n")
        return {"bytes": total, "done": done, "ok": ok}

    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        results = await asyncio.gather(*(one(session) for _ in range(clients)))
    print(json.dumps(results))


# -- server ------------------------------------------------------------------
async def _run_case(fmt: str, clients: int, events: int) -> dict[str, Any]:
    import anyio
    import anyio.lowlevel
    from aiohttp import web
    from streambus_http import StreamHub
    from streambus_http.aio import add_routes

    from streambus import Bus, DeltaEvent, Filter, new_stream_id

    naive_ready = 0

    async with Bus(buffer=4096) as bus:
        hub = StreamHub.attach(bus)
        app = web.Application()
        add_routes(app, hub)

        async def naive(request: web.Request) -> web.StreamResponse:
            nonlocal naive_ready
            sub = bus.subscribe(Filter.of(streams=request.match_info["id"]))
            resp = web.StreamResponse(headers={"content-type": "text/plain; charset=utf-8"})
            await resp.prepare(request)
            naive_ready += 1
            async with sub:
                async for event in sub:
                    if type(event) is DeltaEvent:
                        await resp.write(event.text.encode())
                    elif type(event).__name__ in ("EndEvent", "ErrorEvent", "AbortEvent"):
                        break
            await resp.write_eof()
            return resp

        app.router.add_get("/naive/{id}", naive)
        runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0, backlog=1024)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        stream = new_stream_id()
        path = f"/naive/{stream}" if fmt == "naive" else f"/streams/{stream}/{fmt}"
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            __file__,
            "--client",
            f"http://127.0.0.1:{port}{path}",
            str(clients),
            str(events * len(TOKEN)),
            fmt,
            stdout=subprocess.PIPE,
        )
        with anyio.fail_after(60):
            while (naive_ready if fmt == "naive" else hub.waiting) < clients:  # noqa: ASYNC110 - other process
                await anyio.sleep(0.01)
        cpu0 = time.process_time()
        t0 = time.time()
        async with bus.stream(model="bench", stream=stream) as w:
            # Tokens arrive at ARRIVAL_RATE; when the loop runs late, those already
            # due are published together, as a network-fed producer would find them.
            published = 0
            while published < events:
                due = min(events, int((time.time() - t0) * ARRIVAL_RATE) + 1)
                while published < due:
                    await w.delta(TOKEN)
                    published += 1
                await anyio.lowlevel.checkpoint()
        out, _ = await proc.communicate()
        cpu = time.process_time() - cpu0
        results = json.loads(out)
        await runner.cleanup()
        await bus.shutdown()
    elapsed = max(r["done"] for r in results) - t0
    deliveries = events * clients
    return {
        "format": fmt,
        "clients": clients,
        "events": events,
        "ok": sum(r["ok"] for r in results),
        "elapsed": elapsed,
        "events_per_s": events / elapsed,
        "deliveries_per_s": deliveries / elapsed,
        "cpu_us_per_delivery": cpu / deliveries * 1e6,
        "bytes": sum(r["bytes"] for r in results) // clients,
    }


def _encode_cost(fmt: str, n: int = 20_000) -> float:
    from streambus_http import make_encoder

    from streambus import DeltaEvent, StartEvent

    enc = make_encoder(fmt)
    enc.encode([StartEvent(stream="s", seq=0, ts=1.0, model="m")])
    deltas = [DeltaEvent(stream="s", seq=i + 1, ts=1.0, text=TOKEN) for i in range(n)]
    started = time.perf_counter()
    for d in deltas:
        enc.encode([d])
    return (time.perf_counter() - started) / n * 1e6


def main() -> None:
    started = time.perf_counter()
    rows: list[dict[str, Any]] = []
    plan = [(1, 20_000), (100, 2_000)]
    for clients, events in plan:
        for fmt in [*FORMATS, "naive"]:
            row = asyncio.run(_run_case(fmt, clients, events))
            row["encode_us"] = _encode_cost(fmt) if fmt != "naive" else None
            rows.append(row)
            print(
                f"{fmt:7} clients={clients:3} {row['events_per_s']:>10,.0f} ev/s "
                f"{row['deliveries_per_s']:>10,.0f} deliveries/s "
                f"cpu {row['cpu_us_per_delivery']:.1f} µs ok={row['ok']}",
                flush=True,
            )
    took = time.perf_counter() - started
    lines = [
        "## HTTP streaming outputs (streambus-http)",
        "",
        "Server: bus + StreamHub + aiohttp (the `http` sink's routes) in one process; clients: aiohttp in a",
        "separate process, all reading one stream. A producer offers N 4-character deltas at 50,000/s (those due",
        "when the loop comes round are published together, yielding after each round); time runs from the first",
        "publish to the last client's last byte. Server CPU is the serving",
        "process's CPU time per delivered event. `naive` is the peer: a hand-written aiohttp handler per client",
        "with its own bus subscription writing plain text. Encode is the sans-I/O encoder alone, per event.",
        "Server capacity = 1 / server CPU per delivery: what one core could serve if the clients kept up (on this",
        "shared, sandboxed 2-core machine loopback syscalls are slow and counted only partly as process CPU).",
        "",
        "| clients | format | events | complete | events/s | deliveries/s | server CPU µs/delivery "
        "| server capacity deliveries/s/core | bytes/client | encode µs/event |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        enc = f"{r['encode_us']:.2f}" if r["encode_us"] is not None else "-"
        lines.append(
            f"| {r['clients']} | {r['format']} | {r['events']:,} | {r['ok']}/{r['clients']} | {r['events_per_s']:,.0f} "
            f"| {r['deliveries_per_s']:,.0f} | {r['cpu_us_per_delivery']:.1f} | {1e6 / r['cpu_us_per_delivery']:,.0f} "
            f"| {r['bytes']:,} | {enc} |"
        )
    one = [r for r in rows if r["clients"] == 1 and r["format"] != "naive"]
    many = [r for r in rows if r["clients"] == 100 and r["format"] != "naive"]
    naive100 = next(r for r in rows if r["clients"] == 100 and r["format"] == "naive")
    text100 = next(r for r in many if r["format"] == "text")
    goal_one = all(r["events_per_s"] >= 10_000 for r in one)
    goal_many = all(r["deliveries_per_s"] >= 50_000 for r in many)
    complete = all(r["ok"] == r["clients"] for r in rows)
    lines += [
        "",
        f"Hub text vs naive per-client subscription at 100 clients: "
        f"{text100['deliveries_per_s'] / naive100['deliveries_per_s']:.2f}x deliveries/s.",
        "",
        "Goal: every format >= 10,000 events/s to one client and >= 50,000 deliveries/s to 100 concurrent clients,"
        " every client receiving the complete stream. "
        f"One client: {'met' if goal_one else 'NOT met'}; 100 clients: {'met' if goal_many else 'NOT met'}; "
        f"complete streams everywhere: {'yes' if complete else 'NO'}. (Run took {took:.0f} s.)",
        "",
    ]
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text("\n".join(lines), encoding="utf-8")
    print("\n".join(lines))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--client":
        asyncio.run(_client_main(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]))
    else:
        main()
