"""Running the proxy: an async context manager for apps and tests, and the ``streambus proxy`` command."""

from __future__ import annotations

import signal
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import click
import structlog
from aiohttp import web
from yarl import URL

from streambus import Bus
from streambus.config import Pipeline, load_config
from streambus.errors import StreamBusError
from streambus.logging import configure_logging

from ._proxy import ProxyError, create_app

__all__ = ["proxy_command", "serve_proxy"]

log = structlog.get_logger("streambus.proxy")


@asynccontextmanager
async def serve_proxy(
    bus: Bus, upstream: str, *, host: str = "127.0.0.1", port: int = 0, **options: Any
) -> AsyncIterator[str]:
    """Serve the proxy for *bus* on *host*:*port* (0: a free port); yield its base URL.

    ::

        async with Bus() as bus, serve_proxy(bus, "http://127.0.0.1:11434") as url:
            client = ollama.AsyncClient(host=url)        # OpenAI clients: base_url=url + "/v1"

    *options* are those of :class:`~streambus_proxy.Proxy`. In-flight requests
    are cut when the block exits. asyncio only (aiohttp).
    """
    app = create_app(bus, upstream, **options)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    try:
        await web.SockSite(runner, sock).start()
        bound = sock.getsockname()[1]
        url = f"http://[{host}]:{bound}" if family == socket.AF_INET6 else f"http://{host}:{bound}"
        log.info("proxy.listening", url=url, upstream=_shown(upstream))
        yield url
    finally:
        await runner.cleanup()


def _shown(upstream: str) -> str:
    """*upstream* without the credentials a URL may carry (for logs)."""
    try:
        return str(URL(upstream).with_user(None))
    except ValueError:
        return "<invalid URL>"


async def _serve(pipeline: Pipeline | None, upstream: str, host: str, port: int, options: dict[str, Any]) -> None:
    bus = pipeline.make_bus() if pipeline is not None else Bus()
    async with bus:
        if pipeline is not None:
            pipeline.attach(bus)
            for producer in pipeline.producers:
                bus.start_producer(producer)
        async with serve_proxy(bus, upstream, host=host, port=port, **options):
            with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async for signum in signals:
                    log.info("proxy.signal", signal=signal.Signals(signum).name)
                    break
        await bus.shutdown()


@click.command(name="proxy")
@click.option("--upstream", required=True, help="Base URL of the Ollama or OpenAI-compatible server to forward to.")
@click.option(
    "--config",
    "config",
    type=click.Path(exists=True, dir_okay=False),
    help="A pipeline TOML whose sinks (recorder, stats, websocket, moderation...) get every proxied stream.",
)
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=11435, show_default=True, type=click.IntRange(0, 65535), help="Port to listen on.")
@click.option(
    "--moderated/--pass-through",
    default=None,
    help="Force clients onto the processed stream (default: only when the config has a moderation stage).",
)
@click.option(
    "--read-timeout",
    default=300.0,
    show_default=True,
    type=float,
    help="Seconds of upstream silence that end a stream.",
)
@click.option("--connect-timeout", default=10.0, show_default=True, type=float, help="Seconds to connect upstream.")
def proxy_command(
    upstream: str,
    config: str | None,
    host: str,
    port: int,
    moderated: bool | None,
    read_timeout: float,
    connect_timeout: float,
) -> None:
    """Serve the Ollama / OpenAI API on HOST:PORT, forwarding to UPSTREAM and publishing every answer.

    Point existing clients at it by changing their base URL only
    (``OLLAMA_HOST=http://127.0.0.1:11435``, ``base_url="http://127.0.0.1:11435/v1"``).
    """
    pipeline: Pipeline | None = None
    try:
        if config is not None:
            pipeline = load_config(config)
            configure_logging(pipeline.log.level, pipeline.log.format)
        else:
            configure_logging("info")
        options = {"moderated": moderated, "read_timeout": read_timeout, "connect_timeout": connect_timeout}
        anyio.run(_serve, pipeline, upstream, host, port, options)
    except (StreamBusError, ProxyError) as exc:
        raise click.ClickException(str(exc)) from None
    except KeyboardInterrupt:
        pass
