"""The ``streambus replay`` and ``streambus serve-mock`` commands.

Registered in the ``streambus.commands`` entry point group (like any plugin
command), so they appear in ``streambus --help``.
"""

from __future__ import annotations

import sys

import anyio
import click

from .builtins.stdout import StdoutSink
from .bus import Bus
from .config import Pipeline, load_config
from .errors import StreamBusError
from .logging import configure_logging
from .recording import RecordingProblem
from .replay import ReplayProducer

__all__ = ["replay_command", "serve_mock_command"]


def _warn_problems(problems: list[RecordingProblem], paths: tuple[str, ...]) -> None:
    where = paths[0] if len(paths) == 1 else "recording"
    for problem in problems:
        if problem.kind == "truncated":
            click.echo(
                f"warning: {where}:{problem.line}: {problem.message}; replaying every complete event before it",
                err=True,
            )
        else:
            click.echo(f"warning: {where}:{problem.line}: skipped: {problem.message}", err=True)


@click.command(name="replay")
@click.argument("files", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--speed", type=float, default=1.0, show_default=True, help="Divide recorded pauses by this.")
@click.option("--burst", is_flag=True, help="As fast as possible, no pauses.")
@click.option("--idle-limit", type=float, default=None, help="Cap every recorded pause at this many seconds.")
@click.option("--stream", "streams", multiple=True, help="Only this recorded stream id (repeatable).")
@click.option("--model", "models", multiple=True, help="Only streams of this model (repeatable).")
@click.option("--provider", "providers", multiple=True, help="Only streams of this provider (repeatable).")
@click.option("--loop", is_flag=True, help="Repeat until interrupted.")
@click.option("--repeat", type=int, default=1, show_default=True, help="Play the recording this many times.")
@click.option("--keep-ids", is_flag=True, help="Publish the recorded stream ids instead of new ones.")
@click.option("--lenient", is_flag=True, help="Skip (and report) invalid lines instead of failing.")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["text", "jsonl"]),
    default="text",
    show_default=True,
    help="stdout output: the streamed text, or every event in wire form.",
)
@click.option(
    "--config",
    "config",
    type=click.Path(dir_okay=False),
    default=None,
    help="Feed the sinks (and [bus]/[log] settings) of this pipeline instead of printing.",
)
def replay_command(
    files: tuple[str, ...],
    speed: float,
    burst: bool,
    idle_limit: float | None,
    streams: tuple[str, ...],
    models: tuple[str, ...],
    providers: tuple[str, ...],
    loop: bool,
    repeat: int,
    keep_ids: bool,
    lenient: bool,
    fmt: str,
    config: str | None,
) -> None:
    """Replay recorded FILES with their timing, printing the text (or feeding a pipeline's sinks).

    Several FILES (rotated parts) play as one recording. A truncated last
    line (the recorder was killed) is reported and everything before it plays.
    """
    pipeline: Pipeline | None = None
    if config is not None:
        try:
            pipeline = load_config(config)
            pipeline.check()  # the sinks' preflight: an unwritable recorder path fails here, not mid-replay
        except StreamBusError as exc:
            raise click.ClickException(str(exc)) from None
        if pipeline.producers:
            click.echo(f"note: the {len(pipeline.producers)} producer(s) of {config} are not started", err=True)
        configure_logging(pipeline.log.level, pipeline.log.format)
    else:
        # stdout carries the replayed text; logs go to stderr.
        configure_logging("warning")
    try:
        producer = ReplayProducer(
            path=list(files),
            speed=speed,
            burst=burst,
            idle_limit=idle_limit,
            streams=list(streams),
            models=list(models),
            providers=list(providers),
            loop=0 if loop else repeat,
            keep_ids=keep_ids,
            lenient=lenient,
        )
    except StreamBusError as exc:
        raise click.ClickException(str(exc)) from None
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    _warn_problems(producer.problems, files)
    if not producer.plans:
        click.echo("warning: no recorded stream matches", err=True)

    async def main() -> None:
        async with pipeline.make_bus() if pipeline is not None else Bus() as running:
            if pipeline is not None:
                pipeline.attach(running)
            else:
                out = StdoutSink(StdoutSink.Options(format="jsonl" if fmt == "jsonl" else "text"))
                running.add_sink(out, name="stdout")
            running.start_producer(producer, name="replay")

    try:
        anyio.run(main)
    except StreamBusError as exc:
        raise click.ClickException(str(exc)) from None
    except KeyboardInterrupt:
        sys.exit(130)


@click.command(name="serve-mock")
@click.argument("recordings", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", type=int, default=11434, show_default=True, help="Port (0 picks a free one).")
@click.option("--speed", type=float, default=1.0, show_default=True, help="Divide recorded pauses by this.")
@click.option("--burst", is_flag=True, help="Send each answer at once, no pauses.")
@click.option("--idle-limit", type=float, default=None, help="Cap every recorded pause at this many seconds.")
@click.option("--lenient", is_flag=True, help="Skip invalid recording lines instead of failing.")
@click.option(
    "--match",
    type=click.Choice(["normalized", "exact", "model"]),
    default=None,
    help="How a request finds its recorded stream [default: normalized when the recording stores requests, "
    "else model].",
)
def serve_mock_command(
    recordings: tuple[str, ...],
    host: str,
    port: int,
    speed: float,
    burst: bool,
    idle_limit: float | None,
    lenient: bool,
    match: str | None,
) -> None:
    """Serve RECORDINGS over HTTP as an Ollama and OpenAI-compatible model server.

    Point a client at the printed URL (OpenAI clients: URL + "/v1"). Each
    request gets the recorded stream whose recorded request matches it (or,
    for recordings without requests, the next recorded stream of its model),
    with the recorded timing. Stops on Ctrl-C / SIGTERM.
    """
    configure_logging("info")
    try:
        from .mockserver import MockServer
    except ImportError as exc:
        raise click.ClickException(str(exc)) from None
    try:
        server = MockServer(
            list(recordings), speed=speed, burst=burst, idle_limit=idle_limit, lenient=lenient, match=match
        )
    except StreamBusError as exc:
        raise click.ClickException(str(exc)) from None
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None

    import asyncio
    import signal

    async def main() -> None:
        try:
            url = await server.start(host, port)
        except OSError as exc:
            raise click.ClickException(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        models = ", ".join(server.models) or "none"
        click.echo(f"serving {models} on {url} (formats: {', '.join(server.formats)}); Ctrl-C stops", err=True)
        click.echo(url)
        sys.stdout.flush()
        try:
            await stop.wait()
        finally:
            await server.close()

    asyncio.run(main())
