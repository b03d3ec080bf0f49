"""Template plugin: the ``textfiles`` sink writes each finished stream's text to a file.

Copy ``plugins/template`` to start a plugin of your own (docs/writing-plugins.md).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
import msgspec
import structlog

from streambus import PluginBase, Subscription
from streambus.events import AbortEvent, DeltaEvent, EndEvent, ErrorEvent

__all__ = ["TextFilesSink"]

log = structlog.get_logger("streambus.textfiles")


class TextFilesSink(PluginBase):
    """Write each stream's content text to ``<directory>/<stream>.txt`` when it ends."""

    class Options(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
        """Config keys of the ``textfiles`` sink."""

        directory: str
        channel: str = "content"

        def __post_init__(self) -> None:
            if not self.directory:
                raise ValueError("directory: must not be empty")
            if self.channel not in ("content", "reasoning", "tool"):
                raise ValueError(f"channel: expected content, reasoning or tool, got {self.channel!r}")

    overflow = "block"  # a file must have every character

    def __init__(self, options: Options | None = None, /, **keys: Any) -> None:
        # The one rule: an Options, or keyword options (TextFilesSink(directory="out")), never both.
        self.options: TextFilesSink.Options = self.resolve_options(options, keys)
        self.directory = Path(self.options.directory)
        self._texts: dict[str, list[str]] = {}

    async def setup(self, bus: object) -> None:
        """Create the directory (a permission error fails the sink clearly)."""
        await anyio.Path(self.directory).mkdir(parents=True, exist_ok=True)

    async def run(self, events: Subscription) -> None:
        """Collect text per stream; write the file at the stream's terminal event."""
        while batch := await events.receive_batch():
            for event in batch:
                if isinstance(event, DeltaEvent):
                    if event.channel == self.options.channel:
                        self._texts.setdefault(event.stream, []).append(event.text)
                elif isinstance(event, EndEvent | ErrorEvent | AbortEvent):
                    await self._write(event.stream)

    async def _write(self, stream: str) -> None:
        text = "".join(self._texts.pop(stream, []))
        path = anyio.Path(self.directory / f"{stream}.txt")
        await path.write_text(text, encoding="utf-8")
        log.debug("textfiles.written", stream=stream, chars=len(text))
