"""streambus-langchain: streambus and LangChain, both directions.

- :class:`ChatModelProducer` runs any ``BaseChatModel.astream`` and publishes
  it as one stream (content, reasoning and tool-call chunks, usage, finish reason);
- :class:`BusCallbackHandler` publishes every model run of an existing chain
  or agent to a bus, one stream per run id, with one argument:
  ``config={"callbacks": [BusCallbackHandler(bus)]}``;
- :class:`RecordedChatModel` answers ``invoke`` / ``stream`` / ``astream``
  from a streambus recording, so LangChain apps are tested against recorded
  streams.

Needs ``langchain-core``: ``pip install 'streambus-langchain[langchain]'``.
LangChain's async API runs on asyncio only; under trio these raise
:class:`WrongEventLoop`. See ``docs/plugins/langchain.md``.
"""

from __future__ import annotations

try:
    import langchain_core  # noqa: F401
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        f"streambus-langchain needs langchain-core ({exc}). "
        "Install it with: pip install 'streambus-langchain[langchain]'"
    ) from exc

from ._callbacks import BusCallbackHandler
from ._errors import RecordedStreamError, StreamAborted, WrongEventLoop
from ._mapping import chunk_pieces, finish_reason, langchain_usage, usage_from_metadata
from ._producer import ChatModelProducer, model_identity
from ._recorded import RecordedChatModel

__all__ = [
    "BusCallbackHandler",
    "ChatModelProducer",
    "RecordedChatModel",
    "RecordedStreamError",
    "StreamAborted",
    "WrongEventLoop",
    "chunk_pieces",
    "finish_reason",
    "langchain_usage",
    "model_identity",
    "usage_from_metadata",
]
