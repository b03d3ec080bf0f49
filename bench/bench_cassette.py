"""Record once, replay: what a streambus cassette and vcrpy keep of streamed answers.

The workload a test suite runs: concurrent chat streams (the official
``openai`` client, Chat Completions with ``stream=True``), tokens arriving one
at a time with recorded pauses. A fake upstream (the mock server, answering
by model) sends each stream of ``TOKENS`` tokens ``GAP`` seconds apart. Each tool
records ``STREAMS`` different questions asked at once (a thread per question), then
replays them with the upstream stopped. Measured per tool, on the client side:

- the text (identical to the upstream's or not);
- the reads the client got (``httpx`` ``iter_raw`` chunks, i.e. network reads);
- the time to first token and the whole stream's duration, against the recording's;
- the median |arrival gap - recorded gap| between consecutive tokens;
- the wall time of the replay of all streams (what an instant replay costs a test).

Writes ``bench/results/cassette.md``. Runs in about half a minute.
"""

from __future__ import annotations

import concurrent.futures
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import openai

from streambus.cassette import Cassette
from streambus.events import DeltaEvent, EndEvent, Event, StartEvent
from streambus.mockserver import MockServer

RESULTS = Path(__file__).resolve().parent / "results" / "cassette.md"
STREAMS = 8
TOKENS = 30
GAP = 0.02  # seconds between tokens at the upstream
FIRST = 0.1  # seconds to the first token


def upstream_events() -> list[Event]:
    events: list[Event] = []
    for s in range(STREAMS):
        sid = f"up-{s}"
        t0 = 1000.0 + s * 10
        events.append(StartEvent(stream=sid, seq=0, ts=t0, model=f"model-{s}", provider="openai"))
        for i in range(TOKENS):
            events.append(DeltaEvent(stream=sid, seq=i + 1, ts=t0 + FIRST + i * GAP, text=f"tok{i} "))
        events.append(EndEvent(stream=sid, seq=TOKENS + 1, ts=t0 + FIRST + TOKENS * GAP))
    return events


class Counted(httpx.HTTPTransport):
    """Counts the network reads of each response (public httpx transport API)."""

    def __init__(self, reads: list[int]) -> None:
        super().__init__()
        self.reads = reads

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = super().handle_request(request)
        stream = response.stream
        reads = self.reads

        class Counting(httpx.SyncByteStream):
            def __iter__(self) -> Any:
                for chunk in stream:  # type: ignore[union-attr]
                    reads.append(len(chunk))
                    yield chunk

            def close(self) -> None:
                stream.close()  # type: ignore[union-attr]

        return httpx.Response(
            response.status_code, headers=response.headers, stream=Counting(), extensions=response.extensions
        )


def ask(base_url: str, s: int, use_transport: bool = True) -> dict[str, Any]:
    """Stream one question; return the text, arrival times and reads."""
    reads: list[int] = []
    http = httpx.Client(transport=Counted(reads)) if use_transport else httpx.Client()
    # openai types http_client as its httpx2.Client; its run-time check accepts an httpx.Client too.
    client = openai.OpenAI(
        base_url=base_url + "/v1",
        api_key="sk-bench",
        max_retries=0,
        http_client=http,  # type: ignore[arg-type]
    )
    started = time.perf_counter()
    arrivals: list[float] = []
    text = []
    with client:
        stream = client.chat.completions.create(
            model=f"model-{s}", messages=[{"role": "user", "content": f"question {s}"}], stream=True
        )
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                arrivals.append(time.perf_counter() - started)
                text.append(chunk.choices[0].delta.content)
    return {"text": "".join(text), "arrivals": arrivals, "reads": len(reads)}


def all_at_once(call: Callable[[int], dict[str, Any]]) -> tuple[list[dict[str, Any]], float]:
    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(STREAMS) as pool:
        results = list(pool.map(call, range(STREAMS)))
    return results, time.perf_counter() - started


def summarize(results: list[dict[str, Any]], wall: float, expected: list[str]) -> dict[str, str]:
    recorded_gaps = [GAP] * (TOKENS - 1)
    errors: list[float] = []
    for r in results:
        gaps = [b - a for a, b in zip(r["arrivals"], r["arrivals"][1:], strict=False)]
        errors.extend(abs(g - e) for g, e in zip(gaps, recorded_gaps, strict=False))
    ttft = statistics.median(r["arrivals"][0] for r in results)
    span = statistics.median(r["arrivals"][-1] for r in results)
    same = all(r["text"] == e for r, e in zip(results, expected, strict=True))
    return {
        "text": "identical" if same else "DIFFERENT",
        "reads": f"{statistics.median(r['reads'] for r in results):.0f}",
        "ttft": f"{ttft * 1000:.0f} ms",
        "span": f"{span * 1000:.0f} ms",
        "gap error": f"{statistics.median(errors) * 1000:.1f} ms",
        "wall": f"{wall * 1000:.0f} ms",
    }


def main() -> int:
    import vcr  # type: ignore[import-untyped]

    expected = ["".join(f"tok{i} " for i in range(TOKENS))] * STREAMS
    rows: dict[str, dict[str, str]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        upstream = MockServer(upstream_events(), match="model")
        with upstream.running() as url:
            direct, wall = all_at_once(lambda s: ask(url, s))
            rows["the upstream itself (what was recorded)"] = summarize(direct, wall, expected)
            cassette_path = Path(tmp) / "streambus.jsonl"
            with Cassette(cassette_path, mode="once", upstream=url) as cassette:
                all_at_once(lambda s: ask(cassette.url, s))
            vcr_path = str(Path(tmp) / "vcr.yaml")
            recorder = vcr.VCR(record_mode="once", match_on=["method", "path", "body"])
            with recorder.use_cassette(vcr_path):
                # vcrpy patches httpx's default transport: the counting transport would bypass it.
                all_at_once(lambda s: ask(url, s, use_transport=False))
        # The upstream is stopped: both replay from their files.
        for name, speed in (("streambus cassette, recorded timing", 1.0), ("streambus cassette, instant", None)):
            with Cassette(cassette_path, mode="none", speed=speed) as cassette:
                results, wall = all_at_once(lambda s: ask(cassette.url, s))
            rows[name] = summarize(results, wall, expected)
        replayer = vcr.VCR(record_mode="none", match_on=["method", "path", "body"])
        with replayer.use_cassette(vcr_path):
            results, wall = all_at_once(lambda s: ask("http://127.0.0.1:9", s, use_transport=False))
        vcr_reads: list[int] = []
        with replayer.use_cassette(vcr_path):
            # One question again, its reads counted through httpx's public response API.
            with (
                httpx.Client() as http,
                http.stream(
                    "POST",
                    "http://127.0.0.1:9/v1/chat/completions",
                    json={"model": "model-0", "messages": [{"role": "user", "content": "question 0"}], "stream": True},
                    headers={"Authorization": "Bearer sk-bench"},
                ) as response,
            ):
                vcr_reads.extend(len(c) for c in response.iter_raw())
        row = summarize(results, wall, expected)
        row["reads"] = f"{len(vcr_reads)}"
        rows[f"vcrpy {vcr.__version__}"] = row

    for name, row in rows.items():
        print(f"{name:<42} " + "  ".join(f"{k} {v}" for k, v in row.items()), flush=True)
    keys = ["text", "reads", "ttft", "span", "gap error", "wall"]
    lines = [
        "## Record once, replay: streambus cassette vs vcrpy",
        "",
        f"{STREAMS} concurrent Chat Completions streams (official `openai` client, `stream=True`), "
        f"{TOKENS} tokens each, the first after {FIRST * 1000:.0f} ms, then one every {GAP * 1000:.0f} ms at the "
        "upstream. Each tool recorded them, then replayed them with the upstream stopped. Medians over the streams: "
        "reads = network reads the client got for one stream; TTFT = time to the first token; span = time to the "
        "last token; gap error = |arrival gap - recorded gap| between consecutive tokens; wall = all streams.",
        "",
        "| | " + " | ".join(keys) + " |",
        "|---|" + "---:|" * len(keys),
        *(f"| {name} | " + " | ".join(row[k] for k in keys) + " |" for name, row in rows.items()),
        "",
        f"Load average during the run: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs (a shared machine).",
        "",
    ]
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text("\n".join(lines), encoding="utf-8")
    print(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
