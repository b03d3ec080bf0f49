"""Start hooks: code run as each stream starts, in the task that starts it.

::

    from streambus.hooks import add_start_hook

    remove = add_start_hook(lambda meta: meta.setdefault("host", "gpu-1"))
    ...
    remove()

A hook gets the stream's ``meta`` dict before the ``start`` event is built,
and may add keys to it. It runs in the producer's task, so it sees that
task's context variables: this is how a tracing plugin puts the current
span's ``traceparent`` into every stream a producer starts inside a span
(``streambus_otel.propagate_trace_context``), built-in producers included.
Hooks are process-wide. A hook that raises is logged and skipped: it never
costs a stream its start.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeAlias

import structlog

__all__ = ["StartHook", "add_start_hook", "run_start_hooks"]

log = structlog.get_logger("streambus.hooks")

StartHook: TypeAlias = Callable[[dict[str, Any]], None]
"""``hook(meta)``: may add keys to a starting stream's ``meta``."""

_hooks: list[StartHook] = []


def add_start_hook(hook: StartHook) -> Callable[[], None]:
    """Run ``hook(meta)`` as every stream starts, from now on; returns the function that removes it."""
    _hooks.append(hook)

    def remove() -> None:
        if hook in _hooks:
            _hooks.remove(hook)

    return remove


def run_start_hooks(meta: dict[str, Any]) -> None:
    """Run every start hook on *meta* (the stream writer calls this; a failing hook is logged and skipped)."""
    for hook in tuple(_hooks):
        try:
            hook(meta)
        except Exception as exc:
            log.error("start_hook.failed", hook=repr(hook), error=f"{type(exc).__name__}: {exc}")
