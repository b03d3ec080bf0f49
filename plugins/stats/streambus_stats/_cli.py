"""``streambus stats RECORDING...``: the stats of recorded streams, as tables, JSON or a picture."""

from __future__ import annotations

import itertools
import sys
from pathlib import Path
from typing import Any

import click
import orjson
import structlog

from streambus.errors import StreamBusError
from streambus.logging import configure_logging
from streambus.recording import RecordingProblem, iter_recording

from ._aggregator import Aggregate, StatsAggregator

__all__ = ["stats_command", "summarise"]


def _is_state(path: Path) -> bool:
    with path.open("rb") as f:
        return f.read(64).lstrip().startswith(b'{"streambus_stats"')


def _pairs(values: tuple[str, ...]) -> dict[str, str]:
    """``MODEL=TOKENIZER`` options as a mapping; a value without ``=`` is a usage error naming it."""
    pairs: dict[str, str] = {}
    for value in values:
        model, sep, source = value.partition("=")
        if not sep or not model or not source:
            raise click.BadParameter(f"{value!r}: expected MODEL=TOKENIZER", param_hint="--hf-tokenizer")
        pairs[model] = source
    return pairs


def summarise(
    paths: list[str | Path],
    *,
    lenient: bool = False,
    relative_accuracy: float = 0.01,
    tokenizer: str = "auto",
    encoding: str | None = None,
    hf_tokenizers: dict[str, str] | None = None,
    problems: list[tuple[str, RecordingProblem]] | None = None,
) -> StatsAggregator:
    """Aggregate each recording (or saved stats state) separately and merge them.

    Streams a recording leaves unfinished count as ``incomplete``. Raises
    :class:`~streambus.errors.RecordingError` naming the file and line of a
    damaged recording (skipped and reported in *problems* when *lenient*).
    """
    total = StatsAggregator(
        relative_accuracy=relative_accuracy,
        keep_streams=None,
        tokenizer=tokenizer,  # type: ignore[arg-type]
        encoding=encoding,
        hf_tokenizers=hf_tokenizers,
    )
    for path in map(Path, paths):
        if _is_state(path):
            try:
                part = StatsAggregator.from_state(orjson.loads(path.read_bytes()), counter=total.counter)
            except (ValueError, orjson.JSONDecodeError) as exc:
                raise click.ClickException(f"{path}: {exc}") from None
        else:
            part = StatsAggregator(relative_accuracy=relative_accuracy, keep_streams=None, counter=total.counter)
            found: list[RecordingProblem] = []
            events = iter_recording(path, lenient=lenient, problems=found)
            # In batches, so a large recording is never held in memory whole.
            while batch := list(itertools.islice(events, 4096)):
                part.feed_many(batch)
            part.close_incomplete()
            if problems is not None:
                problems.extend((str(path), p) for p in found)
        total.merge(part)
    return total


def _fmt(value: float | int | None, unit: str = "s") -> str:
    if value is None:
        return "-"
    if unit == "s":
        return f"{value * 1000:.1f}ms" if value < 1 else f"{value:.2f}s"
    if unit == "/s":
        return f"{value:.1f}"
    return str(value)


def _rows(agg: StatsAggregator) -> list[tuple[str, Aggregate, bool]]:
    """``(name, aggregate, end_section)`` per model, then overall; a rule separates the overall row."""
    models = agg.models
    rows = [(model or "(no model)", agg.aggregate(model=model), i == len(models) - 1) for i, model in enumerate(models)]
    # A recording without any start (a header-only file included) has no model rows, only overall.
    rows.append(("overall", agg.aggregate(), False))
    return rows


def render_tables(agg: StatsAggregator, out: Any = None, *, show_streams: bool = False) -> None:
    """Print the latency, token and outcome tables of *agg* (as ``streambus stats`` does) to *out*."""
    import sys

    _render(agg, out if out is not None else sys.stdout, show_streams)


def _render(agg: StatsAggregator, out: Any, show_streams: bool) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(file=out, width=None if out.isatty() else 160, highlight=False)
    rows = _rows(agg)

    latency = Table(title=f"Latency per model (quantiles within {agg.relative_accuracy:.0%} relative error)")
    latency.add_column("model")
    latency.add_column("streams", justify="right")
    for name in ("TTFC p50", "p90", "p99", "max", "chunk gap p50", "p90", "p99", "max", "e2e p50", "p99"):
        latency.add_column(name, justify="right")
    for name, a, last_model in rows:
        ttfc = a.dists["time_to_first_chunk_seconds"]
        gap = a.dists["inter_chunk_latency_seconds"]
        e2e = a.dists["e2e_seconds"]
        latency.add_row(
            name,
            str(a.started),
            *(_fmt(ttfc.quantile(q)) for q in (0.5, 0.9, 0.99, 1.0)),
            *(_fmt(gap.quantile(q)) for q in (0.5, 0.9, 0.99, 1.0)),
            *(_fmt(e2e.quantile(q)) for q in (0.5, 0.99)),
            end_section=last_model,
        )
    console.print(latency)

    speed = Table(title="Tokens per model (counted = not reported by the provider)")
    speed.add_column("model")
    for name in (
        "TPOT p50",
        "tok/s bus p50",
        "p90",
        "tok/s provider p50",
        "throughput tok/s",
        "prompt tok",
        "completion tok",
        "counted",
    ):
        speed.add_column(name, justify="right")
    for name, a, last_model in rows:
        counted = a.tokens["completion:counted"]
        completion = a.token_total("completion")
        speed.add_row(
            name,
            _fmt(a.dists["time_per_output_token_seconds"].quantile(0.5)),
            _fmt(a.dists["output_tokens_per_second"].quantile(0.5), "/s"),
            _fmt(a.dists["output_tokens_per_second"].quantile(0.9), "/s"),
            _fmt(a.dists["provider_tokens_per_second"].quantile(0.5), "/s"),
            _fmt(a.throughput, "/s"),
            str(a.token_total("prompt")),
            str(completion),
            f"{counted / completion:.0%}" if completion else "-",
            end_section=last_model,
        )
    console.print(speed)

    outcomes = Table(title="Outcomes per model")
    outcomes.add_column("model")
    for name in ("end reasons", "errors by kind", "aborts by", "moderation", "incomplete"):
        outcomes.add_column(name)

    def counts(c: Any) -> str:
        return ", ".join(f"{k}={v}" for k, v in sorted(c.items())) or "-"

    for name, a, last_model in rows:
        outcomes.add_row(
            name,
            counts(a.end_reasons),
            counts(a.errors),
            counts(a.aborts),
            counts(a.moderation),
            str(a.outcomes["incomplete"]),
            end_section=last_model,
        )
    console.print(outcomes)

    if show_streams:
        table = Table(title="Streams")
        for name in ("stream", "model", "outcome", "TTFC", "chunks", "gap mean", "e2e", "completion", "tok/s"):
            table.add_column(name)
        for r in agg.streams:
            table.add_row(
                r.stream,
                r.model,
                f"{r.outcome}:{r.reason}" if r.reason else r.outcome,
                _fmt(r.time_to_first_chunk),
                str(r.chunks),
                _fmt(r.inter_chunk_mean),
                _fmt(r.e2e),
                f"{r.completion_tokens} ({r.usage_source})",
                _fmt(r.output_tokens_per_second, "/s"),
            )
        console.print(table)


@click.command("stats")
@click.argument("recordings", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@click.option(
    "--json", "as_json", is_flag=True, help="Print the snapshot as JSON (see docs/stats.md) instead of tables."
)
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), help="Also draw the distributions to FILE.png.")
@click.option(
    "--state",
    "state_path",
    type=click.Path(dir_okay=False),
    help="Also write the mergeable stats state (JSON) to this file; pass it back as an input later.",
)
@click.option("--streams", "show_streams", is_flag=True, help="Also list every stream's figures.")
@click.option("--lenient", is_flag=True, help="Skip damaged lines instead of stopping at the first.")
@click.option(
    "--tokenizer",
    type=click.Choice(["auto", "tiktoken", "approx"]),
    default="auto",
    show_default=True,
    help="How to count tokens a recording's usage lacks.",
)
@click.option("--encoding", default=None, help="tiktoken encoding to use for every model (e.g. o200k_base).")
@click.option(
    "--hf-tokenizer",
    "hf_tokenizers",
    multiple=True,
    metavar="MODEL=TOKENIZER",
    help="Count MODEL's tokens with its own tokenizer: a tokenizer.json, a directory, or a cached hub repo id.",
)
@click.option(
    "--relative-accuracy",
    type=click.FloatRange(0, 1, min_open=True, max_open=True),
    default=0.01,
    show_default=True,
    help="Relative error of the quantile sketches.",
)
def stats_command(
    recordings: tuple[str, ...],
    as_json: bool,
    plot_path: str | None,
    state_path: str | None,
    show_streams: bool,
    lenient: bool,
    tokenizer: str,
    encoding: str | None,
    hf_tokenizers: tuple[str, ...],
    relative_accuracy: float,
) -> None:
    """Print time to first chunk, inter-chunk latency, tokens/s and usage of RECORDINGS, per model and overall.

    RECORDINGS are files the recorder wrote (.jsonl or .jsonl.gz) or stats
    states saved with --state or the sink's state_file; each is aggregated
    separately and the results merged. Timing comes from each event's ts.
    Figures are defined in docs/stats.md.
    """
    # Log lines (tokenizer fallbacks) go to stderr, so --json output stays clean.
    if not structlog.is_configured():
        configure_logging("warning")
    problems: list[tuple[str, RecordingProblem]] = []
    try:
        agg = summarise(
            list(recordings),
            lenient=lenient,
            relative_accuracy=relative_accuracy,
            tokenizer=tokenizer,
            encoding=encoding,
            hf_tokenizers=_pairs(hf_tokenizers),
            problems=problems,
        )
    except StreamBusError as exc:
        raise click.ClickException(str(exc)) from None
    for path, problem in problems:
        click.echo(f"warning: {path}:{problem.line}: {problem.kind}: {problem.message}", err=True)
    if as_json:
        click.echo(orjson.dumps(agg.snapshot(streams=show_streams), option=orjson.OPT_INDENT_2).decode())
    else:
        _render(agg, sys.stdout, show_streams)
    if state_path:
        Path(state_path).write_bytes(orjson.dumps(agg.to_state()))
        click.echo(f"state written to {state_path}", err=True)
    if plot_path:
        from ._plot import plot

        try:
            plot(agg, plot_path, title=", ".join(Path(r).name for r in recordings))
        except StreamBusError as exc:  # matplotlib missing: the message says what to install
            raise click.ClickException(str(exc)) from None
        click.echo(f"plot written to {plot_path}", err=True)
