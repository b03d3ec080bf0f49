"""NDJSON (JSON Lines): bytes in, one decoded JSON value per line out."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import msgspec
import orjson

from ..errors import WireError

__all__ = ["DEFAULT_MAX_LINE", "NdjsonParser", "yield_then_raise"]

DEFAULT_MAX_LINE = 16 * 1024 * 1024
"""The default limit on one line, in bytes (a runaway upstream must not eat memory)."""

T = TypeVar("T")


def yield_then_raise(items: list[T], error: BaseException) -> Iterator[T]:
    """Yield *items*, then raise *error*: how parsers report bad input without losing good input."""
    yield from items
    raise error


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
    CRLF line ends are all handled. :meth:`feed` decodes every line *data*
    completes at once and returns an iterator over the values.

    A line that is not valid JSON makes that iterator raise
    :class:`~streambus.errors.WireError` *at that line*: every value before
    it is yielded first, the bad line is dropped, and the lines after it are
    kept for the next :meth:`feed` (``b""`` will do), so the parser stays
    usable and loses nothing. ``offset`` is the byte offset of the line's
    first byte. A line longer than *max_line* bytes raises as soon as it is
    known to be too long.

    *loads* decodes one line (``orjson.loads`` by default); pass a
    ``msgspec.json.Decoder(T).decode`` for typed, validating decoding.
    """

    __slots__ = ("_base", "_buf", "_loads", "_max_line", "_pending", "_tail")

    def __init__(self, *, max_line: int = DEFAULT_MAX_LINE, loads: Callable[[bytes], Any] = orjson.loads) -> None:
        if max_line < 1:
            raise ValueError(f"max_line: must be at least 1, got {max_line}")
        self._max_line = max_line
        self._loads = loads
        self._buf = bytearray()
        self._base = 0  # byte offset of the first byte not yet split into lines
        self._pending: list[tuple[int, bytes]] = []  # lines left after a bad one
        self._tail = -1  # offset of an unterminated last line, once closed

    @property
    def buffered(self) -> int:
        """Bytes of an incomplete last line held back."""
        return len(self._buf)

    def feed(self, data: bytes | bytearray | memoryview) -> Iterator[Any]:
        """Add *data*; return an iterator over the values of the lines it completed."""
        if isinstance(data, memoryview):
            data = data.tobytes()
        buf = self._buf
        if buf:
            buf += data
            end = buf.rfind(b"\n")
            if end < 0:
                if len(buf) > self._max_line:
                    raise WireError(f"line longer than {self._max_line} bytes", offset=self._base)
                return self._decode([])
            complete = bytes(buf[:end])
            del buf[: end + 1]
        else:
            # The usual case: no partial line held, so slice the read itself
            # instead of copying it through the buffer.
            end = len(data) - 1 if data and data[-1] == 0x0A else data.rfind(b"\n")
            if end < 0:
                buf += data
                if len(buf) > self._max_line:
                    raise WireError(f"line longer than {self._max_line} bytes", offset=self._base)
                return self._decode([])
            complete = bytes(data[:end])
            if end + 1 < len(data):
                buf += data[end + 1 :]
        base = self._base
        self._base = base + len(complete) + 1
        if 0x0A not in complete and not self._pending:
            return self._decode_one(base, complete)
        lines = []
        for line in complete.split(b"\n"):
            lines.append((base, line))
            base += len(line) + 1
        return self._decode(lines)

    def close(self) -> Iterator[Any]:
        """End of input: an iterator over what is left.

        A last line without a newline is decoded if it is valid JSON;
        otherwise it raises :class:`WireError` ("truncated"), meaning the
        upstream stopped in the middle of a line.
        """
        lines: list[tuple[int, bytes]] = []
        if self._buf:
            tail = bytes(self._buf)
            self._buf.clear()
            self._tail = self._base
            lines.append((self._base, tail))
            self._base += len(tail)
        return self._decode(lines)

    def _decode_one(self, offset: int, line: bytes) -> Iterator[Any]:
        if line and line[-1] == 0x0D:
            line = line[:-1]
        if len(line) > self._max_line:
            raise WireError(f"line longer than {self._max_line} bytes", offset=offset)
        try:
            return iter((self._loads(line),))
        except Exception as exc:
            if not line.strip():
                return iter(())
            raise self._error(offset, exc) from None

    def _decode(self, lines: list[tuple[int, bytes]]) -> Iterator[Any]:
        if self._pending:
            lines = self._pending + lines
            self._pending = []
        loads = self._loads
        max_line = self._max_line
        values: list[Any] = []
        for i, (offset, line) in enumerate(lines):
            if line and line[-1] == 0x0D:
                line = line[:-1]
            try:
                if len(line) > max_line:
                    raise WireError(f"line longer than {max_line} bytes", offset=offset)
                values.append(loads(line))
            except Exception as exc:  # any loader's decode error: the line is bad
                if not line.strip():
                    continue
                self._pending = lines[i + 1 :]
                error = exc if isinstance(exc, WireError) else self._error(offset, exc)
                return yield_then_raise(values, error)
        return iter(values)

    def _error(self, offset: int, exc: Exception) -> WireError:
        if offset == self._tail:
            what = "truncated JSON line at end of input"
        elif isinstance(exc, msgspec.ValidationError):
            what = "unexpected JSON value"
        else:
            what = "malformed JSON line"
        return WireError(f"{what}: {exc}", offset=offset)
