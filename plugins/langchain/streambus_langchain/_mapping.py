"""How LangChain message chunks map onto streambus events, and back."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson
from langchain_core.messages import AIMessageChunk, BaseMessage

from streambus import Usage
from streambus.events import Channel
from streambus.wire import ToolCallFragment, tool_text

__all__ = ["chunk_pieces", "finish_reason", "langchain_usage", "usage_from_metadata"]

# Provider finish reasons, normalised to the names streambus uses on `end`.
_REASONS = {
    "stop": "stop",
    "end_turn": "stop",
    "stop_sequence": "stop",
    "eos": "stop",
    "length": "length",
    "max_tokens": "length",
    "tool_calls": "tool_calls",
    "tool_use": "tool_calls",
    "function_call": "tool_calls",
    "content_filter": "content_filter",
    "safety": "content_filter",
}


def chunk_pieces(message: BaseMessage) -> list[tuple[Channel, str]]:
    """Return the ``(channel, text)`` deltas one message chunk carries, in order.

    Works through ``message.content_blocks``, LangChain's provider-neutral
    view: ``text`` blocks (plain string content included) go to ``content``,
    ``reasoning`` blocks (and ``reasoning_content`` in ``additional_kwargs``)
    to ``reasoning``, ``tool_call_chunk`` / ``tool_call`` blocks to ``tool``
    as :func:`streambus.wire.tool_text` fragments. Other blocks (images,
    citations) carry no text and are skipped.
    """
    content = message.content
    if isinstance(content, str) and not _has_extras(message):
        return [("content", content)] if content else []
    pieces: list[tuple[Channel, str]] = []
    for block in message.content_blocks:
        kind = block.get("type")
        if kind == "text":
            text = block.get("text") or ""
            if text:
                pieces.append(("content", str(text)))
        elif kind == "reasoning":
            text = block.get("reasoning") or ""
            if text:
                pieces.append(("reasoning", str(text)))
        elif kind == "tool_call_chunk":
            index = block.get("index")
            fragment = ToolCallFragment(
                index=int(index) if isinstance(index, int) else 0,
                id=block.get("id"),
                name=block.get("name") or None,  # type: ignore[arg-type]
                arguments=str(block.get("args") or ""),
            )
            pieces.append(("tool", tool_text(fragment)))
        elif kind == "tool_call":
            fragment = ToolCallFragment(
                index=len([p for p in pieces if p[0] == "tool"]),
                id=block.get("id"),
                name=str(block.get("name") or ""),
                arguments=orjson.dumps(block.get("args") or {}).decode(),
            )
            pieces.append(("tool", tool_text(fragment)))
    return pieces


def _has_extras(message: BaseMessage) -> bool:
    if message.additional_kwargs.get("reasoning_content"):
        return True
    return isinstance(message, AIMessageChunk) and bool(message.tool_call_chunks)


def finish_reason(metadata: Mapping[str, Any], *, saw_tool_calls: bool = False) -> str:
    """Normalise a provider's finish reason from ``response_metadata`` / ``generation_info``.

    Looks at ``finish_reason`` (OpenAI), ``done_reason`` (Ollama) and
    ``stop_reason`` (Anthropic); unknown values are kept as they are.
    """
    for key in ("finish_reason", "done_reason", "stop_reason"):
        value = metadata.get(key)
        if isinstance(value, str) and value:
            return _REASONS.get(value.lower(), value.lower())
    return "tool_calls" if saw_tool_calls else "stop"


def usage_from_metadata(usage: Mapping[str, Any] | None) -> Usage | None:
    """Convert LangChain ``usage_metadata`` (``input_tokens`` ...) to a :class:`~streambus.Usage`."""
    if not usage:
        return None
    prompt = usage.get("input_tokens")
    completion = usage.get("output_tokens")
    total = usage.get("total_tokens")
    if total is None and prompt is not None and completion is not None:
        total = prompt + completion
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=total, source="provider")


def langchain_usage(usage: Usage | None) -> dict[str, int] | None:
    """Convert a :class:`~streambus.Usage` to LangChain ``usage_metadata`` (``None`` when unknown)."""
    if usage is None:
        return None
    prompt = usage.prompt_tokens or 0
    completion = usage.completion_tokens or 0
    total = usage.total_tokens if usage.total_tokens is not None else prompt + completion
    return {"input_tokens": prompt, "output_tokens": completion, "total_tokens": total}
