"""The moderator contract: an async function from a text window to a :class:`Verdict`.

A moderator is any object with ``async def check(self, text: str) -> Verdict``.
Optional members the moderation stage honours when present:

``context_chars`` (int)
    How many characters of the previous window must be carried over so a term
    split across two windows is still seen whole (the ``keywords`` moderator
    reports twice its longest term). The stage raises ``overlap_chars`` to it.
``async setup()`` / ``async aclose()``
    Called once when the stage starts and stops (open and close HTTP sessions).

Moderators are found by entry point in the ``streambus.moderators`` group;
:func:`load_moderator` builds one from a config table such as
``{"type": "keywords", "words": {"violence": ["kill"]}}``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable

import msgspec

from streambus.errors import ConfigError
from streambus.plugins import build

__all__ = ["Moderator", "Span", "Verdict", "load_moderator"]


class Span(msgspec.Struct, frozen=True, kw_only=True):
    """Characters ``[start, end)`` of the checked window that caused a verdict."""

    start: int
    end: int
    category: str | None = None
    """The category this span matched, when the moderator knows it."""


class Verdict(msgspec.Struct, frozen=True, kw_only=True):
    """What a moderator says about one window of text.

    ``spans`` are offsets into the window text the moderator was given; a
    flagged verdict with no spans covers the whole window (what classifier
    endpoints such as OpenAI's ``/v1/moderations`` return).
    """

    flagged: bool = False
    categories: list[str] = []
    scores: dict[str, float] = {}
    spans: list[Span] = []


@runtime_checkable
class Moderator(Protocol):
    """Anything that judges text: ``async check(text) -> Verdict``."""

    async def check(self, text: str) -> Verdict:
        """Return the verdict about *text* (one window of a stream's channel)."""


def load_moderator(spec: Mapping[str, Any]) -> Moderator:
    """Build a moderator from a config table whose ``type`` names an entry point.

    Raises ``ValueError("moderator.<key>: problem")`` for a missing or unknown
    type and for invalid options, so a pipeline file's error names the key.
    """
    table = dict(spec)
    kind = table.pop("type", None)
    if not isinstance(kind, str) or not kind:
        raise ValueError('moderator.type: missing; name a moderator such as "keywords", "openai" or "python"')
    try:
        moderator = build("moderators", kind, table, location="moderator")
    except ConfigError as exc:
        raise ValueError(str(exc)) from None
    if not isinstance(moderator, Moderator):
        raise ValueError(f"moderator.type: {kind!r} built {type(moderator).__name__}, which has no async check(text)")
    return moderator
