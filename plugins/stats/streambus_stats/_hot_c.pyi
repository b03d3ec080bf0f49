"""Types of the compiled hot path (``_hot_c.pyx``): the same interface as ``_hot``."""

from collections.abc import Callable, Sequence

from streambus.events import Event

from ._hot import Live as Live

COMPILED: bool

def feed(live: dict[str, Live], events: Sequence[Event], other: Callable[[Event], None]) -> int: ...
