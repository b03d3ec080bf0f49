"""WebSocket broadcaster benchmark: streambus-websocket vs raw ``websockets.broadcast()``.

Side by side in one run, on asyncio, with the WebSocket clients in a separate
process (``python bench/bench_websocket.py --clients ...``):

1. Throughput: M token deltas published as fast as possible to 1, 100 and
   1000 clients. Deliveries/s = frames received by all clients / time from
   the first publish to the last frame received. Also the server's CPU time
   per delivered frame (the clients' cost is not in it), the median of the
   rounds: on a shared machine it is steadier than the wall clock. streambus
   goes through the bus, the per-stream history and per-client buffers, and
   writes through websockets' public API (one ``broadcast()`` per event to
   the clients that keep up, ``send()`` for a client that is behind); raw
   ``broadcast()`` writes the same pre-encoded events to every connection,
   one write per event.
2. Overload: slow clients (each reads one frame per 1 ms through a 64 KiB
   socket buffer) while tokens are published at 3000/s. Every token carries
   its publish time in its text, so the publish-to-client latency of every
   character is measured, coalesced or not. Reports characters lost, p99
   latency, and the broadcaster's peak memory (RSS growth).

Throughput rows are the best of alternating runs (three at one client, two at
100, one at 1000: the machine is shared); the spread of the rounds is printed.
Writes ``bench/results/websocket.md``. Bounded: well under two minutes.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import resource
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import msgspec
import psutil  # type: ignore[import-untyped]

OUT = Path(__file__).resolve().parent / "results" / "websocket.md"
TOKEN = " tok"
FILLER = " streaming words" * 10  # overload tokens: a publish stamp plus some text
SNDBUF = 65536
STAMP = re.compile(r"<(\d+\.\d+)>")


def _raise_fd_limit() -> None:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


# -- the client process -------------------------------------------------------------------


async def _client_main(url: str, count: int, mode: str, expect: int, delay: float, rcvbuf: int | None) -> None:
    from websockets.asyncio.client import connect

    decoder = msgspec.json.Decoder()
    results: list[dict[str, Any]] = []
    ready = 0
    all_ready = asyncio.Event()
    start_gate = asyncio.Event()

    async def one() -> None:
        nonlocal ready
        sock = None
        if rcvbuf is not None:
            host, port = url.split("/")[2].rsplit(":", 1)
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            sock.connect((host, int(port)))
            sock.setblocking(False)
        kwargs: dict[str, Any] = {"proxy": None, "max_size": None, "compression": None, "open_timeout": 60}
        if sock is not None:
            kwargs["sock"] = sock
        async with connect(url, **kwargs) as ws:
            if mode == "streambus":
                await ws.recv()  # hello
                await ws.send('{"op":"subscribe","id":1}')
                await ws.recv()  # subscribed
            ready += 1
            if ready == count:
                all_ready.set()
            await start_gate.wait()
            frames = 0
            text: list[str] = []
            lat: list[float] = []
            last = 0.0
            while True:
                data = await ws.recv(decode=False)
                now = time.time()
                frames += 1
                msg = decoder.decode(data)
                kind = msg.get("type")
                if kind == "delta":
                    piece = msg["text"]
                    text.append(piece)
                    if delay:
                        lat.extend(now - float(t) for t in STAMP.findall(piece))
                    elif frames % 16 == 0:
                        lat.append(now - msg["ts"])
                last = now
                if (mode == "raw" and frames >= expect) or kind == "end":
                    break
                if delay:
                    await asyncio.sleep(delay)
            results.append({"frames": frames, "text": "".join(text), "lat": lat, "last": last})

    tasks = [asyncio.create_task(one()) for _ in range(count)]
    await asyncio.wait_for(all_ready.wait(), 90)
    print("READY", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    start_gate.set()
    await asyncio.gather(*tasks)
    lat = sorted(x for r in results for x in r["lat"])
    texts = [r["text"] for r in results]
    out = {
        "frames": sum(r["frames"] for r in results),
        "last": max(r["last"] for r in results),
        "p50": lat[len(lat) // 2] if lat else 0.0,
        "p99": lat[min(len(lat) - 1, int(len(lat) * 0.99))] if lat else 0.0,
        "chars": [len(t) for t in texts],
        "texts_equal": len(set(texts)) == 1,
        "sample": texts[0],
    }
    print("RESULT " + json.dumps(out), flush=True)


# -- servers --------------------------------------------------------------------------------


class ClientProcess:
    def __init__(self, url: str, count: int, mode: str, expect: int, delay: float = 0.0, rcvbuf: int | None = None):
        argv = [sys.executable, __file__, "--clients", url, str(count), mode, str(expect), str(delay), str(rcvbuf or 0)]
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    async def ready(self) -> None:
        line = await asyncio.get_running_loop().run_in_executor(None, self.proc.stdout.readline)  # type: ignore[union-attr]
        if line.strip() != "READY":
            raise RuntimeError(f"client process failed: {line!r}")

    def go(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()

    async def result(self) -> dict[str, Any]:
        line = await asyncio.get_running_loop().run_in_executor(None, self.proc.stdout.readline)  # type: ignore[union-attr]
        self.proc.wait(timeout=60)
        if not line.startswith("RESULT "):
            raise RuntimeError(f"client process failed: {line!r}")
        result: dict[str, Any] = json.loads(line[len("RESULT ") :])
        return result


class MemoryWatch:
    def __init__(self) -> None:
        self.proc = psutil.Process()
        self.base = self.proc.memory_info().rss
        self.peak = self.base
        self.task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while True:
            self.peak = max(self.peak, self.proc.memory_info().rss)
            await asyncio.sleep(0.02)

    def __enter__(self) -> MemoryWatch:
        self.task = asyncio.get_running_loop().create_task(self._run())
        return self

    def __exit__(self, *exc: object) -> None:
        assert self.task is not None
        self.task.cancel()

    @property
    def growth_mb(self) -> float:
        return float((self.peak - self.base) / 2**20)


def _token(i: int, stamped: bool) -> str:
    return f"<{time.time():.4f}>{FILLER}" if stamped else TOKEN


async def run_raw(count: int, messages: int, *, rate: float | None = None, delay: float = 0.0) -> dict[str, Any]:
    from websockets.asyncio.server import broadcast, serve

    from streambus import DeltaEvent, encode

    conns: set[Any] = set()

    async def handler(ws: Any) -> None:
        if delay:
            # The same kernel send buffer as the streambus run (socket_send_buffer).
            ws.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SNDBUF)
        conns.add(ws)
        try:
            await ws.wait_closed()
        finally:
            conns.discard(ws)

    async with serve(handler, "127.0.0.1", 0, compression=None, max_size=None) as server:
        port = server.sockets[0].getsockname()[1]
        clients = ClientProcess(f"ws://127.0.0.1:{port}/", count, "raw", messages, delay, 65536 if delay else None)
        await clients.ready()
        with MemoryWatch() as mem:
            clients.go()
            await asyncio.sleep(0.05)  # let the client process leave its gate
            targets = list(conns)
            start = time.time()
            cpu = time.process_time()
            for i in range(messages):
                event = DeltaEvent(stream="s", seq=i + 1, ts=time.time(), text=_token(i, delay > 0))
                broadcast(targets, encode(event), text=True)
                if rate is not None:
                    await _pace(start, i + 1, rate)
                elif i % 64 == 63:
                    await asyncio.sleep(0)
            result = await clients.result()
            cpu = time.process_time() - cpu
        result.update(start=start, cpu=cpu, mem=mem.growth_mb, connected=len(targets))
        return result


async def _pace(start: float, sent: int, rate: float) -> None:
    ahead = start + sent / rate - time.time()
    if ahead > 0:
        await asyncio.sleep(ahead)
    elif sent % 64 == 0:
        await asyncio.sleep(0)


async def run_streambus(count: int, messages: int, *, rate: float | None = None, delay: float = 0.0) -> dict[str, Any]:
    from streambus_websocket import WebSocketSink

    from streambus import Bus

    async with Bus() as bus:
        sink = WebSocketSink(
            port=0,
            max_clients=count + 10,
            ping_interval=None,
            client_buffer_bytes=16 * 2**20,
            socket_send_buffer=SNDBUF if delay else None,
        )
        bus.add_sink(sink)
        url = await sink.wait_ready()
        clients = ClientProcess(url, count, "streambus", messages, delay, 65536 if delay else None)
        await clients.ready()
        with MemoryWatch() as mem:
            clients.go()
            await asyncio.sleep(0.05)
            connected = sink.clients
            start = time.time()
            cpu = time.process_time()
            async with bus.stream(model="bench") as w:
                for i in range(messages):
                    await w.delta(_token(i, delay > 0))
                    if rate is not None:
                        await _pace(start, i + 1, rate)
                    elif i % 64 == 63:
                        await asyncio.sleep(0)
            result = await clients.result()
            cpu = time.process_time() - cpu
        lagged = sum(c.merged for c in sink.connections)
        result.update(start=start, cpu=cpu, mem=mem.growth_mb, connected=connected, merged=lagged)
        await bus.shutdown()
        return result


# -- attack: clients that never read (issue 18) ---------------------------------------------

ATTACK_OUT = OUT.with_name("websocket-attack.md")
ENDED, ENDED_DELTAS, ENDED_TEXT = 1100, 50, "an ended answer, "
HONEST, WINDOW, STREAM_DELTAS = 10, 4.0, 200
ATTACK_PACE = 0.12
BENCH_TEXT = "".join(f"{i:04d} " for i in range(STREAM_DELTAS))


def _client_frame(payload: bytes) -> bytes:
    """A masked client text frame (RFC 6455 5.2); the all-zero mask key leaves the payload as it is."""
    n = len(payload)
    if n < 126:
        head = bytes((0x81, 0x80 | n))
    elif n < 65536:
        head = bytes((0x81, 0x80 | 126)) + n.to_bytes(2, "big")
    else:
        head = bytes((0x81, 0x80 | 127)) + n.to_bytes(8, "big")
    return head + b"\0\0\0\0" + payload


async def _attack_main(url: str, honest: int, attackers: int, ids: list[str]) -> None:
    """Client process of the attack run: honest readers, and raw sockets that never read."""
    from websockets.asyncio.client import connect

    loop = asyncio.get_running_loop()
    host, port = url.split("/")[2].rsplit(":", 1)
    subscribe = json.dumps({"op": "subscribe", "id": "a", "streams": ids, "since": dict.fromkeys(ids, -1)})
    burst = _client_frame(subscribe.encode()) + _client_frame(b'{"op":"unsubscribe","id":"a"}')
    handshake = (
        f"GET /ws HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    ).encode()
    decoder = msgspec.json.Decoder()
    ready = asyncio.Event()
    subscribed = 0
    gate = asyncio.Event()
    stop = asyncio.Event()
    honest_results: list[dict[str, Any]] = []
    attack = {"subscribes": 0, "connections": 0}

    async def reader() -> None:
        nonlocal subscribed
        async with connect(url, proxy=None, max_size=None, compression=None, open_timeout=60) as ws:
            await ws.recv()  # hello
            await ws.send('{"op":"subscribe","id":1,"models":["bench","bench-stop"]}')
            await ws.recv()  # subscribed
            subscribed += 1
            if subscribed == honest:
                ready.set()
            texts: dict[str, list[str]] = {}
            ok = bad = 0
            code = None
            try:
                while True:
                    msg = decoder.decode(await ws.recv(decode=False))
                    kind = msg.get("type")
                    if kind == "start":
                        texts[msg["stream"]] = [] if msg["model"] == "bench" else ["stop"]
                    elif kind == "delta" and msg["stream"] in texts:
                        texts[msg["stream"]].append(msg["text"])
                    elif kind in ("end", "error", "abort") and msg["stream"] in texts:
                        text = "".join(texts.pop(msg["stream"]))
                        if text.startswith("stop"):
                            break
                        ok, bad = (ok + 1, bad) if text == BENCH_TEXT and kind == "end" else (ok, bad + 1)
            except Exception as exc:  # a close is a loss for an honest client: report it
                code = getattr(getattr(exc, "rcvd", None), "code", repr(exc))
            honest_results.append({"ok": ok, "bad": bad, "closed": code})

    async def attacker() -> None:
        await gate.wait()
        while not stop.is_set():
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.setblocking(False)
            try:
                await loop.sock_connect(sock, (host, int(port)))
                attack["connections"] += 1
                await loop.sock_sendall(sock, handshake)
                while not stop.is_set():
                    await asyncio.wait_for(loop.sock_sendall(sock, burst), 5)
                    attack["subscribes"] += 1
                    await asyncio.sleep(ATTACK_PACE)
            except (OSError, TimeoutError):
                pass  # closed by the server (4003, or its socket gone): come back
            finally:
                sock.close()

    readers = [asyncio.create_task(reader()) for _ in range(honest)]
    attacks = [asyncio.create_task(attacker()) for _ in range(attackers)]
    await asyncio.wait_for(ready.wait(), 60)
    print("READY", flush=True)
    await loop.run_in_executor(None, sys.stdin.readline)
    gate.set()
    await asyncio.gather(*readers)
    stop.set()
    await asyncio.gather(*attacks)
    print("RESULT " + json.dumps({"honest": honest_results, **attack}), flush=True)


class AttackProcess(ClientProcess):
    def __init__(self, url: str, honest: int, attackers: int, ids_path: str) -> None:
        argv = [sys.executable, __file__, "--attack-clients", url, str(honest), str(attackers), ids_path]
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)


async def _loop_lag(into: list[float]) -> None:
    while True:
        before = time.perf_counter()
        await asyncio.sleep(0.005)
        into.append(time.perf_counter() - before - 0.005)


async def run_attack(attackers: int, named: int) -> dict[str, Any]:
    """Publish as fast as the bus goes for WINDOW seconds while *attackers* raw clients attack."""
    from streambus_websocket import WebSocketSink

    from streambus import Bus

    async with Bus() as bus:
        sink = WebSocketSink(port=0, ping_interval=None, close_timeout=1.0)
        bus.add_sink(sink)
        url = await sink.wait_ready()
        ended: list[str] = []
        for _ in range(ENDED):
            async with bus.stream(model="old") as w:
                for _ in range(ENDED_DELTAS):
                    await w.delta(ENDED_TEXT)
            ended.append(w.stream)
            await asyncio.sleep(0)
        # The recorder's view of the bus: a lossless `block` subscriber counting what it gets.
        recorder = bus.subscribe(overflow="block", name="recorder")
        counted = [0]

        async def record() -> None:
            while batch := await recorder.receive_batch():
                counted[0] += len(batch)

        recording = asyncio.get_running_loop().create_task(record())
        ids_path = OUT.parent / f".attack-ids-{os.getpid()}.json"
        ids_path.write_text(json.dumps(ended[:named]))
        clients = AttackProcess(url, HONEST, attackers, str(ids_path))
        try:
            await clients.ready()
        finally:
            ids_path.unlink()
        lags: list[float] = []
        lagging = asyncio.get_running_loop().create_task(_loop_lag(lags))
        with MemoryWatch() as mem:
            clients.go()
            await asyncio.sleep(0.5)  # the attackers' first wave is in
            streams = 0
            first = counted[0]
            start = time.perf_counter()
            while time.perf_counter() - start < WINDOW:
                async with bus.stream(model="bench") as w:
                    for i in range(STREAM_DELTAS):
                        await w.delta(f"{i:04d} ")
                        if i % 16 == 15:
                            await asyncio.sleep(0)
                streams += 1
            elapsed = time.perf_counter() - start
            await asyncio.sleep(0)
            rate = (counted[0] - first) / elapsed
            async with bus.stream(model="bench-stop") as w:
                await w.delta("stop")
            result = await clients.result()
        lagging.cancel()
        opts = sink.options
        # Per connection, at most: its queue (client_buffer_bytes), what the transport holds past
        # its write limit (one 64 KiB chunk plus its 32 KiB limit), and websockets' inbound queue
        # (max_queue = 16 frames of at most max_message_bytes, plus the frame being read).
        per_client = opts.client_buffer_bytes + 96 * 1024 + 17 * opts.max_message_bytes
        result.update(
            rate=rate,
            streams=streams,
            mem=mem.growth_mb,
            per_client_mb=per_client / 2**20,
            max_lag_ms=max(lags, default=0.0) * 1e3,
            expected=streams,
        )
        recording.cancel()
        await bus.shutdown()
        return result


def _attack_run(attackers: int, named: int) -> dict[str, Any]:
    """One run in a fresh server process, so its RSS growth is its own (freed memory stays with a process)."""
    argv = [sys.executable, __file__, "--attack-run", str(attackers), str(named)]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=True).stdout
    line = next(ln for ln in out.splitlines() if ln.startswith("RESULT "))
    result: dict[str, Any] = json.loads(line[len("RESULT ") :])
    return result


def attack_section() -> list[str]:
    started = time.perf_counter()
    runs: dict[str, dict[str, Any]] = {}
    plan = [
        ("none", 0, 0),
        ("1,100 ids (the issue's): refused", 10, ENDED),
        ("256 ids (the limit): replay too large", 10, 256),
        ("64 ids: replay fits, unread, 4003", 10, 64),
    ]
    for _round in range(3):  # alternated, best of three each: the machine is shared
        for name, attackers, named in plan:
            r = _attack_run(attackers, named)
            print(f"attack {name}: {r['rate']:,.0f} events/s, RSS +{r['mem']:.1f} MiB", flush=True)
            mem = max(r["mem"], runs[name]["mem"]) if name in runs else r["mem"]
            if name not in runs or r["rate"] > runs[name]["rate"]:
                runs[name] = r
            runs[name]["mem"] = mem
    base = runs["none"]
    rows = []
    goals = []
    for name, attackers, _named in plan:
        r = runs[name]
        honest_ok = all(h["ok"] == r["expected"] and not h["bad"] and h["closed"] is None for h in r["honest"])
        ratio = r["rate"] / base["rate"]
        bound = base["mem"] + attackers * r["per_client_mb"]
        within = r["mem"] <= bound
        if attackers:
            goals.append(ratio >= 0.9 and honest_ok and within)
        rows.append(
            f"| {name} | {attackers} | {r['rate']:,.0f} | {ratio:.2f} | {r['max_lag_ms']:.0f} | "
            f"{r['connections']} / {r['subscribes']} | {sum(h['ok'] for h in r['honest'])} of "
            f"{HONEST * r['expected']} | {r['mem']:.1f} | {bound:.1f} |"
        )
    elapsed = time.perf_counter() - started
    return [
        "## WebSocket broadcaster under attack (issue 18)",
        "",
        f"{ENDED:,} ended streams of {ENDED_DELTAS} deltas in the history. Each attacker is a raw socket that never "
        f"reads (4 KiB receive buffer) and sends, every {ATTACK_PACE} s, a `subscribe` naming ids of those streams "
        "with `since` -1, then `unsubscribe`; when the server closes it, it connects again. "
        f"Meanwhile the bus publishes {STREAM_DELTAS}-delta streams as fast as it goes for {WINDOW:.0f} s; "
        "throughput is what a lossless `block` subscriber (the recorder's view) received per second. "
        f"{HONEST} honest clients (in the clients' process) follow every stream and check each text. "
        "Default options (`client_buffer_bytes` 1 MiB, `max_subscribe_streams` 256, `close_timeout` 1 s), "
        "asyncio; each run in a fresh server process (RSS growth: peak during the run minus RSS once the "
        "history was filled and the clients connected); best of three alternated runs per row by throughput, "
        "with the largest RSS growth of the three.",
        "",
        "| attack | attackers | bus events/s | vs none | max loop lag ms | attacker connections / subscribes sent "
        "| honest streams complete | server RSS growth MiB | bound MiB |",
        "|---|---:|---:|---:|---:|---|---|---:|---:|",
        *rows,
        "",
        "Bound = RSS growth without attackers + attackers x (client_buffer_bytes + 96 KiB + 17 x max_message_bytes) "
        f"= + {base['per_client_mb']:.2f} MiB per attacker (the formula is in docs/plugins/websocket.md).",
        "",
        f"Goal: >= 0.9x the unattacked bus throughput with 10 attackers, RSS within the bound, honest clients lose "
        f"nothing: {'met' if goals and all(goals) else 'NOT met'}. (Run took {elapsed:.0f} s.)",
        "",
    ]


# -- the report -----------------------------------------------------------------------------


def _rate(r: dict[str, Any]) -> float:
    return float(r["frames"] / max(r["last"] - r["start"], 1e-9))


def _cpu_per_frame(runs: list[dict[str, Any]]) -> float:
    """The server's CPU µs per delivered frame, the median of *runs*."""
    return float(statistics.median(r["cpu"] / r["frames"] * 1e6 for r in runs))


def _span(runs: list[dict[str, Any]]) -> str:
    """Deliveries/s and CPU µs/frame of every run, lowest to highest."""
    rates = sorted(_rate(r) for r in runs)
    cpus = sorted(r["cpu"] / r["frames"] * 1e6 for r in runs)
    return f"{rates[0]:,.0f}-{rates[-1]:,.0f}/s, {cpus[0]:.1f}-{cpus[-1]:.1f} µs/frame"


async def main() -> None:
    _raise_fd_limit()
    started = time.perf_counter()
    rows: list[str] = []
    ratios: dict[int, float] = {}
    cpu: dict[int, tuple[float, float]] = {}  # server CPU µs/frame, median of the rounds: (streambus, raw)
    spread: list[str] = []
    held = False
    for count, messages, rounds in ((1, 20_000, 3), (100, 800, 2), (1000, 100, 1)):
        # The machine is shared: the best of `rounds` alternating runs of each system.
        raws: list[dict[str, Any]] = []
        ourss: list[dict[str, Any]] = []
        for _ in range(rounds):
            raws.append(await run_raw(count, messages))
            ourss.append(await run_streambus(count, messages))
        raw, ours = max(raws, key=_rate), max(ourss, key=_rate)
        expected_chars = len(TOKEN) * messages
        lost = max(sum(expected_chars - c for c in o["chars"]) for o in ourss)
        ratios[count] = _rate(ours) / _rate(raw)
        cpu[count] = (_cpu_per_frame(ourss), _cpu_per_frame(raws))
        if count == 1000:
            held = all(o["connected"] == 1000 for o in ourss) and lost == 0
        for name, r, runs, lost_chars in (
            ("raw broadcast()", raw, raws, 0),
            ("streambus-websocket", ours, ourss, lost),
        ):
            rows.append(
                f"| {count} | {name} | {r['connected']} | {r['frames']:,} | {_rate(r):,.0f} | "
                f"{_cpu_per_frame(runs):.1f} | {r['p99'] * 1e3:.1f} | {lost_chars} |"
            )
        if rounds > 1:
            spread.append(
                f"{count} clients: raw {_span(raws)}, streambus {_span(ourss)}"
                f" ({cpu[count][0] / cpu[count][1]:.2f}x raw's CPU per frame)"
            )
        print(f"throughput {count} clients: raw {_rate(raw):,.0f}/s, streambus {_rate(ours):,.0f}/s", flush=True)

    overload_rows: list[str] = []
    slow, tokens, rate, delay = 10, 2400, 3000.0, 0.001
    raw = await run_raw(slow, tokens, rate=rate, delay=delay)
    ours = await run_streambus(slow, tokens, rate=rate, delay=delay)
    for name, r in (("raw broadcast()", raw), ("streambus-websocket", ours)):
        got = [len(STAMP.findall(r["sample"]))] if r["texts_equal"] else []
        lost_tokens = tokens - (got[0] if got else -1)
        lost_chars = sum(max(0, max(r["chars"]) - c) for c in r["chars"]) if r["chars"] else 0
        overload_rows.append(
            f"| {name} | {slow} | {tokens} @ {rate:.0f}/s | {r['frames']:,} | {lost_tokens} tokens / "
            f"{lost_chars} chars | {r['p50'] * 1e3:,.0f} | {r['p99'] * 1e3:,.0f} | {r['mem']:.1f} |"
        )
        print(f"overload {name}: p99 {r['p99'] * 1e3:.0f} ms, frames {r['frames']}", flush=True)
    overload_zero_loss = (
        ours["texts_equal"] and len(STAMP.findall(ours["sample"])) == tokens and len(set(ours["chars"])) == 1
    )

    goal_tp = all(r >= 0.8 for r in ratios.values())
    # Each shortfall with the server's own cost beside it: throughput is measured end to end
    # (the clients' process included) on a shared machine, CPU per frame is the broadcaster's alone.
    below = "; ".join(
        f"{c} clients at {r:.2f}x, server CPU {cpu[c][0]:.1f} vs raw {cpu[c][1]:.1f} µs/frame"
        for c, r in ratios.items()
        if r < 0.8
    )
    elapsed = time.perf_counter() - started
    lines = [
        "## WebSocket broadcaster",
        "",
        "Clients run in a separate process (asyncio `websockets` clients); the server side runs on asyncio.",
        "Deliveries/s = frames received by all clients / time from the first publish to the last frame.",
        "Server CPU is the broadcasting process's CPU time per delivered frame (clients excluded), the median "
        "of the rounds; rows are the best throughput of alternating rounds (3 at 1 client, 2 at 100, 1 at 1000).",
        "",
        "| clients | system | connected | frames delivered | deliveries/s | server CPU µs/frame | p99 ms "
        "| chars lost |",
        "|---:|---|---:|---:|---:|---:|---:|---:|",
        *rows,
        "",
        f"Overload: {slow} slow clients (one frame per {delay * 1e3:.0f} ms through 64 KiB socket buffers on both "
        "ends), tokens published at a fixed rate; every token carries its publish time, so latency is per character.",
        "",
        "| system | slow clients | tokens | frames delivered | lost | p50 ms | p99 ms | server memory growth MiB |",
        "|---|---:|---|---:|---|---:|---:|---:|",
        *overload_rows,
        "",
        "Throughput ratio streambus / raw broadcast(): "
        + ", ".join(f"{c} clients {r:.2f}x" for c, r in ratios.items())
        + ".",
        "",
        "Spread over the rounds (deliveries/s, server CPU µs/frame): " + "; ".join(spread) + ".",
        "",
        f"Goal: >= 0.8x raw `broadcast()` throughput with per-client buffering, ordering and zero loss, and 1000 "
        f"concurrent clients held on this 2-core machine. Throughput goal {'met' if goal_tp else 'NOT met'} "
        f"(>= 0.8x at {', '.join(str(c) for c, r in ratios.items() if r >= 0.8) or 'no'} clients; "
        f"below: {below or 'none'}); "
        f"1000 clients held with zero loss: {'yes' if held else 'NO'}; "
        f"zero characters lost under overload: {'yes' if overload_zero_loss else 'NO'}. "
        f"(Run took {elapsed:.0f} s.)",
        "",
    ]
    OUT.parent.mkdir(exist_ok=True)
    OUT.write_text("\n".join(lines))
    print("\n".join(lines))


def attack_main() -> None:
    lines = attack_section()
    ATTACK_OUT.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--clients":
        _raise_fd_limit()
        url, count, mode, expect, delay, rcvbuf = sys.argv[2:8]
        asyncio.run(_client_main(url, int(count), mode, int(expect), float(delay), int(rcvbuf) or None))
    elif len(sys.argv) > 1 and sys.argv[1] == "--attack-clients":
        _raise_fd_limit()
        url, honest, attackers, ids_path = sys.argv[2:6]
        ids = json.loads(Path(ids_path).read_text())
        asyncio.run(_attack_main(url, int(honest), int(attackers), ids))
    else:
        os.environ.setdefault("PYTHONHASHSEED", "0")
        import structlog

        structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(30))
        if sys.argv[1:2] == ["--attack-run"]:
            _raise_fd_limit()
            print("RESULT " + json.dumps(asyncio.run(run_attack(int(sys.argv[2]), int(sys.argv[3])))), flush=True)
        else:
            if sys.argv[1:] != ["--attack"]:
                asyncio.run(main())
            attack_main()
