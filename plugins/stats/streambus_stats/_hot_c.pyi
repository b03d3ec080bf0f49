"""Types of the compiled hot path (``_hot_c.pyx``): the same interface as ``_hot``."""

from ._hot import Feeder as Feeder
from ._hot import Gaps as Gaps
from ._hot import Live as Live

COMPILED: bool
