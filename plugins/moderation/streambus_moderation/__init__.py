"""streambus-moderation: moderate streamed completions without leaking.

The :class:`ModerationStage` sits between producers and the sinks that must
only see moderated text (``interpose = True``), checking each stream in
overlapping windows in ``gate`` mode (hold until approved) or ``observe``
mode (flag, retract or abort after the fact). Moderators are small async
objects (``check(text) -> Verdict``) found by entry point in
``streambus.moderators``: ``keywords``, ``openai`` and ``python`` ship here.

The ``openai`` moderator needs aiohttp (``pip install
'streambus-moderation[openai]'``) and is imported on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .keywords import KeywordModerator
from .normalize import Normalized, normalize
from .python_moderator import PythonModerator, coerce_verdict
from .stage import ModerationStage, ModerationStats
from .verdict import Moderator, Span, Verdict, load_moderator

if TYPE_CHECKING:
    from .openai_moderator import ModerationAPIError, OpenAIModerator

__all__ = [
    "KeywordModerator",
    "ModerationAPIError",
    "ModerationStage",
    "ModerationStats",
    "Moderator",
    "Normalized",
    "OpenAIModerator",
    "PythonModerator",
    "Span",
    "Verdict",
    "coerce_verdict",
    "load_moderator",
    "normalize",
]


def __getattr__(name: str) -> Any:
    # The openai moderator imports aiohttp, an optional dependency: load it lazily.
    if name in ("OpenAIModerator", "ModerationAPIError"):
        from . import openai_moderator

        return getattr(openai_moderator, name)
    raise AttributeError(f"module 'streambus_moderation' has no attribute {name!r}")
