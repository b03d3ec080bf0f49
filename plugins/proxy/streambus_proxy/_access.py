"""Who may use the proxy: the Host/Origin policy, CORS, and the optional client token.

Every request meets :func:`guard` first (an aiohttp middleware):

1. duplicate ``Host``/``Origin``/``Authorization`` headers: 400; a ``Host``
   that is not one of the proxy's names (DNS rebinding) or an ``Origin`` not
   allowed: 403 (:class:`streambus.access.OriginPolicy`). Nothing is forwarded.
2. a CORS preflight (``OPTIONS`` with ``Origin`` and
   ``Access-Control-Request-Method``) from an allowed origin: 204 with the CORS
   headers, answered here (the upstream never sees it).
3. with a client token: the request must carry it, as ``X-Streambus-Token``
   or as ``Authorization: Bearer <token>`` (then that header is the proxy's
   and is not forwarded), compared in constant time; otherwise 401.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable

import structlog
from aiohttp import web

from streambus.access import OriginPolicy, Refusal
from streambus.serving import OncePerClient

__all__ = ["TOKEN_HEADER", "Access"]

log = structlog.get_logger("streambus.proxy")

TOKEN_HEADER = "X-Streambus-Token"
"""The request header that carries the proxy's client token (never forwarded)."""

_Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Access:
    """The proxy's access rules: an :class:`OriginPolicy` and an optional client *token*."""

    def __init__(self, policy: OriginPolicy, token: str | None) -> None:
        if token is not None and not token.strip():
            raise ValueError("token: must not be empty (leave it out to serve without a token)")
        self.policy = policy
        self.token = token.strip().encode() if token is not None else None
        self._first_refusal = OncePerClient()

    def _refuse(self, request: web.Request, refusal: Refusal) -> web.Response:
        client = request.remote or ""
        if self._first_refusal(client):
            log.warning("proxy.refused", client=client, status=refusal.status, reason=refusal.reason)
        return web.json_response({"error": refusal.reason}, status=refusal.status)

    def _authorized(self, request: web.Request) -> web.Request | None:
        """The request to serve when it carries the token (without the token's ``Authorization``), else ``None``."""
        assert self.token is not None
        given = request.headers.get(TOKEN_HEADER)
        if given is not None:
            return request if hmac.compare_digest(given.strip().encode(), self.token) else None
        scheme, _, value = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(value.strip().encode(), self.token):
            # The Bearer was the proxy's: the upstream gets the --upstream credentials, if any, instead.
            headers = request.headers.copy()
            del headers["Authorization"]
            return request.clone(headers=headers)
        return None

    @web.middleware
    async def guard(self, request: web.Request, handler: _Handler) -> web.StreamResponse:
        """The middleware: refuse, answer a preflight, check the token, or pass the request on."""
        headers = request.headers
        refusal = self.policy.check(
            hosts=headers.getall("Host", []),
            origins=headers.getall("Origin", []),
            authorizations=len(headers.getall("Authorization", [])),
        )
        if refusal is not None:
            return self._refuse(request, refusal)
        origin = headers.get("Origin")
        if request.method == "OPTIONS" and origin is not None and "Access-Control-Request-Method" in headers:
            preflight = {
                "Access-Control-Allow-Methods": "GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS",
                "Access-Control-Max-Age": "600",
            }
            wanted = headers.get("Access-Control-Request-Headers")
            if wanted:
                # The origin is trusted (allow-listed): let it send the headers its SDK needs.
                preflight["Access-Control-Allow-Headers"] = wanted
            return web.Response(status=204, headers=preflight)
        if self.token is not None:
            authorized = self._authorized(request)
            if authorized is None:
                return self._refuse(request, Refusal(401, f"missing or wrong proxy token ({TOKEN_HEADER} or Bearer)"))
            request = authorized
        return await handler(request)

    async def add_cors(self, request: web.Request, response: web.StreamResponse) -> None:
        """``on_response_prepare``: let an allowed page read the answer (the guard refused every other)."""
        origin = request.headers.get("Origin")
        if origin is not None and self.policy.origin_allowed(origin):
            response.headers["Access-Control-Allow-Origin"] = origin
            response.headers["Access-Control-Expose-Headers"] = "X-Streambus-Stream, X-Request-Id"
            response.headers.add("Vary", "Origin")
