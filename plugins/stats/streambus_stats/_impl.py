"""Which hot path the aggregator runs: the compiled ``_hot_c`` when it was built, else ``_hot`` (pure Python).

Installing the plugin builds ``_hot_c`` with Cython when a C compiler is
there (the build falls back to pure Python, with a warning, when it is not).
Set ``STREAMBUS_STATS_PURE=1`` to run the pure-Python path anyway. A compiled
module older than its ``.pyx`` (an editable install whose source changed
since) is not used, and a ``stats.hot_path_stale`` warning is logged:
rebuild with ``pip install -e plugins/stats``.
"""

from __future__ import annotations

import os
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

import structlog

from . import _hot

__all__ = ["COMPILED", "Feeder", "Gaps", "Live", "load", "select"]


def load(*, pure: bool = False) -> ModuleType:
    """Return the hot-path module to use: ``_hot_c`` when built and current (unless *pure*), else ``_hot``."""
    if pure or os.environ.get("STREAMBUS_STATS_PURE", "") not in ("", "0"):
        return _hot
    try:
        from . import _hot_c
    except ImportError:
        return _hot
    built = Path(_hot_c.__file__ or "")
    source = Path(__file__).with_name("_hot_c.pyx")
    if source.exists() and built.exists() and source.stat().st_mtime > built.stat().st_mtime:
        structlog.get_logger("streambus.stats").warning(
            "stats.hot_path_stale",
            detail=f"{built.name} is older than {source.name}: running the pure-Python hot path",
            fix="pip install -e plugins/stats",
        )
        return _hot
    return _hot_c


def select(module: ModuleType) -> None:
    """Make aggregators created from now on run *module*'s hot path (``_hot`` or ``_hot_c``): for tests, benchmarks."""
    globals().update(Feeder=module.Feeder, Gaps=module.Gaps, Live=module.Live, COMPILED=module is not _hot)


if TYPE_CHECKING:
    from ._hot import Feeder, Gaps, Live

COMPILED = False
"""Whether the aggregator runs the compiled hot path."""
select(load())
