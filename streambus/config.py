"""TOML pipelines: a bus, its producers and its sinks, described in one file.

::

    [bus]
    buffer = 1024            # events per subscriber
    overflow = "coalesce"    # block | coalesce | drop_oldest | disconnect

    [log]
    level = "info"           # debug | info | warning | error
    format = "console"       # console | json

    [[producers]]
    type = "synthetic"       # an entry point name in streambus.producers
    count = 3                # ... then that plugin's own options

    [[sinks]]
    type = "stdout"          # an entry point name in streambus.sinks
    overflow = "block"       # keys every sink takes: name, overflow, buffer,
                             # critical, raw, filter = {streams, models, providers, meta}

Every validation error names the file, the table and the key, e.g.
``configs/x.toml: sinks[1].port: expected integer, got "abc"``.
Load with :func:`load_config`, check what the plugins need from the machine
(files to read, directories to write) with :meth:`Pipeline.check`, run with
:meth:`Pipeline.run`.
"""

from __future__ import annotations

import dataclasses
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import anyio
import msgspec
import structlog

from .bus import Bus, Producer, Sink
from .errors import ConfigError, PipelineFailed, StreamBusError, StreamsFailed, SubscriptionClosed
from .events import ErrorEvent
from .plugins import NonNegativeFloat, PositiveInt, build, check_bounds, check_plugin, validate_options
from .subscription import Filter, OverflowPolicy, Subscription

__all__ = ["BusConfig", "LogConfig", "Pipeline", "RunConfig", "SinkEntry", "load_config", "parse_config"]

log = structlog.get_logger("streambus.config")


class BusConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """The ``[bus]`` table (bounds in ``docs/configuration.md``)."""

    buffer: PositiveInt = 1024
    """Events per subscriber: at least 1."""
    overflow: Literal["block", "coalesce", "drop_oldest", "disconnect"] = "coalesce"
    max_bytes: PositiveInt = 8 * 1024 * 1024
    """Byte cap of a ``coalesce`` subscriber's buffer: at least 1."""
    drain_timeout: NonNegativeFloat = 10.0
    """Seconds sinks get to drain at shutdown: finite, at least 0."""

    def __post_init__(self) -> None:
        check_bounds(self)


class LogConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """The ``[log]`` table."""

    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["console", "json"] = "console"


class RunConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """The ``[run]`` table: what makes ``streambus run`` fail."""

    fail_on_stream_error: bool = True
    """Exit 1 when any stream ended with an ``error`` event; ``false`` for long-running pipelines."""


class _FilterConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    streams: list[str] | None = None
    models: list[str] | None = None
    providers: list[str] | None = None
    meta: dict[str, Any] | None = None


class _SinkCommon(msgspec.Struct, kw_only=True):
    name: str | None = None
    overflow: Literal["block", "coalesce", "drop_oldest", "disconnect"] | None = None
    buffer: PositiveInt | None = None
    critical: bool = False
    raw: bool | None = None
    filter: _FilterConfig | None = None


_SINK_KEYS = {f.name for f in msgspec.structs.fields(_SinkCommon)}


@dataclasses.dataclass
class SinkEntry:
    """A configured sink with the subscription settings from its table."""

    sink: Sink
    name: str | None = None
    overflow: str | None = None
    buffer: int | None = None
    critical: bool = False
    raw: bool | None = None
    filter: Filter | None = None


@dataclasses.dataclass
class Pipeline:
    """A validated pipeline, ready to :meth:`run`."""

    path: str
    bus: BusConfig
    log: LogConfig
    producers: list[Producer]
    sinks: list[SinkEntry]
    plugins: list[tuple[str, Any]] = dataclasses.field(default_factory=list)
    """``(location, plugin)`` of every producer and sink in file order, e.g. ``("sinks[1]", recorder)``."""
    run_config: RunConfig = dataclasses.field(default_factory=RunConfig)
    """The ``[run]`` table."""

    def check(self) -> None:
        """Run every plugin's ``preflight()``: files it reads exist, directories it writes to are writable.

        Raises :class:`~streambus.errors.ConfigError` naming the file, table
        and key of the first problem. Nothing is opened or created.
        """
        for location, plugin in self.plugins:
            check_plugin(plugin, path=self.path, location=location)

    def make_bus(self) -> Bus:
        """Return a :class:`Bus` with this pipeline's ``[bus]`` settings."""
        return Bus(
            buffer=self.bus.buffer,
            overflow=OverflowPolicy(self.bus.overflow),
            max_bytes=self.bus.max_bytes,
            drain_timeout=self.bus.drain_timeout,
        )

    def attach(self, bus: Bus) -> None:
        """Add this pipeline's sinks to a running *bus* (before producers start)."""
        for entry in self.sinks:
            self._attach_one(bus, entry, entry.sink)

    async def run(self, *, serve: bool = False) -> None:
        """Check, then run until every producer finished and every sink drained.

        With *serve*, keep running until SIGINT/SIGTERM (or :meth:`Bus.shutdown`);
        on a signal, live streams are aborted with ``by="shutdown"`` and sinks drain.

        Fails fast: :meth:`check` runs first (raising
        :class:`~streambus.errors.ConfigError`); a sink that cannot start (its
        ``setup`` raises, or its first ``run`` raises a
        :class:`~streambus.errors.StreamBusError`, as a port in use does)
        stops the bus at once instead of being restarted, and a producer that
        raises is logged; either way :class:`~streambus.errors.PipelineFailed`
        names the first failing table once everything has drained. Streams
        that ended with an ``error`` event raise
        :class:`~streambus.errors.StreamsFailed` at the end, unless ``[run]
        fail_on_stream_error = false``.
        """
        self.check()
        failures: list[PipelineFailed] = []
        sink_down = anyio.Event()  # set when a sink could not start: producers not yet running stay off
        stream_errors = _StreamErrors()
        async with self.make_bus() as bus:
            if self.run_config.fail_on_stream_error:
                # Lossless but cheap: it only looks at each event's type.
                bus.add_sink(stream_errors, name="stream-errors", overflow="block")
            names = {id(plugin): location for location, plugin in self.plugins}
            for entry in self.sinks:
                where = names.get(id(entry.sink), entry.name or "sink")
                self._attach_one(bus, entry, _FailFastSink(entry.sink, self.path, where, bus, failures, sink_down))
            for producer in self.producers:
                where = names.get(id(producer), type(producer).__name__)
                bus.start_producer(_FailFastProducer(producer, self.path, where, failures, sink_down), name=where)
            if serve:
                await _serve_until_signal(bus)
        if failures:
            raise failures[0]
        if stream_errors.first is not None:
            raise StreamsFailed(self.path, stream_errors.count, stream_errors.first)

    @staticmethod
    def _attach_one(bus: Bus, entry: SinkEntry, sink: Sink) -> None:
        bus.add_sink(
            sink,
            name=entry.name,
            filter=entry.filter,
            buffer=entry.buffer,
            overflow=entry.overflow,
            critical=entry.critical,
            raw=entry.raw,
        )


class _StreamErrors:
    """Counts the streams that ended with an ``error`` event, keeping the first."""

    def __init__(self) -> None:
        self.count = 0
        self.first: ErrorEvent | None = None

    async def run(self, events: Subscription) -> None:
        while batch := await events.receive_batch():
            for event in batch:
                if isinstance(event, ErrorEvent):
                    self.count += 1
                    if self.first is None:
                        self.first = event


def _describe(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__


class _FailFastSink:
    """A configured sink that, when it cannot start, stops the pipeline instead of being restarted in a loop.

    "Cannot start" is a ``setup`` that raises, or a first ``run`` that raises a
    :class:`~streambus.errors.StreamBusError`; later failures keep the bus's restarts.

    Every other attribute (``overflow``, ``interpose``, ...) is the wrapped sink's own.
    """

    def __init__(
        self, sink: Any, path: str, where: str, bus: Bus, failures: list[PipelineFailed], down: anyio.Event
    ) -> None:
        self._sink = sink
        self._path = path
        self._where = where
        self._bus = bus
        self._failures = failures
        self._down = down
        self._failed = False
        self._started = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sink, name)

    async def setup(self, bus: Bus) -> None:
        setup = getattr(self._sink, "setup", None)
        if setup is None:
            return
        try:
            await setup(bus)
        except Exception as exc:
            await self._cannot_start(exc)

    async def run(self, events: Any) -> None:
        if self._failed:
            return
        first, self._started = not self._started, True
        try:
            await self._sink.run(events)
        except StreamBusError as exc:
            # A deliberate error on the first run (a port in use, a token file that vanished)
            # means the sink cannot start; restarting it with backoff would only repeat it.
            if not first or isinstance(exc, SubscriptionClosed):
                raise
            await self._cannot_start(exc)

    async def _cannot_start(self, exc: Exception) -> None:
        # Not logged: the run ends at once with this error, which says what to fix.
        self._failed = True
        failure = PipelineFailed(f"could not start: {_describe(exc)}", path=self._path, location=self._where)
        failure.__cause__ = exc
        self._failures.append(failure)
        self._down.set()
        await self._bus.shutdown("a sink could not start")


class _FailFastProducer:
    """A configured producer whose exception makes ``streambus run`` exit non-zero (after draining)."""

    def __init__(
        self, producer: Any, path: str, where: str, failures: list[PipelineFailed], sink_down: anyio.Event
    ) -> None:
        self._producer = producer
        self._path = path
        self._where = where
        self._failures = failures
        self._sink_down = sink_down

    async def run(self, bus: Bus) -> None:
        if self._sink_down.is_set():
            return  # a sink could not start: the pipeline is stopping
        try:
            await self._producer.run(bus)
        except Exception as exc:
            failure = PipelineFailed(f"failed: {_describe(exc)}", path=self._path, location=self._where)
            failure.__cause__ = exc
            self._failures.append(failure)
            log.error("pipeline.producer_failed", producer=self._where, error=_describe(exc))


async def _serve_until_signal(bus: Bus) -> None:
    import signal

    async with anyio.create_task_group() as tg:

        async def watch() -> None:
            with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async for signum in signals:
                    log.info("bus.signal", signal=signal.Signals(signum).name)
                    await bus.shutdown()
                    return

        async def stopped() -> None:
            await bus.wait_stopped()
            tg.cancel_scope.cancel()

        tg.start_soon(watch)
        tg.start_soon(stopped)


def _table(data: Any, where: str, path: str) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise ConfigError(f"expected a table, got {type(data).__name__}", path=path, location=where)
    return data


def parse_config(data: Mapping[str, Any], *, path: str = "<config>") -> Pipeline:
    """Validate a parsed TOML document and build its plugins."""
    unknown = set(data) - {"bus", "log", "run", "producers", "sinks"}
    if unknown:
        key = sorted(unknown)[0]
        raise ConfigError("unknown table (expected bus, log, run, producers, sinks)", path=path, location=key)
    bus = validate_options(BusConfig, _table(data.get("bus", {}), "bus", path), path=path, location="bus")
    logcfg = validate_options(LogConfig, _table(data.get("log", {}), "log", path), path=path, location="log")
    runcfg = validate_options(RunConfig, _table(data.get("run", {}), "run", path), path=path, location="run")

    plugins: list[tuple[str, Any]] = []
    producers: list[Producer] = []
    for i, raw in enumerate(_list(data.get("producers", []), "producers", path)):
        where = f"producers[{i}]"
        table = dict(_table(raw, where, path))
        kind = _type_of(table, where, path)
        producers.append(build("producers", kind, table, path=path, location=where))
        plugins.append((where, producers[-1]))

    sinks: list[SinkEntry] = []
    for i, raw in enumerate(_list(data.get("sinks", []), "sinks", path)):
        where = f"sinks[{i}]"
        table = dict(_table(raw, where, path))
        kind = _type_of(table, where, path)
        common_raw = {k: table.pop(k) for k in list(table) if k in _SINK_KEYS}
        common = validate_options(_SinkCommon, common_raw, path=path, location=where)
        sink = build("sinks", kind, table, path=path, location=where)
        plugins.append((where, sink))
        flt = None
        if common.filter is not None:
            f = common.filter
            flt = Filter.of(streams=f.streams, models=f.models, providers=f.providers, meta=f.meta)
        sinks.append(
            SinkEntry(
                sink=sink,
                name=common.name or kind,
                overflow=common.overflow,
                buffer=common.buffer,
                critical=common.critical,
                raw=common.raw,
                filter=flt,
            )
        )
    return Pipeline(
        path=path, bus=bus, log=logcfg, producers=producers, sinks=sinks, plugins=plugins, run_config=runcfg
    )


def _list(value: Any, where: str, path: str) -> list[Any]:
    if not isinstance(value, list):
        raise ConfigError(
            f"expected an array of tables ([[{where}]]), got {type(value).__name__}", path=path, location=where
        )
    return value


def _type_of(table: dict[str, Any], where: str, path: str) -> str:
    kind = table.pop("type", None)
    if kind is None:
        raise ConfigError("missing required key", path=path, location=f"{where}.type")
    if not isinstance(kind, str):
        raise ConfigError(f"expected string, got {kind!r}", path=path, location=f"{where}.type")
    return kind


def load_config(path: str | Path) -> Pipeline:
    """Read, validate and build the pipeline in the TOML file at *path*."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config: {exc.strerror or exc}", path=str(p)) from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"invalid TOML: {exc}", path=str(p)) from None
    return parse_config(data, path=str(p))
