"""streambus WebSocket broadcaster: resumable, backpressured fan-out with a live page.

``WebSocketSink`` is the ``websocket`` sink (entry point ``streambus.sinks``);
``tail_command`` is ``streambus tail URL`` (entry point ``streambus.commands``).
The wire protocol lives in :mod:`streambus_websocket.protocol` and is
described in ``docs/websocket-protocol.md``; options in
``docs/plugins/websocket.md``.
"""

from __future__ import annotations

try:
    import websockets  # noqa: F401
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "the websocket plugin needs the 'websockets' library: pip install 'streambus-websocket' "
        "(or pip install 'websockets>=14')"
    ) from exc

from .client import Client
from .history import History, StreamLog
from .protocol import (
    PROTOCOL_VERSION,
    ClientMessage,
    CloseCode,
    ErrorCode,
    Ping,
    ProtocolError,
    Subscribe,
    Unsubscribe,
    parse_client_message,
)
from .server import BroadcasterError, WebSocketSink
from .tail import tail_command

__all__ = [
    "PROTOCOL_VERSION",
    "BroadcasterError",
    "Client",
    "ClientMessage",
    "CloseCode",
    "ErrorCode",
    "History",
    "Ping",
    "ProtocolError",
    "StreamLog",
    "Subscribe",
    "Unsubscribe",
    "WebSocketSink",
    "parse_client_message",
    "tail_command",
]
