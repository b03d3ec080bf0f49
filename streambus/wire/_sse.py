"""Server-sent events (``text/event-stream``) following the WHATWG rules."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Literal, TypeAlias

import msgspec

from ..errors import WireError
from ._ndjson import DEFAULT_MAX_LINE, yield_then_raise

__all__ = ["RawSseEvent", "SseEvent", "SseParser", "format_sse"]

_BOM = b"\xef\xbb\xbf"

_Shape: TypeAlias = tuple[bytes, int, bytes, bytes, bytes]
"""Where the fast way cuts: the blank line, its length, it + ``data: ``, it + ``event: ``, a line end + ``data: ``."""
_LF: _Shape = (b"\n\n", 2, b"\n\ndata: ", b"\n\nevent: ", b"\ndata: ")
_CRLF: _Shape = (b"\r\n\r\n", 4, b"\r\n\r\ndata: ", b"\r\n\r\nevent: ", b"\r\ndata: ")


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


RawSseEvent: TypeAlias = tuple[bytes, bytes, int]
"""What :meth:`SseParser.feed_raw` yields per event: its type (``b"message"`` when none was
given), its data lines joined with ``\\n`` as UTF-8 bytes, and the byte offset of its first
``data`` line in the stream."""


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
        "_idle",
        "_max_line",
        "_pending",
        "_retry",
        "_shape",
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
        self._pending: tuple[int, list[bytes]] | None = None  # lines left after a bad one
        self._data: list[str] = []
        self._type = ""
        self._retry: int | None = None
        self._event_offset = 0
        self._shape: _Shape | None = None  # the stream's blank line and the like, once the fast way has seen it
        self._idle = False  # the last read took the fast way (so no BOM, CR or event under way to look at)
        self.last_event_id = ""
        """The last event id seen (send it as ``Last-Event-ID`` when reconnecting)."""
        self.retry: int | None = None
        """The last ``retry:`` value seen, in milliseconds."""

    @property
    def buffered(self) -> int:
        """Bytes held back for the next read: an incomplete line, or the start of an incomplete event."""
        return len(self._buf)

    def feed(self, data: bytes | bytearray | memoryview) -> Iterator[SseEvent]:
        """Add *data*; return an iterator over the events it completed."""
        return self._feed(data, raw=False)

    def feed_raw(self, data: bytes | bytearray | memoryview) -> Iterator[RawSseEvent]:
        """Add *data*; return an iterator over the ``(event, data, offset)`` of the events it completed.

        The same events as :meth:`feed` (same order, offsets and errors), as
        :data:`RawSseEvent` tuples whose type and data are UTF-8 *bytes*
        (already checked to be valid), for a JSON decoder that reads bytes
        (no ``str`` is made per event); the ``id:`` and ``retry:`` fields stay readable as
        :attr:`last_event_id` and :attr:`retry`. The usual events of LLM APIs
        are cut without building an :class:`SseEvent` at all.
        """
        if self._idle and type(data) is bytes:  # the usual read, as :meth:`_feed` would take it, one call less
            if not self._buf:
                one = self._one_event(data)
                if one is not None:
                    return iter((one,))
            whole = self._whole_events(data, True)
            if whole is not None:
                return iter(whole)
            self._idle = False
        return self._feed(data, raw=True)

    def _feed(self, data: bytes | bytearray | memoryview, raw: bool) -> Iterator[Any]:
        """:meth:`feed` (``SseEvent`` s) or :meth:`feed_raw` (``RawSseEvent`` s), as *raw* says."""
        if not isinstance(data, bytes):
            data = bytes(data)
        tried = self._idle
        if tried:  # the last read took the fast way: no BOM, CR or event under way to look at
            whole = self._whole_events(data, raw)
            if whole is not None:
                return iter(whole)
            self._idle = False
        if self._skip_lf and data:
            self._skip_lf = False
            if data[0] == 0x0A:
                data = data[1:]
                self._base += 1
                if self._pending:  # lines held after a bad one run up to that CR: the LF is theirs
                    pos, held = self._pending
                    self._pending = (pos, [*held[:-1], held[-1] + b"\n"]) if held else (pos + 1, held)
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
        if not tried and not self._pending and not self._data and not self._type and self._retry is None:
            whole = self._whole_events(data, raw)
            if whole is not None:
                return iter(whole)
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
            return self._maybe_raw(self._process(b"", self._base), raw) if self._pending else iter(())
        complete = bytes(src[: end + 1])
        if src is buf:
            del buf[: end + 1]
        elif end + 1 < len(src):
            buf += src[end + 1 :]
        # A CR ending the read may be the first half of a CRLF split across reads.
        self._skip_lf = complete[-1] == 0x0D and not buf
        base = self._base
        self._base = base + len(complete)
        return self._maybe_raw(self._process(complete, base), raw)

    @staticmethod
    def _maybe_raw(events: Iterator[SseEvent], raw: bool) -> Iterator[Any]:
        if not raw:
            return events
        # A generator, so an error the line loop raises still comes after every event before it.
        return ((e.event.encode(), e.data.encode(), e.offset) for e in events)

    def _one_event(self, data: bytes) -> RawSseEvent | None:
        """:meth:`_whole_events` for a read that is exactly one event, with nothing held; else ``None``.

        What a server that flushes each event on its own sends, so the usual
        read of a streamed answer: the same checks and the same event as
        :meth:`_whole_events` (raw), without its split, loop and list, which
        saves about a fifth of an answer parser's time per event
        (``docs/decisions.md``). Only between events, after a read that took
        the fast way (``_idle``), when ``_buf`` is empty.
        """
        sep, n, _, _, data_line = self._shape  # type: ignore[misc]  # (set once a read took the fast way)
        if not data.endswith(sep) or len(data) > self._max_line:
            return None
        first = data[0]
        at = self._base
        if first == 0x64 and data.startswith(b"data: "):
            name, value, offset = b"message", data[6:-n], at
        elif first == 0x65 and data.startswith(b"event: "):
            name, found, value = data[7:-n].partition(data_line)
            if not found or 0x0A in name or 0x0D in name:
                return None
            offset = at + 7 + n // 2 + len(name)
            name = name or b"message"
        else:
            return None
        # One line each (int needles: a memchr each, cheaper than counting the read's line ends).
        if 0x0A in value or 0x0D in value:
            return None
        try:
            data.decode()  # the UTF-8 check; the line loop names a bad byte's offset
        except UnicodeDecodeError:
            return None
        self._base = at + len(data)
        return name, value, offset

    def _whole_events(self, data: bytes, raw: bool) -> list[Any] | None:
        """The fast way for the events nearly every LLM API sends; ``None`` when *data* is not that.

        Between events (no event under way), when what is held plus *data*
        holds whole events that all are one ``data: `` line, or all an
        ``event: `` line then a ``data: `` line, with one kind of line end,
        those events are cut out with a few C calls per read instead of a
        Python loop over lines. What follows the last of them stays held, as
        bytes, for the next read. Anything else (comments, ``id:``, several
        data lines, invalid UTF-8, mixed line ends...) returns ``None`` with
        nothing changed, and the line loop in :meth:`_process` handles it.
        """
        buf = self._buf
        src = bytes(buf) + data if buf else data
        shape = self._shape
        if shape is None:  # the stream's first line end tells
            first = src.find(b"\n")
            if first < 0:
                return None
            shape = _CRLF if first and src[first - 1] == 0x0D else _LF
        sep, n, data_split, event_split, data_line = shape
        size = len(src)
        if src.endswith(sep):  # the usual read: whole events, nothing after them
            cut = size
            whole = src
        else:
            cut = src.rfind(sep) + n
            if cut < n or size - cut > self._max_line:
                return None
            whole = src[:cut]
        if cut > self._max_line:
            return None
        first = whole[0]  # (an index is cheaper than a call that would fail)
        if first == 0x64 and whole.startswith(b"data: "):
            head, per_event, split = 6, 2, data_split
        elif first == 0x65 and whole.startswith(b"event: "):
            head, per_event, split = 7, 3, event_split
        else:
            return None
        # The line ends, counted once: with CRLF one splitlines counts CRs and LFs together (a stray CR or
        # LF in a block is a line end more, since a block never touches the CRLFs around it); with LF,
        # ``0x0D in`` rules CRs out (an int needle is a memchr; a bytes one first fails as an int, which
        # costs about ten times more).
        if n == 4:
            line_ends = len(whole.splitlines())
        elif 0x0D in whole:
            return None
        else:
            line_ends = whole.count(b"\n")
        # Each event has exactly *per_event* of them unless a block holds line ends of its own.
        if line_ends == per_event:  # the usual read: one event, nothing to split
            blocks: list[bytes] | tuple[bytes] = (whole[head:-n],)
        else:
            blocks = whole[head:-n].split(split)
            if line_ends != per_event * len(blocks):
                return None
        at = self._base
        if raw:
            try:
                whole.decode()  # one check of the whole read; the line loop names a bad byte's offset
            except UnicodeDecodeError:
                return None
            raws: list[RawSseEvent] = []
            if head == 6:
                for block in blocks:
                    raws.append((b"message", block, at))
                    at += 6 + n + len(block)
            else:
                for block in blocks:
                    name, found, value = block.partition(data_line)
                    if not found:
                        return None
                    raws.append((name or b"message", value, at + 7 + n // 2 + len(name)))
                    at += 7 + n + len(block)
            self._shape = shape
            self._idle = True
            self._base = at
            if buf or cut < size:
                buf[:] = src[cut:]
            return raws
        step = head + n  # from one block to the next: the block, the blank line, the next field name
        skip = head + n // 2  # from a block's start to its data line: the event type and a line end
        errors = self._errors
        last_id = self.last_event_id
        events: list[SseEvent] = []
        try:
            if head == 6:
                for block in blocks:
                    events.append(SseEvent(data=block.decode("utf-8", errors), id=last_id, offset=at))
                    at += step + len(block)
            else:
                for block in blocks:
                    name, found, value = block.partition(data_line)
                    if not found:
                        return None
                    events.append(
                        SseEvent(
                            data=value.decode("utf-8", errors),
                            event=name.decode("utf-8", errors) or "message",
                            id=last_id,
                            offset=at + skip + len(name),
                        )
                    )
                    at += step + len(block)
        except UnicodeDecodeError:
            return None
        self._took(cut, src, shape)
        return events

    def _took(self, cut: int, src: bytes, shape: _Shape) -> None:
        """The fast way took ``src[:cut]``: hold the rest; the next read may go the fast way at once."""
        self._shape = shape
        self._idle = True
        self._base += cut
        buf = self._buf
        if buf or cut < len(src):
            buf[:] = src[cut:]

    def close(self) -> Iterator[SseEvent]:
        """End of input: an iterator over the last event, if one was pending."""
        self._idle = False
        tail = bytes(self._buf)
        self._buf.clear()
        base = self._base
        self._base += len(tail)
        return self._process(tail, base, final=True)

    def _process(self, complete: bytes, pos: int, final: bool = False) -> Iterator[SseEvent]:
        lines: list[bytes] = complete.splitlines(keepends=True)
        if self._pending:
            pos, earlier = self._pending
            lines = earlier + lines
            self._pending = None
        events: list[SseEvent] = []
        max_line = self._max_line
        errors = self._errors
        data = self._data
        for i, raw in enumerate(lines):
            offset = pos
            pos += len(raw)
            # A line never contains CR or LF, so stripping both removes exactly its terminator.
            line = raw.rstrip(b"\r\n")
            if not line:
                if data:
                    events.append(self._dispatch())
                    data = self._data
                else:
                    self._type = ""
                continue
            if line[0] == 0x3A:  # ":" starts a comment (keep-alive)
                continue
            try:
                if len(line) > max_line:
                    raise WireError(f"line longer than {max_line} bytes", offset=offset)
                if line.startswith(b"data:"):
                    value = line[6:] if line[5:6] == b" " else line[5:]
                    if not data:
                        self._event_offset = offset
                    data.append(value.decode("utf-8", errors))
                    continue
                if line.startswith(b"event:"):  # (Anthropic and OpenAI Responses name every event)
                    value = line[7:] if line[6:7] == b" " else line[6:]
                    self._type = value.decode("utf-8", errors)
                    continue
                text = line.decode("utf-8", errors)
            except UnicodeDecodeError as exc:
                start = exc.start + (len(line) - len(exc.object))
                error = WireError(f"invalid UTF-8 in event stream ({exc.reason})", offset=offset + start)
                self._pending = (pos, lines[i + 1 :])
                return yield_then_raise(events, error)
            except WireError as exc:
                self._pending = (pos, lines[i + 1 :])
                return yield_then_raise(events, exc)
            field, colon, value_text = text.partition(":")
            if colon and value_text[:1] == " ":
                value_text = value_text[1:]
            if field == "data":
                if not data:
                    self._event_offset = offset
                data.append(value_text)
            elif field == "event":
                self._type = value_text
            elif field == "id":
                if "\0" not in value_text:
                    self.last_event_id = value_text
            elif field == "retry" and value_text.isascii() and value_text.isdigit():
                self._retry = self.retry = int(value_text)
            # Any other field name is ignored, as the standard says.
        if final and self._dispatch_at_close and data:
            events.append(self._dispatch())
        return iter(events)

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
