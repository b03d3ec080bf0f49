"""A bus in a background thread, for synchronous front ends (Streamlit, Gradio).

Streamlit re-runs a plain script per interaction and Gradio calls plain
functions; both want a synchronous generator. :class:`BackgroundBus` runs a
:class:`~streambus.Bus` (with a :class:`~streambus_http.StreamHub`) in an anyio
blocking portal thread, and hands out generators over its streams::

    bg = BackgroundBus.start()
    stream_id = bg.start_stream(produce, prompt)     # async def produce(writer, prompt)
    st.write_stream(bg.text(stream_id))              # Streamlit: the chunks
    yield from bg.accumulated(stream_id)             # Gradio: the text so far

Because the hub keeps every stream's history, a generator created after its
stream started still reads it from the beginning.
"""

from __future__ import annotations

import atexit
import functools
import threading
from collections.abc import Awaitable, Callable, Iterator, Mapping
from contextlib import AbstractContextManager
from typing import Any, ClassVar, Literal

import anyio
import anyio.from_thread

from streambus import Bus, Producer, StreamWriter, new_stream_id
from streambus.events import AbortEvent, DeltaEvent, ErrorEvent
from streambus.subscription import StreamFailed

from ._formats import failure_note
from ._hub import StreamHub

__all__ = ["BackgroundBus"]

Produce = Callable[..., Awaitable[None]]


class BackgroundBus:
    """A running :class:`~streambus.Bus` in a background thread, driven from synchronous code.

    Create it with :meth:`start` (in Streamlit, cache it with
    ``st.cache_resource``); stop it with :meth:`close` (also done at
    interpreter exit). Every method is safe to call from any thread except
    the bus's own.
    """

    _instances: ClassVar[list[BackgroundBus]] = []
    _lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(
        self,
        *,
        backend: Literal["asyncio", "trio"] = "asyncio",
        bus: Bus | None = None,
        hub: StreamHub | None = None,
        start_timeout: float = 30.0,
    ) -> None:
        self.backend = backend
        self.bus = bus or Bus()
        self.hub = hub or StreamHub()
        self.start_timeout = start_timeout
        self._portal_cm: AbstractContextManager[anyio.from_thread.BlockingPortal] | None = None
        self._portal: anyio.from_thread.BlockingPortal | None = None
        self._bus_cm: AbstractContextManager[Bus] | None = None

    @classmethod
    def start(cls, *, producers: list[Producer] | None = None, **options: Any) -> BackgroundBus:
        """Start a bus thread (with *producers* running on it) and return it."""
        bg = cls(**options)
        bg.open()
        for producer in producers or []:
            bg.start_producer(producer)
        return bg

    def open(self) -> None:
        """Start the thread, enter the bus and attach the hub."""
        if self._portal is not None:
            raise RuntimeError("this BackgroundBus is already running")
        self._portal_cm = anyio.from_thread.start_blocking_portal(self.backend)
        self._portal = self._portal_cm.__enter__()
        try:
            self._bus_cm = self._portal.wrap_async_context_manager(self.bus)
            self._bus_cm.__enter__()
            self._portal.call(functools.partial(self.bus.add_sink, self.hub, name="http-hub"))
        except BaseException:
            self._portal_cm.__exit__(None, None, None)
            self._portal = None
            raise
        with self._lock:
            if not self._instances:
                atexit.register(BackgroundBus.close_all)
            self._instances.append(self)

    @property
    def portal(self) -> anyio.from_thread.BlockingPortal:
        """The blocking portal into the bus's thread (call async functions with ``portal.call``)."""
        if self._portal is None:
            raise RuntimeError("this BackgroundBus is not running; call open() or use BackgroundBus.start()")
        return self._portal

    @property
    def running(self) -> bool:
        """Whether the bus thread is running."""
        return self._portal is not None

    def close(self) -> None:
        """Abort live streams, let sinks drain, and stop the thread. Safe to call twice."""
        portal = self._portal
        if portal is None:
            return
        self._portal = None
        try:
            portal.call(self.bus.shutdown)
            assert self._bus_cm is not None
            self._bus_cm.__exit__(None, None, None)
        finally:
            assert self._portal_cm is not None
            self._portal_cm.__exit__(None, None, None)
            with self._lock:
                if self in self._instances:
                    self._instances.remove(self)

    @classmethod
    def close_all(cls) -> None:
        """Close every running BackgroundBus (registered with ``atexit``)."""
        with cls._lock:
            running = list(cls._instances)
        for bg in running:
            bg.close()

    def __enter__(self) -> BackgroundBus:
        if self._portal is None:
            self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- producing ---------------------------------------------------------
    def start_producer(self, producer: Producer) -> None:
        """Run *producer* on the bus (``bus.start_producer``)."""
        self.portal.call(self.bus.start_producer, producer)

    def start_stream(
        self,
        produce: Produce,
        *args: Any,
        model: str = "",
        provider: str = "",
        meta: Mapping[str, Any] | None = None,
    ) -> str:
        """Run ``await produce(writer, *args)`` in a new stream on the bus; return the stream id.

        The writer is a :class:`~streambus.StreamWriter`: call ``await
        writer.delta(text)``; leaving ``produce`` ends the stream (an exception
        ends it with ``error``).
        """
        stream_id = new_stream_id()
        bus = self.bus

        async def run() -> None:
            writer: StreamWriter
            async with bus.stream(model=model, provider=provider, meta=meta, stream=stream_id) as writer:
                await produce(writer, *args)

        self.portal.call(functools.partial(bus.start_soon, run, name=f"stream:{stream_id}"))
        return stream_id

    def abort(self, stream: str, reason: str = "", by: str = "client") -> bool:
        """Abort a live stream (``bus.abort``); False if it is not live."""
        return self.portal.call(functools.partial(self.bus.abort, stream, reason, by))

    # -- reading -----------------------------------------------------------
    def text(
        self, stream: str, *, channel: str = "content", failure: Literal["note", "raise"] = "note"
    ) -> Iterator[str]:
        """Yield the text chunks of *stream* as they arrive (give it to ``st.write_stream``).

        A stream ending in ``abort`` or ``error`` yields a note (``[aborted by
        X: reason]``) with *failure* ``"note"``, or raises
        :class:`~streambus.StreamFailed` with ``"raise"``. Raises
        :class:`~streambus_http.HttpStreamError` if the stream does not start
        within ``start_timeout`` seconds.
        """
        portal = self.portal
        hub = self.hub
        portal.call(functools.partial(hub.wait_stream, stream, max_wait=self.start_timeout))
        cursor = portal.call(hub.stream_cursor, stream)
        while True:
            batch = portal.call(cursor.next_batch)
            if not batch:
                if cursor.done:
                    return
                continue
            for event in batch:
                if type(event) is DeltaEvent:
                    if event.channel == channel and event.text:
                        yield event.text
                elif isinstance(event, ErrorEvent | AbortEvent):
                    if failure == "raise":
                        raise StreamFailed(event)
                    yield "\n\n" + failure_note(event)

    def accumulated(self, stream: str, **options: Any) -> Iterator[str]:
        """Yield the text of *stream* so far, growing with each chunk (what ``gr.ChatInterface`` shows)."""
        parts: list[str] = []
        for chunk in self.text(stream, **options):
            parts.append(chunk)
            yield "".join(parts)

    def chat_fn(
        self,
        produce: Produce,
        *,
        model: str = "",
        provider: str = "",
        meta: Mapping[str, Any] | None = None,
    ) -> Callable[[str, list[Any]], Iterator[str]]:
        """A ``gr.ChatInterface`` function: each message starts ``produce(writer, message, history)``.

        ``gr.ChatInterface(bg.chat_fn(produce))`` is the whole Gradio wiring.
        """

        def respond(message: str, history: list[Any]) -> Iterator[str]:
            stream = self.start_stream(produce, message, history, model=model, provider=provider, meta=meta)
            yield from self.accumulated(stream)

        return respond
