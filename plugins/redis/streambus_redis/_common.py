"""What the sink and the source share: errors, connection settings, the per-bus origin."""

from __future__ import annotations

import os
import secrets
from typing import TYPE_CHECKING, Any

from streambus import StreamBusError
from streambus.engines import EngineLocal, engine_state
from streambus.errors import AsyncioRequired

if TYPE_CHECKING:
    import redis.asyncio as aioredis

    from streambus import Bus

__all__ = [
    "DEFAULT_STREAM",
    "DEFAULT_URL",
    "AsyncioRequired",
    "RedisGap",
    "as_str",
    "connect",
    "epoch_key",
    "heartbeat_key",
    "index_key",
    "local_state",
    "require_asyncio",
    "stream_key",
]

DEFAULT_URL = "redis://127.0.0.1:6379/0"
"""Used when neither the ``url`` option nor ``STREAMBUS_REDIS_URL`` is set."""

DEFAULT_STREAM = "streambus:events"
"""The Redis stream key used when the ``stream`` option is not set."""

# Connection secrets come from the environment, never from a config file.
ENV_URL = "STREAMBUS_REDIS_URL"
ENV_USERNAME = "STREAMBUS_REDIS_USERNAME"
ENV_PASSWORD = "STREAMBUS_REDIS_PASSWORD"
ENV_TLS_CA = "STREAMBUS_REDIS_TLS_CA_FILE"
ENV_TLS_CERT = "STREAMBUS_REDIS_TLS_CERT_FILE"
ENV_TLS_KEY = "STREAMBUS_REDIS_TLS_KEY_FILE"


class RedisGap(StreamBusError):
    """Entries a consumer had not read yet were lost before it read them.

    They were trimmed (``MAXLEN``), or the whole key was lost (Redis restarted
    without its data, the key was deleted: its epoch changed), or a sender's
    entry counter jumped. Not raised: the source logs it (``redis.gap``),
    appends it to :attr:`RedisSource.gaps` and ends every stream that may have
    lost events with an ``error`` event of kind ``redis_gap``. ``key`` is the
    Redis stream; ``after`` the last id read before the gap; ``until`` the
    newest id known lost (or ``None`` when unknown); ``lost`` how many entries
    are known lost (``None`` when unknown); ``how`` what revealed it.
    Keep consumers closer to the head, raise ``maxlen``, or give Redis
    persistence to avoid it.
    """

    def __init__(self, key: str, after: str, until: str | None, lost: int | None, how: str) -> None:
        what = f"{lost} entries" if lost is not None else "entries"
        upto = f" up to {until}" if until else ""
        super().__init__(f"{key}: {what} after {after}{upto} were lost before this consumer read them ({how})")
        self.key = key
        self.after = after
        self.until = until
        self.lost = lost
        self.how = how


def epoch_key(key: str) -> str:
    """The Redis string holding the epoch (incarnation id) of the stream *key*.

    Whoever touches the key first (a sink writing, a source reading) creates
    it with a random id (``SET NX``), in the same pipeline as its ``XADD`` or
    ``XREAD``, so the id it gets back belongs to the very data it wrote or
    read. Redis losing its data (or the key being deleted with its epoch)
    gives the key a new id: a consumer that knew the old one knows the
    entries it had not read are gone.
    """
    return f"{key}#epoch"


def stream_key(prefix: str, stream: str) -> str:
    """The Redis stream holding one stream's events in the ``per_stream`` layout: ``<prefix>:s:<stream id>``."""
    return f"{prefix}:s:{stream}"


def index_key(prefix: str) -> str:
    """The small Redis stream of every stream's ``start`` and terminal event in the ``per_stream`` layout."""
    return f"{prefix}:index"


def heartbeat_key(prefix: str, producer: str) -> str:
    """The key a sink instance (*producer*) keeps alive while it runs (``producer_timeout_ms``)."""
    return f"{prefix}:producer:{producer}"


def new_epoch() -> str:
    """A fresh random epoch id."""
    return secrets.token_hex(8)


def require_asyncio(what: str) -> None:
    """Raise :class:`~streambus.errors.AsyncioRequired` unless running under asyncio (redis-py is asyncio-bound)."""
    AsyncioRequired.check(what, needs="redis-py")


def resolve_url(url: str | None) -> str:
    """The option, else ``STREAMBUS_REDIS_URL``, else :data:`DEFAULT_URL`."""
    return url or os.environ.get(ENV_URL) or DEFAULT_URL


def connect(
    url: str | None, *, tls: bool | None = None, password_env: str = ENV_PASSWORD, socket_timeout: float | None = None
) -> aioredis.Redis:
    """Build a redis-py asyncio client; the password and TLS files come from the environment.

    ``rediss://`` URLs (or ``tls = true``) use TLS, verified against
    ``STREAMBUS_REDIS_TLS_CA_FILE`` when set; a client certificate is sent when
    ``STREAMBUS_REDIS_TLS_CERT_FILE`` / ``..._KEY_FILE`` are set.
    """
    import redis.asyncio as aioredis

    target = resolve_url(url)
    if tls and target.startswith("redis://"):
        target = "rediss://" + target[len("redis://") :]
    kwargs: dict[str, Any] = {
        "socket_connect_timeout": 3.0,
        "socket_timeout": socket_timeout,
        "socket_keepalive": True,
        "health_check_interval": 15,
    }
    password = os.environ.get(password_env)
    if password:
        kwargs["password"] = password
    username = os.environ.get(ENV_USERNAME)
    if username:
        kwargs["username"] = username
    if target.startswith("rediss://"):
        if ca := os.environ.get(ENV_TLS_CA):
            kwargs["ssl_ca_certs"] = ca
        if cert := os.environ.get(ENV_TLS_CERT):
            kwargs["ssl_certfile"] = cert
        if key := os.environ.get(ENV_TLS_KEY):
            kwargs["ssl_keyfile"] = key
    client: aioredis.Redis = aioredis.Redis.from_url(target, **kwargs)
    return client


def redact(url: str) -> str:
    """*url* without a password, for logs."""
    if "@" not in url:
        return url
    scheme, rest = url.split("://", 1) if "://" in url else ("", url)
    return f"{scheme}://***@{rest.rsplit('@', 1)[1]}"


def local_state(bus: Bus) -> EngineLocal:
    """The redis engine's shared state on *bus* (its origin id and the streams its sources republished)."""
    return engine_state(bus, "redis")


def parse_id(entry_id: str) -> tuple[int, int]:
    """``"1700000000000-3"`` -> ``(1700000000000, 3)`` (``"0"`` and ``"0-0"`` -> ``(0, 0)``)."""
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


def as_str(value: Any) -> str:
    """A value from a redis-py reply (bytes, or already decoded) as text."""
    return value.decode() if isinstance(value, bytes) else str(value)
