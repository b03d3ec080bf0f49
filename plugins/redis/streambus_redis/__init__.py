"""streambus-redis: distributed mode over Redis Streams.

A :class:`RedisSink` on the producers' bus publishes wire-form events to a
Redis stream (pipelined ``XADD``, several events per entry, ``MAXLEN ~``
trimming); a :class:`RedisSource` on another process's bus reads them back
(``XREAD`` from a saved position, or a consumer group with ``XACK`` and
``XAUTOCLAIM``) and republishes them, de-duplicated by (``stream``, ``seq``)
so its sinks see every event exactly once, in order. A :class:`RedisControl`
on every bus carries stop requests to the host whose producer owns the stream.

redis-py's asyncio client is asyncio-bound: both raise
:class:`AsyncioRequired` under trio. See ``docs/distributed.md``.
"""

from __future__ import annotations

try:
    import redis.asyncio  # noqa: F401
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        f"streambus-redis needs redis-py ({exc}); install it with: pip install 'streambus-redis' 'redis[hiredis]>=5'"
    ) from exc

from ._codec import Entry, decode_entry, decode_events, encode_entry, entry_header
from ._common import DEFAULT_STREAM, DEFAULT_URL, AsyncioRequired, RedisGap, epoch_key
from ._control import DEFAULT_CONTROL_CHANNEL, RedisControl
from ._dedup import Deduplicator, Verdict
from ._sink import RedisSink
from ._source import RedisSource

__all__ = [
    "DEFAULT_CONTROL_CHANNEL",
    "DEFAULT_STREAM",
    "DEFAULT_URL",
    "AsyncioRequired",
    "Deduplicator",
    "Entry",
    "RedisControl",
    "RedisGap",
    "RedisSink",
    "RedisSource",
    "Verdict",
    "decode_entry",
    "decode_events",
    "encode_entry",
    "entry_header",
    "epoch_key",
]
