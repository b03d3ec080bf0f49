"""The ``stdout`` sink: print text as it streams."""

from __future__ import annotations

import sys
from typing import Literal, TextIO

import msgspec

from ..events import AbortEvent, DeltaEvent, EndEvent, ErrorEvent, StartEvent, encode
from ..plugins import PluginBase
from ..subscription import Subscription

__all__ = ["StdoutSink"]


class StdoutSink(PluginBase):
    """Print streamed text to stdout as it arrives (``print(chunk, end="", flush=True)``).

    ``format = "text"`` prints the content text of every stream (with a
    header line per stream when several interleave); ``"jsonl"`` prints
    every event in wire form, one per line.
    """

    class Options(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
        """Config keys of the ``stdout`` sink."""

        format: Literal["text", "jsonl"] = "text"
        channels: list[Literal["content", "reasoning", "tool"]] = msgspec.field(default_factory=lambda: ["content"])
        headers: bool = True

    overflow = "block"

    def __init__(self, options: Options | None = None, *, file: TextIO | None = None) -> None:
        self.options = options or self.Options()
        self.file = file

    async def run(self, events: Subscription) -> None:
        """Write events to stdout until the subscription ends.

        Concurrent streams are not interleaved: the oldest unfinished stream
        prints live while the others are held, then each follows in turn.
        """
        out = self.file or sys.stdout
        jsonl = self.options.format == "jsonl"
        channels = set(self.options.channels)
        order: list[str] = []
        held: dict[str, list[str]] = {}
        ended: set[str] = set()
        current: str | None = None

        def header(stream: str) -> str:
            return f"── {stream} ──\n" if self.options.headers else ""

        def advance(parts: list[str]) -> str | None:
            # Print held streams in order until one is still live.
            while order:
                stream = order[0]
                parts.append(header(stream))
                parts.extend(held.pop(stream, []))
                if stream not in ended:
                    return stream
                order.pop(0)
                parts.append("\n")
            return None

        while batch := await events.receive_batch():
            parts: list[str] = []
            for event in batch:
                if jsonl:
                    parts.append(encode(event).decode() + "\n")
                    continue
                kind = type(event)
                if kind is StartEvent:
                    order.append(event.stream)
                    held[event.stream] = []
                    if current is None:
                        current = advance(parts)
                    continue
                if event.stream not in held and event.stream != current:
                    continue  # joined mid-stream: no start seen
                if kind is DeltaEvent:
                    assert isinstance(event, DeltaEvent)
                    if event.channel not in channels or not event.text:
                        continue
                    if event.stream == current:
                        parts.append(event.text)
                    else:
                        held[event.stream].append(event.text)
                elif kind in (EndEvent, ErrorEvent, AbortEvent):
                    note = ""
                    if isinstance(event, ErrorEvent):
                        note = f"[error {event.kind}: {event.message}]"
                    elif isinstance(event, AbortEvent):
                        note = f"[aborted by {event.by}: {event.reason}]"
                    if event.stream == current:
                        parts.append(note)
                        parts.append("\n")
                        order.remove(event.stream)
                        held.pop(event.stream, None)
                        current = advance(parts)
                    else:
                        held[event.stream].append(note)
                        ended.add(event.stream)
            if parts:
                try:
                    out.write("".join(parts))
                    out.flush()
                except BrokenPipeError:
                    # The reader went away (`streambus demo | head`): stop quietly.
                    events.close()
                    return
