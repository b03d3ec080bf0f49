"""Plugins shipped with the core, registered by entry point like any other."""

from __future__ import annotations

from .recorder import RecorderSink
from .stdout import StdoutSink, TextLayout
from .synthetic import SyntheticProducer

__all__ = ["RecorderSink", "StdoutSink", "SyntheticProducer", "TextLayout"]
