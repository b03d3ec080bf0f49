"""Helpers for writing producers that talk to model servers.

:class:`Failure` is what one request attempt ends with when it fails: a
stable ``kind`` (``connect``, ``http_status``, ``timeout``, ``truncated``...),
a message, and whether retrying may help. A producer retries a retryable
failure only while it has published no text, then turns the last one into
the stream's ``error`` event (``writer.error(f.kind, f.message,
retryable=f.retryable)``). :func:`require_asyncio` gives the clear error a
producer built on an asyncio-only library (aiohttp) owes a trio user.
"""

from __future__ import annotations

import asyncio

import msgspec

__all__ = ["Failure", "require_asyncio"]


class Failure(msgspec.Struct, frozen=True):
    """Why one attempt failed: becomes the stream's ``error`` event unless retried."""

    kind: str
    message: str
    retryable: bool = False


def require_asyncio(plugin: str) -> None:
    """Raise a clear error unless running on asyncio (aiohttp cannot run on trio)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        raise RuntimeError(
            f"the {plugin} producer uses aiohttp, which runs only on asyncio: "
            "run the bus under asyncio (anyio.run(main, backend='asyncio'), or the streambus CLI)"
        ) from None
