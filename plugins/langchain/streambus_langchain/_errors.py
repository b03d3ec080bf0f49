"""Errors of the LangChain plugin (all derive from :class:`streambus.StreamBusError`).

::

    StreamBusError
    ├── AsyncioRequired      (streambus.errors) an asyncio-only part ran under trio
    │   └── WrongEventLoop   LangChain's async API was used under trio
    ├── StreamAborted        the bus aborted the stream of a LangChain run (stops the run)
    └── RecordedStreamError  a recorded stream ended with an ``error`` event
"""

from __future__ import annotations

from streambus import StreamBusError
from streambus.errors import AsyncioRequired

__all__ = ["RecordedStreamError", "StreamAborted", "WrongEventLoop"]


class WrongEventLoop(AsyncioRequired):
    """LangChain's async API was used outside asyncio; run the bus under asyncio."""


class StreamAborted(StreamBusError):
    """The stream of this LangChain run was aborted on the bus; the run is stopped.

    ``stream`` is the stream id (the run id), ``reason`` and ``by`` come from
    the ``abort`` event.
    """

    def __init__(self, stream: str, reason: str = "", by: str = "") -> None:
        super().__init__(f"stream {stream} was aborted by {by or 'the bus'}" + (f": {reason}" if reason else ""))
        self.stream = stream
        self.reason = reason
        self.by = by


class RecordedStreamError(StreamBusError):
    """A recorded stream ended with an ``error`` event; ``kind`` and ``retryable`` are the event's."""

    def __init__(self, kind: str, message: str, *, retryable: bool = False) -> None:
        super().__init__(f"{kind}: {message}" if message else kind)
        self.kind = kind
        self.retryable = retryable
