"""Counting what a provider parser skipped: new event types must not break a stream."""

from __future__ import annotations

import threading

import structlog

__all__ = ["SkippedTypes"]

log = structlog.get_logger("streambus.wire")

# (provider, type) pairs already logged; bounded so a flood of made-up types cannot grow it forever.
_logged: set[tuple[str, str]] = set()
_LOGGED_MAX = 1024
_lock = threading.Lock()


class SkippedTypes(dict[str, int]):
    """Per-type counts of the input a parser skipped because it does not know the type.

    Providers add event types now and then; a parser that meets one skips it
    and calls :meth:`note`, so the stream goes on and the count shows what
    was left out. The first skip of each type logs one warning
    (``wire.unknown_type``) per process, not one per stream.
    """

    __slots__ = ("provider",)

    def __init__(self, provider: str) -> None:
        super().__init__()
        self.provider = provider

    def note(self, kind: str) -> None:
        """Count one skipped item of type *kind*."""
        self[kind] = self.get(kind, 0) + 1
        key = (self.provider, kind)
        if key in _logged:
            return
        with _lock:
            if key in _logged or len(_logged) >= _LOGGED_MAX:
                return
            _logged.add(key)
        log.warning(
            "wire.unknown_type",
            provider=self.provider,
            type=kind,
            hint="skipped: this streambus version does not know it (counted in the parser's `skipped`)",
        )
