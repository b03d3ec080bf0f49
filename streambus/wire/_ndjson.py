"""NDJSON (JSON Lines): bytes in, one decoded JSON value per line out."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

import orjson

from ..errors import WireError

__all__ = ["DEFAULT_MAX_LINE", "NdjsonParser"]

DEFAULT_MAX_LINE = 16 * 1024 * 1024
"""The default limit on one line, in bytes (a runaway upstream must not eat memory)."""


class NdjsonParser:
    """Split newline-delimited JSON arriving in arbitrary pieces into values.

    ::

        parser = NdjsonParser()
        async for chunk in response.content.iter_any():
            for obj in parser.feed(chunk):
                handle(obj)
        for obj in parser.close():
            handle(obj)

    Objects split across reads, several objects in one read, blank lines and
    CRLF line ends are all handled. :meth:`feed` buffers *data* at once and
    returns an iterator over the complete lines; iterate it before feeding
    again (lines not yet iterated are kept for the next iterator, in order).

    A line that is not valid JSON raises :class:`~streambus.errors.WireError`
    from the iterator *at that line*: every value before it was already
    yielded, the bad line is dropped, and the parser stays usable. ``offset``
    is the byte offset of the line's first byte. A line longer than
    *max_line* bytes raises too, as soon as it is known to be too long.

    *loads* decodes one line (``orjson.loads`` by default); pass a
    ``msgspec.json.Decoder(T).decode`` for typed decoding.
    """

    __slots__ = ("_base", "_buf", "_lines", "_loads", "_max_line", "_tail", "line_offset")

    def __init__(self, *, max_line: int = DEFAULT_MAX_LINE, loads: Callable[[bytes], Any] = orjson.loads) -> None:
        if max_line < 1:
            raise ValueError(f"max_line: must be at least 1, got {max_line}")
        self._max_line = max_line
        self._loads = loads
        self._buf = bytearray()
        self._base = 0  # byte offset of self._buf[0]
        self._lines: deque[tuple[int, bytes]] = deque()
        self._tail = -1  # offset of an unterminated last line, once closed
        self.line_offset = 0
        """Byte offset of the line whose value was yielded last (for the caller's own errors)."""

    @property
    def buffered(self) -> int:
        """Bytes of an incomplete last line held back."""
        return len(self._buf)

    def feed(self, data: bytes | bytearray | memoryview) -> Iterator[Any]:
        """Add *data*; return an iterator over the values of the lines it completed."""
        buf = self._buf
        buf += data
        end = buf.rfind(b"\n")
        if end < 0:
            if len(buf) > self._max_line:
                raise WireError(f"line longer than {self._max_line} bytes", offset=self._base)
            return self._drain()
        complete = bytes(buf[:end])
        del buf[: end + 1]
        pos = self._base
        append = self._lines.append
        for line in complete.split(b"\n"):
            append((pos, line))
            pos += len(line) + 1
        self._base = pos
        return self._drain()

    def close(self) -> Iterator[Any]:
        """End of input: return an iterator over what is left.

        A last line without a newline is decoded if it is valid JSON;
        otherwise it raises :class:`WireError` ("truncated"), meaning the
        upstream stopped in the middle of a line.
        """
        if self._buf:
            tail = bytes(self._buf)
            self._buf.clear()
            self._lines.append((self._base, tail))
            self._tail = self._base
            self._base += len(tail)
        return self._drain()

    def _drain(self) -> Iterator[Any]:
        lines = self._lines
        loads = self._loads
        max_line = self._max_line
        while lines:
            offset, line = lines.popleft()
            if line.endswith(b"\r"):
                line = line[:-1]
            if len(line) > max_line:
                raise WireError(f"line longer than {max_line} bytes", offset=offset)
            self.line_offset = offset
            try:
                value = loads(line)
            except Exception as exc:  # any loader's decode error: the line is bad
                if not line.strip():
                    continue
                what = "truncated JSON line at end of input" if offset == self._tail else "malformed JSON line"
                raise WireError(f"{what}: {exc}", offset=offset) from None
            yield value
