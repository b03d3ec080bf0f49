"""Counting tokens when the provider did not report them.

:class:`TokenCounter` uses ``tiktoken`` when it is installed *and* can load
the encoding of the model (``tiktoken.encoding_for_model``, or the encoding
named in the options). tiktoken downloads its BPE files on first use; on a
machine without network access (or for models it does not know, such as
``llama3``) loading fails, the failure is remembered (one warning per
encoding, no retry per stream) and the documented approximation is used:

    tokens(text) = sum over the pieces of ``\\w+|[^\\w\\s]`` of ceil(len(piece) / 4)

i.e. every word or punctuation mark is at least one token and long words are
one token per four characters (OpenAI's rule of thumb). On English prose it
lands within about 25% of BPE tokenizers; it is a fallback, not a tokenizer.
Counts made either way are reported with ``source = "counted"``.
"""

from __future__ import annotations

import contextlib
import math
import re
import threading
from collections.abc import Iterator
from typing import Any, Literal

import structlog

__all__ = ["TokenCounter", "approximate_tokens"]

log = structlog.get_logger("streambus.stats")

_PIECE = re.compile(r"\w+|[^\w\s]")

TokenizerChoice = Literal["auto", "tiktoken", "approx"]


def approximate_tokens(text: str) -> int:
    """Return the documented approximate token count of *text* (0 for empty or blank text)."""
    return sum(math.ceil(len(piece) / 4) for piece in _PIECE.findall(text))


class TokenCounter:
    """Counts tokens of a model's text; :attr:`method` of the last count says how.

    :param tokenizer: ``auto`` (tiktoken when it can load the model's
        encoding, else the approximation), ``tiktoken`` (same, but warn on
        every fallback), or ``approx`` (never try tiktoken).
    :param encoding: a tiktoken encoding name (``o200k_base``) to use for every
        model instead of looking the model up.
    """

    def __init__(self, tokenizer: TokenizerChoice = "auto", encoding: str | None = None) -> None:
        if tokenizer not in ("auto", "tiktoken", "approx"):
            raise ValueError(f"tokenizer: expected auto, tiktoken or approx, got {tokenizer!r}")
        self.tokenizer = tokenizer
        self.encoding = encoding
        self._encoders: dict[str, Any] = {}
        self._failed: dict[str, str] = {}

    def encoder_for(self, model: str) -> Any | None:
        """Return the tiktoken encoding for *model*, or ``None`` when it cannot be had (cached)."""
        if self.tokenizer == "approx":
            return None
        key = self.encoding or model
        if key in self._encoders:
            return self._encoders[key]
        if key in self._failed:
            return None
        try:
            import tiktoken
        except ImportError:
            self._fail(key, "tiktoken is not installed (pip install 'streambus-stats[tiktoken]')")
            return None
        try:
            with _cache_only():
                enc = tiktoken.get_encoding(self.encoding) if self.encoding else tiktoken.encoding_for_model(model)
        except KeyError:
            self._fail(key, f"tiktoken does not know the encoding of model {model!r}")
            return None
        except Exception as exc:  # the BPE file is not cached, or the cache is bad
            # The full text of a connection error is a screenful; its first line says enough.
            detail = str(exc).splitlines()[0][:160] if str(exc) else ""
            self._fail(key, f"tiktoken could not load the encoding (offline?): {type(exc).__name__}: {detail}")
            return None
        self._encoders[key] = enc
        return enc

    def _fail(self, key: str, why: str) -> None:
        self._failed[key] = why
        log.warning("stats.tokenizer_fallback", model=key, reason=why, method="approx")

    def count(self, text: str, model: str) -> tuple[int, str]:
        """Return ``(tokens, method)`` with method ``tiktoken:<encoding>`` or ``approx``."""
        if not text:
            return 0, "none"
        enc = self.encoder_for(model)
        if enc is not None:
            return len(enc.encode(text, disallowed_special=())), f"tiktoken:{enc.name}"
        return approximate_tokens(text), "approx"

    @property
    def fallbacks(self) -> dict[str, str]:
        """Models (or encodings) that fell back to the approximation, with the reason."""
        return dict(self._failed)


_cache_lock = threading.Lock()


@contextlib.contextmanager
def _cache_only() -> Iterator[None]:
    """Let tiktoken read its BPE files from its cache but never download them.

    tiktoken fetches a missing encoding file over the internet on first use;
    a stats sink must not make network calls behind the user's back (and on
    an offline machine the attempt only costs a DNS timeout). Its module-level
    ``read_file`` is what fetches; swap it for the duration of the load.
    """
    import tiktoken.load

    def refuse(blobpath: str) -> bytes:
        raise OSError(f"{blobpath} is not in tiktoken's cache (TIKTOKEN_CACHE_DIR) and streambus never downloads it")

    with _cache_lock:
        original = tiktoken.load.read_file
        tiktoken.load.read_file = refuse
        try:
            yield
        finally:
            tiktoken.load.read_file = original
