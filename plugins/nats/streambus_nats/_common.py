"""What the NATS sink and source share: errors, connection settings, subjects, the per-bus origin."""

from __future__ import annotations

import asyncio
import functools
import importlib
import importlib.metadata
import importlib.util
import os
import re
import ssl
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import structlog

from streambus import StreamBusError
from streambus.engines import EngineLocal, engine_state
from streambus.errors import AsyncioRequired

if TYPE_CHECKING:
    import nats.aio.client

    from streambus import Bus

__all__ = [
    "DEFAULT_PREFIX",
    "DEFAULT_STREAM_NAME",
    "DEFAULT_URL",
    "AsyncioRequired",
    "NatsAuthFailed",
    "NatsGap",
    "NatsHeaderParserUnsupported",
    "check_header_parser",
    "connect",
    "event_subject",
    "heartbeat_subject",
    "index_stream_name",
    "index_subject",
    "index_wildcard",
    "local_state",
    "require_asyncio",
]

log = structlog.get_logger("streambus.nats")

DEFAULT_URL = "nats://127.0.0.1:4222"
"""Used when neither the ``url`` option nor ``STREAMBUS_NATS_URL`` is set."""

DEFAULT_PREFIX = "streambus"
"""The subject prefix used when the ``prefix`` option is not set."""

DEFAULT_STREAM_NAME = "STREAMBUS"
"""The JetStream stream name used when the ``stream_name`` option is not set."""

# Connection secrets come from the environment, never from a config file.
ENV_URL = "STREAMBUS_NATS_URL"
ENV_TOKEN = "STREAMBUS_NATS_TOKEN"
ENV_USER = "STREAMBUS_NATS_USER"
ENV_PASSWORD = "STREAMBUS_NATS_PASSWORD"
ENV_CREDS = "STREAMBUS_NATS_CREDS"
ENV_TLS_CA = "STREAMBUS_NATS_TLS_CA_FILE"
ENV_TLS_CERT = "STREAMBUS_NATS_TLS_CERT_FILE"
ENV_TLS_KEY = "STREAMBUS_NATS_TLS_KEY_FILE"

# One NATS subject token: anything but '.', '*', '>', whitespace; '%' is our escape character.
_UNSAFE = re.compile(r"[^A-Za-z0-9_\-~]")
_TOKEN = re.compile(r"^[A-Za-z0-9_\-]+(\.[A-Za-z0-9_\-]+)*$")


class NatsHeaderParserUnsupported(StreamBusError):
    """nats-py would hand this process every message header's value as a list.

    nats-py parses headers with ``fast_mail_parser.parse_email`` when that
    package is installed (nats-py's ``fast-parse`` extra). fast-mail-parser
    0.10 returns each header's values as a list, and nats-py passes them on
    as they are, JetStream's own status headers included: de-duplication
    and flow control could not work. Raised when a sink, source or control
    starts, before it connects; uninstall ``fast-mail-parser`` (it is only a
    speed-up of nats-py's, and a small one: 2.2 against 3.2 µs for this
    plugin's three headers, measured).
    """


@functools.cache
def check_header_parser() -> None:
    """Raise :class:`NatsHeaderParserUnsupported` if nats-py would parse headers into lists (see there)."""
    if importlib.util.find_spec("fast_mail_parser") is None:
        return  # nats-py's own parser: str values
    try:
        parser = importlib.import_module("fast_mail_parser")
    except ImportError:
        return  # nats-py's import of it fails the same way, and it falls back to its own parser
    try:
        version = importlib.metadata.version("fast-mail-parser")
    except importlib.metadata.PackageNotFoundError:
        version = "(version unknown)"
    try:
        probe = parser.parse_email(b"Nats-Msg-Id: probe\r\n\r\n").headers.get("Nats-Msg-Id")
    except Exception as exc:  # an API of its own: whatever it raises, nats-py would meet on every message
        what = f"its parse_email fails on a plain header block ({type(exc).__name__}: {exc})"
    else:
        if isinstance(probe, str):
            return
        what = f"its parse_email returns header values as {type(probe).__name__} instead of str"
    raise NatsHeaderParserUnsupported(
        f"fast-mail-parser {version} is installed (nats-py's fast-parse extra) and {what}, which nats-py "
        "passes on as it is: streambus-nats cannot read its own or JetStream's headers then; uninstall it "
        "with `pip uninstall fast-mail-parser`"
    )


class NatsAuthFailed(StreamBusError):
    """The server refused this process's credentials ("Authorization Violation").

    Raised at once, never retried in a loop: a retry will not fix a wrong
    secret. Check ``STREAMBUS_NATS_TOKEN``, ``STREAMBUS_NATS_USER`` /
    ``STREAMBUS_NATS_PASSWORD``, ``STREAMBUS_NATS_CREDS`` or the user in the
    URL (their values are never logged or put in this message).
    """


class NatsGap(StreamBusError):
    """Messages a consumer had not read yet were lost before it read them.

    Retention removed them (``max_age`` / ``max_bytes``: the consumer was away
    or behind too long), or the JetStream stream itself was lost and recreated
    (its creation time, the *epoch*, changed: the server lost its storage, or
    someone deleted the stream), or the stream went back in time (its last
    sequence is below the position being resumed). Not raised: the source
    logs it (``nats.gap``), appends it to :attr:`NatsSource.gaps` and ends every
    stream that may have lost events with an ``error`` event of kind
    ``nats_gap``. ``stream`` is the JetStream stream name; ``after`` the last
    stream sequence read before the gap; ``until`` the newest sequence known
    lost (``None`` when unknown); ``lost`` how many messages are known lost
    (``None`` when unknown); ``how`` what revealed it. Raise ``max_age`` /
    ``max_bytes``, or keep consumers closer to the head, to avoid it.
    """

    def __init__(self, stream: str, after: int, until: int | None, lost: int | None, how: str) -> None:
        what = f"{lost} messages" if lost is not None else "messages"
        upto = f" up to {until}" if until is not None else ""
        super().__init__(f"{stream}: {what} after {after}{upto} were lost before this consumer read them ({how})")
        self.stream = stream
        self.after = after
        self.until = until
        self.lost = lost
        self.how = how


def require_asyncio(what: str) -> None:
    """Raise :class:`~streambus.errors.AsyncioRequired` unless running under asyncio (nats-py is asyncio-bound)."""
    AsyncioRequired.check(what, needs="nats-py")


def check_prefix(prefix: str) -> None:
    """Raise ``ValueError("prefix: ...")`` unless *prefix* is dot-separated plain subject tokens."""
    if not _TOKEN.match(prefix):
        raise ValueError(
            f"prefix: must be subject tokens of letters, digits, '-' and '_' joined by '.', got {prefix!r}"
        )


def subject_token(stream: str) -> str:
    """*stream* (an event's stream id) as one NATS subject token.

    Letters, digits, ``-``, ``_`` and ``~`` stay; every other byte of its UTF-8
    form becomes ``%XX``, so ids with dots or wildcards cannot leave their
    subject. (An empty id is ``%``.)
    """
    if not stream:
        return "%"
    if not _UNSAFE.search(stream):
        return stream
    return "".join(c if not _UNSAFE.match(c) else "".join(f"%{b:02X}" for b in c.encode()) for c in stream)


def event_subject(prefix: str, stream: str) -> str:
    """The subject carrying the events of *stream*: ``<prefix>.ev.<stream id>``."""
    return f"{prefix}.ev.{subject_token(stream)}"


def events_wildcard(prefix: str) -> str:
    """The subjects of every stream under *prefix* (the JetStream stream's subjects)."""
    return f"{prefix}.ev.>"


def index_subject(prefix: str, stream: str) -> str:
    """The subject carrying *stream*'s ``start`` and terminal event (the index): ``<prefix>.idx.<stream id>``."""
    return f"{prefix}.idx.{subject_token(stream)}"


def index_wildcard(prefix: str) -> str:
    """The index subjects of every stream under *prefix* (the index JetStream stream's subjects)."""
    return f"{prefix}.idx.>"


def index_stream_name(stream_name: str) -> str:
    """The JetStream stream holding the index of the JetStream stream *stream_name*: ``<stream_name>_INDEX``."""
    return f"{stream_name}_INDEX"


def heartbeat_subject(prefix: str, producer: str) -> str:
    """The core-NATS subject (not stored) where a sink says it is alive: ``<prefix>.hb.<producer>``."""
    return f"{prefix}.hb.{producer}"


def resolve_url(url: str | None) -> str:
    """The option, else ``STREAMBUS_NATS_URL``, else :data:`DEFAULT_URL`."""
    return url or os.environ.get(ENV_URL) or DEFAULT_URL


def redact(url: str) -> str:
    """*url* (possibly a comma-separated list) without user or password, for logs."""
    parts = []
    for one in url.split(","):
        if "@" in one:
            scheme, rest = one.split("://", 1) if "://" in one else ("", one)
            one = f"{scheme}://***@{rest.rsplit('@', 1)[1]}"
        parts.append(one)
    return ",".join(parts)


def _tls_context() -> ssl.SSLContext | None:
    ca, cert, key = os.environ.get(ENV_TLS_CA), os.environ.get(ENV_TLS_CERT), os.environ.get(ENV_TLS_KEY)
    if not (ca or cert):
        return None
    context = ssl.create_default_context(cafile=ca)
    if cert:
        context.load_cert_chain(cert, key)
    return context


async def connect(
    url: str | None,
    *,
    name: str,
    reconnect_wait: float,
    on_disconnect: Callable[[], Awaitable[None]] | None = None,
    on_reconnect: Callable[[], Awaitable[None]] | None = None,
) -> nats.aio.client.Client:
    """Connect with nats-py; credentials and TLS files come from the environment.

    The client reconnects by itself, forever, waiting *reconnect_wait* seconds
    (plus nats-py's jitter) between attempts; *on_disconnect* and
    *on_reconnect* are told. Raises what nats-py raises when the first
    connection fails (the caller retries with its :class:`RetryPolicy`),
    and, without trying, :class:`NatsHeaderParserUnsupported` (see there).
    """
    import nats

    check_header_parser()
    refused: asyncio.Future[BaseException] = asyncio.get_running_loop().create_future()
    connected = False

    async def error(exc: Exception) -> None:
        if "authorization violation" in str(exc).lower():
            if not connected and not refused.done():
                refused.set_result(exc)
            elif connected:
                log.error("nats.auth_refused", error=f"{type(exc).__name__}: {exc}")
            return
        # nats-py reports every failed reconnect attempt here; the callers log the outage once.
        log.debug("nats.client_error", error=f"{type(exc).__name__}: {exc}")

    async def disconnected() -> None:
        if on_disconnect is not None:
            await on_disconnect()

    async def reconnected() -> None:
        if on_reconnect is not None:
            await on_reconnect()

    kwargs: dict[str, Any] = {}
    if token := os.environ.get(ENV_TOKEN):
        kwargs["token"] = token
    if user := os.environ.get(ENV_USER):
        kwargs["user"] = user
        kwargs["password"] = os.environ.get(ENV_PASSWORD, "")
    if creds := os.environ.get(ENV_CREDS):
        kwargs["user_credentials"] = creds
    if (context := _tls_context()) is not None:
        kwargs["tls"] = context
    attempt = asyncio.ensure_future(
        nats.connect(
            servers=[s.strip() for s in resolve_url(url).split(",")],
            name=name,
            connect_timeout=3,
            allow_reconnect=True,
            max_reconnect_attempts=-1,
            reconnect_time_wait=reconnect_wait,
            ping_interval=5,
            max_outstanding_pings=2,
            error_cb=error,
            disconnected_cb=disconnected,
            reconnected_cb=reconnected,
            **kwargs,
        )
    )
    try:
        # nats-py keeps retrying a refused first connection; a wrong secret must fail at once instead.
        waiters: list[asyncio.Future[Any]] = [attempt, refused]
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not attempt.done():
            attempt.cancel()
            attempt.add_done_callback(_consume_outcome)
    if refused.done() and not (attempt.done() and not attempt.cancelled() and attempt.exception() is None):
        raise NatsAuthFailed(
            f"{redact(resolve_url(url))} refused the credentials ({refused.result()}); check STREAMBUS_NATS_TOKEN, "
            "STREAMBUS_NATS_USER / STREAMBUS_NATS_PASSWORD, STREAMBUS_NATS_CREDS or the URL's user"
        )
    client: nats.aio.client.Client = attempt.result()
    connected = True
    return client


def _consume_outcome(task: asyncio.Future[Any]) -> None:
    # A cancelled connection attempt may still end with an error; nobody waits for it.
    if not task.cancelled():
        task.exception()


def local_state(bus: Bus) -> EngineLocal:
    """The nats engine's shared state on *bus* (its origin id and the streams its sources republished)."""
    return engine_state(bus, "nats")
