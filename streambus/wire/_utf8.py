"""Incremental UTF-8 decoding that never splits a character across reads."""

from __future__ import annotations

import codecs
from typing import Literal

from ..errors import WireError

__all__ = ["Utf8Decoder"]


class Utf8Decoder:
    """Decode UTF-8 arriving in arbitrary pieces (TCP reads) into text.

    ::

        decoder = Utf8Decoder()
        text = "".join(decoder.feed(chunk) for chunk in chunks) + decoder.close()

    A multi-byte character split across reads is held back until its last
    byte arrives, so :meth:`feed` never returns half a character.

    With ``errors="strict"`` (the default) invalid bytes raise
    :class:`~streambus.errors.WireError` whose ``offset`` is the position of
    the first bad byte in everything fed so far and whose ``partial`` is the
    valid text decoded by the same call before it, so nothing already
    accepted is lost. The decoder then skips the bad bytes and stays usable:
    call :meth:`feed` (``b""`` is fine) or :meth:`close` again to get what
    followed them. With ``errors="replace"`` bad bytes become U+FFFD, as
    browsers do, and nothing is raised.
    """

    __slots__ = ("_backlog", "_decoder", "_fed")

    def __init__(self, errors: Literal["strict", "replace"] = "strict") -> None:
        if errors not in ("strict", "replace"):
            raise ValueError(f"errors: expected 'strict' or 'replace', got {errors!r}")
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors)
        self._fed = 0
        self._backlog = b""

    @property
    def offset(self) -> int:
        """How many bytes were fed so far."""
        return self._fed

    @property
    def pending(self) -> int:
        """How many bytes are held back (an incomplete character, or bytes after an error)."""
        return len(self._decoder.getstate()[0]) + len(self._backlog)

    def feed(self, data: bytes | bytearray | memoryview) -> str:
        """Decode *data*; return the text of every complete character so far."""
        if not self._backlog:
            base = self._fed - len(self._decoder.getstate()[0])
            self._fed += len(data)
            try:
                return self._decoder.decode(data)
            except UnicodeDecodeError as exc:
                return self._fail(exc, base, final=False)
        return self._decode(bytes(data), final=False)

    def close(self) -> str:
        """Finish: return the last text, or raise :class:`WireError` for an incomplete character."""
        return self._decode(b"", final=True)

    def _decode(self, data: bytes, *, final: bool) -> str:
        held = len(self._decoder.getstate()[0])
        chunk = self._backlog + data
        base = self._fed - held - len(self._backlog)
        self._backlog = b""
        self._fed += len(data)
        try:
            return self._decoder.decode(chunk, final=final)
        except UnicodeDecodeError as exc:
            return self._fail(exc, base, final=final)

    def _fail(self, exc: UnicodeDecodeError, base: int, *, final: bool) -> str:
        # exc.object is the held-back bytes plus the new input; everything
        # before exc.start is valid and is handed to the caller on the error.
        buf = bytes(exc.object)
        partial = buf[: exc.start].decode("utf-8")
        self._backlog = buf[exc.end :]
        self._decoder.reset()
        if final and exc.end == len(buf) and "end of data" in exc.reason:
            message = "truncated UTF-8 sequence at end of input"
        else:
            message = f"invalid UTF-8 byte 0x{buf[exc.start]:02x} ({exc.reason})"
        raise WireError(message, offset=base + exc.start, partial=partial)
