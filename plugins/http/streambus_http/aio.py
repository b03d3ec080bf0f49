"""aiohttp building blocks: serve bus streams from an ``aiohttp.web`` application.

::

    from streambus_http.aio import stream_response

    async def events(request: web.Request) -> web.StreamResponse:
        return await stream_response(request, hub, "sse", stream=request.match_info["id"])

or mount every route at once with :func:`add_routes`. aiohttp is bound to
asyncio: these helpers raise ``RuntimeError`` under trio. A client that
disconnects ends the response cleanly (at the latest one idle tick later).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

import sniffio
import structlog
from aiohttp import web
from aiohttp.http import HttpProcessingError
from aiohttp.typedefs import Middleware

from streambus import Filter
from streambus.access import OriginPolicy
from streambus.tokens import OPERATOR, Authenticator, OutOfScope, Scope, TokenError, bearer_credential

from ._errors import HttpStreamError
from ._formats import FORMATS, Encoder, FormatName, error_body, make_encoder
from ._hub import StreamHub
from ._serve import UNKNOWN_STREAM_TIMEOUT, body, open_stream

__all__ = ["add_routes", "filter_from_query", "origin_guard", "server_logger", "stream_response"]

log = structlog.get_logger("streambus.http")

_Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
_CorsHandler = Callable[[web.Request, dict[str, str], Scope], Awaitable[web.StreamResponse]]


def _require_asyncio() -> None:
    try:
        library = sniffio.current_async_library()
    except sniffio.AsyncLibraryNotFoundError:
        library = "none"
    if library != "asyncio":
        raise RuntimeError(
            f"streambus_http's aiohttp server needs asyncio (aiohttp is asyncio-bound), but runs under {library}; "
            "use the ASGI building blocks (streambus_http.asgi) under trio"
        )


# Remote addresses already logged for a refusal: a client hammering the server gets one line.
_LOGGED_LIMIT = 4096
# With a static token only, the answer stays what it always was.
_STATIC_401 = "missing or wrong bearer token"


class _OnePerClient(logging.Filter):
    """aiohttp logs a traceback for every malformed request (a duplicate ``Host``...): keep one line per client.

    Only :class:`aiohttp.http.HttpProcessingError` (the client's fault) is
    shortened and de-duplicated; any other error keeps its traceback.
    """

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if not isinstance(exc, HttpProcessingError):
            return True
        client = str(record.args[0]) if isinstance(record.args, tuple) and record.args else ""
        if client in self.seen:
            return False
        if len(self.seen) >= _LOGGED_LIMIT:
            self.seen.clear()
        self.seen.add(client)
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


def origin_guard(policy: OriginPolicy) -> Middleware:
    """An aiohttp middleware applying *policy* (:class:`streambus.access.OriginPolicy`) to every request.

    Duplicate ``Host``/``Origin``/``Authorization`` headers get 400; a ``Host``
    that is not one of the server's names (DNS rebinding) or an ``Origin``
    the policy does not allow gets 403, with a one-line reason, before any
    handler runs. Each client address is logged once. Use it first in the
    application's middlewares::

        app = web.Application(middlewares=[origin_guard(OriginPolicy(bind_host="127.0.0.1", port=8090))])
    """
    logged: set[str] = set()

    @web.middleware
    async def guard(request: web.Request, handler: _Handler) -> web.StreamResponse:
        headers = request.headers
        refusal = policy.check(
            hosts=headers.getall("Host", []),
            origins=headers.getall("Origin", []),
            authorizations=len(headers.getall("Authorization", [])),
        )
        if refusal is None:
            return await handler(request)
        client = request.remote or ""
        if client not in logged:
            if len(logged) >= _LOGGED_LIMIT:
                logged.clear()
            logged.add(client)
            log.warning("http.refused", client=client, status=refusal.status, reason=refusal.reason)
        return web.Response(status=refusal.status, text=refusal.reason + "\n")

    return guard


def _client_gone(request: web.Request) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


def _error_response(exc: HttpStreamError, encoder: Encoder | str) -> web.Response:
    if exc.status == 204:
        return web.Response(status=204)
    content_type, data = error_body(encoder, exc.status, exc.message)
    return web.Response(status=exc.status, body=data, headers={"Content-Type": content_type})


async def stream_response(
    request: web.Request,
    hub: StreamHub,
    format: FormatName | str = "sse",
    *,
    stream: str | None = None,
    filter: Filter | None = None,
    resume: str | None = None,
    start_timeout: float = 30.0,
    unknown_stream_timeout: float = UNKNOWN_STREAM_TIMEOUT,
    keepalive: float = 15.0,
    tick: float = 1.0,
    write_interval: float = 0.005,
    headers: Mapping[str, str] | None = None,
    scope: Scope = OPERATOR,
    **format_options: Any,
) -> web.StreamResponse:
    """Stream one bus stream (or a filter over many) in *format* as the answer to *request*.

    Reads ``Last-Event-ID`` (or the ``last_event_id`` query parameter) unless
    *resume* is given. Answers 404/400/409/204 with a plain text reason
    before any body when the request cannot be served (a *stream* id the hub
    does not know after *unknown_stream_timeout* seconds, no stream matching
    *filter* after *start_timeout* seconds). *write_interval* is the
    least time between two writes (tokens arriving meanwhile share one write).
    *scope* is what the request's token covers: streams outside it get 403,
    a filter is narrowed to it, and the response ends when the token
    expires (the client reconnects with a new token and ``Last-Event-ID``).
    Returns the finished response (aiohttp handlers return it as is).
    """
    _require_asyncio()
    encoder = make_encoder(format, **format_options)
    if resume is None:
        resume = request.headers.get("Last-Event-ID") or request.query.get("last_event_id") or None
    try:
        opened = await open_stream(
            hub,
            encoder,
            stream=stream,
            filter=filter,
            resume=resume,
            start_timeout=start_timeout,
            unknown_stream_timeout=unknown_stream_timeout,
            scope=scope,
        )
    except HttpStreamError as exc:
        return _error_response(exc, encoder)
    response = web.StreamResponse(status=200, headers={**encoder.headers, **(headers or {})})
    response.content_type = encoder.media_type.split(";")[0]
    if "charset=" in encoder.media_type:
        response.charset = encoder.media_type.split("charset=")[1]
    expires = scope.expires
    try:
        await response.prepare(request)
        async for chunk in body(opened, keepalive=keepalive, tick=tick, write_interval=write_interval):
            if chunk:
                await response.write(chunk)
            elif _client_gone(request):
                log.debug("http.client_gone", stream=stream)
                return response
            if expires is not None and time.time() > expires:
                # The token was checked at the request; its end ends what it opened.
                log.info("http.token_expired", stream=stream)
                break
        await response.write_eof()
    except OSError:
        log.debug("http.client_gone", stream=stream)
    return response


def filter_from_query(query: Mapping[str, str], multi: Callable[[str], list[str]] | None = None) -> Filter:
    """Build a :class:`~streambus.Filter` from query parameters.

    ``stream``, ``model`` and ``provider`` may repeat; ``meta.<key>=<value>``
    requires a tag (repeat it to accept several values).
    """
    getall = multi or (lambda key: [query[key]] if key in query else [])
    meta: dict[str, Any] = {}
    for key in query:
        if key.startswith("meta."):
            values = getall(key)
            meta[key[5:]] = values[0] if len(values) == 1 else values
    return Filter.of(
        streams=getall("stream") or None,
        models=getall("model") or None,
        providers=getall("provider") or None,
        meta=meta or None,
    )


def add_routes(
    app: web.Application,
    hub: StreamHub,
    *,
    prefix: str = "",
    token: str | None = None,
    auth: Authenticator | None = None,
    cors_origins: Sequence[str] = (),
    chat_meta_key: str = "chat",
    start_timeout: float = 30.0,
    unknown_stream_timeout: float = UNKNOWN_STREAM_TIMEOUT,
    keepalive: float = 15.0,
    retry_ms: int = 3000,
    write_interval: float = 0.005,
) -> None:
    """Mount the standard routes of the ``http`` sink on *app*.

    ============================================  ==============================================
    ``GET  {prefix}/streams``                     JSON list of the streams in the history
    ``GET  {prefix}/streams/{id}/{format}``       one stream: ``sse``, ``text``, ``ndjson``, ``ui``, ``openai``
    ``GET  {prefix}/events/{format}?model=...``   a filter (``stream``, ``model``, ``provider``, ``meta.<k>``)
    ``POST {prefix}/v1/chat/completions``         OpenAI clients: ``stream_id`` in the body, else the
                                                  live or next stream of ``model`` (``*`` for any)
    ``POST {prefix}/api/chat``                    AI SDK ``useChat``: the live or next stream whose
                                                  ``meta[chat_meta_key]`` is the chat ``id``
    ``GET  {prefix}/api/chat/{id}/stream``        AI SDK resume: that chat's live stream, or 204
    ============================================  ==============================================

    With *token*, every route needs ``Authorization: Bearer <token>`` (or
    ``?token=`` for ``EventSource``), compared in constant time. *auth*
    (:class:`streambus.tokens.Authenticator`) accepts static and scoped
    tokens instead: a request without an acceptable one gets 401 with the
    reason, and one outside its token's scope 403; every listing and filter
    is narrowed to the scope.
    *cors_origins* lists origins allowed to read from a browser (``*`` for any).
    Host and Origin are checked by :func:`origin_guard`, which the ``http``
    sink installs; an application mounting these routes installs it too.
    """
    if token is not None and auth is not None:
        raise TypeError("pass token or auth, not both (Authenticator(static=[token], ...) holds both)")
    authenticator = auth if auth is not None else Authenticator([token] if token else ())
    origins = set(cors_origins)
    logged: set[str] = set()

    def guard(handler: _CorsHandler, fmt: str = "text") -> _Handler:
        async def wrapped(request: web.Request) -> web.StreamResponse:
            cors = _cors_headers(request, origins)
            if request.method == "OPTIONS":
                return web.Response(status=204, headers=cors)
            try:
                scope = authenticator.authenticate(
                    bearer_credential(request.headers.get("Authorization"), request.query.get("token"))
                    if authenticator.required
                    else None
                )
            except TokenError as exc:
                # The reason is one of a few fixed sentences: never the token or the key.
                client = request.remote or ""
                if client not in logged:
                    if len(logged) >= _LOGGED_LIMIT:
                        logged.clear()
                    logged.add(client)
                    log.warning("http.unauthorized", client=client, reason=exc.reason)
                content_type, data = error_body(fmt, 401, exc.reason if authenticator.verifier else _STATIC_401)
                headers = {**cors, "Content-Type": content_type, "WWW-Authenticate": 'Bearer error="invalid_token"'}
                return web.Response(status=401, body=data, headers=headers)
            return await handler(request, cors, scope)

        return wrapped

    def forbidden(exc: OutOfScope, cors: dict[str, str], fmt: str = "text") -> web.Response:
        content_type, data = error_body(fmt, 403, exc.message)
        return web.Response(status=403, body=data, headers={**cors, "Content-Type": content_type})

    common: dict[str, Any] = {
        "start_timeout": start_timeout,
        "unknown_stream_timeout": unknown_stream_timeout,
        "keepalive": keepalive,
        "write_interval": write_interval,
    }

    def options_for(fmt: str, cors: dict[str, str], scope: Scope) -> dict[str, Any]:
        opts: dict[str, Any] = dict(common, headers=cors, scope=scope)
        if fmt == "sse":
            opts["retry_ms"] = retry_ms
        return opts

    async def list_streams(request: web.Request, cors: dict[str, str], scope: Scope) -> web.StreamResponse:
        items = [
            {
                "stream": s.stream,
                "model": s.model,
                "provider": s.provider,
                "meta": s.meta,
                "live": not hub.ended(s.stream),
            }
            for s in hub.streams()
            if scope.may_read(s)
        ]
        return web.json_response({"streams": items}, headers=cors)

    def check_format(fmt: str) -> None:
        if fmt not in FORMATS:
            raise web.HTTPNotFound(text=f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}\n")

    async def one_stream(request: web.Request, cors: dict[str, str], scope: Scope) -> web.StreamResponse:
        fmt = request.match_info["format"]
        check_format(fmt)
        return await stream_response(
            request, hub, fmt, stream=request.match_info["stream"], **options_for(fmt, cors, scope)
        )

    async def filtered(request: web.Request, cors: dict[str, str], scope: Scope) -> web.StreamResponse:
        fmt = request.match_info["format"]
        check_format(fmt)
        flt = filter_from_query(request.query, lambda key: request.query.getall(key, []))
        return await stream_response(request, hub, fmt, filter=flt, **options_for(fmt, cors, scope))

    async def json_body(request: web.Request) -> dict[str, Any]:
        try:
            data = await request.json()
        except ValueError as exc:
            raise web.HTTPBadRequest(text=f"request body is not JSON: {exc}\n") from None
        if not isinstance(data, dict):
            raise web.HTTPBadRequest(text="request body must be a JSON object\n")
        return data

    async def chat_completions(request: web.Request, cors: dict[str, str], scope: Scope) -> web.StreamResponse:
        def refuse(message: str) -> web.Response:
            # OpenAI's error object, so OpenAI clients raise with the message.
            content_type, data = error_body("openai", 400, message)
            return web.Response(status=400, body=data, headers={**cors, "Content-Type": content_type})

        try:
            data = await json_body(request)
        except web.HTTPBadRequest as exc:
            return refuse((exc.text or "").strip())
        if data.get("stream") is not True:
            return refuse('only streamed completions are served: send "stream": true')
        options = data.get("stream_options") or {}
        include_usage = bool(options.get("include_usage")) if isinstance(options, dict) else False
        model = data.get("model")
        stream_id = data.get("stream_id")
        flt = Filter.of(models=model) if isinstance(model, str) and model not in ("", "*") else Filter()
        return await stream_response(
            request,
            hub,
            "openai",
            stream=stream_id if isinstance(stream_id, str) else None,
            filter=flt,
            include_usage=include_usage,
            **options_for("openai", cors, scope),
        )

    async def ui_chat(request: web.Request, cors: dict[str, str], scope: Scope) -> web.StreamResponse:
        data = await json_body(request)
        chat = data.get("id")
        if not isinstance(chat, str) or not chat:
            raise web.HTTPBadRequest(text='the body needs the chat "id" (useChat sends it)\n')
        return await stream_response(
            request, hub, "ui", filter=Filter.of(meta={chat_meta_key: chat}), **options_for("ui", cors, scope)
        )

    async def ui_resume(request: web.Request, cors: dict[str, str], scope: Scope) -> web.StreamResponse:
        try:
            flt = scope.narrow(Filter.of(meta={chat_meta_key: request.match_info["chat"]}))
        except OutOfScope as exc:
            return forbidden(exc, cors)
        found = hub.pick(flt)
        if found is None:
            return web.Response(status=204, headers=cors)
        return await stream_response(request, hub, "ui", stream=found, **options_for("ui", cors, scope))

    routes = [
        ("GET", "/streams", list_streams),
        ("GET", "/streams/{stream}/{format}", one_stream),
        ("GET", "/events/{format}", filtered),
        ("POST", "/v1/chat/completions", chat_completions),
        ("POST", "/api/chat", ui_chat),
        ("GET", "/api/chat/{chat}/stream", ui_resume),
    ]
    for method, path, handler in routes:
        wrapped = guard(handler, "openai" if handler is chat_completions else "text")
        app.router.add_route(method, prefix + path, wrapped)
        if origins:
            app.router.add_route("OPTIONS", prefix + path, wrapped)


def _cors_headers(request: web.Request, origins: set[str]) -> dict[str, str]:
    origin = request.headers.get("Origin")
    if not origin or not origins or ("*" not in origins and origin not in origins):
        return {}
    return {
        "Access-Control-Allow-Origin": "*" if "*" in origins else origin,
        "Access-Control-Allow-Headers": "Authorization, Content-Type, Last-Event-ID",
        "Access-Control-Allow-Methods": "GET, POST, OPTIONS",
        "Access-Control-Expose-Headers": "x-vercel-ai-ui-message-stream",
    }
