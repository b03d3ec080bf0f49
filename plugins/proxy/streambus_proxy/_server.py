"""Running the proxy: an async context manager for apps and tests, and the ``streambus proxy`` command."""

from __future__ import annotations

import os
import signal
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import anyio
import click
import structlog
from yarl import URL

from streambus import Bus
from streambus.access import OriginPolicy, is_loopback_host
from streambus.config import Pipeline, load_config
from streambus.errors import StreamBusError
from streambus.logging import configure_logging
from streambus.serving import AppServer, server_logger

from ._proxy import Proxy, ProxyError, parse_upstream, require_asyncio

__all__ = ["check_public_bind", "proxy_command", "serve_proxy"]

log = structlog.get_logger("streambus.proxy")


def check_public_bind(host: str, *, token: str | None, allow_public: bool) -> None:
    """Refuse (:class:`ProxyError`) to listen on a non-loopback *host* without a client token, unless *allow_public*."""
    if is_loopback_host(host) or token is not None or allow_public:
        return
    raise ProxyError(
        f"host: listening on {host or 'every interface'!r} without a client token would let anyone who reaches it "
        "use the upstream (and the credentials of --upstream) and read every stream; "
        "set a token (--token-env NAME) or pass --allow-public"
    )


@asynccontextmanager
async def serve_proxy(
    bus: Bus,
    upstream: str,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    token: str | None = None,
    allow_public: bool = False,
    **options: Any,
) -> AsyncIterator[str]:
    """Serve the proxy for *bus* on *host*:*port* (0: a free port); yield its base URL.

    ::

        async with Bus() as bus, serve_proxy(bus, "http://127.0.0.1:11434") as url:
            client = ollama.AsyncClient(host=url)        # OpenAI clients: base_url=url + "/v1"

    *options* are those of :class:`~streambus_proxy.Proxy` (``allowed_hosts``,
    ``allowed_origins``, timeouts...). A *host* that is not a loopback address
    needs a client *token*, or *allow_public* (then anyone who reaches the
    port may use it): :class:`ProxyError` otherwise. In-flight requests are
    cut when the block exits. asyncio only (aiohttp).
    """
    require_asyncio()
    check_public_bind(host, token=token, allow_public=allow_public)
    proxy = Proxy(bus, upstream, token=token, bind_host=host, **options)
    async with AppServer(host, port) as server:
        # Same-origin is judged against the port actually served (port 0 picks one).
        proxy.access.policy = proxy.access.policy.with_port(server.port)
        url = await server.start(proxy.app(), shutdown_timeout=1.0, logger=server_logger("streambus.proxy.http"))
        log.info("proxy.listening", url=url, upstream=_shown(upstream))
        yield url


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


def _check_upstream(ctx: click.Context, param: click.Parameter, value: str) -> str:
    try:
        parse_upstream(value)
    except ProxyError as exc:
        raise click.BadParameter(str(exc).removeprefix("upstream: "), ctx, param) from None
    return value


def _check_origins(ctx: click.Context, param: click.Parameter, value: Sequence[str]) -> Sequence[str]:
    try:
        OriginPolicy(bind_host="127.0.0.1", allowed_origins=value)
    except ValueError as exc:
        raise click.BadParameter(str(exc).removeprefix("allowed_origins: "), ctx, param) from None
    return value


def _read_token(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    if value is None:
        return None
    token = os.environ.get(value, "").strip()
    if not token:
        raise click.BadParameter(f"environment variable {value} is not set or empty", ctx, param)
    return token


@click.command(name="proxy")
@click.option(
    "--upstream",
    required=True,
    callback=_check_upstream,
    help="Base URL of the Ollama or OpenAI-compatible server to forward to.",
)
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
@click.option(
    "--retries",
    default=2,
    show_default=True,
    type=click.IntRange(min=0),
    help="Times a 429 or 503 from the upstream is tried again (jitter, or its Retry-After) before the client sees it.",
)
@click.option(
    "--retry-max-wait",
    default=10.0,
    show_default=True,
    type=click.FloatRange(min=0, max=3600),
    help="The longest wait for a retry; an upstream asking for more has its refusal passed on.",
)
@click.option(
    "--token-env",
    "token",
    metavar="NAME",
    callback=_read_token,
    help="Environment variable holding the client token every request must carry "
    "(X-Streambus-Token header, or Authorization: Bearer).",
)
@click.option(
    "--allow-public",
    is_flag=True,
    help="Allow listening on a non-loopback --host without --token-env (anyone who reaches it may use it).",
)
@click.option(
    "--allowed-host",
    "allowed_hosts",
    multiple=True,
    metavar="NAME",
    help="A further name clients reach the proxy by (repeatable; '*' for any). Other Host headers get 403.",
)
@click.option(
    "--allowed-origin",
    "allowed_origins",
    multiple=True,
    metavar="ORIGIN",
    callback=_check_origins,
    help="A web origin (https://app.example.com) whose pages may call the proxy (repeatable; '*' for any). "
    "Other browser requests get 403.",
)
def proxy_command(
    upstream: str,
    config: str | None,
    host: str,
    port: int,
    moderated: bool | None,
    read_timeout: float,
    connect_timeout: float,
    retries: int,
    retry_max_wait: float,
    token: str | None,
    allow_public: bool,
    allowed_hosts: tuple[str, ...],
    allowed_origins: tuple[str, ...],
) -> None:
    """Serve the Ollama / OpenAI API on HOST:PORT, forwarding to UPSTREAM and publishing every answer.

    Point existing clients at it by changing their base URL only
    (``OLLAMA_HOST=http://127.0.0.1:11435``, ``base_url="http://127.0.0.1:11435/v1"``).
    """
    try:
        check_public_bind(host, token=token, allow_public=allow_public)
    except ProxyError as exc:
        raise click.UsageError(str(exc)) from None
    pipeline: Pipeline | None = None
    try:
        if config is not None:
            pipeline = load_config(config)
            configure_logging(pipeline.log.level, pipeline.log.format)
        else:
            configure_logging("info")
        options = {
            "moderated": moderated,
            "read_timeout": read_timeout,
            "connect_timeout": connect_timeout,
            "retries": retries,
            "retry_max_wait": retry_max_wait,
            "token": token,
            "allow_public": allow_public,
            "allowed_hosts": allowed_hosts,
            "allowed_origins": allowed_origins,
        }
        anyio.run(_serve, pipeline, upstream, host, port, options)
    except StreamBusError as exc:  # ProxyError is one
        raise click.ClickException(str(exc)) from None
    except KeyboardInterrupt:
        pass
