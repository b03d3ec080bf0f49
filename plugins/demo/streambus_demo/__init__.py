"""``streambus demo``: the whole of streambus on one machine, with nothing to install or run.

Run ``streambus demo`` (or ``make demo`` from a fresh clone) and open the
printed URL; ``--duration N`` bounds the run, ``--ollama URL`` /
``--openai URL --model M`` point it at real servers instead of the bundled
recording.
"""

from __future__ import annotations

import errno
import sys

import anyio
import click
from streambus_websocket import BroadcasterError

from streambus import SinkFailed, StreamBusError
from streambus.logging import configure_logging

from ._demo import DemoError, DemoOptions, LiveView, run_demo

__all__ = ["DemoError", "DemoOptions", "LiveView", "demo_command", "run_demo"]


@click.command(name="demo")
@click.option("--duration", type=float, default=None, help="Stop after this many seconds (default: until Ctrl-C).")
@click.option("--rounds", type=click.IntRange(min=1), default=None, help="Stop after this many rounds of requests.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Where the live page and WebSocket listen.")
@click.option("--port", type=click.IntRange(0, 65535), default=8765, show_default=True, help="0 picks a free port.")
@click.option(
    "--record-dir",
    type=click.Path(file_okay=False),
    default=None,
    help="Where recordings go (default: a new temporary directory).",
)
@click.option(
    "--speed",
    type=click.FloatRange(min=0, min_open=True),
    default=1.0,
    show_default=True,
    help="Replay speed of the bundled recording.",
)
@click.option("--ollama", "ollama_url", default=None, help="Stream from this Ollama server instead of the recording.")
@click.option(
    "--openai", "openai_url", default=None, help="Stream from this OpenAI-compatible base URL (with --model)."
)
@click.option("--model", default=None, help="Model to ask the real server(s) for.")
@click.option("--live/--no-live", default=None, help="Live terminal table (default: when stdout is a terminal).")
@click.option(
    "--log-level", type=click.Choice(["debug", "info", "warning", "error"]), default="error", show_default=True
)
def demo_command(
    duration: float | None,
    rounds: int | None,
    host: str,
    port: int,
    record_dir: str | None,
    speed: float,
    ollama_url: str | None,
    openai_url: str | None,
    model: str | None,
    live: bool | None,
    log_level: str,
) -> None:
    """Run the demo: mock model server -> ollama/openai producers -> moderation, stats, recorder, live page."""
    if openai_url and not model:
        raise click.UsageError("--openai needs --model (the model to ask that server for)")
    configure_logging(log_level)
    options = DemoOptions(
        duration=duration,
        rounds=rounds,
        host=host,
        port=port,
        record_dir=record_dir,
        speed=speed,
        ollama_url=ollama_url,
        openai_url=openai_url,
        model=model,
        live=live,
    )
    try:
        anyio.run(run_demo, options)
    except (StreamBusError, OSError) as exc:  # DemoError is a StreamBusError
        click.echo(f"error: {_explain(exc, host, port)}", err=True)
        sys.exit(1)


def _explain(exc: BaseException, host: str, port: int) -> str:
    """What to tell the person at the terminal: the failing part's own error, with the demo's fix."""
    cause = exc.__cause__ if isinstance(exc, SinkFailed) and exc.__cause__ is not None else exc
    if isinstance(cause, BroadcasterError):
        reason = cause.__cause__
        if isinstance(reason, OSError) and reason.errno == errno.EADDRINUSE:
            return f"port {port} on {host} is in use: try --port 0 (a free port) or another --port"
    return str(cause)
