"""streambus proxy: put the bus in front of an Ollama or OpenAI-compatible server.

Existing clients change one base URL and every answer they stream also flows
through the bus (recorder, stats, WebSocket fan-out, moderation)::

    streambus proxy --upstream http://127.0.0.1:11434 --config configs/proxy-ollama.toml

or, inside an asyncio app, :func:`create_app` (an :class:`aiohttp.web.Application`
for a running :class:`~streambus.Bus`) and :func:`serve_proxy`. aiohttp is
asyncio-only: the proxy raises a clear :class:`RuntimeError` under trio.
See ``docs/proxy.md``.
"""

from ._access import TOKEN_HEADER
from ._proxy import CONTENT_FILTER, Proxy, ProxyError, create_app, parse_tags, parse_upstream
from ._redact import REDACTED
from ._server import check_public_bind, proxy_command, serve_proxy

__all__ = [
    "CONTENT_FILTER",
    "REDACTED",
    "TOKEN_HEADER",
    "Proxy",
    "ProxyError",
    "check_public_bind",
    "create_app",
    "parse_tags",
    "parse_upstream",
    "proxy_command",
    "serve_proxy",
]
