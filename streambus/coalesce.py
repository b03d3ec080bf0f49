"""Coalescing: an ordered queue in which a reader that fell behind gets bigger deltas, never fewer characters.

::

    queue: Coalescer[bytes] = Coalescer()
    queue.append(encode(start), start.stream)          # never merges; a barrier for its stream
    queue.add_delta(delta, encode(delta), merge=False) # queued as given
    queue.add_delta(delta2, encode(delta2), merge=True)  # starts a merge point for its stream
    queue.add_delta(delta3, encode(delta3), merge=True)  # merged into delta2 (same stream and channel)
    item = queue.popleft()   # a payload, or a MergedDelta: item.payload, or encode(item.event())

A delta merges only into the newest queued item of its own stream, and only
when that item is a delta of the same channel, so no stream is ever
reordered: text is concatenated, ``n`` summed, ``first_seq`` kept, ``seq``
and ``ts`` are the last merged delta's. Merging costs O(1) however far the
reader lags (pieces are joined once, when the merged delta is read).

The caller decides *when* to merge (``merge=True``), usually once its queue
holds more than some number of bytes: below that, events go out as they came.
Used by the websocket sink's per-client queues and the core history's snapshots.
"""

from __future__ import annotations

import operator
from collections import deque
from typing import Generic, TypeVar

from .events import DeltaEvent

__all__ = ["Coalescer", "MergedDelta"]

T = TypeVar("T")

_text_of = operator.attrgetter("text")
_n_of = operator.attrgetter("n")


class MergedDelta(Generic[T]):
    """A delta that later deltas of its stream and channel merge into.

    Read :attr:`payload` while :attr:`merged` is 0 (the first delta's
    payload, e.g. bytes encoded once for every reader); otherwise build the
    merged delta with :meth:`event`.
    """

    __slots__ = ("channel", "first_seq", "merged", "n", "payload", "pieces", "seq", "size", "stream", "ts")

    def __init__(self, first: DeltaEvent, payload: T | None = None, size: int | None = None) -> None:
        self.stream = first.stream
        self.channel = first.channel
        self.first_seq = first.seq if first.first_seq is None else first.first_seq
        self.seq = first.seq
        self.ts = first.ts
        self.n = first.n
        self.pieces = [first.text]
        self.payload: T | None = payload
        """The first delta's payload; ``None`` once another delta merged in."""
        self.merged = 0
        """How many deltas merged into the first one."""
        self.size = len(first.text) if size is None else size
        """The caller's measure of this item (*size*, default the text's length), plus each merged text's length."""

    def add(self, delta: DeltaEvent) -> None:
        """Merge *delta* (the next delta of this stream and channel) into this one."""
        self.pieces.append(delta.text)
        self.seq = delta.seq
        self.ts = delta.ts
        self.n += delta.n
        self.size += len(delta.text)
        self.merged += 1
        self.payload = None

    def add_many(self, deltas: list[DeltaEvent]) -> None:
        """Merge *deltas* (the next deltas of this stream and channel, in order) as :meth:`add` does, in one call."""
        if not deltas:
            return
        texts = list(map(_text_of, deltas))
        self.pieces.extend(texts)
        last = deltas[-1]
        self.seq = last.seq
        self.ts = last.ts
        self.n += sum(map(_n_of, deltas))
        self.size += sum(map(len, texts))
        self.merged += len(deltas)
        self.payload = None

    def event(self) -> DeltaEvent:
        """The merged delta: ``first_seq`` set when more than one source seq is covered."""
        return DeltaEvent(
            stream=self.stream,
            seq=self.seq,
            ts=self.ts,
            text="".join(self.pieces),
            channel=self.channel,
            n=self.n,
            first_seq=self.first_seq if self.first_seq != self.seq else None,
        )


class Coalescer(Generic[T]):
    """A FIFO of payloads (*T*) and :class:`MergedDelta` items, with O(1) merging per stream.

    Append with :meth:`append` (never merges) or :meth:`add_delta`; read with
    :meth:`popleft`. ``len()`` counts queued items, not merged deltas.
    """

    __slots__ = ("_items", "_tails")

    def __init__(self) -> None:
        self._items: deque[T | MergedDelta[T]] = deque()
        # Per stream, its newest queued item when that item is a merge point.
        self._tails: dict[str, MergedDelta[T]] = {}

    def __len__(self) -> int:
        return len(self._items)

    def __bool__(self) -> bool:
        return bool(self._items)

    def append(self, payload: T, stream: str | None = None) -> None:
        """Queue *payload* as it is; nothing merges into it, nor past it into its *stream*'s earlier deltas."""
        if stream is not None and self._tails:
            self._tails.pop(stream, None)
        self._items.append(payload)

    def extend(self, payloads: list[T]) -> None:
        """Queue *payloads* as they are (a replay); every stream's merge point is reset."""
        self._tails.clear()
        self._items.extend(payloads)

    def add_delta(
        self, delta: DeltaEvent, payload: T, *, merge: bool, size: int | None = None
    ) -> MergedDelta[T] | None:
        """Queue *delta* (encoded as *payload*); with *merge*, merge it into its stream's newest queued delta.

        Returns the :class:`MergedDelta` it merged into, or ``None`` when it was
        queued (as a new merge point of that *size* when *merge*, else as *payload*).
        """
        if merge:
            tail = self._tails.get(delta.stream)
            if tail is not None and tail.channel == delta.channel:
                tail.add(delta)
                return tail
            tail = self._tails[delta.stream] = MergedDelta(delta, payload, size)
            self._items.append(tail)
            return None
        self.append(payload, delta.stream)
        return None

    def popleft(self) -> T | MergedDelta[T]:
        """Take the oldest item; raises ``IndexError`` when empty."""
        item = self._items.popleft()
        if type(item) is MergedDelta and self._tails.get(item.stream) is item:
            del self._tails[item.stream]
        return item

    def clear(self) -> None:
        """Drop everything queued."""
        self._items.clear()
        self._tails.clear()
