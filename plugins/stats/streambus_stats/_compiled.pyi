"""Types of the compiled twins (``_compiled.pyx``) of the per-event loop, ``digest`` and the token count."""

from collections.abc import Callable, Sequence
from typing import Any

from ddsketch.mapping import LogarithmicMapping

from streambus.events import DeltaEvent, Event, StartEvent

from ._distribution import Digest

class Live:
    start: StartEvent
    agg: Any
    gaps: list[float]
    texts: list[str]
    moderation: dict[str, int]
    first: float | None
    first_content: float | None
    first_ts: float | None
    last: float | None
    gap_max: float
    empty: int
    extra: int
    first_n: int
    def __init__(self, start: StartEvent, agg: Any) -> None: ...
    @property
    def chunks(self) -> int: ...
    @property
    def ngaps(self) -> int: ...
    @property
    def gap_sum(self) -> float: ...
    def chunk(self, event: DeltaEvent) -> None: ...

def feed(events: Sequence[Event], live: dict[str, Any], other: Callable[[Event], None]) -> int: ...
def digest(
    values: list[float],
    bounds: Sequence[float],
    mapping: LogarithmicMapping,
    buckets: list[int],
    keyed: dict[int, int],
) -> Digest | None: ...
def approximate_tokens(text: str) -> int: ...
