"""Serving an aiohttp application: the start-up the http sink, the proxy and the mock server share.

::

    server = AppServer("127.0.0.1", 0)            # bound now: server.port is known (0 picked a free one)
    app = make_app(port=server.port)              # e.g. an Origin policy that needs the served port
    await server.start(app, logger=server_logger("myapp.http"))
    print(server.url)                             # http://127.0.0.1:PORT  (http://[::1]:PORT for IPv6)
    ...
    await server.close()                          # or: async with AppServer(...) as server: await server.start(app)

The socket is bound before the application is built, so what the application
needs to know about its address (the port that makes a page same-origin) is
known. :func:`server_logger` keeps aiohttp from logging a traceback for each
malformed request a client sends: one line per client, instead.

aiohttp is bound to asyncio and is not a dependency of the core: install
``streambus[testing]`` (or a plugin that serves HTTP, which depends on it).
"""

from __future__ import annotations

import logging
import socket
from types import TracebackType
from typing import Any

import anyio

try:
    from aiohttp import web
    from aiohttp.http import HttpProcessingError
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "streambus.serving needs aiohttp, which is not installed. Install it with: pip install 'streambus[testing]'"
    ) from exc

__all__ = ["CLOSE_TIMEOUT", "AppServer", "OncePerClient", "server_logger"]

CLOSE_TIMEOUT = 5.0
"""Seconds :meth:`AppServer.close` waits for in-flight requests to be cut and the runner to clean up."""


class OncePerClient:
    """Says whether a client is seen for the first time, so a refusal is logged once per client, not per request.

    ::

        first = OncePerClient()
        if first(request.remote or ""):
            log.warning("refused", client=request.remote, reason=reason)

    Remembers at most *limit* clients (then starts over), so a flood of
    addresses cannot grow it without bound.
    """

    __slots__ = ("limit", "seen")

    def __init__(self, limit: int = 4096) -> None:
        self.limit = limit
        self.seen: set[str] = set()

    def __call__(self, client: str) -> bool:
        """True the first time *client* is given (since the last start-over)."""
        if client in self.seen:
            return False
        if len(self.seen) >= self.limit:
            self.seen.clear()
        self.seen.add(client)
        return True


class AppServer:
    """An aiohttp application served on a socket bound when this is created.

    :param host: the address to listen on (``"::1"`` and other addresses with a
        colon are IPv6). Binding fails here, with the ``OSError``, when the
        port is taken.
    :param port: the port; 0 picks a free one (read it from :attr:`port`).
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.host = host
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
        except OSError:
            sock.close()
            raise
        self._sock: socket.socket | None = sock
        self.port: int = sock.getsockname()[1]
        """The bound port (the free one picked when *port* was 0)."""
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        """The base URL, ``http://host:port`` (IPv6 hosts in brackets)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    async def start(self, app: web.Application, **runner_options: Any) -> str:
        """Serve *app* on the bound socket (asyncio only); return :attr:`url`.

        *runner_options* go to :class:`aiohttp.web.AppRunner` (``logger``,
        ``shutdown_timeout``, ``handler_cancellation``...); the access log is
        off unless ``access_log`` is given. Raises ``RuntimeError`` when
        already started or closed.
        """
        if self._sock is None or self._runner is not None:
            raise RuntimeError("AppServer: already started or closed; create another one")
        runner_options.setdefault("access_log", None)
        runner = web.AppRunner(app, **runner_options)
        await runner.setup()
        self._runner = runner
        await web.SockSite(runner, self._sock).start()
        return self.url

    async def close(self) -> None:
        """Stop serving (in-flight responses are cut off) and release the socket; safe to call twice.

        Waits at most :data:`CLOSE_TIMEOUT` seconds for aiohttp's clean-up,
        shielded from cancellation, so a server closed while its task is
        cancelled still releases its port.
        """
        runner, self._runner = self._runner, None
        sock, self._sock = self._sock, None
        try:
            if runner is not None:
                with anyio.CancelScope(shield=True), anyio.move_on_after(CLOSE_TIMEOUT):
                    await runner.cleanup()
        finally:
            if sock is not None:
                sock.close()

    async def __aenter__(self) -> AppServer:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()


class _OnePerClient(logging.Filter):
    """aiohttp logs a traceback for every malformed request (a duplicate ``Host``...): keep one line per client.

    Only :class:`aiohttp.http.HttpProcessingError` (the client's fault) is
    shortened and de-duplicated; any other error keeps its traceback.
    """

    def __init__(self) -> None:
        super().__init__()
        self.first = OncePerClient()

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if not isinstance(exc, HttpProcessingError):
            return True
        client = str(record.args[0]) if isinstance(record.args, tuple) and record.args else ""
        if not self.first(client):
            return False
        record.msg, record.args = "refused a malformed request from %s: %s", (client, " ".join(str(exc).split()))
        record.exc_info, record.exc_text = None, None
        record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


def server_logger(name: str) -> logging.Logger:
    """The logger to give ``aiohttp.web.AppRunner(logger=...)``: malformed requests make one line per client."""
    logger = logging.getLogger(name)
    if not any(isinstance(f, _OnePerClient) for f in logger.filters):
        logger.addFilter(_OnePerClient())
    return logger
