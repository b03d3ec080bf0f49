"""The parts of the producer that subclass ``transformers`` classes.

Imported when a generation starts, not with the plugin: importing torch and
transformers takes seconds, and ``streambus plugins`` or a pipeline that does
not use this producer should not pay for it.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import torch
from transformers import StoppingCriteria, StoppingCriteriaList, TextStreamer

from ._handoff import Handoff

__all__ = ["AbortCriterion", "HandoffStreamer", "StoppingCriteriaList", "torch"]


class AbortCriterion(StoppingCriteria):
    """Stops ``generate`` after the current token once :meth:`set` was called."""

    def __init__(self) -> None:
        self.flag = threading.Event()

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any) -> torch.BoolTensor:
        stop: torch.BoolTensor = torch.full(
            (input_ids.shape[0],), self.flag.is_set(), dtype=torch.bool, device=input_ids.device
        )  # type: ignore[assignment]
        return stop


class HandoffStreamer(TextStreamer):
    """A :class:`TextStreamer` whose print-ready text goes into a :class:`Handoff`.

    ``TextStreamer`` does the incremental detokenising (it holds back text
    until a word or a complete character is ready); this class only moves it.
    """

    def __init__(self, tokenizer: Any, handoff: Handoff, criterion: AbortCriterion, **decode_kwargs: Any) -> None:
        super().__init__(tokenizer, skip_prompt=True, **decode_kwargs)
        self.handoff = handoff
        self.criterion = criterion
        self.first_token_at: float | None = None

    def put(self, value: Any) -> None:
        # The first call carries the prompt (skipped); the second the first new token.
        if self.next_tokens_are_prompt is False and self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        super().put(value)  # type: ignore[no-untyped-call]

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        if text and not self.handoff.put(text):
            self.criterion.flag.set()
