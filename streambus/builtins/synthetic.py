"""The ``synthetic`` producer: realistic token streams without a model.

For demos and load tests: ``count`` streams, ``concurrency`` at a time, each
with a time to first token, a token rate with jitter, optional reasoning
before the answer, and text from a built-in corpus or a file.
"""

from __future__ import annotations

import random
import re
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import anyio
import msgspec

from ..events import Usage
from ..plugins import Fraction, NonNegativeFloat, NonNegativeInt, PluginBase, PositiveInt, check_bounds

if TYPE_CHECKING:
    from ..bus import Bus

__all__ = ["SyntheticProducer"]

_CORPORA = {
    "english": (
        "Streaming lets a reader see the answer while the model is still writing it. "
        "Each token travels from the model server through the bus to every subscriber, "
        "and a slow subscriber receives bigger chunks instead of losing characters. "
        "Recordings keep the timing of every chunk, so tests replay what users saw. "
    ),
    "japanese": (
        "ストリーミングでは、モデルが書いている間に答えを読むことができます。"
        "各トークンはバスを通ってすべての購読者に届き、遅い購読者は文字を失わずに大きな塊を受け取ります。"
    ),
}
_TOKEN = re.compile(r"\s*\S+|\s+")


def _tokens(text: str) -> list[str]:
    # Whitespace-led words for spaced scripts, 1-3 characters for CJK text.
    if any("\u3040" <= ch <= "\u9fff" for ch in text):
        out: list[str] = []
        i = 0
        while i < len(text):
            step = 1 + (i * 7 % 3)
            out.append(text[i : i + step])
            i += step
        return out
    return _TOKEN.findall(text)


class SyntheticProducer(PluginBase):
    """Generate ``count`` realistic token streams at a given pace (no model needed)."""

    class Options(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
        """Config keys of the ``synthetic`` producer."""

        count: NonNegativeInt = 3
        """Streams to produce."""
        concurrency: PositiveInt = 3
        """Streams live at once."""
        tokens: PositiveInt = 60
        """Content deltas per stream."""
        tokens_per_second: NonNegativeFloat = 50.0
        """Pace of the deltas; 0: no pause."""
        ttft: NonNegativeFloat = 0.2
        """Seconds before the first delta."""
        jitter: Fraction = 0.2
        """Each pause varies by up to this fraction."""
        text: Literal["english", "japanese"] | None = "english"
        text_file: str | None = None
        """A UTF-8 text file whose words are streamed instead of a built-in corpus."""
        reasoning_tokens: NonNegativeInt = 0
        model: str = "synthetic-1"
        provider: str = "synthetic"
        seed: int | None = None
        meta: dict[str, str] = {}

        def __post_init__(self) -> None:
            check_bounds(self)

    def __init__(self, options: Options | None = None) -> None:
        self.options: SyntheticProducer.Options = self.resolve_options(options, {})
        if self.options.text_file is not None:
            source = _read_text_file(self.options.text_file)
        else:
            source = _CORPORA[self.options.text or "english"]
        self._vocab = _tokens(source)
        if not self._vocab:
            raise ValueError("the text source is empty")
        self._rng = random.Random(self.options.seed)
        self.stream_ids: list[str] = []
        """Ids of the streams produced so far, in start order."""

    def _pause(self, base: float) -> float:
        jitter = self.options.jitter
        return max(0.0, base * (1 + self._rng.uniform(-jitter, jitter)))

    async def run(self, bus: Bus) -> None:
        """Publish ``count`` streams, ``concurrency`` at a time."""
        limiter = anyio.Semaphore(self.options.concurrency)
        async with anyio.create_task_group() as tg:
            for index in range(self.options.count):
                await limiter.acquire()
                tg.start_soon(self._one, bus, index, limiter)

    async def _one(self, bus: Bus, index: int, limiter: anyio.Semaphore) -> None:
        o = self.options
        try:
            meta = {"index": index, **o.meta}
            async with bus.stream(model=o.model, provider=o.provider, meta=meta) as w:
                self.stream_ids.append(w.stream)
                gap = 1.0 / o.tokens_per_second if o.tokens_per_second else 0.0
                await anyio.sleep(self._pause(o.ttft))
                start = self._rng.randrange(len(self._vocab))
                for i in range(o.reasoning_tokens):
                    await w.delta(self._vocab[(start + i) % len(self._vocab)], channel="reasoning")
                    await anyio.sleep(self._pause(gap))
                for i in range(o.tokens):
                    await w.delta(self._vocab[(start + i) % len(self._vocab)])
                    await anyio.sleep(self._pause(gap))
                await w.end(
                    "stop",
                    usage=Usage(
                        prompt_tokens=8,
                        completion_tokens=o.tokens + o.reasoning_tokens,
                        total_tokens=8 + o.tokens + o.reasoning_tokens,
                    ),
                )
        finally:
            limiter.release()


def _read_text_file(path: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except IsADirectoryError:
        raise ValueError(f"text_file: {path} is a directory, not a text file") from None
    except OSError as exc:
        raise ValueError(f"text_file: cannot read {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise ValueError(f"text_file: {path} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
