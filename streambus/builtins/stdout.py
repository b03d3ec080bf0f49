"""The ``stdout`` sink: print text as it streams.

:class:`TextLayout` is the layout it prints with (one stream after another,
closing notes on their own line); ``streambus tail`` uses it too.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable
from typing import Literal, TextIO

import msgspec

from ..events import AbortEvent, DeltaEvent, ErrorEvent, Event, StartEvent, encode, is_terminal
from ..plugins import PluginBase
from ..subscription import Subscription

__all__ = ["StdoutSink", "TextLayout", "failure_note"]


def failure_note(event: Event) -> str:
    """The note that closes a failed stream: ``[error kind: message]``, ``[aborted by X: reason]``; else ``""``."""
    if isinstance(event, ErrorEvent):
        return f"[error {event.kind}: {event.message}]"
    if isinstance(event, AbortEvent):
        return f"[aborted by {event.by}: {event.reason}]"
    return ""


def _plain_header(stream: str, start: StartEvent | None) -> str:
    return f"── {stream} ──\n"


class TextLayout:
    """Lays out the text of concurrent streams for a terminal, one stream after another.

    The oldest unfinished stream prints live; streams that start meanwhile
    are held and follow in turn, each under its *header*, so no text (and no
    closing note) ever lands inside another stream's text. A change of
    channel within a stream (reasoning, then the answer) starts a new line,
    and so does a stream's closing note (*note*: the text for its terminal
    event, ``""`` for none).

    Feed every event in order to :meth:`feed` and write what it returns.

    :param channels: the delta channels to print.
    :param header: the line(s) printed before each stream's text; ``None`` for none.
    :param note: the closing note of a terminal event (default :func:`failure_note`).
    :param style: restyles a piece of text of a channel (e.g. dims reasoning on a terminal).
    :param unstarted: print streams whose ``start`` was not seen (a resumed subscription);
        by default they are skipped.
    """

    def __init__(
        self,
        *,
        channels: Iterable[str] = ("content",),
        header: Callable[[str, StartEvent | None], str] | None = _plain_header,
        note: Callable[[Event], str] = failure_note,
        style: Callable[[str, str], str] | None = None,
        unstarted: bool = False,
    ) -> None:
        self.channels = frozenset(channels)
        self.header = header
        self.note = note
        self.style = style
        self.unstarted = unstarted
        self._starts: dict[str, StartEvent | None] = {}
        self._order: list[str] = []  # unfinished or held streams, oldest first
        self._held: dict[str, list[str]] = {}
        self._ended: set[str] = set()
        self._current: str | None = None
        self._mid_line: set[str] = set()  # streams whose text so far does not end with a newline
        self._channel: dict[str, str] = {}

    def _begin(self, stream: str, start: StartEvent | None, parts: list[str]) -> None:
        self._starts[stream] = start
        self._order.append(stream)
        self._held[stream] = []
        if self._current is None:
            self._advance(parts)

    def _advance(self, parts: list[str]) -> None:
        # Print held streams in order until one is still live.
        self._current = None
        while self._order:
            stream = self._order[0]
            if self.header is not None:
                parts.append(self.header(stream, self._starts.get(stream)))
            parts.extend(self._held.pop(stream, []))
            if stream not in self._ended:
                self._current = stream
                return
            self._ended.discard(stream)
            self._order.pop(0)
            self._starts.pop(stream, None)

    def _put(self, stream: str, text: str, parts: list[str]) -> None:
        if stream == self._current:
            parts.append(text)
        else:
            self._held[stream].append(text)

    def feed(self, event: Event) -> str:
        """The text to write for *event* now (often ``""``: filtered, or held for later)."""
        parts: list[str] = []
        stream = event.stream
        known = stream == self._current or stream in self._held
        if type(event) is StartEvent:
            if not known:
                self._begin(stream, event, parts)
            return "".join(parts)
        if not known:
            if not self.unstarted:
                return ""  # joined mid-stream: no start seen
            self._begin(stream, None, parts)
        if type(event) is DeltaEvent:
            assert isinstance(event, DeltaEvent)
            channel = event.channel
            if channel not in self.channels or not event.text:
                return "".join(parts)
            text = event.text
            if self._channel.get(stream, channel) != channel and stream in self._mid_line:
                self._put(stream, "\n", parts)  # reasoning and answer on their own lines
            self._channel[stream] = channel
            if text.endswith("\n"):
                self._mid_line.discard(stream)
            else:
                self._mid_line.add(stream)
            self._put(stream, self.style(channel, text) if self.style is not None else text, parts)
        elif is_terminal(event):
            note = self.note(event)
            closing = ("\n" if stream in self._mid_line else "") + (note + "\n" if note else "")
            self._mid_line.discard(stream)
            self._channel.pop(stream, None)
            if stream == self._current:
                parts.append(closing)
                self._order.remove(stream)
                self._starts.pop(stream, None)
                self._advance(parts)
            else:
                self._held[stream].append(closing)
                self._ended.add(stream)
        return "".join(parts)


class StdoutSink(PluginBase):
    """Print streamed text to stdout as it arrives (``print(chunk, end="", flush=True)``).

    ``format = "text"`` prints the content text of every stream, one stream
    after another (see :class:`TextLayout`), with a header line per stream;
    a stream that ends in ``error`` or ``abort`` ends with a note on its own
    line (``[error kind: message]``, ``[aborted by X: reason]``).
    ``"jsonl"`` prints every event in wire form, one per line.
    """

    class Options(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
        """Config keys of the ``stdout`` sink."""

        format: Literal["text", "jsonl"] = "text"
        channels: list[Literal["content", "reasoning", "tool"]] = msgspec.field(default_factory=lambda: ["content"])
        headers: bool = True

    overflow = "block"

    def __init__(self, options: Options | None = None, *, file: TextIO | None = None) -> None:
        self.options: StdoutSink.Options = self.resolve_options(options, {})
        self.file = file

    async def run(self, events: Subscription) -> None:
        """Write events to stdout until the subscription ends.

        Concurrent streams are not interleaved: the oldest unfinished stream
        prints live while the others are held, then each follows in turn.
        """
        out = self.file or sys.stdout
        jsonl = self.options.format == "jsonl"
        layout = TextLayout(channels=self.options.channels, header=_plain_header if self.options.headers else None)
        while batch := await events.receive_batch():
            if jsonl:
                text = "".join(encode(event).decode() + "\n" for event in batch)
            else:
                text = "".join([layout.feed(event) for event in batch])
            if text:
                try:
                    out.write(text)
                    out.flush()
                except BrokenPipeError:
                    # The reader went away (`streambus demo | head`): stop quietly.
                    events.close()
                    return
