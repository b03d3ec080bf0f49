"""Errors of the HTTP outputs, all under :class:`streambus.StreamBusError`::

StreamBusError
└── HttpStreamError     a request cannot be served (carries the HTTP status)
    └── ResumeError     Last-Event-ID is malformed (400) or no longer in the history (409)
"""

from __future__ import annotations

from streambus import StreamBusError

__all__ = ["HttpStreamError", "ResumeError"]


class HttpStreamError(StreamBusError):
    """A request for a stream cannot be served; ``status`` is the HTTP status to answer with."""

    def __init__(self, message: str, *, status: int) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class ResumeError(HttpStreamError):
    """The resume position (``Last-Event-ID``) is malformed or was evicted from the history.

    A client that gets 409 should reload the stream from the start, or from now.
    """
