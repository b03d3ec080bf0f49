"""The ``stats`` sink: aggregate every stream on the bus, serve /metrics and /stats, log summaries.

::

    from streambus_stats import StatsSink

    stats = StatsSink(port=9464, interval=30)
    async with Bus() as bus:
        bus.add_sink(stats)
        ...
    print(stats.snapshot()["overall"]["time_to_first_chunk_seconds"])

The sink subscribes with ``overflow = "block"`` so it sees every delta
uncoalesced (coalescing would merge chunks and change inter-chunk figures).
The HTTP endpoint uses aiohttp and therefore needs the asyncio backend; with
``port`` unset the sink is backend-neutral (asyncio or trio).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import anyio
import msgspec
import orjson
import sniffio
import structlog

from streambus.plugins import (
    Fraction,
    NonNegativeFloat,
    NonNegativeInt,
    PluginBase,
    Port,
    PositiveInt,
    check_bounds,
    require_writable_directory,
)
from streambus.subscription import Subscription

from ._aggregator import Aggregate, StatsAggregator
from ._prometheus import render_metrics

if TYPE_CHECKING:
    from aiohttp import web

    from streambus import Bus

__all__ = ["StatsSink"]

log = structlog.get_logger("streambus.stats")

_FIRST_PAUSE = 0.001
_BEHIND = 4
"""A read of this many times ``read_batch`` events or more is followed by the next at once."""
"""Seconds of the first pause after a read that found the bus idle (no rate to go by yet)."""

METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


_Quantile = Annotated[float, msgspec.Meta(gt=0, lt=1)]


class StatsSink(PluginBase):
    """Aggregates stream figures (TTFC, inter-chunk latency, tokens/s, usage) per model and provider.

    Read them with :meth:`snapshot`, over HTTP (``/metrics`` for Prometheus,
    ``/stats`` JSON, ``/stats/state`` mergeable state) when ``port`` is set,
    and in the log: a ``stats.summary`` line every ``interval`` seconds and
    ``stats.final`` lines when the bus stops. Build it from
    :class:`StatsSink.Options` or with the same names as keyword arguments.
    """

    class Options(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
        """Config keys of the ``stats`` sink (see ``docs/plugins/stats.md``)."""

        port: Port | None = None
        """Serve ``/metrics`` and ``/stats`` on this TCP port (0: any free port); unset: no HTTP."""
        host: str = "127.0.0.1"
        """Address to listen on."""
        interval: NonNegativeFloat = 60.0
        """Seconds between ``stats.summary`` log lines; 0 turns them off."""
        relative_accuracy: _Quantile = 0.01
        """Relative error of quantiles (the DDSketch's alpha)."""
        quantiles: list[Annotated[float, msgspec.Meta(gt=0, lt=1)]] = msgspec.field(
            default_factory=lambda: [0.5, 0.9, 0.99]
        )
        """Quantiles reported besides min and max."""
        keep_streams: NonNegativeInt = 1000
        """Finished streams whose per-stream figures are kept for ``/stats``."""
        tokenizer: Literal["auto", "tiktoken", "approx"] = "auto"
        """How to count tokens the provider did not report."""
        encoding: str | None = None
        """A tiktoken encoding name to use for every model."""
        hf_tokenizers: dict[str, str] = msgspec.field(default_factory=dict)
        """Model -> its own tokenizer on this machine: a ``tokenizer.json``, a directory, or a cached hub repo id."""
        state_file: str | None = None
        """Write the mergeable aggregator state (JSON) here when the bus stops."""
        read_batch: PositiveInt = 2048
        """Events to let pile up between reads (the pause is set from the rate the sink sees); 1: read at once."""
        read_pause: Fraction = 0.01
        """The longest pause between reads, in seconds: figures lag by at most this much; 0: never pause."""

        def __post_init__(self) -> None:
            check_bounds(self)
            if self.port is not None and not 0 <= self.port <= 65535:
                raise ValueError(f"port: must be between 0 and 65535, got {self.port}")
            if not self.interval >= 0 or math.isinf(self.interval):
                raise ValueError(f"interval: must be a finite number of seconds >= 0, got {self.interval}")
            if not 0.0 < self.relative_accuracy < 1.0:
                raise ValueError(
                    f"relative_accuracy: must be between 0 and 1 (exclusive), got {self.relative_accuracy}"
                )
            if not self.quantiles:
                raise ValueError("quantiles: must not be empty")
            for q in self.quantiles:
                if not 0.0 < q < 1.0:
                    raise ValueError(f"quantiles: each must be between 0 and 1 (exclusive), got {q}")
            if not 0 <= self.read_pause <= 1:
                raise ValueError(f"read_pause: must be between 0 and 1 second, got {self.read_pause}")
            if self.read_batch < 1:
                raise ValueError(f"read_batch: must be 1 or more, got {self.read_batch}")
            if self.keep_streams < 0:
                raise ValueError(f"keep_streams: must be 0 or more, got {self.keep_streams}")

    overflow = "block"
    buffer = 16384

    def preflight(self) -> None:
        """Check that ``state_file`` (when set) can be written when the bus stops; nothing is created."""
        path = self.options.state_file
        if path:
            require_writable_directory("state_file", Path(path).parent)
            if Path(path).is_dir():
                raise ValueError(f"state_file: {path} is a directory; name a file")

    def __init__(self, options: Options | None = None, **kwargs: Any) -> None:
        self.options: StatsSink.Options = self.resolve_options(options, kwargs)
        opts = self.options
        self.aggregator = StatsAggregator(
            relative_accuracy=opts.relative_accuracy,
            tokenizer=opts.tokenizer,
            encoding=opts.encoding,
            hf_tokenizers=opts.hf_tokenizers,
            keep_streams=opts.keep_streams,
            quantiles=opts.quantiles,
        )
        self._runner: web.AppRunner | None = None
        self.url: str | None = None
        """``http://host:port`` once the HTTP endpoint listens (after ``setup``)."""

    # -- reading ------------------------------------------------------------------
    def snapshot(self, *, streams: bool = True) -> dict[str, Any]:
        """Everything aggregated so far as JSON-able data (what ``/stats`` serves)."""
        return self.aggregator.snapshot(streams=streams)

    def metrics(self) -> bytes:
        """The Prometheus text exposition (what ``/metrics`` serves)."""
        return render_metrics(self.aggregator)

    # -- lifecycle ------------------------------------------------------------------
    async def setup(self, bus: Bus) -> None:
        """Start the HTTP endpoint when ``port`` is set (asyncio only)."""
        if self.options.port is None:
            return
        backend = sniffio.current_async_library()
        if backend != "asyncio":
            raise RuntimeError(
                f"the stats sink's HTTP endpoint (port={self.options.port}) uses aiohttp, which needs asyncio, "
                f"but the bus runs on {backend}: run it under asyncio or leave `port` unset"
            )
        try:
            from aiohttp import web
        except ImportError as exc:  # pragma: no cover - aiohttp is a dependency
            raise ImportError("the stats HTTP endpoint needs aiohttp: pip install 'streambus-stats'") from exc

        app = web.Application()
        app.router.add_get("/metrics", self._handle_metrics)
        app.router.add_get("/stats", self._handle_stats)
        app.router.add_get("/stats/state", self._handle_state)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, self.options.host, self.options.port)
        try:
            await site.start()
        except OSError:
            await runner.cleanup()
            raise
        self._runner = runner
        host, port = runner.addresses[0][:2]
        self.url = f"http://{'[' + host + ']' if ':' in host else host}:{port}"
        log.info("stats.listening", url=self.url, metrics=f"{self.url}/metrics", stats=f"{self.url}/stats")

    async def teardown(self) -> None:
        """Stop the HTTP endpoint."""
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    async def _handle_metrics(self, request: web.Request) -> web.Response:
        from aiohttp import web

        return web.Response(body=self.metrics(), headers={"Content-Type": METRICS_CONTENT_TYPE})

    async def _handle_stats(self, request: web.Request) -> web.Response:
        from aiohttp import web

        streams = request.query.get("streams", "1").lower() not in ("0", "false", "no")
        return web.Response(body=orjson.dumps(self.snapshot(streams=streams)), content_type="application/json")

    async def _handle_state(self, request: web.Request) -> web.Response:
        from aiohttp import web

        return web.Response(body=orjson.dumps(self.aggregator.to_state()), content_type="application/json")

    async def run(self, events: Subscription) -> None:
        """Aggregate events until the bus stops; then log ``stats.final`` and write ``state_file``."""
        async with anyio.create_task_group() as tg:
            if self.options.interval > 0:
                tg.start_soon(self._tick)
            await self._read(events)
            tg.cancel_scope.cancel()
        self.log_summary(final=True)
        if self.options.state_file:
            await anyio.Path(self.options.state_file).write_bytes(orjson.dumps(self.aggregator.to_state()))
            log.info("stats.state_written", path=self.options.state_file)

    async def _read(self, events: Subscription) -> None:
        # Waking up costs about as much as aggregating a few hundred events, so the sink lets
        # about `read_batch` of them pile up between reads: it pauses for as long as that took at
        # the rate of its last read, never longer than `read_pause`. The pause is set from
        # counts, not fixed in seconds, so a slow bus (many subscribers, a profiler) is read in
        # batches as big as a fast one's.
        feed = self.aggregator.feed_many
        target, longest = self.options.read_batch, self.options.read_pause
        now = anyio.current_time
        pause = 0.0
        while True:
            before = now()
            batch = await events.receive_batch()
            if not batch:
                return
            feed(batch)
            pause = next_pause(pause, now() - before, len(batch), target, longest)
            if pause:
                await anyio.sleep(pause)

    async def _tick(self) -> None:
        while True:
            await anyio.sleep(self.options.interval)
            self.log_summary()

    def log_summary(self, *, final: bool = False) -> None:
        """Log one ``stats.summary`` line (or, with *final*, ``stats.final`` overall and per model)."""
        event = "stats.final" if final else "stats.summary"
        agg = self.aggregator
        log.info(event, scope="overall", live=len(agg.live), **_fields(agg.aggregate()))
        if final:
            for model in agg.models:
                log.info(event, scope="model", model=model, **_fields(agg.aggregate(model=model)))


def _fields(agg: Aggregate) -> dict[str, Any]:
    def q(figure: str, quantile: float) -> float | None:
        value = agg.dists[figure].quantile(quantile)
        return None if value is None else round(value, 6)

    return {
        "streams": agg.started,
        "finished": agg.finished,
        "errors": sum(agg.errors.values()),
        "aborts": sum(agg.aborts.values()),
        "ttfc_p50": q("time_to_first_chunk_seconds", 0.5),
        "ttfc_p99": q("time_to_first_chunk_seconds", 0.99),
        "inter_chunk_p50": q("inter_chunk_latency_seconds", 0.5),
        "inter_chunk_p99": q("inter_chunk_latency_seconds", 0.99),
        "tokens_per_second_p50": q("output_tokens_per_second", 0.5),
        "prompt_tokens": agg.token_total("prompt"),
        "completion_tokens": agg.token_total("completion"),
        "cached_input_tokens": agg.token_total("cached_input"),
        "cache_creation_input_tokens": agg.token_total("cache_creation_input"),
        "reasoning_tokens": agg.token_total("reasoning"),
    }


def next_pause(pause: float, waited: float, got: int, target: int, longest: float) -> float:
    """Seconds to pause before the next read, after a read of *got* events.

    *pause* is the pause before that read (0: there was none) and *waited* the time the read
    itself took (waiting for events and aggregating them).
    """
    if not longest or got >= _BEHIND * target:
        return 0.0  # (a batch that big: the sink is falling behind, read on at once)
    if not pause:
        # No rate to go by yet: read again at once after a big batch (the sink may be behind),
        # else (the bus was idle, or this is the first read) pause briefly to measure one.
        return 0.0 if got >= target else min(longest, _FIRST_PAUSE)
    # The batch piled up over (pause + waited): pause as long as `target` events take at that rate
    # (shorter than before when the batch was bigger than `target`, so the reads stay near it).
    return min(longest, (pause + waited) * target / got)
