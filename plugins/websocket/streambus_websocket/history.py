"""The websocket sink's history is the core's :class:`streambus.history.StreamHistory`.

``History`` stays importable under its old name for code written against it.
"""

from __future__ import annotations

from streambus.history import StreamHistory, StreamLog

__all__ = ["History", "StreamLog"]

History = StreamHistory
"""The core's resumable per-stream history (the name this plugin exported first)."""
