"""Make the bundled demo recording with streambus's own tools.

Authored answers are streamed through a real Bus by StreamWriters, paced
like real models (time to first token, tokens/s with jitter), and written by
the ``recorder`` sink. The result, ``streambus/data/recordings/demo.jsonl``,
is what ``streambus demo`` serves through the mock model server and what
tests replay. Run: ``.venv/bin/python scripts/make_recordings.py``.

Streams (several per model, so the mock server cycles through them):
- ``llama3.2`` (ollama): English answers, one ending in an upstream error;
- ``qwen3`` (ollama): reasoning ("thinking") before the answer, and a tool call;
- ``gpt-4o-mini`` (openai): Japanese and English answers, one aborted by the client.
"""

from __future__ import annotations

import random
import re
from pathlib import Path

import anyio

from streambus import Bus, Usage
from streambus.builtins.recorder import RecorderSink
from streambus.wire import ToolCallFragment, tool_text

OUT = Path(__file__).resolve().parent.parent / "streambus" / "data" / "recordings" / "demo.jsonl"

ENGLISH = [
    "A streaming event bus takes every token a model writes and hands it to each subscriber as it "
    "arrives: the browser, the recorder, the stats aggregator. A slow subscriber gets bigger chunks "
    "instead of losing characters, so nobody waits for the slowest reader.",
    "Recordings keep the time between chunks. When a test replays one, the application sees the "
    "same pauses a user saw, and the official clients cannot tell the mock server from a real one.",
    "Backpressure is a promise about memory: every buffer is bounded, and when one fills up the "
    "policy you chose decides whether to wait, merge, drop or disconnect.",
]
JAPANESE = [
    "ストリーミングでは、モデルが答えを書いている間にその文章を読むことができます。"
    "各トークンはバスを通って、ブラウザ、記録、統計のすべての購読者に届きます。",
    "遅い購読者は文字を失わず、より大きなかたまりを受け取ります。記録されたストリームは元のタイミングで再生できます。",
]
THINKING = (
    "The user asks how resuming works. A client remembers the last seq it saw per stream; on "
    "reconnect it sends since, and the server replays the gap from history or says it cannot."
)
ANSWER_AFTER_THINKING = (
    "When a connection drops, the client reconnects with the last sequence number it saw for each "
    "stream. The broadcaster sends every missed event, in order and without duplicates, or tells the "
    "client to reload if its history no longer covers the gap."
)
# A tool call as docs/wire.md says tool deltas carry it: one fragment per line, name first,
# then the arguments' JSON in pieces (as OpenAI streams them).
TOOL_NAME = "get_weather"
TOOL_ARGUMENTS = '{"city": "Kyoto", "unit": "celsius"}'


def tool_deltas(name: str, arguments: str) -> list[str]:
    """The texts of the ``tool`` deltas that stream one call: a header fragment, then argument pieces."""
    texts = [tool_text(ToolCallFragment(index=0, id="call_0", name=name))]
    texts += [tool_text(ToolCallFragment(index=0, arguments=arguments[i : i + 6])) for i in range(0, len(arguments), 6)]
    return texts


_WORDS = re.compile(r"\s*\S+|\s+")


def tokens(text: str) -> list[str]:
    if any("\u3040" <= ch <= "\u9fff" for ch in text):
        out, i, rng = [], 0, random.Random(len(text))
        while i < len(text):
            step = rng.choice((1, 2, 2, 3))
            out.append(text[i : i + step])
            i += step
        return out
    return _WORDS.findall(text)


async def stream(
    bus: Bus,
    rng: random.Random,
    *,
    model: str,
    provider: str,
    prompt: str,
    text: str = "",
    thinking: str = "",
    tool: tuple[str, str] | None = None,
    tps: float = 40.0,
    ending: str = "end",
) -> None:
    meta = {"prompt": prompt, "source": "streambus demo recording"}
    async with bus.stream(model=model, provider=provider, meta=meta) as w:
        await anyio.sleep(rng.uniform(0.25, 0.6))  # time to first token
        count = 0
        for piece in tokens(thinking):
            await w.delta(piece, channel="reasoning")
            count += 1
            await anyio.sleep(rng.uniform(0.6, 1.4) / tps)
        if tool:
            for piece in tool_deltas(*tool):
                await w.delta(piece, channel="tool")
                count += 1
                await anyio.sleep(rng.uniform(0.6, 1.4) / tps)
        pieces = tokens(text)
        cut = len(pieces) * 2 // 3 if ending != "end" else len(pieces)
        for piece in pieces[:cut]:
            await w.delta(piece)
            count += 1
            await anyio.sleep(rng.uniform(0.6, 1.4) / tps)
        prompt_tokens = len(prompt.split()) + 12
        if ending == "error":
            await w.error("upstream_error", "model runner stopped unexpectedly (out of memory)", retryable=True)
        elif ending == "abort":
            await w.abort("client closed the connection", by="client")
        else:
            await w.end(
                "tool_calls" if tool else "stop",
                usage=Usage(prompt_tokens=prompt_tokens, completion_tokens=count, total_tokens=prompt_tokens + count),
                timings={"total_duration": 0.4 + count / tps, "eval_duration": count / tps},
            )


async def main() -> None:
    OUT.parent.mkdir(parents=True, exist_ok=True)
    if OUT.exists():
        OUT.unlink()
    rng = random.Random(2026)
    recorder = RecorderSink(RecorderSink.Options(path=str(OUT), meta={"made_by": "scripts/make_recordings.py"}))
    async with Bus() as bus:
        bus.add_sink(recorder, critical=True)
        async with anyio.create_task_group() as tg:
            tg.start_soon(
                lambda: stream(
                    bus,
                    rng,
                    model="llama3.2",
                    provider="ollama",
                    prompt="What is a streaming event bus?",
                    text=ENGLISH[0],
                )
            )
            tg.start_soon(
                lambda: stream(
                    bus,
                    rng,
                    model="gpt-4o-mini",
                    provider="openai",
                    prompt="ストリーミングとは何ですか？",
                    text=JAPANESE[0],
                    tps=30,
                )
            )
            tg.start_soon(
                lambda: stream(
                    bus,
                    rng,
                    model="qwen3",
                    provider="ollama",
                    prompt="How does resume work?",
                    thinking=THINKING,
                    text=ANSWER_AFTER_THINKING,
                    tps=50,
                )
            )
        async with anyio.create_task_group() as tg:
            tg.start_soon(
                lambda: stream(
                    bus, rng, model="llama3.2", provider="ollama", prompt="Why record streams?", text=ENGLISH[1]
                )
            )
            tg.start_soon(
                lambda: stream(
                    bus,
                    rng,
                    model="gpt-4o-mini",
                    provider="openai",
                    prompt="What happens to slow subscribers?",
                    text=ENGLISH[2],
                    ending="abort",
                )
            )
            tg.start_soon(
                lambda: stream(
                    bus,
                    rng,
                    model="qwen3",
                    provider="ollama",
                    prompt="What is the weather in Kyoto?",
                    tool=(TOOL_NAME, TOOL_ARGUMENTS),
                )
            )
        async with anyio.create_task_group() as tg:
            tg.start_soon(
                lambda: stream(
                    bus,
                    rng,
                    model="llama3.2",
                    provider="ollama",
                    prompt="Explain backpressure.",
                    text=ENGLISH[2],
                    ending="error",
                )
            )
            tg.start_soon(
                lambda: stream(
                    bus,
                    rng,
                    model="gpt-4o-mini",
                    provider="openai",
                    prompt="遅い購読者はどうなりますか？",
                    text=JAPANESE[1],
                    tps=30,
                )
            )
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes)")


if __name__ == "__main__":
    anyio.run(main)
