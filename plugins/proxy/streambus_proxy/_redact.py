"""Keeping the credentials the proxy forwarded out of what it publishes, records and logs.

An upstream may echo a key back (``Incorrect API key provided: Bearer sk-...``)
in an error body, an in-band error or even the generated text. The proxy
knows the exact values it forwarded, so it searches for exactly those
(:func:`secrets_of`) and replaces them with :data:`REDACTED`. Text that
arrives in pieces goes through a :class:`StreamRedactor`, which holds back a
piece's tail while it could be the start of a secret, so a key split across
two deltas is still caught.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Iterable, Mapping
from typing import Any, AnyStr, Generic

__all__ = [
    "CREDENTIAL_HEADERS",
    "HOLD_FROM",
    "MIN_SECRET",
    "REDACTED",
    "Redactor",
    "StreamRedactor",
    "secrets_of",
]

REDACTED = "[redacted]"
"""What a secret is replaced with."""

MIN_SECRET = 8
"""Shorter values are not searched for on their own: they would mangle ordinary text (a Basic
password ``pw`` would strike every ``pw``), and no issued API key is that short. The whole
header value that carried them (``Basic Ym9iOnB3``) is still redacted."""

CREDENTIAL_HEADERS = ("authorization", "api-key", "x-api-key")
"""Request headers whose values the proxy treats as secrets (case-insensitive), whatever the
format; a format adds its own (:class:`streambus.formats.Credentials`: Gemini's ``x-goog-api-key``
and ``?key=``)."""


def secrets_of(values: Iterable[str]) -> list[str]:
    """The strings to redact for credential header *values*: each value, and its parts an upstream may echo.

    ``Bearer sk-x`` gives ``Bearer sk-x`` and ``sk-x``; ``Basic <b64>`` gives the
    base64 text, the decoded ``user:password`` and the password.
    """
    found: set[str] = set()
    for value in values:
        value = value.strip()
        found.add(value)
        scheme, _, credential = value.partition(" ")
        credential = credential.strip()
        if not credential:
            continue
        found.add(credential)
        if scheme.lower() == "basic":
            try:
                decoded = base64.b64decode(credential, validate=True).decode()
            except (binascii.Error, UnicodeDecodeError):
                continue
            found.add(decoded)
            found.add(decoded.partition(":")[2])
    return sorted((s for s in found if len(s) >= MIN_SECRET), key=len, reverse=True)


class Redactor:
    """Replaces every occurrence of *secrets* (exact strings) with :data:`REDACTED`.

    A redactor without secrets returns its input unchanged at no cost, so one
    can be used for every request whether or not it carried credentials.
    """

    __slots__ = ("pattern", "secrets")

    def __init__(self, secrets: Iterable[str]) -> None:
        # Longest first, so a header value wins over the key inside it.
        self.secrets: tuple[str, ...] = tuple(sorted({s for s in secrets if s}, key=len, reverse=True))
        self.pattern = re.compile("|".join(map(re.escape, self.secrets))) if self.secrets else None

    def __bool__(self) -> bool:
        return self.pattern is not None

    def text(self, value: str) -> str:
        """*value* with every secret replaced."""
        if self.pattern is None:
            return value
        return self.pattern.sub(REDACTED, value)

    def value(self, obj: Any) -> Any:
        """A JSON-like *obj* (dicts, lists, strings) with every string redacted, keys included."""
        if self.pattern is None:
            return obj
        if isinstance(obj, str):
            return self.text(obj)
        if isinstance(obj, Mapping):
            return {self.value(k): self.value(v) for k, v in obj.items()}
        if isinstance(obj, list | tuple):
            return [self.value(v) for v in obj]
        return obj

    def body(self, data: bytes) -> bytes:
        """A whole UTF-8 body with every secret replaced."""
        if self.pattern is None:
            return data
        stream = self.byte_stream()
        return stream.feed(data) + stream.flush()

    def stream(self) -> StreamRedactor[str]:
        """A :class:`StreamRedactor` over text pieces."""
        return StreamRedactor(self.secrets, REDACTED)

    def byte_stream(self) -> StreamRedactor[bytes]:
        """A :class:`StreamRedactor` over UTF-8 byte chunks."""
        return StreamRedactor(tuple(s.encode() for s in self.secrets), REDACTED.encode())


HOLD_FROM = 4
"""A piece's tail is held back once it matches this many characters of a secret's start. A shorter
match passes (at most ``HOLD_FROM - 1`` characters: ``sk-``, ``Bea``); if the next pieces complete the
secret, the rest of it is redacted. Holding every one-character match instead would hold back the last
``s`` of one word in four of English text whenever a key starts with ``sk-``."""


class StreamRedactor(Generic[AnyStr]):
    """Redacts a text (or byte) stream that arrives in pieces of any size.

    :meth:`feed` returns what is safe to pass on now: every secret replaced,
    also one split across pieces. A tail that matches the first
    :data:`HOLD_FROM` characters of a secret or more is held back until the
    next piece shows whether it is one. Call :meth:`flush` at the end of the
    stream for what is still held.
    """

    __slots__ = ("heads", "held", "keep", "marker", "pattern", "secrets", "tail")

    def __init__(self, secrets: tuple[AnyStr, ...], marker: AnyStr) -> None:
        self.secrets: tuple[AnyStr, ...] = secrets
        self.marker: AnyStr = marker
        self.held: AnyStr = marker[:0]
        self.tail: AnyStr = marker[:0]
        """The end of what was passed on, where a secret completed by the next piece may have begun
        (a longer start would have been held back, so ``HOLD_FROM - 1`` characters suffice)."""
        self.keep = HOLD_FROM - 1
        self.pattern: re.Pattern[AnyStr] | None = _alternation(secrets) if secrets else None
        # Every secret, and every tail worth holding, starts with one of these: one search rules both out.
        self.heads: tuple[AnyStr, ...] = tuple({s[:HOLD_FROM] for s in secrets})

    def feed(self, piece: AnyStr) -> AnyStr:
        """Take the next *piece*; return the part of the stream that is safe to pass on now."""
        if self.pattern is None:
            return piece
        passed = len(self.tail)
        joined = self.tail + self.held + piece
        if not any(head in joined for head in self.heads):
            # The usual case: no secret and nothing to hold.
            self.held = joined[:0]
            self.tail = joined[-self.keep :] if self.keep else self.tail
            return joined[passed:]
        if self.pattern.search(joined) is None:
            text = joined[passed:]
        else:
            parts: list[AnyStr] = []
            pos = passed
            for match in self.pattern.finditer(joined):
                if match.end() > passed:  # (one wholly in the tail was redacted when it passed)
                    # A secret whose start was already passed on loses the rest.
                    start = max(match.start(), passed)
                    parts += (joined[pos:start], self.marker)
                    pos = match.end()
            parts.append(joined[pos:])
            text = self.marker[:0].join(parts)
        cut = max(_partial_start(self.tail + text, self.secrets) - passed, 0)
        out, self.held = text[:cut], text[cut:]
        if self.keep:
            self.tail = (self.tail + out)[-self.keep :]
        return out

    def flush(self) -> AnyStr:
        """The held-back tail (no secret: the stream ended before one completed)."""
        held, self.held = self.held, self.held[:0]
        return held


def _alternation(secrets: tuple[AnyStr, ...]) -> re.Pattern[AnyStr]:
    first = secrets[0]
    bar = "|" if isinstance(first, str) else b"|"
    return re.compile(bar.join(re.escape(s) for s in secrets))


def _partial_start(text: AnyStr, secrets: tuple[AnyStr, ...]) -> int:
    """Where the longest tail of *text* that is a proper prefix of a secret, :data:`HOLD_FROM` long or more, begins.

    ``len(text)`` when there is none.
    """
    cut = len(text)
    for secret in secrets:
        if len(secret) <= HOLD_FROM:
            continue  # its proper prefixes are all too short to hold
        head = secret[:HOLD_FROM]  # a tail to hold starts with these: searched in C, rarely found
        i = text.find(head, max(0, len(text) - len(secret) + 1))
        while i != -1 and i < cut:
            if secret.startswith(text[i:]):
                cut = i
                break
            i = text.find(head, i + 1)
    return cut
