"""streambus: an async streaming event bus for LLM output with pluggable sinks.

Producers read model streams into one typed event channel; the bus fans the
events out to subscribers (sinks) with per-subscriber buffers and overflow
policies. Everything public is re-exported here.
"""

from __future__ import annotations

__version__ = "0.1.0"

from .bus import Bus, Producer, Sink
from .config import Pipeline, load_config
from .errors import (
    BusClosed,
    ConfigError,
    DecodeError,
    Overflowed,
    PipelineFailed,
    PluginError,
    PluginNotFound,
    RecordingError,
    SinkFailed,
    StopFailed,
    StreamBusError,
    StreamClosed,
    StreamsFailed,
    SubscriptionClosed,
    UnknownOption,
    WireError,
)
from .events import (
    AbortEvent,
    DeltaEvent,
    EndEvent,
    ErrorEvent,
    Event,
    ModerationEvent,
    StartEvent,
    Usage,
    decode,
    encode,
    encode_each,
    encode_many,
    is_terminal,
)
from .logging import configure_logging
from .plugins import PluginBase
from .stopping import StopOutcome, StopRoute
from .subscription import Filter, OverflowPolicy, StreamFailed, Subscription
from .writer import StreamWriter, new_stream_id

__all__ = [
    "AbortEvent",
    "Bus",
    "BusClosed",
    "ConfigError",
    "DecodeError",
    "DeltaEvent",
    "EndEvent",
    "ErrorEvent",
    "Event",
    "Filter",
    "ModerationEvent",
    "OverflowPolicy",
    "Overflowed",
    "Pipeline",
    "PipelineFailed",
    "PluginBase",
    "PluginError",
    "PluginNotFound",
    "Producer",
    "RecordingError",
    "Sink",
    "SinkFailed",
    "StartEvent",
    "StopFailed",
    "StopOutcome",
    "StopRoute",
    "StreamBusError",
    "StreamClosed",
    "StreamFailed",
    "StreamWriter",
    "StreamsFailed",
    "Subscription",
    "SubscriptionClosed",
    "UnknownOption",
    "Usage",
    "WireError",
    "__version__",
    "configure_logging",
    "decode",
    "encode",
    "encode_each",
    "encode_many",
    "is_terminal",
    "load_config",
    "new_stream_id",
]
