"""The stats aggregator: per-stream figures, aggregated per model, provider and overall.

Feed it events (:meth:`StatsAggregator.feed`, in ``seq`` order per stream, as
a subscription or a recording delivers them) and read
:meth:`StatsAggregator.snapshot`. Every figure is defined in
``docs/stats.md``; in short, with ``ts`` the producer's timestamps:

- time to first chunk = ts(first non-empty ``content`` or ``reasoning`` delta) - ts(start)
- inter-chunk latency = ts(non-empty delta) - ts(previous non-empty delta), one
  value per chunk after the first (chunks, not tokens)
- end-to-end = ts(terminal event) - ts(start)
- time per output token = (e2e - ttfc) / (completion_tokens - 1), when completion_tokens >= 2
- output tokens/s (bus) = (completion_tokens - 1) / (e2e - ttfc) = 1 / TPOT
- provider tokens/s = completion_tokens / timings["eval_duration"] (Ollama's eval rate)

:meth:`StatsAggregator.feed_many` takes one batch (what the sink reads from its
subscription at once): it walks the events, gathers every value a stream
contributes to a distribution, and adds each distribution's values in one go
at the end of the batch, so every figure is up to date when it returns.

Aggregators merge exactly (:meth:`StatsAggregator.merge`) and serialise
(:meth:`StatsAggregator.to_state` / :meth:`StatsAggregator.from_state`), so
processes or recordings can be summarised separately and combined.
"""

from __future__ import annotations

import collections
import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Final, Literal

import msgspec

from streambus.events import AbortEvent, DeltaEvent, EndEvent, ErrorEvent, Event, ModerationEvent, StartEvent

from ._distribution import CHUNK_BUCKETS, COMPILED, DURATION_BUCKETS, RATE_BUCKETS, TOKEN_BUCKETS, Distribution
from ._tokens import TokenCounter, TokenizerChoice

__all__ = ["FIGURES", "STATE_VERSION", "TOKEN_KINDS", "Aggregate", "Live", "StatsAggregator", "StreamRecord"]

STATE_VERSION: Final = 1
"""Version of the JSON state :meth:`StatsAggregator.to_state` writes."""

Outcome = Literal["end", "error", "abort", "incomplete"]

FIGURES: Final[dict[str, tuple[str, tuple[float, ...]]]] = {
    "time_to_first_chunk_seconds": ("start to first non-empty content or reasoning delta", DURATION_BUCKETS),
    "time_to_first_content_seconds": ("start to first non-empty content delta", DURATION_BUCKETS),
    "inter_chunk_latency_seconds": ("gap between consecutive non-empty deltas (chunks, not tokens)", CHUNK_BUCKETS),
    "time_per_output_token_seconds": ("(e2e - ttfc) / (completion_tokens - 1)", CHUNK_BUCKETS),
    "e2e_seconds": ("start to terminal event", DURATION_BUCKETS),
    "output_tokens_per_second": ("(completion_tokens - 1) / (e2e - ttfc), measured at the bus", RATE_BUCKETS),
    "provider_tokens_per_second": ("completion_tokens / eval_duration, as the provider reported", RATE_BUCKETS),
    "prompt_tokens": ("prompt (input) tokens per stream", TOKEN_BUCKETS),
    "completion_tokens": ("completion (output) tokens per stream", TOKEN_BUCKETS),
}
"""Every distribution an :class:`Aggregate` keeps: name -> (definition, bucket bounds)."""

_ORDER = ("time_to_first_chunk", "time_to_first_content")

if COMPILED:
    from ._compiled import Live as _CompiledLive
    from ._compiled import feed as _compiled_feed


class StreamRecord(msgspec.Struct, kw_only=True):
    """The figures of one finished stream (``None`` where a figure is undefined)."""

    stream: str
    model: str
    provider: str
    outcome: Outcome
    """``end``, ``error``, ``abort``, or ``incomplete`` (no terminal event seen)."""
    reason: str
    """The end reason, error kind or abort ``by``; empty for incomplete streams."""
    start_ts: float
    end_ts: float | None
    time_to_first_chunk: float | None
    time_to_first_content: float | None
    e2e: float | None
    chunks: int
    empty_deltas: int
    inter_chunk_mean: float | None
    inter_chunk_max: float | None
    prompt_tokens: int | None
    completion_tokens: int | None
    total_tokens: int | None
    usage_source: Literal["provider", "counted"] | None
    token_method: str | None
    """``provider``, ``hf:<tokenizer>``, ``tiktoken:<encoding>`` or ``approx``: how completion tokens were known."""
    time_per_output_token: float | None
    output_tokens_per_second: float | None
    provider_tokens_per_second: float | None
    moderation: dict[str, int] = {}
    cached_input_tokens: int | None = None
    """Prompt tokens read from the provider's cache (part of ``prompt_tokens``), when it reported them."""
    cache_creation_input_tokens: int | None = None
    """Prompt tokens written to the provider's cache (Anthropic), when it reported them."""
    reasoning_tokens: int | None = None
    """Completion tokens spent on reasoning (part of ``completion_tokens``), when the provider reported them."""


class Aggregate:
    """Counters and distributions of a set of streams (one model/provider pair, or merged).

    Distributions are in :attr:`dists` keyed by the names of :data:`FIGURES`.
    """

    __slots__ = (
        "aborts",
        "chunks",
        "dists",
        "empty_deltas",
        "end_reasons",
        "errors",
        "first_ts",
        "last_ts",
        "moderation",
        "outcomes",
        "pending",
        "relative_accuracy",
        "started",
        "tokens",
    )

    def __init__(self, relative_accuracy: float = 0.01) -> None:
        self.relative_accuracy = relative_accuracy
        self.dists = {name: Distribution(relative_accuracy, bounds) for name, (_, bounds) in FIGURES.items()}
        self.started = 0
        self.outcomes: Counter[str] = Counter()
        self.end_reasons: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        self.aborts: Counter[str] = Counter()
        self.moderation: Counter[str] = Counter()
        self.chunks = 0
        self.empty_deltas = 0
        self.tokens: Counter[str] = Counter()
        """Token totals keyed ``"<kind>:<provider|counted>"``, kind one of :data:`TOKEN_KINDS`
        (the cache and reasoning kinds are only ever provider-reported)."""
        self.first_ts = math.inf
        self.last_ts = -math.inf
        self.pending: dict[str, list[float]] = {name: [] for name in FIGURES}
        """Values gathered for :attr:`dists` during a batch, by figure; :meth:`ingest` adds them."""

    def ingest(self) -> None:
        """Add the :attr:`pending` values to their distributions (the aggregator does it after every batch)."""
        for name, values in self.pending.items():
            if values:
                self.dists[name].add_many(values)
                values.clear()

    @property
    def finished(self) -> int:
        """Streams that reached a terminal event (or were closed as incomplete)."""
        return sum(self.outcomes.values())

    def token_total(self, kind: str) -> int:
        """Total *kind* tokens (one of :data:`TOKEN_KINDS`), provider-reported plus counted."""
        return self.tokens[f"{kind}:provider"] + self.tokens[f"{kind}:counted"]

    @property
    def throughput(self) -> float | None:
        """Completion tokens per second of wall time, first start to last terminal event."""
        span = self.last_ts - self.first_ts
        total = self.token_total("completion")
        if not math.isfinite(span) or span <= 0 or not total:
            return None
        return total / span

    def merge(self, other: Aggregate) -> None:
        """Add everything *other* holds."""
        for name, dist in self.dists.items():
            dist.merge(other.dists[name])
        self.started += other.started
        for mine, theirs in (
            (self.outcomes, other.outcomes),
            (self.end_reasons, other.end_reasons),
            (self.errors, other.errors),
            (self.aborts, other.aborts),
            (self.moderation, other.moderation),
            (self.tokens, other.tokens),
        ):
            mine.update(theirs)
        self.chunks += other.chunks
        self.empty_deltas += other.empty_deltas
        self.first_ts = min(self.first_ts, other.first_ts)
        self.last_ts = max(self.last_ts, other.last_ts)

    def summary(self, quantiles: Sequence[float] = (0.5, 0.9, 0.99)) -> dict[str, Any]:
        """Return the aggregate as plain JSON-able data (see ``docs/stats.md`` for every key)."""
        out: dict[str, Any] = {
            "streams": {
                "started": self.started,
                "finished": self.finished,
                "live": max(self.started - self.finished, 0),
                "outcomes": dict(sorted(self.outcomes.items())),
            },
            "end_reasons": dict(sorted(self.end_reasons.items())),
            "errors": dict(sorted(self.errors.items())),
            "aborts": dict(sorted(self.aborts.items())),
            "moderation": dict(sorted(self.moderation.items())),
            "chunks": self.chunks,
            "empty_deltas": self.empty_deltas,
            "tokens": {
                kind: {
                    "provider": self.tokens[f"{kind}:provider"],
                    "counted": self.tokens[f"{kind}:counted"],
                    "all": self.token_total(kind),
                }
                for kind in TOKEN_KINDS
            },
            "throughput_tokens_per_second": self.throughput,
        }
        for name, dist in self.dists.items():
            out[name] = dist.summary(quantiles)
        return out

    def to_state(self) -> dict[str, Any]:
        """Return JSON-able state for :meth:`from_state`."""
        return {
            "dists": {name: dist.to_state() for name, dist in self.dists.items()},
            "started": self.started,
            "outcomes": dict(self.outcomes),
            "end_reasons": dict(self.end_reasons),
            "errors": dict(self.errors),
            "aborts": dict(self.aborts),
            "moderation": dict(self.moderation),
            "chunks": self.chunks,
            "empty_deltas": self.empty_deltas,
            "tokens": dict(self.tokens),
            "first_ts": self.first_ts if math.isfinite(self.first_ts) else None,
            "last_ts": self.last_ts if math.isfinite(self.last_ts) else None,
        }

    @classmethod
    def from_state(cls, state: dict[str, Any], relative_accuracy: float) -> Aggregate:
        """Rebuild an aggregate from :meth:`to_state` output."""
        agg = cls(relative_accuracy)
        for name in agg.dists:
            if name in state["dists"]:
                agg.dists[name] = Distribution.from_state(state["dists"][name])
        agg.started = int(state["started"])
        for attr in ("outcomes", "end_reasons", "errors", "aborts", "moderation", "tokens"):
            getattr(agg, attr).update({str(k): int(v) for k, v in state[attr].items()})
        agg.chunks = int(state["chunks"])
        agg.empty_deltas = int(state["empty_deltas"])
        agg.first_ts = math.inf if state["first_ts"] is None else float(state["first_ts"])
        agg.last_ts = -math.inf if state["last_ts"] is None else float(state["last_ts"])
        return agg


TOKEN_KINDS = ("prompt", "completion", "total", "cached_input", "cache_creation_input", "reasoning")
"""The token figures an aggregate totals: the usage's ``prompt``, ``completion`` and ``total``,
and the parts of them a provider may report: prompt tokens read from (``cached_input``) and
written to (``cache_creation_input``) its cache, completion tokens spent on ``reasoning``."""

_DETAILS = ("cached_input", "cache_creation_input", "reasoning")
_DETAIL_KEYS = tuple(f"{kind}:provider" for kind in _DETAILS)

_TOKEN_KEYS = {
    source: tuple(f"{kind}:{source}" for kind in ("prompt", "completion", "total"))
    for source in ("provider", "counted")
}


class Live:
    """What the aggregator tracks of a stream between its start and its terminal event.

    Each non-empty delta's text is kept (to count tokens when the provider
    did not report them) and its gap to the previous non-empty delta goes to
    the group's pending inter-chunk values. The stream's mean gap is
    ``(last - first_ts) / ngaps``: the sum of its gaps, telescoped.
    """

    __slots__ = (
        "agg",
        "empty",
        "extra",
        "first",
        "first_content",
        "first_n",
        "first_ts",
        "gap_max",
        "gaps",
        "last",
        "moderation",
        "start",
        "texts",
    )

    def __init__(self, start: StartEvent, agg: Aggregate) -> None:
        self.start = start
        self.agg = agg
        self.gaps = agg.pending["inter_chunk_latency_seconds"]
        """The group's pending inter-chunk gaps (shared by its live streams)."""
        self.texts: list[str] = []
        """The text of every non-empty delta so far."""
        self.moderation: dict[str, int] = {}
        """Moderation actions on this stream, by action."""
        self.empty = 0
        self.extra = 0
        """Chunks beyond one carried by coalesced deltas (sum of ``n - 1``)."""
        self.first: float | None = None
        """ts of the first content or reasoning chunk (time to first chunk)."""
        self.first_content: float | None = None
        self.first_ts: float | None = None
        """ts of the first chunk on any channel: where the gaps start."""
        self.first_n = 0
        self.last: float | None = None
        """ts of the latest chunk."""
        self.gap_max = -math.inf

    @property
    def chunks(self) -> int:
        """Chunks so far (a coalesced delta counts its ``n``)."""
        return len(self.texts) + self.extra

    @property
    def ngaps(self) -> int:
        """Gaps so far: one per chunk after the first delta's."""
        return self.chunks - self.first_n if self.first_ts is not None else 0

    @property
    def gap_sum(self) -> float:
        """The sum of the gaps (raw, before clamping): the span from first to latest chunk."""
        if self.first_ts is None or self.last is None:
            return 0.0
        return self.last - self.first_ts

    def chunk(self, event: DeltaEvent) -> None:
        """Account for a non-empty delta (:meth:`StatsAggregator.feed_many` inlines the commonest case)."""
        self.texts.append(event.text)
        ts, n = event.ts, event.n
        if n != 1:
            self.extra += n - 1
        if event.channel != "tool":
            if self.first is None:
                self.first = ts
                self.agg.pending["time_to_first_chunk_seconds"].append(ts - self.start.ts)
            if self.first_content is None and event.channel == "content":
                self.first_content = ts
                self.agg.pending["time_to_first_content_seconds"].append(ts - self.start.ts)
        last, self.last = self.last, ts
        if last is None:
            self.first_ts, self.first_n = ts, n
            return
        if n < 1:  # not a valid delta: it carries no chunk to time
            return
        # A delta that carries n chunks: its gap is taken as n equal gaps (evenly spread).
        gap = ts - last if n == 1 else (ts - last) / n
        self.gaps.extend([gap] * n)
        if gap > self.gap_max:
            self.gap_max = gap


class StatsAggregator:
    """Computes stream figures from events and aggregates them per model/provider.

    :param relative_accuracy: the DDSketch's relative error on quantiles (0.01 = 1%).
    :param tokenizer: how to count tokens when the provider did not (see :class:`TokenCounter`).
    :param encoding: a tiktoken encoding to use for every model.
    :param hf_tokenizers: model name -> its own tokenizer on this machine (see :class:`TokenCounter`).
    :param keep_streams: how many finished :class:`StreamRecord` to keep (``None``: all).
    :param quantiles: the quantiles summaries report.
    :param compiled: run deltas through the compiled twin of the per-event path (``None``: when it
        was built, see :data:`~streambus_stats.COMPILED`); ``False``: the pure-Python
        reference. Both give the same figures.
    """

    def __init__(
        self,
        *,
        relative_accuracy: float = 0.01,
        tokenizer: TokenizerChoice = "auto",
        encoding: str | None = None,
        hf_tokenizers: Mapping[str, str] | None = None,
        keep_streams: int | None = 1000,
        quantiles: Sequence[float] = (0.5, 0.9, 0.99),
        counter: TokenCounter | None = None,
        compiled: bool | None = None,
    ) -> None:
        if compiled and not COMPILED:
            raise ValueError(
                "compiled: the compiled per-event path is not available (the plugin was built without it, "
                "or STREAMBUS_STATS_PURE is set)"
            )
        if not 0.0 < relative_accuracy < 1.0:
            raise ValueError(f"relative_accuracy: must be between 0 and 1 (exclusive), got {relative_accuracy}")
        if keep_streams is not None and keep_streams < 0:
            raise ValueError(f"keep_streams: must be 0 or more, got {keep_streams}")
        for q in quantiles:
            if not 0.0 < q < 1.0:
                raise ValueError(f"quantiles: each must be between 0 and 1 (exclusive), got {q}")
        self.relative_accuracy = relative_accuracy
        self.quantiles = tuple(quantiles)
        self.counter = counter or TokenCounter(tokenizer, encoding, hf_tokenizers)
        self.compiled = COMPILED if compiled is None else compiled
        """Whether deltas go through the compiled twin of the per-event path (same figures, faster)."""
        self._live_type: Any = _CompiledLive if self.compiled else Live  # (the twins share an interface, not a class)
        self.groups: dict[tuple[str, str], Aggregate] = {}
        """One :class:`Aggregate` per ``(model, provider)``."""
        self.streams: collections.deque[StreamRecord] = collections.deque(maxlen=keep_streams)
        """The most recent finished streams' records."""
        self.live: dict[str, Live] = {}
        """Streams started and not finished, by id."""
        self.events = 0
        self.orphans = 0
        """Events of streams whose ``start`` was not seen (joined mid-stream), or after their terminal event."""

    # -- feeding -----------------------------------------------------------------
    def _group(self, model: str, provider: str) -> Aggregate:
        key = (model, provider)
        agg = self.groups.get(key)
        if agg is None:
            agg = self.groups[key] = Aggregate(self.relative_accuracy)
        return agg

    def feed(self, event: Event) -> None:
        """Account for one event."""
        self.feed_many((event,))

    def feed_many(self, events: Iterable[Event]) -> None:
        """Account for *events*, in order: one batch, as the sink reads it from its subscription."""
        if not isinstance(events, list | tuple):
            events = list(events)
        if self.compiled:
            orphans = _compiled_feed(events, self.live, self._other)  # (before `+=`: _other counts some too)
            self.orphans += orphans
        else:
            live = self.live
            for event in events:
                if type(event) is not DeltaEvent:
                    self._other(event)
                    continue
                st = live.get(event.stream)
                if st is None:
                    self.orphans += 1
                elif not event.text:
                    st.empty += 1
                elif st.first_content is None or event.n != 1:
                    st.chunk(event)
                else:
                    # The commonest event by far, inlined: one more chunk of a stream that has its first content.
                    st.texts.append(event.text)
                    ts = event.ts
                    gap = ts - st.last  # type: ignore[operator]  # (set with first_content)
                    st.last = ts
                    st.gaps.append(gap)
                    if gap > st.gap_max:
                        st.gap_max = gap
        self.events += len(events)
        self._ingest()

    def _other(self, event: Event) -> None:
        # Every event but a delta: starts, moderation actions and terminal events.
        if type(event) is StartEvent:
            self._start(event)
        elif type(event) is ModerationEvent:
            st = self.live.get(event.stream)
            if st is None:
                self.orphans += 1
                return
            st.moderation[event.action] = st.moderation.get(event.action, 0) + 1
            st.agg.moderation[event.action] += 1
        else:
            st = self.live.pop(event.stream, None)
            if st is None:
                self.orphans += 1
                return
            self._finish(st, event)

    def _ingest(self) -> None:
        for agg in self.groups.values():
            agg.ingest()

    def _start(self, event: StartEvent) -> None:
        if event.stream in self.live:
            # A second start for a live stream: finish the first one as incomplete.
            self._finish(self.live.pop(event.stream), None)
        agg = self._group(event.model, event.provider)
        agg.started += 1
        agg.first_ts = min(agg.first_ts, event.ts)
        self.live[event.stream] = self._live_type(event, agg)

    def close_incomplete(self) -> None:
        """Finish every live stream as ``incomplete`` (end of a recording that cut streams short)."""
        for st in list(self.live.values()):
            del self.live[st.start.stream]
            self._finish(st, None)
        self._ingest()

    def _finish(self, st: Live, event: Event | None) -> None:
        # Runs once per stream: for short streams (tens of tokens) its cost per token is as much as
        # the deltas', so it reads each field once and spells its steps out (no loops over tuples).
        start = st.start
        start_ts = start.ts
        agg = st.agg
        pending = agg.pending
        usage = None
        eval_duration = None
        outcome: Outcome
        if isinstance(event, EndEvent):
            outcome, reason = "end", event.reason
            usage = event.usage
            eval_duration = event.timings.get("eval_duration")
            agg.end_reasons[reason] += 1
        elif isinstance(event, ErrorEvent):
            outcome, reason = "error", event.kind
            agg.errors[reason] += 1
        elif isinstance(event, AbortEvent):
            outcome, reason = "abort", event.by
            agg.aborts[reason] += 1
        else:
            outcome, reason = "incomplete", ""
        agg.outcomes[outcome] += 1
        chunks = st.chunks
        empty = st.empty
        agg.chunks += chunks
        agg.empty_deltas += empty
        end_ts = e2e = None
        if event is not None:
            end_ts = event.ts
            e2e = end_ts - start_ts
            if end_ts > agg.last_ts:
                agg.last_ts = end_ts
            pending["e2e_seconds"].append(e2e)
        first = st.first
        ttfc = first - start_ts if first is not None else None
        first_content = st.first_content
        ttf_content = first_content - start_ts if first_content is not None else None

        # Token usage: the provider's numbers where given, counted where missing.
        if usage is not None:
            prompt, completion, total = usage.prompt_tokens, usage.completion_tokens, usage.total_tokens
            counted = usage.source == "counted"
            details = (usage.cached_input_tokens, usage.cache_creation_input_tokens, usage.reasoning_tokens)
        else:
            prompt = completion = total = None
            counted = False
            details = (None, None, None)
        method: str | None = "provider" if completion is not None and not counted else None
        if completion is None:
            completion, method = self.counter.count("".join(st.texts), start.model)
            if method == "none":
                method = "counted"
            counted = True
        if prompt is None and start.meta:
            prompt_text = _prompt_text(start.meta)
            if prompt_text is not None:
                prompt, _ = self.counter.count(prompt_text, start.model)
                counted = True
        if total is None and prompt is not None:
            total = prompt + completion
        source: Literal["provider", "counted"] = "counted" if counted else "provider"
        if method is None:
            method = "counted"
        tokens = agg.tokens
        prompt_key, completion_key, total_key = _TOKEN_KEYS[source]
        if prompt is not None:
            tokens[prompt_key] += prompt
            pending["prompt_tokens"].append(prompt)
        tokens[completion_key] += completion
        if total is not None:
            tokens[total_key] += total
        pending["completion_tokens"].append(completion)
        if usage is not None:
            for key, value in zip(_DETAIL_KEYS, details, strict=True):
                if value is not None:
                    tokens[key] += value

        tpot = rate = provider_rate = None
        if ttfc is not None and e2e is not None and completion >= 2:
            tpot = (e2e - ttfc) / (completion - 1)
            pending["time_per_output_token_seconds"].append(tpot)
            if e2e > ttfc:
                rate = (completion - 1) / (e2e - ttfc)
                pending["output_tokens_per_second"].append(rate)
        if method == "provider" and completion and eval_duration is not None and eval_duration > 0:
            provider_rate = completion / eval_duration
            pending["provider_tokens_per_second"].append(provider_rate)

        streams = self.streams
        if streams.maxlen == 0:
            return
        gaps = st.ngaps
        streams.append(
            StreamRecord(
                stream=start.stream,
                model=start.model,
                provider=start.provider,
                outcome=outcome,
                reason=reason,
                start_ts=start_ts,
                end_ts=end_ts,
                time_to_first_chunk=ttfc,
                time_to_first_content=ttf_content,
                e2e=e2e,
                chunks=chunks,
                empty_deltas=empty,
                inter_chunk_mean=st.gap_sum / gaps if gaps > 0 else None,
                inter_chunk_max=st.gap_max if gaps > 0 else None,
                prompt_tokens=prompt,
                completion_tokens=completion,
                total_tokens=total,
                usage_source=source,
                token_method=method,
                time_per_output_token=tpot,
                output_tokens_per_second=rate,
                provider_tokens_per_second=provider_rate,
                moderation=dict(st.moderation),
                cached_input_tokens=details[0],
                cache_creation_input_tokens=details[1],
                reasoning_tokens=details[2],
            )
        )

    # -- reading -------------------------------------------------------------------
    def aggregate(self, *, model: str | None = None, provider: str | None = None) -> Aggregate:
        """Return the merged aggregate of the groups matching *model* and/or *provider* (all by default)."""
        out = Aggregate(self.relative_accuracy)
        for (m, p), agg in self.groups.items():
            if (model is None or m == model) and (provider is None or p == provider):
                out.merge(agg)
        return out

    @property
    def models(self) -> list[str]:
        """Models seen, sorted."""
        return sorted({m for m, _ in self.groups})

    @property
    def providers(self) -> list[str]:
        """Providers seen, sorted."""
        return sorted({p for _, p in self.groups})

    def snapshot(self, *, streams: bool = True) -> dict[str, Any]:
        """Return everything as JSON-able data: ``overall``, ``models``, ``providers``, ``groups``, ``streams``."""
        q = self.quantiles
        out: dict[str, Any] = {
            "relative_accuracy": self.relative_accuracy,
            "quantiles": list(q),
            "events": self.events,
            "orphan_events": self.orphans,
            "live_streams": len(self.live),
            "overall": self.aggregate().summary(q),
            "models": {m: self.aggregate(model=m).summary(q) for m in self.models},
            "providers": {p: self.aggregate(provider=p).summary(q) for p in self.providers},
            "groups": [{"model": m, "provider": p, **agg.summary(q)} for (m, p), agg in sorted(self.groups.items())],
            "tokenizer_fallbacks": self.counter.fallbacks,
        }
        if streams:
            out["streams"] = [msgspec.to_builtins(r) for r in self.streams]
        return out

    # -- merging -----------------------------------------------------------------
    def merge(self, other: StatsAggregator) -> None:
        """Add everything *other* aggregated (same relative accuracy required).

        Finished-stream records are appended (bounded by ``keep_streams``);
        *other*'s live streams are not carried over, only their first chunks
        and gaps so far: finish them first (:meth:`close_incomplete`) if they
        should count. Merging copies: merge each aggregator (or state) once.
        """
        if other.relative_accuracy != self.relative_accuracy:
            raise ValueError(
                f"cannot merge aggregators of different relative accuracy "
                f"({other.relative_accuracy} into {self.relative_accuracy})"
            )
        for key, agg in other.groups.items():
            self._group(*key).merge(agg)
        self.streams.extend(other.streams)
        self.events += other.events
        self.orphans += other.orphans

    def to_state(self) -> dict[str, Any]:
        """Return the mergeable state as JSON-able data.

        Live streams' figures so far (first chunks, gaps) are included; their
        end is not, and their stream records are not.
        """
        return {
            "streambus_stats": STATE_VERSION,
            "relative_accuracy": self.relative_accuracy,
            "events": self.events,
            "orphans": self.orphans,
            "groups": [{"model": m, "provider": p, **agg.to_state()} for (m, p), agg in sorted(self.groups.items())],
            "streams": [msgspec.to_builtins(r) for r in self.streams],
        }

    @classmethod
    def from_state(cls, state: dict[str, Any], **kwargs: Any) -> StatsAggregator:
        """Rebuild an aggregator from :meth:`to_state` output; ``ValueError`` names what is wrong."""
        if not isinstance(state, dict) or state.get("streambus_stats") != STATE_VERSION:
            found = state.get("streambus_stats") if isinstance(state, dict) else None
            raise ValueError(f"not a streambus stats state of version {STATE_VERSION} (streambus_stats={found!r})")
        try:
            agg = cls(relative_accuracy=float(state["relative_accuracy"]), keep_streams=None, **kwargs)
            agg.events = int(state["events"])
            agg.orphans = int(state["orphans"])
            for i, group in enumerate(state["groups"]):
                try:
                    agg.groups[(str(group["model"]), str(group["provider"]))] = Aggregate.from_state(
                        group, agg.relative_accuracy
                    )
                except (KeyError, TypeError, ValueError) as exc:
                    raise ValueError(f"groups[{i}]: {exc}") from None
            agg.streams.extend(msgspec.convert(state["streams"], list[StreamRecord]))
        except KeyError as exc:
            raise ValueError(f"stats state: missing key {exc.args[0]!r}") from None
        except msgspec.ValidationError as exc:
            raise ValueError(f"stats state: streams: {exc}") from None
        return agg


def _prompt_text(meta: dict[str, Any]) -> str | None:
    """The prompt a producer put in ``meta`` (``prompt``, or ``messages`` / ``system``), for counting."""
    parts: list[str] = []
    system = meta.get("system")
    if isinstance(system, str):
        parts.append(system)
    prompt = meta.get("prompt")
    if isinstance(prompt, str):
        parts.append(prompt)
    messages = meta.get("messages")
    if isinstance(messages, list):
        for message in messages:
            content = message.get("content") if isinstance(message, dict) else None
            if isinstance(content, str):
                parts.append(content)
    return "\n".join(parts) if parts else None
