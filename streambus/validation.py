"""Reading a msgspec validation error: where it is and what is wrong, without parsing text in three places.

msgspec says where a value failed only inside its message (``"Expected `int`,
got `str` - at `$.seq`"``). :func:`validation_problem` is the one place that
reads it; the event decoder, the config validator and the WebSocket protocol
all use it::

    try:
        msgspec.convert(data, Options)
    except msgspec.ValidationError as exc:
        problem = validation_problem(exc)
        print(problem.path, problem.message)     # "$.port", "Expected `int`, got `str`"
"""

from __future__ import annotations

from typing import NamedTuple

import msgspec

__all__ = ["ValidationProblem", "validation_problem"]

_AT = " - at `"
_MISSING = "Object missing required field `"
_UNKNOWN = "Object contains unknown field `"


class ValidationProblem(NamedTuple):
    """One msgspec validation error, taken apart."""

    path: str | None
    """Where the bad value is (``$.meta.user``, ``$[2]``); ``None`` when it is the whole value."""
    message: str
    """What is wrong, without the location (``Expected `int`, got `str```)."""
    missing: str | None
    """The required field that is absent, when that is the problem."""
    unknown: str | None
    """The field that is not allowed, when that is the problem."""

    @property
    def field(self) -> str | None:
        """The path of the offending field itself: a missing or unknown field's own path, else :attr:`path`."""
        name = self.missing or self.unknown
        if name is None:
            return self.path
        return f"{self.path or '$'}.{name}"

    def describe(self) -> str:
        """For a person: ``message.content: expected `str`, got `int``` (the path without ``$.``, then the problem)."""
        text = self.message[:1].lower() + self.message[1:]
        if self.path and self.path.startswith("$."):
            return f"{self.path[2:]}: {text}"
        return text


def validation_problem(exc: msgspec.DecodeError) -> ValidationProblem:
    """Take *exc* apart into where (:attr:`~ValidationProblem.path`) and what (:attr:`~ValidationProblem.message`).

    *exc* is a :class:`msgspec.ValidationError`, or any msgspec decode error
    (one without a location has no :attr:`~ValidationProblem.path`).
    """
    text = str(exc)
    message, sep, where = text.rpartition(_AT)
    if not sep:
        message, where = text, ""
    path = where.rstrip("`") or None
    missing = message[len(_MISSING) :].split("`", 1)[0] if message.startswith(_MISSING) else None
    unknown = message[len(_UNKNOWN) :].split("`", 1)[0] if message.startswith(_UNKNOWN) else None
    return ValidationProblem(path, message, missing, unknown)
