"""Checks shared by the LangChain pieces."""

from __future__ import annotations

import sniffio

from ._errors import WrongEventLoop

__all__ = ["require_asyncio"]


def require_asyncio(what: str) -> None:
    """Raise :class:`WrongEventLoop` unless running under asyncio (LangChain's async API needs it)."""
    try:
        library = sniffio.current_async_library()
    except sniffio.AsyncLibraryNotFoundError:
        library = None
    if library != "asyncio":
        raise WrongEventLoop(
            f"{what} needs asyncio: LangChain's async API (astream, async callbacks) runs on asyncio only, "
            f"but this is {library or 'no event loop'}. Run the bus with anyio.run(..., backend='asyncio')."
        )
