"""Server-sent events (``text/event-stream``) following the WHATWG rules."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Literal

import msgspec

from ..errors import WireError
from ._ndjson import DEFAULT_MAX_LINE, yield_then_raise

__all__ = ["SseEvent", "SseParser", "format_sse"]

_BOM = b"\xef\xbb\xbf"


class _BadLine(Exception):
    """A bad line: *error* to raise after the events before it; the lines after it start at *end*."""

    def __init__(self, error: WireError, end: int) -> None:
        self.error = error
        self.end = end


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

    :meth:`feed` parses what *data* completes at once and returns an
    iterator over the events. Invalid UTF-8 (with ``errors="strict"``, the
    default; ``"replace"`` substitutes U+FFFD as browsers do) makes that
    iterator raise :class:`~streambus.errors.WireError` at the bad line,
    after every event before it; the line is dropped and the lines after it
    are kept for the next :meth:`feed` (``b""`` will do), so the parser stays
    usable and loses nothing.
    """

    __slots__ = (
        "_base",
        "_bom",
        "_buf",
        "_data",
        "_dispatch_at_close",
        "_errors",
        "_event_offset",
        "_max_line",
        "_pending",
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
        self._pending: tuple[int, bytes] | None = None  # offset and bytes of the lines after a bad one
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
        if isinstance(data, memoryview):
            data = data.tobytes()
        if self._skip_lf and data:
            self._skip_lf = False
            if data[0] == 0x0A:
                data = data[1:]
                self._base += 1
        buf = self._buf
        if self._bom:
            buf += data
            if len(buf) < 3 and _BOM.startswith(buf):
                return iter(())
            self._bom = False
            if buf.startswith(_BOM):
                del buf[:3]
                self._base += 3
            data = b""
        if buf:
            buf += data
            src: bytes | bytearray | memoryview = buf
        else:
            src = data  # the usual case: no partial line held, no copy through the buffer
        # Usually the read ends at a line end; only otherwise search for the last one.
        last_is_eol = src and src[-1] in (0x0A, 0x0D)
        end = len(src) - 1 if last_is_eol else max(src.rfind(b"\n"), src.rfind(b"\r"))  # type: ignore[union-attr]
        if end < 0:
            if src is not buf:
                buf += src
            if len(buf) > self._max_line:
                raise WireError(f"line longer than {self._max_line} bytes", offset=self._base)
            return self._process(b"", self._base) if self._pending else iter(())
        if src is buf:
            complete = bytes(buf[: end + 1])
            del buf[: end + 1]
        elif end + 1 < len(src):
            complete = bytes(src[: end + 1])
            buf += src[end + 1 :]
        else:
            complete = bytes(src)  # the whole read (no copy when it is bytes)
        # A CR ending the read may be the first half of a CRLF split across reads.
        self._skip_lf = complete[-1] == 0x0D and not buf
        base = self._base
        self._base = base + len(complete)
        return self._process(complete, base)

    def close(self) -> Iterator[SseEvent]:
        """End of input: an iterator over the last event, if one was pending."""
        tail = bytes(self._buf)
        self._buf.clear()
        base = self._base
        self._base += len(tail)
        return self._process(tail, base, final=True)

    def _process(self, complete: bytes, pos: int, final: bool = False) -> Iterator[SseEvent]:
        """Parse *complete* (whole lines, unless *final*; starting at byte offset *pos*) into events."""
        if self._pending:
            # Lines left after a bad one: they come first.
            pos, earlier = self._pending
            complete = earlier + complete
            self._pending = None
        events: list[SseEvent] = []
        try:
            self._blocks(complete, pos, events)
        except _BadLine as bad:
            self._pending = (pos + bad.end, complete[bad.end :])
            return yield_then_raise(events, bad.error)
        if final and self._dispatch_at_close and self._data:
            events.append(self._dispatch())
        return iter(events)

    def _blocks(self, complete: bytes, pos: int, events: list[SseEvent]) -> None:
        # Servers use one line end throughout: with LF only or CRLF only, the text splits (in C)
        # at blank lines into one block per event. A mix, or a lone CR, takes the line-by-line path.
        if b"\r" not in complete:
            eol = b"\n"
        elif complete.count(b"\r") == complete.count(b"\r\n") == complete.count(b"\n"):
            eol = b"\r\n"
        else:
            self._lines(complete.splitlines(keepends=True), 0, pos, events)
            return
        blocks = complete.split(eol + eol)
        rest = blocks.pop()  # the lines after the last blank line (b"" when it ends with one)
        i = 0  # where the block starts in complete
        skip = 2 * len(eol)
        for block in blocks:
            if self._data or self._type or self._retry is not None or not self._simple(block, eol, pos + i, events):
                self._lines([line + eol for line in block.split(eol)] + [eol], i, pos, events)
            i += len(block) + skip
        if rest:
            lines = [line + eol for line in rest.split(eol)]
            if lines[-1] == eol:  # what follows rest's own last line end: not a line
                lines.pop()
            else:
                lines[-1] = lines[-1][: -len(eol)]  # an unterminated last line (at close)
            self._lines(lines, i, pos, events)

    def _simple(self, block: bytes, eol: bytes, offset: int, events: list[SseEvent]) -> bool:
        """The fast path: one event as providers send it (an optional ``event:`` line, then one
        ``data:`` line), found between events. Return ``False`` for anything else (comments,
        ``id:``, several data lines, a line too long or not UTF-8): the line-by-line path then
        gives the same result."""
        name = "message"
        line = block
        if block[:6] == b"event:":
            head, _, line = block.partition(eol)
            value = head[7:] if head[6:7] == b" " else head[6:]
            offset += len(head) + len(eol)
            try:
                name = value.decode("utf-8", self._errors) or "message"
            except UnicodeDecodeError:
                return False
        if line[:5] != b"data:" or eol in line or len(block) > self._max_line:
            return False
        value = line[6:] if line[5:6] == b" " else line[5:]
        try:
            data = value.decode("utf-8", self._errors)
        except UnicodeDecodeError:
            return False
        events.append(SseEvent(data=data, event=name, id=self.last_event_id, offset=offset))
        return True

    def _lines(self, lines: list[bytes], i: int, pos: int, events: list[SseEvent]) -> None:
        """Take *lines* (each with its line end, but maybe the last), the first at byte *pos* + *i*."""
        for raw in lines:
            offset = pos + i
            i += len(raw)
            # A line never contains CR or LF, so stripping both removes exactly its terminator.
            line = raw.rstrip(b"\r\n")
            try:
                self._line(line, offset, events)
            except UnicodeDecodeError as exc:
                # exc.object is the part decoded: the end of the line.
                at = offset + len(line) - len(exc.object) + exc.start
                raise _BadLine(WireError(f"invalid UTF-8 in event stream ({exc.reason})", offset=at), i) from None
            except WireError as exc:
                raise _BadLine(exc, i) from None

    def _line(self, line: bytes, offset: int, events: list[SseEvent]) -> None:
        """Take one line (without its line end) at byte *offset*; a blank line dispatches the event."""
        if not line:
            if self._data:
                events.append(self._dispatch())
            else:
                self._type = ""
            return
        if line[0] == 0x3A:  # ":" starts a comment (keep-alive)
            return
        if len(line) > self._max_line:
            raise WireError(f"line longer than {self._max_line} bytes", offset=offset)
        if line.startswith(b"data:"):
            value = line[6:] if line[5:6] == b" " else line[5:]
            if not self._data:
                self._event_offset = offset
            self._data.append(value.decode("utf-8", self._errors))
            return
        text = line.decode("utf-8", self._errors)
        field, colon, value_text = text.partition(":")
        if colon and value_text[:1] == " ":
            value_text = value_text[1:]
        if field == "data":
            if not self._data:
                self._event_offset = offset
            self._data.append(value_text)
        elif field == "event":
            self._type = value_text
        elif field == "id":
            if "\0" not in value_text:
                self.last_event_id = value_text
        elif field == "retry" and value_text.isascii() and value_text.isdigit():
            self._retry = self.retry = int(value_text)
        # Any other field name is ignored, as the standard says.

    def _dispatch(self) -> SseEvent:
        data = self._data
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
