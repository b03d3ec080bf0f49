"""Keep secrets out of recordings: scrub what a request carried, then look for anything key-like left.

::

    scrubber = Scrubber(body_fields=["api_key", "password"])
    headers = scrubber.headers(request.headers)   # Authorization, api-key, x-api-key... -> "[scrubbed]"
    body = scrubber.body(request_body)            # those fields, at any depth -> "[scrubbed]"
    for hit in find_secrets(recording_text, known=scrubber.seen):
        print(hit.line, hit.kind, hit.masked)      # never the secret itself

:class:`Scrubber` replaces the values of credential headers and of the
configured body fields with :data:`SCRUBBED` and remembers the values it
replaced (:attr:`Scrubber.seen`), so :func:`find_secrets` can also find them
wherever else they turned up (an answer that echoed the key). Headers that
only describe the client (``user-agent``, ``x-stainless-*``...) or the
connection are dropped, since they change from one machine to the next and
never change the answer.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Mapping
from typing import Any

__all__ = ["SCRUBBED", "SECRET_HEADERS", "Scrubber", "SecretHit", "find_secrets", "mask", "mask_secrets"]

SCRUBBED = "[scrubbed]"
"""What a scrubbed header or body value is replaced with."""

SECRET_HEADERS: tuple[str, ...] = (
    "authorization",
    "proxy-authorization",
    "api-key",
    "x-api-key",
    "x-goog-api-key",
    "cookie",
    "x-streambus-token",
)
"""Request headers whose values never reach a recording (compared without case)."""

_DROPPED_HEADERS = frozenset(
    {
        "host",
        "content-length",
        "connection",
        "keep-alive",
        "accept-encoding",
        "transfer-encoding",
        "user-agent",
        "traceparent",
        "tracestate",
        "x-request-id",
    }
)
_DROPPED_PREFIXES = ("x-stainless-",)

# Shapes of the keys of the common providers and token formats; a hit is reported masked.
_PATTERNS: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("anthropic key", re.compile(r"sk-ant-[A-Za-z0-9_\-]{20,}")),
    ("openai-style key", re.compile(r"sk-(?!ant-)[A-Za-z0-9_\-]{20,}")),
    ("google api key", re.compile(r"AIza[0-9A-Za-z_\-]{35}")),
    ("hugging face token", re.compile(r"hf_[A-Za-z0-9]{30,}")),
    ("github token", re.compile(r"gh[pousr]_[A-Za-z0-9]{36,}")),
    ("aws access key id", re.compile(r"(?:AKIA|ASIA)[0-9A-Z]{16}")),
    ("groq key", re.compile(r"gsk_[A-Za-z0-9]{40,}")),
    ("xai key", re.compile(r"xai-[A-Za-z0-9]{40,}")),
    ("bearer token", re.compile(r"Bearer\s+[A-Za-z0-9._~+/=\-]{16,}")),
    ("json web token", re.compile(r"eyJ[A-Za-z0-9_\-]{8,}\.[A-Za-z0-9_\-]{8,}\.[A-Za-z0-9_\-]{8,}")),
)


def mask(secret: str) -> str:
    """*secret* shortened so that it can be shown: its first 4 characters and its length."""
    return f"{secret[:4]}...({len(secret)} characters)"


@dataclasses.dataclass(frozen=True)
class SecretHit:
    """Something key-like found in a text: the 1-based ``line``, what it looks like, and the value ``masked``."""

    line: int
    kind: str
    masked: str


def find_secrets(text: str, *, known: Iterable[str] = ()) -> list[SecretHit]:
    """Every key-like string in *text* (and every occurrence of a *known* secret), line by line.

    The hits carry the value masked (:func:`mask`), never whole, so that a
    failure message or a log line can show them.
    """
    secrets = sorted({s for s in known if len(s) >= 8}, key=len, reverse=True)
    hits: list[SecretHit] = []
    for number, line in enumerate(text.splitlines(), start=1):
        for secret in secrets:
            if secret in line:
                hits.append(SecretHit(number, "a credential sent with a request", mask(secret)))
        for kind, pattern in _PATTERNS:
            for found in pattern.finditer(line):
                hits.append(SecretHit(number, kind, mask(found.group(0))))
    return hits


def mask_secrets(text: str, *, known: Iterable[str] = ()) -> str:
    """*text* with every key-like string (and every *known* secret) replaced by its :func:`mask`.

    For messages and log lines that quote a request: they show where a key
    was, never the key.
    """
    for secret in sorted({s for s in known if len(s) >= 8}, key=len, reverse=True):
        text = text.replace(secret, mask(secret))
    for _, pattern in _PATTERNS:
        text = pattern.sub(lambda found: mask(found.group(0)), text)
    return text


class Scrubber:
    """Replace credentials in request headers and bodies with :data:`SCRUBBED`.

    :param body_fields: JSON object keys (any depth, compared without case)
        whose values are scrubbed from request bodies, e.g. ``["api_key"]``.
    :param headers: the credential headers; the default is :data:`SECRET_HEADERS`.
    """

    def __init__(self, body_fields: Iterable[str] = (), *, headers: Iterable[str] = SECRET_HEADERS) -> None:
        self.body_fields = frozenset(f.lower() for f in body_fields)
        self.secret_headers = frozenset(h.lower() for h in headers)
        for name in (*self.body_fields, *self.secret_headers):
            if not name.strip():
                raise ValueError("scrub fields and headers must be non-empty names")
        self.seen: set[str] = set()
        """Every value scrubbed so far (for :func:`find_secrets`'s ``known``)."""

    def _remember(self, value: str) -> None:
        self.seen.add(value)
        # "Bearer sk-..." is also searched for as the bare key.
        scheme, _, credential = value.partition(" ")
        if credential and scheme.lower() in ("bearer", "basic", "token"):
            self.seen.add(credential.strip())

    def headers(self, headers: Mapping[str, str]) -> dict[str, str]:
        """The headers worth recording, names lower-cased, credentials scrubbed, sorted by name."""
        out: dict[str, str] = {}
        for key, value in headers.items():
            name = key.lower()
            if name in _DROPPED_HEADERS or name.startswith(_DROPPED_PREFIXES):
                continue
            if name in self.secret_headers:
                self._remember(value)
                out[name] = SCRUBBED
            else:
                out[name] = value
        return dict(sorted(out.items()))

    def body(self, body: Any) -> Any:
        """A copy of the JSON *body* with the configured fields' values scrubbed."""
        if isinstance(body, dict):
            out: dict[str, Any] = {}
            for key, value in body.items():
                if isinstance(key, str) and key.lower() in self.body_fields:
                    if isinstance(value, str):
                        self._remember(value)
                    out[key] = SCRUBBED
                else:
                    out[key] = self.body(value)
            return out
        if isinstance(body, list):
            return [self.body(item) for item in body]
        return body
