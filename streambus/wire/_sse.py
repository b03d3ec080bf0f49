"""Server-sent events (``text/event-stream``) following the WHATWG rules."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from typing import Literal

import msgspec

from ..errors import WireError
from ._ndjson import DEFAULT_MAX_LINE

__all__ = ["SseEvent", "SseParser", "format_sse"]

_BOM = b"\xef\xbb\xbf"


class SseEvent(msgspec.Struct, frozen=True, kw_only=True):
    """One dispatched server-sent event."""

    data: str
    """The data lines joined with ``\\n`` (no trailing newline)."""
    event: str = "message"
    """The ``event:`` type, ``message`` when none was given."""
    id: str = ""
    """The last event id in effect (it persists across events, as in browsers)."""
    retry: int | None = None
    """A ``retry:`` value (milliseconds) seen since the previous event, if any."""
    offset: int = 0
    """Byte offset of the event's first ``data`` line in the stream; use it in error messages."""


class SseParser:
    """Parse an event stream arriving in arbitrary pieces into :class:`SseEvent` s.

    ::

        parser = SseParser()
        async for chunk in response.content.iter_any():
            for event in parser.feed(chunk):
                if event.data == "[DONE]":
                    break
                handle(orjson.loads(event.data))
        for event in parser.close():
            handle(orjson.loads(event.data))

    The WHATWG event-stream rules apply: ``data:`` with or without the space
    after the colon, several ``data:`` lines joined with ``\\n``, lines
    starting with ``:`` are comments (keep-alives), ``event:``, ``id:``
    (ignored when it contains NUL) and ``retry:`` (digits only) fields, CR,
    LF and CRLF line ends (a CR at the end of one read and an LF at the start
    of the next are one line end), a leading byte order mark, and an event is
    dispatched by a blank line only when it has data.

    One deliberate leniency: :meth:`close` dispatches a final event whose
    blank line never came (many servers end that way); pass
    ``dispatch_at_close=False`` for the strict browser behaviour of dropping it.

    :meth:`feed` returns an iterator; iterate it before feeding again.
    Invalid UTF-8 raises :class:`~streambus.errors.WireError` (with
    ``errors="strict"``, the default; ``"replace"`` substitutes U+FFFD as
    browsers do) from the iterator at the bad line, after every event before
    it; the line is dropped and the parser stays usable.
    """

    __slots__ = (
        "_base",
        "_bom",
        "_buf",
        "_data",
        "_dispatch_at_close",
        "_errors",
        "_event_offset",
        "_lines",
        "_max_line",
        "_retry",
        "_skip_lf",
        "_type",
        "last_event_id",
        "retry",
    )

    def __init__(
        self,
        *,
        errors: Literal["strict", "replace"] = "strict",
        max_line: int = DEFAULT_MAX_LINE,
        dispatch_at_close: bool = True,
    ) -> None:
        if errors not in ("strict", "replace"):
            raise ValueError(f"errors: expected 'strict' or 'replace', got {errors!r}")
        if max_line < 1:
            raise ValueError(f"max_line: must be at least 1, got {max_line}")
        self._errors = errors
        self._max_line = max_line
        self._dispatch_at_close = dispatch_at_close
        self._buf = bytearray()
        self._base = 0  # byte offset of self._buf[0]
        self._bom = True  # still at the start, where a BOM may be
        self._skip_lf = False  # the last line ended with CR: a leading LF belongs to it
        self._lines: deque[tuple[int, bytes]] = deque()
        self._data: list[str] = []
        self._type = ""
        self._retry: int | None = None
        self._event_offset = 0
        self.last_event_id = ""
        """The last event id seen (send it as ``Last-Event-ID`` when reconnecting)."""
        self.retry: int | None = None
        """The last ``retry:`` value seen, in milliseconds."""

    @property
    def buffered(self) -> int:
        """Bytes of an incomplete line held back."""
        return len(self._buf)

    def feed(self, data: bytes | bytearray | memoryview) -> Iterator[SseEvent]:
        """Add *data*; return an iterator over the events it completed."""
        if self._skip_lf and data:
            self._skip_lf = False
            if data[0] == 0x0A:
                data = data[1:]
                self._base += 1
        buf = self._buf
        buf += data
        if self._bom:
            if len(buf) < 3 and _BOM.startswith(buf):
                return self._drain()
            self._bom = False
            if buf.startswith(_BOM):
                del buf[:3]
                self._base += 3
        end = max(buf.rfind(b"\n"), buf.rfind(b"\r"))
        if end < 0:
            if len(buf) > self._max_line:
                raise WireError(f"line longer than {self._max_line} bytes", offset=self._base)
            return self._drain()
        complete = bytes(buf[: end + 1])
        del buf[: end + 1]
        # A CR ending the read may be the first half of a CRLF split across reads.
        self._skip_lf = complete[-1] == 0x0D and not buf
        pos = self._base
        append = self._lines.append
        for line in complete.splitlines(keepends=True):
            append((pos, line))
            pos += len(line)
        self._base = pos
        return self._drain()

    def close(self) -> Iterator[SseEvent]:
        """End of input: return an iterator over the last event, if one was pending."""
        if self._buf:
            tail = bytes(self._buf)
            self._buf.clear()
            self._lines.append((self._base, tail))
            self._base += len(tail)
        return self._drain(final=True)

    def _drain(self, final: bool = False) -> Iterator[SseEvent]:
        lines = self._lines
        max_line = self._max_line
        while lines:
            offset, raw = lines.popleft()
            # A line never contains CR or LF, so stripping both removes exactly its terminator.
            line = raw.rstrip(b"\r\n")
            if not line:
                event = self._dispatch()
                if event is not None:
                    yield event
                continue
            if line[0] == 0x3A:  # ":" starts a comment (keep-alive)
                continue
            if len(line) > max_line:
                raise WireError(f"line longer than {max_line} bytes", offset=offset)
            try:
                text = line.decode("utf-8", self._errors)
            except UnicodeDecodeError as exc:
                raise WireError(f"invalid UTF-8 in event stream ({exc.reason})", offset=offset + exc.start) from None
            field, colon, value = text.partition(":")
            if colon and value[:1] == " ":
                value = value[1:]
            if field == "data":
                if not self._data:
                    self._event_offset = offset
                self._data.append(value)
            elif field == "event":
                self._type = value
            elif field == "id":
                if "\0" not in value:
                    self.last_event_id = value
            elif field == "retry" and value.isascii() and value.isdigit():
                self._retry = self.retry = int(value)
            # Any other field name is ignored, as the standard says.
        if final and self._dispatch_at_close:
            event = self._dispatch()
            if event is not None:
                yield event

    def _dispatch(self) -> SseEvent | None:
        data = self._data
        if not data:
            self._type = ""
            return None
        event = SseEvent(
            data=data[0] if len(data) == 1 else "\n".join(data),
            event=self._type or "message",
            id=self.last_event_id,
            retry=self._retry,
            offset=self._event_offset,
        )
        self._data = []
        self._type = ""
        self._retry = None
        return event


def format_sse(data: str, *, event: str | None = None, id: str | None = None, retry: int | None = None) -> bytes:
    """Encode one server-sent event (``data:`` lines and the blank line that dispatches it).

    Newlines in *data* become separate ``data:`` lines, so the receiver gets
    *data* back exactly.
    """
    parts: list[str] = []
    if event is not None:
        parts.append(f"event: {event}\n")
    if id is not None:
        if "\n" in id or "\r" in id or "\0" in id:
            raise ValueError("id: must not contain CR, LF or NUL")
        parts.append(f"id: {id}\n")
    if retry is not None:
        parts.append(f"retry: {retry}\n")
    if "\n" in data or "\r" in data:
        for piece in data.replace("\r\n", "\n").replace("\r", "\n").split("\n"):
            parts.append(f"data: {piece}\n")
    else:
        parts.append(f"data: {data}\n")
    parts.append("\n")
    return "".join(parts).encode("utf-8")
