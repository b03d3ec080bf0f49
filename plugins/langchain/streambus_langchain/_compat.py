"""Checks shared by the LangChain pieces."""

from __future__ import annotations

from ._errors import WrongEventLoop

__all__ = ["require_asyncio"]


def require_asyncio(what: str) -> None:
    """Raise :class:`WrongEventLoop` unless running under asyncio (LangChain's async API needs it)."""
    WrongEventLoop.check(what, needs="LangChain's async API (astream, async callbacks)")
