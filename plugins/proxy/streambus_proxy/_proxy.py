"""The proxy: an aiohttp app that forwards to an upstream model server and publishes what it answers.

Model routes are the ``routes`` of every installed wire format that can read
its answers (:class:`~streambus.formats.AnswerParsing`): Ollama's
``/api/chat`` and ``/api/generate``, OpenAI's ``/v1/chat/completions``,
``/v1/completions`` and ``/v1/responses``, Anthropic's ``/v1/messages``,
Gemini's ``/v1beta/models/{model}:streamGenerateContent`` (a ``{name}`` in a
route is a path segment; ``{model}`` names the model), and those of any
provider plugin installed later. They
are forwarded and their answers published on the bus; every other path is
passed through untouched. The proxy knows no provider: it publishes the
provider-neutral pieces of :mod:`streambus.formats`.

Without an interposed stage on the bus, the client gets the upstream's bytes
as they arrive (one ``write`` per read, nothing held back) and a *copy* is
parsed by the format's sans-I/O parser into a bus stream. With a stage
(moderation), the client gets what the stage republishes, re-encoded by the
format's :class:`~streambus.formats.StreamEncoder`.
"""

from __future__ import annotations

import base64
import contextlib
import re
import uuid
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any, Protocol

import aiohttp
import anyio
import msgspec
import orjson
import structlog
from aiohttp import web
from yarl import URL

from streambus import Bus, Filter, StreamBusError, StreamWriter, Subscription, SubscriptionClosed, WireError
from streambus.access import OriginPolicy
from streambus.errors import AsyncioRequired
from streambus.events import AbortEvent, Channel, EndEvent, Event, is_terminal
from streambus.formats import (
    AnswerFilter,
    AnswerParsing,
    Credentials,
    EndPiece,
    ErrorPiece,
    Piece,
    TextPiece,
    WireFormat,
    installed_formats,
    load_format,
)
from streambus.producing import Failure, RetryPolicy, retry_after, status_failure, stream_error_failure
from streambus.writer import new_stream_id

from ._access import TOKEN_HEADER, Access
from ._redact import CREDENTIAL_HEADERS, Redactor, StreamRedactor, secrets_of

__all__ = ["CONTENT_FILTER", "Proxy", "ProxyError", "create_app", "parse_tags", "parse_upstream", "require_asyncio"]

log = structlog.get_logger("streambus.proxy")

CONTENT_FILTER = "content_filter"
"""The ``finish_reason`` (OpenAI) / ``done_reason`` (Ollama) of a stream moderation aborted."""

TAGS_HEADER = "X-Streambus-Tags"
STREAM_HEADER = "X-Streambus-Stream"
REQUEST_ID_HEADER = "X-Request-Id"

# RFC 9110 7.6.1 hop-by-hop headers, plus the ones aiohttp recomputes for us.
_HOP = frozenset(
    h.lower()
    for h in (
        "Connection",
        "Keep-Alive",
        "Proxy-Authenticate",
        "Proxy-Authorization",
        "TE",
        "Trailer",
        "Transfer-Encoding",
        "Upgrade",
        "Host",
        "Content-Length",
    )
)
_NOT_UPSTREAM = _HOP | {TAGS_HEADER.lower(), TOKEN_HEADER.lower()}
# Response headers that stop being true once the proxy re-frames the body.
_NOT_DOWNSTREAM = _HOP | {"date", "server"}


class ProxyError(StreamBusError):
    """A bad proxy setting (upstream URL, tags header, formats); the message names what was wrong."""


class _Format(WireFormat, AnswerParsing, Protocol):
    """A wire format the proxy can serve: it encodes events and parses answers."""


def parse_tags(value: str) -> dict[str, Any]:
    """Parse an ``X-Streambus-Tags`` header: ``key=value, key2=value2`` or a JSON object.

    Raises :class:`ProxyError` naming the problem (the proxy answers 400 with it).
    """
    value = value.strip()
    if not value:
        return {}
    if value.startswith("{"):
        try:
            tags = orjson.loads(value)
        except orjson.JSONDecodeError as exc:
            raise ProxyError(f"{TAGS_HEADER}: not valid JSON: {exc}") from None
        if not isinstance(tags, dict):
            raise ProxyError(f"{TAGS_HEADER}: must be a JSON object")
        return tags
    out: dict[str, Any] = {}
    for part in value.split(","):
        part = part.strip()
        if not part:
            continue
        key, sep, val = part.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ProxyError(f"{TAGS_HEADER}: expected key=value pairs separated by commas, got {part!r}")
        out[key] = val.strip()
    return out


def _masked(value: str) -> str:
    """*value* with the password of a ``user:password@`` part replaced, for error messages."""
    scheme, sep, rest = value.partition("://")
    if not sep:
        scheme, rest = "", value
    userinfo, at, host = rest.rpartition("@")
    if not at:
        return value
    user, colon, _password = userinfo.partition(":")
    return f"{scheme}{sep}{user}{':***' if colon else ''}@{host}"


def parse_upstream(upstream: str) -> tuple[str, str | None]:
    """Check an ``--upstream`` URL; return the base URL without credentials, and the Basic auth its userinfo asks for.

    Raises :class:`ProxyError` naming what is wrong with the value (its
    password masked): no ``http://``/``https://`` scheme, no host, a port that
    is not a number, an unclosed IPv6 bracket...
    """
    shown = repr(_masked(upstream))
    if not upstream.startswith(("http://", "https://")):
        raise ProxyError(f"upstream: expected an http:// or https:// URL, got {shown}")
    try:
        url = URL(upstream)
        port = url.port
    except ValueError as exc:
        reason = str(exc).removeprefix("Invalid URL: ")
        raise ProxyError(f"upstream: {shown} is not a valid URL ({reason})") from None
    if not url.host:
        raise ProxyError(f"upstream: {shown} names no host")
    if port is not None and not 0 < port < 65536:
        raise ProxyError(f"upstream: {shown} has port {port}, outside 1-65535")
    if url.query_string or url.fragment:
        raise ProxyError(f"upstream: {shown} must be a base URL, without a query or fragment")
    auth = None
    if url.user is not None:
        # Credentials in the URL become a header, so the URL itself (recorded in
        # meta, shown in logs and error messages) never carries them.
        auth = "Basic " + base64.b64encode(f"{url.user}:{url.password or ''}".encode()).decode()
        url = url.with_user(None)
    return str(url).rstrip("/"), auth


class _Publisher:
    """Turns pieces into writer calls (choice 0 of a multi-choice answer), with the call's secrets redacted.

    Every text that reaches the bus goes through here: deltas through one
    :class:`StreamRedactor` per channel (a key split across chunks is still
    caught), error messages through the :class:`Redactor`.
    """

    def __init__(self, w: StreamWriter, redactor: Redactor) -> None:
        self.w = w
        self.redactor = redactor
        self.channels: dict[Channel, StreamRedactor[str]] = {}

    async def delta(self, text: str, channel: Channel) -> None:
        stream = self.channels.get(channel)
        if stream is None:
            stream = self.channels[channel] = self.redactor.stream()
        safe = stream.feed(text)
        if safe:
            await self.w.delta(safe, channel=channel)

    async def flush(self) -> None:
        """Publish the text each channel still holds back, before the stream's terminal event."""
        for channel, stream in self.channels.items():
            held = stream.flush()
            if held and not self.w.finished:
                await self.w.delta(held, channel=channel)

    async def end(self, reason: str, **fields: Any) -> None:
        await self.flush()
        await self.w.end(reason, **fields)

    async def error(self, kind: str, message: str, *, retryable: bool = False) -> None:
        if self.w.finished:
            return
        await self.flush()
        await self.w.error(kind, self.redactor.text(message), retryable=retryable)

    async def apply(self, pieces: Iterable[Piece]) -> None:
        w = self.w
        for piece in pieces:
            if w.finished:
                return
            if isinstance(piece, TextPiece):
                if piece.choice == 0 and piece.text:
                    await self.delta(piece.text, piece.channel)
            elif isinstance(piece, EndPiece):
                await self.end(piece.reason, usage=piece.usage, timings=piece.timings)
            elif isinstance(piece, ErrorPiece):
                failure = stream_error_failure(piece.message, piece.code, piece.retryable)
                await self.error(failure.kind, failure.message, retryable=failure.retryable)


def _as_filtered(event: Event) -> Event:
    """An abort by moderation becomes the normal end a filtering server sends."""
    if isinstance(event, AbortEvent) and event.by == "moderation":
        return EndEvent(stream=event.stream, seq=event.seq, ts=event.ts, reason=CONTENT_FILTER)
    return event


def _response_headers(upstream: aiohttp.ClientResponse, *, drop: Iterable[str] = ()) -> dict[str, str]:
    skip = _NOT_DOWNSTREAM | {h.lower() for h in drop}
    out: dict[str, str] = {}
    for key, value in upstream.headers.items():
        if key.lower() not in skip:
            out[key] = value
    return out


class _Call:
    """One proxied model request, shared by the forwarding side and the relay."""

    def __init__(
        self,
        *,
        request: web.Request,
        fmt: _Format,
        route: str,
        body: dict[str, Any],
        raw: bytes,
        answer_filter: AnswerFilter | None,
        streaming: bool,
        stream: str,
        model: str,
        meta: dict[str, Any],
        headers: dict[str, str],
        redactor: Redactor,
    ) -> None:
        self.request = request
        self.headers = headers
        """What is forwarded upstream."""
        self.redactor = redactor
        """The forwarded credentials, kept out of every event and log line of this call."""
        self.fmt = fmt
        self.route = route
        self.body = body
        self.raw = raw
        """The body sent upstream: the client's, or the format's :meth:`~AnswerParsing.usage_request`."""
        self.answer_filter = answer_filter
        """Takes what the proxy asked for on its own out of the client's bytes (``None``: nothing to take)."""
        self.streaming = streaming
        self.stream = stream
        self.model = model
        self.meta = meta
        self.moderated = False
        self.relayed: anyio.Event | None = None
        self.ready = anyio.Event()
        self.response: web.StreamResponse | None = None
        self.upstream: aiohttp.ClientResponse | None = None
        self.upstream_status = 200
        self.upstream_headers: dict[str, str] = {}
        self.w_terminal: Event | None = None

    def answer(self, response: web.StreamResponse) -> None:
        if self.response is None:
            self.response = response
        self.ready.set()


async def _write_quietly(response: web.StreamResponse, data: bytes) -> None:
    if data:
        with contextlib.suppress(ConnectionError):
            await response.write(data)


class Proxy:
    """Forward model requests to *upstream* and publish every answer on *bus*.

    ::

        async with Bus() as bus:
            bus.add_sink(RecorderSink(path="proxy.jsonl"))
            runner = web.AppRunner(Proxy(bus, "http://127.0.0.1:11434").app())
            ...

    :param bus: a running :class:`~streambus.Bus`; its sinks get every proxied stream.
    :param upstream: the model server's base URL (``http://127.0.0.1:11434``,
        ``https://api.openai.com``); request paths are appended to it unchanged.
    :param moderated: whether clients get the processed (moderated) stream
        re-encoded; ``None`` (default) decides per request: yes when the bus
        has an interposed stage such as a moderation gate.
    :param connect_timeout: seconds to connect to the upstream before answering 502.
    :param read_timeout: seconds without a byte from the upstream before the
        stream is ended as a ``timeout`` failure (the client is never left hanging).
    :param formats: wire format names whose routes are published; ``None``
        (default): every installed format that can parse its answers
        (:class:`~streambus.formats.AnswerParsing`), found by entry point.
    :param token: a client token: every request must carry it (``X-Streambus-Token``,
        or ``Authorization: Bearer``, which is then not forwarded). ``None``: no token.
    :param bind_host: the address the proxy is served on; with the loopback
        names it is a name a request's ``Host`` may carry.
    :param port: the port it is served on (``None``: unknown, any port is same-origin).
    :param allowed_hosts: further names clients reach the proxy by (``"*"``: any).
    :param retries: how many times a 429 or 503 from the upstream is tried again
        before the client sees it (0: never), waiting ``retry_backoff * 2**(n-1)``
        plus jitter, or the upstream's ``Retry-After`` when it says one; a wait
        longer than ``retry_max_wait`` is not made: the refusal goes to the client.
    :param retry: a :class:`~streambus.producing.RetryPolicy` of your own instead
        (its ``waits`` record every wait; a test gives it a ``sleep`` that returns at once).
    :param allowed_origins: web origins whose pages may call the proxy (``"*"``: any);
        other browser requests are refused with 403 before anything is forwarded.
    """

    def __init__(
        self,
        bus: Bus,
        upstream: str,
        *,
        moderated: bool | None = None,
        connect_timeout: float = 10.0,
        read_timeout: float = 300.0,
        formats: Iterable[str] | None = None,
        token: str | None = None,
        bind_host: str = "127.0.0.1",
        port: int | None = None,
        allowed_hosts: Iterable[str] = (),
        allowed_origins: Iterable[str] = (),
        retries: int = 2,
        retry_backoff: float = 0.5,
        retry_max_wait: float = 10.0,
        retry: RetryPolicy | None = None,
    ) -> None:
        self.bus = bus
        self.upstream, self._auth = parse_upstream(upstream)
        # The proxy's own credentials (from the URL) are kept from the client's answer too.
        self._own = Redactor(secrets_of([self._auth] if self._auth else []))
        try:
            policy = OriginPolicy(
                bind_host=bind_host, port=port, allowed_hosts=allowed_hosts, allowed_origins=allowed_origins
            )
            self.access = Access(policy, token)
        except ValueError as exc:
            raise ProxyError(str(exc)) from None
        if not connect_timeout > 0:
            raise ProxyError(f"connect_timeout: must be positive, got {connect_timeout}")
        if not read_timeout > 0:
            raise ProxyError(f"read_timeout: must be positive, got {read_timeout}")
        if retries < 0:
            raise ProxyError(f"retries: must be at least 0, got {retries}")
        for key, value in (("retry_backoff", retry_backoff), ("retry_max_wait", retry_max_wait)):
            if not 0 <= value < float("inf"):
                raise ProxyError(f"{key}: must be at least 0 and finite, got {value}")
        self.retry = retry or RetryPolicy(retries=retries, backoff=retry_backoff, max_wait=retry_max_wait)
        """How a 429 or 503 from the upstream is tried again before the client sees it."""
        self.moderated = moderated
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.formats = _proxied_formats(formats)
        self.routes: dict[str, tuple[_Format, str]] = {}
        served_by: dict[str, str] = {}
        for name, fmt in self.formats.items():
            for path, route in fmt.routes.items():
                if path in served_by:
                    raise ProxyError(f"formats: {served_by[path]!r} and {name!r} both serve {path}; choose one")
                served_by[path] = name
                self.routes[path] = (fmt, route)
        headers, params = set(CREDENTIAL_HEADERS), set[str]()
        for fmt in self.formats.values():
            if isinstance(fmt, Credentials):
                headers.update(h.lower() for h in fmt.credential_headers)
                params.update(fmt.credential_params)
        self.credential_headers = frozenset(headers)
        """Request headers whose values are kept out of events and logs (the formats' and the usual ones)."""
        self.credential_params = frozenset(params)
        """Query parameters whose values are kept out of events and logs (Gemini's ``key``)."""
        self._session: aiohttp.ClientSession | None = None
        self.disconnect_poll = 0.05
        """Seconds between checks that a streaming client is still connected."""

    # -- the application ---------------------------------------------------------
    def app(self) -> web.Application:
        """The :class:`aiohttp.web.Application` (its upstream session opens and closes with it)."""
        app = web.Application(client_max_size=64 * 1024 * 1024, middlewares=[self.access.guard])
        app.on_response_prepare.append(self.access.add_cors)
        app.cleanup_ctx.append(self._session_ctx)
        for path, (fmt, route) in self.routes.items():
            # aiohttp's router matches templates such as Gemini's /v1beta/models/{model}:streamGenerateContent.
            app.router.add_post(path, self._model_handler(fmt, route))
        app.router.add_route("*", "/{tail:.*}", self._handle)
        return app

    async def _session_ctx(self, app: web.Application) -> Any:
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=self.connect_timeout, sock_read=self.read_timeout)
        # auto_decompress=False: pass-through bodies keep their Content-Encoding, byte for byte.
        self._session = aiohttp.ClientSession(
            timeout=timeout,
            auto_decompress=False,
            connector=aiohttp.TCPConnector(limit=0),
            skip_auto_headers=("User-Agent", "Accept-Encoding"),
        )
        yield
        await self._session.close()
        self._session = None

    @property
    def session(self) -> aiohttp.ClientSession:
        """The upstream HTTP session (open while the app runs)."""
        if self._session is None:
            raise RuntimeError("the proxy app is not running (start it with an aiohttp AppRunner)")
        return self._session

    def _is_moderated(self) -> bool:
        if self.moderated is not None:
            return self.moderated
        return self.bus.interposed

    def _forward_headers(self, request: web.Request) -> dict[str, str]:
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _NOT_UPSTREAM}
        if self._auth is not None and not any(k.lower() == "authorization" for k in headers):
            headers["Authorization"] = self._auth
        if self._own:
            # Bodies are searched for the proxy's credentials: they must not arrive compressed.
            headers = {k: v for k, v in headers.items() if k.lower() != "accept-encoding"}
            headers["Accept-Encoding"] = "identity"
        return headers

    def _redactor(self, headers: Mapping[str, str], query: Mapping[str, str]) -> Redactor:
        """What must not reach the bus or the logs for a request forwarded with *headers* and *query*."""
        sent = [v for k, v in headers.items() if k.lower() in self.credential_headers]
        sent += [v for k, v in query.items() if k in self.credential_params]
        return Redactor(secrets_of(sent))

    def _model_handler(self, fmt: _Format, route: str) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        async def handle(request: web.Request) -> web.StreamResponse:
            return await self._model(request, fmt, route)

        return handle

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        """Every request that is not a ``POST`` to a model route."""
        return await self._pass_through(request)

    # -- anything that is not a model route ----------------------------------------------
    async def _pass_through(self, request: web.Request, body: bytes | None = None) -> web.StreamResponse:
        url = self.upstream + request.rel_url.raw_path_qs
        headers = self._forward_headers(request)
        redactor = self._redactor(headers, request.query)
        data: Any = body
        if body is None and request.can_read_body:
            # Stream uploads (model blobs can be gigabytes) instead of holding them.
            data = request.content.iter_chunked(1 << 16)
            if request.content_length is not None:
                headers["Content-Length"] = str(request.content_length)
        try:
            upstream = await self.session.request(
                request.method, url, data=data, headers=headers, allow_redirects=False
            )
        except (aiohttp.ClientError, TimeoutError) as exc:
            log.warning("proxy.unreachable", path=request.path, error=redactor.text(_describe(exc)))
            return web.json_response({"error": f"upstream {self.upstream} unreachable: {_describe(exc)}"}, status=502)
        async with upstream:
            response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
            response.headers.update(_response_headers(upstream))
            await response.prepare(request)
            own = self._own.byte_stream()
            try:
                async for chunk in upstream.content.iter_any():
                    await response.write(own.feed(chunk))
                await response.write(own.flush())
                await response.write_eof()
            except (aiohttp.ClientError, TimeoutError) as exc:
                log.warning("proxy.upstream_cut", path=request.path, error=redactor.text(_describe(exc)))
            except ConnectionError:
                log.info("proxy.client_gone", path=request.path)
        return response

    # -- model routes -----------------------------------------------------------------
    def _meta(self, request: web.Request, path: str, body: Mapping[str, Any], streaming: bool) -> dict[str, Any]:
        tags = parse_tags(request.headers.get(TAGS_HEADER, ""))
        meta: dict[str, Any] = dict(tags)
        meta.update(
            {
                "client": request.remote or "",
                "request_id": request.headers.get(REQUEST_ID_HEADER) or uuid.uuid4().hex,
                "path": path,
                "streamed": streaming,
                "upstream": self.upstream,
            }
        )
        if tags:
            meta["tags"] = tags
        meta.update(_trace_context(request.headers))
        return meta

    async def _model(self, request: web.Request, fmt: _Format, route: str) -> web.StreamResponse:
        raw = await request.read()
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError:
            body = None
        if not isinstance(body, dict):
            # Not ours to judge: the upstream answers a bad body with its own error.
            return await self._pass_through(request, raw)
        try:
            streaming = fmt.is_streaming(route, body)
            meta = self._meta(request, request.path, body, streaming)
        except ProxyError as exc:
            return web.json_response(fmt.error_body(400, str(exc)), status=400)
        headers = self._forward_headers(request)
        redactor = self._redactor(headers, request.query)
        # Gemini names the model in the path (/v1beta/models/{model}:...), the others in the body.
        model = request.match_info.get("model") or body.get("model")
        answer_filter = None
        # The bus gets the provider's usage even when the client did not ask for it.
        asked = fmt.usage_request(route, body)
        if asked is not None:
            raw = orjson.dumps(asked[0])
            answer_filter = asked[1]
        call = _Call(
            request=request,
            fmt=fmt,
            route=route,
            body=body,
            raw=raw,
            answer_filter=answer_filter,
            streaming=streaming,
            stream=new_stream_id(),
            model=redactor.text(model) if isinstance(model, str) else "",
            meta=redactor.value(meta),
            headers=headers,
            redactor=redactor,
        )
        log.info("proxy.request", stream=call.stream, path=request.path, model=call.model, streamed=streaming)
        sub = None
        if self._is_moderated():
            # Subscribed before the stream starts, so the client misses none of the processed events.
            # coalesce: a slow client gets bigger chunks (never fewer characters) instead of
            # holding up the moderation stage, which every other stream goes through too.
            sub = self.bus.subscribe(Filter.of(streams=call.stream), overflow="coalesce", name=f"proxy:{call.stream}")
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._watch_client, request, call.stream)
                if sub is not None:
                    call.moderated = True
                    call.relayed = anyio.Event()
                    tg.start_soon(self._relay, call, sub)
                # The stream starts when the request arrives, so time to first chunk includes the upstream's.
                async with self.bus.stream(
                    stream=call.stream, model=call.model, provider=fmt.name, meta=call.meta
                ) as w:
                    await self._forward(call, w)
                if call.relayed is not None:
                    await call.relayed.wait()
                tg.cancel_scope.cancel()
        finally:
            if sub is not None:
                sub.close()
            if call.upstream is not None:
                if isinstance(call.w_terminal, AbortEvent):
                    call.upstream.close()
                call.upstream.release()
        if call.response is None:
            # Only when the client left before anything was answered: there is nobody to answer.
            return web.Response(status=499)
        return call.response

    async def _forward(self, call: _Call, w: StreamWriter) -> None:
        """Send the request upstream and answer the client (pass-through) or feed the relay (moderated)."""
        fmt = call.fmt
        headers = {k: v for k, v in call.headers.items() if k.lower() != "accept-encoding"}
        headers["Accept-Encoding"] = "identity"  # the parser reads a copy of these bytes
        url = self.upstream + call.request.rel_url.raw_path_qs
        pub = _Publisher(w, call.redactor)
        try:
            try:
                upstream = await self._post(call, url, headers)
            except (aiohttp.ClientError, TimeoutError) as exc:
                message = f"upstream {self.upstream} unreachable: {_describe(exc)}"
                log.warning("proxy.unreachable", stream=call.stream, error=call.redactor.text(_describe(exc)))
                await pub.error("timeout" if isinstance(exc, TimeoutError) else "connect", message, retryable=True)
                answer = {STREAM_HEADER: call.stream}
                call.answer(web.json_response(fmt.error_body(502, message), status=502, headers=answer))
                return
            call.upstream = upstream
            upstream_id = upstream.headers.get("x-request-id")
            if upstream_id:
                w.meta["upstream_request_id"] = call.redactor.text(upstream_id)
            if upstream.status >= 400:
                await self._upstream_status(call, pub, upstream)
            elif call.relayed is not None and call.moderated:
                await self._feed(call, pub, upstream)
            elif not call.streaming:
                await self._whole(call, pub, upstream)
            else:
                await self._stream(call, pub, upstream)
            await pub.flush()
        finally:
            call.w_terminal = w.terminal
            call.ready.set()

    async def _post(self, call: _Call, url: str, headers: Mapping[str, str]) -> aiohttp.ClientResponse:
        """POST upstream; a 429 or 503 is tried again as :attr:`retry` says (jitter, or the server's ``Retry-After``).

        Nothing has reached the client yet, so a retry is invisible to it; the
        last answer (success or the final refusal) is returned for the caller
        to pass on.
        """
        last: aiohttp.ClientResponse | None = None

        async def attempt() -> Failure | None:
            nonlocal last
            if last is not None:
                last.release()
            last = await self.session.post(url, data=call.raw, headers=headers, allow_redirects=False)
            if last.status not in (429, 503):
                return None
            data = await last.read()  # kept by aiohttp: the final refusal is still readable
            failure = status_failure(last.status, data, last.reason)
            return msgspec.structs.replace(failure, retry_after=retry_after(last.headers.get("Retry-After")))

        def retrying(failure: Failure, delay: float) -> None:
            log.info("proxy.upstream_retry", stream=call.stream, error=call.redactor.text(failure.message), delay=delay)

        await self.retry.run(attempt, on_retry=retrying)
        assert last is not None
        return last

    async def _upstream_status(self, call: _Call, pub: _Publisher, upstream: aiohttp.ClientResponse) -> None:
        status = upstream.status
        try:
            data = await upstream.read()
        except (aiohttp.ClientError, TimeoutError):
            data = b""
        body = self._own.body(data)
        call.answer(
            web.Response(status=status, reason=upstream.reason, body=body, headers=self._headers(call, upstream))
        )
        failure = status_failure(status, data, upstream.reason)
        log.info("proxy.upstream_status", stream=call.stream, status=status)
        await pub.error(failure.kind, failure.message, retryable=failure.retryable)

    def _headers(self, call: _Call, upstream: aiohttp.ClientResponse, drop: Iterable[str] = ()) -> dict[str, str]:
        headers = _response_headers(upstream, drop=drop)
        headers[STREAM_HEADER] = call.stream
        # The client's trace goes back with the answer unless the upstream answered with its own.
        trace = _trace_context(call.request.headers)
        if "traceparent" in trace and not any(k.lower() == "traceparent" for k in headers):
            headers["traceparent"] = trace["traceparent"]
        return headers

    async def _whole(self, call: _Call, pub: _Publisher, upstream: aiohttp.ClientResponse) -> None:
        fmt = call.fmt
        try:
            data = await upstream.read()
        except (aiohttp.ClientError, TimeoutError) as exc:
            message = f"the upstream broke off the answer: {_describe(exc)}"
            call.answer(web.json_response(fmt.error_body(502, message), status=502))
            await pub.error("truncated", message, retryable=True)
            return
        call.answer(
            web.Response(
                status=upstream.status,
                reason=upstream.reason,
                body=self._own.body(data),
                headers=self._headers(call, upstream),
            )
        )
        await _publish_body(call, pub, data)

    async def _watch_client(self, request: web.Request, stream: str) -> None:
        """Abort *stream* by ``client`` once the client's connection is gone."""
        while True:
            transport = request.transport
            if transport is None or transport.is_closing():
                if self.bus.abort(stream, "client disconnected", by="client"):
                    log.info("proxy.client_gone", stream=stream)
                return
            await anyio.sleep(self.disconnect_poll)

    async def _stream(self, call: _Call, pub: _Publisher, upstream: aiohttp.ClientResponse) -> None:
        """Pass-through: every upstream read goes to the client first, then a copy is parsed and published."""
        w = pub.w
        response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
        response.headers.update(self._headers(call, upstream))
        call.answer(response)
        await response.prepare(call.request)
        parser = call.fmt.stream_parser(call.route, call.body)
        client = _ClientBytes(self._own, call.answer_filter)
        parsing = True
        failure: tuple[str, str] | None = None
        try:
            async for chunk in upstream.content.iter_any():
                try:
                    await response.write(client.feed(chunk))
                except ConnectionError:
                    log.info("proxy.client_gone", stream=call.stream)
                    await w.abort("client disconnected", by="client")
                    return
                if parsing:
                    try:
                        await pub.apply(parser.feed(chunk))
                    except WireError as exc:
                        parsing = False
                        await pub.error("malformed", str(exc))
            await _write_quietly(response, client.flush())
            if parsing:
                await pub.apply(parser.close())
            if not w.finished:
                failure = ("truncated", "the upstream closed the stream before its end")
        except WireError as exc:
            failure = ("truncated", f"the stream ended inside a line: {exc}")
        except TimeoutError:
            failure = ("timeout", f"no data from the upstream within read_timeout={self.read_timeout}s")
        except aiohttp.ClientError as exc:
            failure = ("truncated", f"the upstream connection broke mid-stream: {_describe(exc)}")
        if failure is not None and not w.finished:
            kind, message = failure
            log.warning("proxy.upstream_cut", stream=call.stream, kind=kind, error=call.redactor.text(message))
            await _write_quietly(response, client.flush())
            await pub.error(kind, message, retryable=True)
            # End the client's stream the way the provider ends a failed one: in band.
            await _write_quietly(response, _error_bytes(call.fmt, call.route, call.body, w.terminal))
        with contextlib.suppress(ConnectionError):
            await response.write_eof()

    # -- moderated: the client gets the processed stream -------------------------------------
    async def _feed(self, call: _Call, pub: _Publisher, upstream: aiohttp.ClientResponse) -> None:
        """Moderated: parse the upstream's answer onto the bus; :meth:`_relay` answers the client."""
        call.upstream_status = upstream.status
        call.upstream_headers = self._headers(call, upstream, drop=("content-type", "content-encoding"))
        call.ready.set()
        try:
            if not call.streaming:
                await _publish_body(call, pub, await upstream.read())
                return
            parser = call.fmt.stream_parser(call.route, call.body)
            async for chunk in upstream.content.iter_any():
                await pub.apply(parser.feed(chunk))
            await pub.apply(parser.close())
            if not pub.w.finished:
                await pub.error("truncated", "the upstream closed the stream before its end", retryable=True)
        except WireError as exc:
            await pub.error("malformed", str(exc))
        except TimeoutError:
            await pub.error("timeout", f"no data from the upstream within read_timeout={self.read_timeout}s")
        except aiohttp.ClientError as exc:
            message = f"the upstream connection broke mid-stream: {_describe(exc)}"
            await pub.error("truncated", message, retryable=True)

    async def _relay(self, call: _Call, sub: Subscription) -> None:
        """Moderated: answer the client from the processed stream, re-encoded in its wire format."""
        assert call.relayed is not None
        try:
            events: list[Event] = []
            response: web.StreamResponse | None = None
            encoder = call.fmt.stream_encoder(call.route, call.body)
            async for event in sub:
                if call.response is not None and response is None:
                    return  # answered without the relay (upstream error status, unreachable)
                if not call.streaming:
                    events.append(_as_filtered(event))
                    if is_terminal(event):
                        if call.response is None:
                            assembled = call.fmt.assemble(call.route, call.body, events)
                            status = 502 if "error" in assembled else call.upstream_status
                            headers = {STREAM_HEADER: call.stream}
                            call.answer(web.json_response(assembled, status=status, dumps=_dumps, headers=headers))
                        return
                    continue
                if response is None:
                    if is_terminal(event) and not call.ready.is_set():
                        return  # failed before the upstream answered: _forward answered
                    await call.ready.wait()
                    if call.response is not None or call.upstream is None:
                        return  # answered already, or the client left before the upstream did
                    response = web.StreamResponse(status=call.upstream_status)
                    response.headers.update(call.upstream_headers)
                    response.content_type = encoder.content_type
                    call.answer(response)
                    await response.prepare(call.request)
                data = encoder.encode(_as_filtered(event))
                try:
                    if data:
                        await response.write(data)
                    if is_terminal(event):
                        if not (isinstance(event, AbortEvent) and event.by == "client"):
                            await response.write(encoder.close())
                            await response.write_eof()
                        return
                except ConnectionError:
                    self.bus.abort(call.stream, "client disconnected", by="client")
                    log.info("proxy.client_gone", stream=call.stream)
                    return
        except SubscriptionClosed as exc:
            # Past the coalescing byte cap: this client reads far slower than the model writes.
            log.warning("proxy.client_too_slow", stream=call.stream, error=str(exc))
            self.bus.abort(call.stream, "client too slow", by="client")
        finally:
            call.relayed.set()


class _ClientBytes:
    """What the client gets of the upstream's bytes: the answer filter's, then the proxy's own secrets redacted."""

    def __init__(self, own: Redactor, answer_filter: AnswerFilter | None) -> None:
        self._own = own.byte_stream()
        self._filter = answer_filter

    def feed(self, data: bytes) -> bytes:
        return self._own.feed(self._filter.feed(data) if self._filter is not None else data)

    def flush(self) -> bytes:
        rest = self._filter.close() if self._filter is not None else b""
        return self._own.feed(rest) + self._own.flush()


async def _publish_body(call: _Call, pub: _Publisher, data: bytes) -> None:
    """Publish a whole (``stream: false``) answer."""
    try:
        pieces = call.fmt.body_pieces(call.route, call.body, data)
    except WireError as exc:
        await pub.error("malformed", f"the upstream's answer is not a {call.fmt.name} body: {exc}")
        return
    await pub.apply(pieces)


def _proxied_formats(names: Iterable[str] | None) -> dict[str, _Format]:
    """The formats to proxy: *names*, or every installed one that parses answers."""
    chosen = installed_formats() if names is None else {name: load_format(name) for name in names}
    out: dict[str, _Format] = {}
    for name, fmt in chosen.items():
        if isinstance(fmt, AnswerParsing):
            out[name] = fmt
        elif names is not None:
            raise ProxyError(
                f"formats: {name!r} cannot be proxied: its WireFormat has no stream_parser/body_pieces/usage_request"
                " (streambus.formats.AnswerParsing)"
            )
    if not out and names is None:
        raise ProxyError("formats: no installed wire format can parse answers (install streambus-ollama)")
    return out


def _error_bytes(fmt: WireFormat, route: str, body: Mapping[str, Any], terminal: Event | None) -> bytes:
    if terminal is None:
        return b""
    encoder = fmt.stream_encoder(route, body)
    return encoder.encode(terminal) + encoder.close()


_TRACEPARENT = re.compile(r"^[0-9a-f]{2}-(?!0{32})[0-9a-f]{32}-(?!0{16})[0-9a-f]{16}-[0-9a-f]{2}$")


def _trace_context(headers: Mapping[str, str]) -> dict[str, str]:
    """The client's W3C trace context (``traceparent``, ``tracestate``) when well formed, for the stream's meta.

    The headers themselves are forwarded upstream unchanged, so the provider's
    spans (if it traces) join the same trace; the ``otel`` sink parents the
    stream's span on ``start.meta["traceparent"]``.
    """
    parent = headers.get("traceparent", "").strip().lower()
    if not _TRACEPARENT.match(parent):
        return {}
    context = {"traceparent": parent}
    state = headers.get("tracestate", "").strip()
    if state and len(state) <= 512:
        context["tracestate"] = state
    return context


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _dumps(obj: Any) -> str:
    return orjson.dumps(obj).decode()


def require_asyncio() -> None:
    """Raise :class:`~streambus.errors.AsyncioRequired` unless running under asyncio (aiohttp is asyncio-only)."""
    AsyncioRequired.check("the streambus proxy", needs="aiohttp")


def create_app(bus: Bus, upstream: str, **options: Any) -> web.Application:
    """Return the proxy's :class:`aiohttp.web.Application` for a running *bus*.

    *options* are those of :class:`Proxy` (``moderated``, ``connect_timeout``,
    ``read_timeout``, ``formats``, ``token``, ``bind_host``, ``port``,
    ``allowed_hosts``, ``allowed_origins``). Serve it with an
    :class:`aiohttp.web.AppRunner` in the bus's asyncio loop; aiohttp is
    asyncio-only, so under trio this raises :class:`RuntimeError` saying so.
    """
    require_asyncio()
    return Proxy(bus, upstream, **options).app()
