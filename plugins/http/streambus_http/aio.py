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

import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

import orjson
import structlog
from aiohttp import web
from aiohttp.typedefs import Middleware

from streambus import Filter, StartEvent, StopFailed, StopOutcome
from streambus.access import OriginPolicy
from streambus.errors import AsyncioRequired
from streambus.serving import OncePerClient, server_logger
from streambus.tokens import OPERATOR, Authenticator, OutOfScope, Scope, TokenError, bearer_credential

from ._errors import HttpStreamError
from ._formats import FORMATS, Encoder, FormatName, error_body, make_encoder
from ._hub import StreamHub
from ._serve import UNKNOWN_STREAM_TIMEOUT, body, open_stream

__all__ = [
    "MAX_STOP_REASON",
    "StopPermission",
    "add_routes",
    "filter_from_query",
    "origin_guard",
    "server_logger",
    "stop_permission",
    "stream_response",
]

log = structlog.get_logger("streambus.http")

_Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
_CorsHandler = Callable[[web.Request, dict[str, str], Scope], Awaitable[web.StreamResponse]]


def _require_asyncio() -> None:
    AsyncioRequired.check(
        "streambus_http's aiohttp server",
        needs="aiohttp",
        hint="use the ASGI building blocks (streambus_http.asgi) under trio",
    )


MAX_STOP_REASON = 200
"""Longest ``reason`` a stop request may carry, in characters (longer ones get 400)."""
_MAX_STOP_BODY = 4096  # bytes: a JSON object with a reason fits many times over


class StopPermission:
    """Who may stop streams through the http sink: decided by :func:`stop_permission`, in one place.

    *auth* holds the credentials the sink accepts (static and scoped tokens,
    :class:`streambus.tokens.Authenticator`; *token* is the shorthand for one
    static token); *allow_stop* is the sink's ``allow_stop`` option;
    *start_of* finds a stream's ``start`` (``StreamHub.start_of``), on which
    a scoped token's reach is judged.
    """

    __slots__ = ("allow_stop", "auth", "start_of")

    def __init__(
        self,
        *,
        token: str | None = None,
        auth: Authenticator | None = None,
        allow_stop: bool = True,
        start_of: Callable[[str], StartEvent | None] | None = None,
    ) -> None:
        if token is not None and auth is not None:
            raise TypeError("pass token or auth, not both")
        self.auth = auth if auth is not None else Authenticator([token] if token else ())
        self.allow_stop = allow_stop
        self.start_of = start_of

    def scope(self, request: web.Request) -> Scope | TokenError:
        """What the request's credential grants, or the :class:`~streambus.tokens.TokenError` refusing it."""
        if not self.auth.required:
            return OPERATOR
        try:
            return self.auth.authenticate(
                bearer_credential(request.headers.get("Authorization"), request.query.get("token"))
            )
        except TokenError as exc:
            return exc


def stop_permission(permission: StopPermission, request: web.Request, stream: str | None) -> tuple[int, str] | None:
    """May the caller of *request* stop *stream*? ``None`` if so, else the HTTP status and a reason to answer.

    *stream* is ``None`` when a chat stop found no live stream of that chat
    (the caller then learns that only if it may stop).

    - ``allow_stop = false``: nobody may (403);
    - a token is configured: the request must present an acceptable one
      (``Authorization: Bearer``, or ``?token=``): a static token (compared
      in constant time) or a scoped token (401 otherwise, with the reason
      when scoped tokens are accepted);
    - a scoped token needs the stop right (403), and *stream* within its
      scope, judged on the stream's ``start`` (403; an unknown stream too, so
      the answer says nothing about streams outside the scope);
    - otherwise (a loopback sink without a token) any caller that passed the
      Host/Origin guard may.

    This is the one place that decides. The reason never repeats what the
    caller presented.
    """
    if not permission.allow_stop:
        return 403, "stopping streams is disabled on this server (allow_stop = false)"
    scope = permission.scope(request)
    if isinstance(scope, TokenError):
        return 401, scope.reason if permission.auth.verifier is not None else "stopping a stream needs the bearer token"
    if not scope.stop:
        return 403, "this token may not stop streams (it lacks the stop right)"
    if scope.unrestricted or stream is None:
        return None
    start = permission.start_of(stream) if permission.start_of is not None else None
    if start is None or not scope.may_read(start):
        return 403, f"stream {stream[:64]!r} is outside this token's scope"
    return None


# With a static token only, the answer stays what it always was.
_STATIC_401 = "missing or wrong bearer token"


def origin_guard(policy: OriginPolicy) -> Middleware:
    """An aiohttp middleware applying *policy* (:class:`streambus.access.OriginPolicy`) to every request.

    Duplicate ``Host``/``Origin``/``Authorization`` headers get 400; a ``Host``
    that is not one of the server's names (DNS rebinding) or an ``Origin``
    the policy does not allow gets 403, with a one-line reason, before any
    handler runs. Each client address is logged once. Use it first in the
    application's middlewares::

        app = web.Application(middlewares=[origin_guard(OriginPolicy(bind_host="127.0.0.1", port=8090))])
    """
    first_refusal = OncePerClient()

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
        if first_refusal(client):
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
    allow_stop: bool = True,
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
    ``POST {prefix}/streams/{id}/abort``          stop a stream (``{"reason": ...}`` body optional)
    ``POST {prefix}/api/chat/{id}/abort``         AI SDK stop: stop that chat's live stream
    ============================================  ==============================================

    With *token*, every route needs ``Authorization: Bearer <token>`` (or
    ``?token=`` for ``EventSource``), compared in constant time. *auth*
    (:class:`streambus.tokens.Authenticator`) accepts static and scoped
    tokens instead: a request without an acceptable one gets 401 with the
    reason, and one outside its token's scope 403; every listing and filter
    is narrowed to the scope. A stop answers ``{"stream": id, "outcome":
    ...}``: 200 for ``stopped``, ``forwarded`` and ``ended``, 404 for
    ``unknown``, 503 when the stop could not reach the stream's owner,
    401/403 as :func:`stop_permission` decides, 400 for a bad body.
    *allow_stop* = False refuses every stop.
    *cors_origins* lists origins allowed to read from a browser (``*`` for any).
    Host and Origin are checked by :func:`origin_guard`, which the ``http``
    sink installs; an application mounting these routes installs it too.
    """
    if token is not None and auth is not None:
        raise TypeError("pass token or auth, not both (Authenticator(static=[token], ...) holds both)")
    authenticator = auth if auth is not None else Authenticator([token] if token else ())
    origins = set(cors_origins)
    first_unauthorized = OncePerClient()
    permission = StopPermission(auth=authenticator, allow_stop=allow_stop, start_of=hub.start_of)

    def guard(handler: _CorsHandler, fmt: str = "text", *, checks_token: bool = True) -> _Handler:
        async def wrapped(request: web.Request) -> web.StreamResponse:
            cors = _cors_headers(request, origins)
            if request.method == "OPTIONS":
                return web.Response(status=204, headers=cors)
            if not checks_token:
                # A stop is authorized by stop_permission() alone (the token included).
                return await handler(request, cors, OPERATOR)
            try:
                scope = authenticator.authenticate(
                    bearer_credential(request.headers.get("Authorization"), request.query.get("token"))
                    if authenticator.required
                    else None
                )
            except TokenError as exc:
                # The reason is one of a few fixed sentences: never the token or the key.
                client = request.remote or ""
                if first_unauthorized(client):
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

    async def stop_reply(
        request: web.Request, cors: dict[str, str], stream: str | None, chat: str | None
    ) -> web.Response:
        def answer(status: int, **fields: Any) -> web.Response:
            return web.json_response(fields, status=status, headers=cors)

        flt = Filter.of(meta={chat_meta_key: chat}) if chat is not None else None
        if flt is not None:
            scope = permission.scope(request)
            if isinstance(scope, Scope) and not scope.unrestricted:
                # A scoped token's chat stop looks among its own streams only, live or ended.
                try:
                    flt = scope.narrow(flt)
                except OutOfScope:
                    flt = Filter(streams=frozenset())
            stream = hub.pick(flt)
        refused = stop_permission(permission, request, stream)
        if refused is not None:
            return answer(refused[0], error=refused[1])
        # Read only after the permission: a caller who may not stop cannot make us read a body.
        if (request.content_length or 0) > _MAX_STOP_BODY:
            return answer(400, error=f"the body must be at most {_MAX_STOP_BODY} bytes")
        try:
            raw = await request.read()
            data = orjson.loads(raw) if raw.strip() else {}
        except orjson.JSONDecodeError:
            return answer(400, error="the body must be JSON (or empty)")
        if not isinstance(data, dict):
            return answer(400, error="the body must be a JSON object")
        reason = data.get("reason", "")
        if not isinstance(reason, str) or len(reason) > MAX_STOP_REASON:
            return answer(400, error=f"reason: must be a string of at most {MAX_STOP_REASON} characters")
        if stream is None:
            assert flt is not None
            ended = any(flt.matches(start) for start in hub.streams())
            outcome = StopOutcome.ENDED if ended else StopOutcome.UNKNOWN
            return answer(200 if ended else 404, chat=chat, outcome=outcome.value)
        bus = hub.bus
        if bus is None or not bus.running:
            return answer(503, stream=stream, error="the bus is not running")
        try:
            outcome = await bus.stop(stream, reason=reason or "stopped by a client", by="client")
        except StopFailed as exc:
            log.warning("http.stop_failed", stream=stream, error=str(exc))
            return answer(503, stream=stream, error=f"the stop could not reach the stream's owner: {exc}")
        if outcome is StopOutcome.UNKNOWN and hub.ended(stream):
            outcome = StopOutcome.ENDED
        log.info("http.stop", stream=stream, outcome=outcome.value, client=request.remote)
        extra = {"chat": chat} if chat is not None else {}
        return answer(404 if outcome is StopOutcome.UNKNOWN else 200, stream=stream, outcome=outcome.value, **extra)

    async def stop_stream(request: web.Request, cors: dict[str, str], _scope: Scope) -> web.StreamResponse:
        return await stop_reply(request, cors, request.match_info["stream"], None)

    async def stop_chat(request: web.Request, cors: dict[str, str], _scope: Scope) -> web.StreamResponse:
        return await stop_reply(request, cors, None, request.match_info["chat"])

    routes = [
        ("GET", "/streams", list_streams),
        ("GET", "/streams/{stream}/{format}", one_stream),
        ("GET", "/events/{format}", filtered),
        ("POST", "/v1/chat/completions", chat_completions),
        ("POST", "/api/chat", ui_chat),
        ("GET", "/api/chat/{chat}/stream", ui_resume),
        ("POST", "/streams/{stream}/abort", stop_stream),
        ("POST", "/api/chat/{chat}/abort", stop_chat),
    ]
    for method, path, handler in routes:
        stops = handler in (stop_stream, stop_chat)
        # A stop is authorized by stop_permission() alone (the token included), so it is decided in one place.
        wrapped = guard(handler, "openai" if handler is chat_completions else "text", checks_token=not stops)
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
