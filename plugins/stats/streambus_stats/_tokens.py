"""Counting tokens when the provider did not report them.

:class:`TokenCounter` counts with the best tokenizer it can find *on this
machine*, never downloading anything:

1. the model's own tokenizer, from the Hugging Face ``tokenizers`` library:
   a ``tokenizer.json`` named for the model in ``hf_tokenizers`` (a file, a
   directory holding one, or a hub repo id), or, for a model named like a hub
   repo (``Qwen/Qwen3-8B``), one already in the local Hugging Face cache;
2. ``tiktoken``, when it is installed *and* its BPE file for the model's
   encoding is cached (``tiktoken.encoding_for_model``, or ``encoding``);
3. the documented approximation:

    tokens(text) = sum over the pieces of ``\\w+|[^\\w\\s]`` of ceil(len(piece) / 4)

i.e. every word or punctuation mark is at least one token and long words are
one token per four characters (OpenAI's rule of thumb). On English prose it
lands within about 25% of BPE tokenizers; it is a fallback, not a tokenizer.

Counts made any of these ways are reported with ``source = "counted"``, and
the stream's ``usage_method`` says which (``hf:<tokenizer>``,
``tiktoken:<encoding>`` or ``approx``). Falling back to the approximation is
said once per counter, in one short log line; :attr:`TokenCounter.fallbacks`
keeps every model's reason.
"""

from __future__ import annotations

import contextlib
import re
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Literal

import structlog

from ._distribution import COMPILED

__all__ = ["TokenCounter", "approximate_tokens", "count_pieces"]

log = structlog.get_logger("streambus.stats")

_PIECE = re.compile(r"\w{1,4}|[^\w\s]")
"""One approximate token: up to four word characters of a run (a run of n gives ceil(n / 4) of them), or one
other non-space character."""

TokenizerChoice = Literal["auto", "tiktoken", "approx"]


def approximate_tokens(text: str) -> int:
    """Return the documented approximate token count of *text* (0 for empty or blank text).

    That is the sum of ``ceil(len(piece) / 4)`` over the pieces ``\\w+|[^\\w\\s]`` finds; the
    regex engine counts the four-character parts itself (:func:`count_pieces`); the compiled
    twin of that loop, when built, counts the same in C.
    """
    return _count(text)


def count_pieces(text: str) -> int:
    """:func:`approximate_tokens` with the regex engine: the reference its compiled twin is tested against."""
    return _PIECE.subn("", text)[1]


_count = count_pieces
if COMPILED:
    from ._compiled import approximate_tokens as _count  # (the C loop: 30x faster)


class TokenCounter:
    """Counts tokens of a model's text; :attr:`method` of the last count says how.

    :param tokenizer: ``auto`` (tiktoken when it can load the model's
        encoding, else the approximation), ``tiktoken`` (same, but warn on
        every fallback), or ``approx`` (never try tiktoken).
    :param encoding: a tiktoken encoding name (``o200k_base``) to use for every
        model instead of looking the model up.
    """

    def __init__(
        self,
        tokenizer: TokenizerChoice = "auto",
        encoding: str | None = None,
        hf_tokenizers: Mapping[str, str] | None = None,
    ) -> None:
        if tokenizer not in ("auto", "tiktoken", "approx"):
            raise ValueError(f"tokenizer: expected auto, tiktoken or approx, got {tokenizer!r}")
        self.tokenizer = tokenizer
        self.encoding = encoding
        self.hf_tokenizers = dict(hf_tokenizers or {})
        """Model name -> a ``tokenizer.json`` file, a directory holding one, or a hub repo id in the local cache."""
        self._encoders: dict[str, Any] = {}
        self._hf: dict[str, tuple[Any, str] | None] = {}
        self._failed: dict[str, str] = {}
        self._warned = False

    def hf_tokenizer_for(self, model: str) -> tuple[Any, str] | None:
        """The model's own ``tokenizers.Tokenizer`` and its name, when one is on this machine (cached per model)."""
        if self.tokenizer != "auto":
            return None
        if model in self._hf:
            return self._hf[model]
        found = None
        source = self.hf_tokenizers.get(model) or (model if "/" in model else None)
        if source is not None:
            path = _local_tokenizer_file(source)
            if path is None and model in self.hf_tokenizers:
                self._fail(model, f"no tokenizer.json at {source!r} (a file, a directory, or a cached hub repo)")
            elif path is not None:
                try:
                    from tokenizers import Tokenizer

                    found = (Tokenizer.from_file(str(path)), source)
                except Exception as exc:  # ImportError, or tokenizers' own errors (plain Exception) for a bad file
                    self._fail(model, f"cannot load the tokenizer {source!r}: {type(exc).__name__}: {exc}")
        self._hf[model] = found
        return found

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
        if not self._warned:  # one short line per counter; every reason stays in `fallbacks`
            self._warned = True
            log.warning("stats.tokens_approximated", model=key, reason=why)

    def count(self, text: str, model: str) -> tuple[int, str]:
        """Return ``(tokens, method)`` with method ``hf:<tokenizer>``, ``tiktoken:<encoding>`` or ``approx``."""
        if not text:
            return 0, "none"
        own = self.hf_tokenizer_for(model)
        if own is not None:
            hf, name = own
            return len(hf.encode(text, add_special_tokens=False).ids), f"hf:{name}"
        enc = self.encoder_for(model)
        if enc is not None:
            return len(enc.encode(text, disallowed_special=())), f"tiktoken:{enc.name}"
        return approximate_tokens(text), "approx"

    @property
    def fallbacks(self) -> dict[str, str]:
        """Models (or encodings) that fell back to the approximation, with the reason."""
        return dict(self._failed)


def _local_tokenizer_file(source: str) -> Path | None:
    """A ``tokenizer.json`` for *source* already on this machine: a file, a directory, or a cached hub repo."""
    path = Path(source).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        inside = path / "tokenizer.json"
        return inside if inside.is_file() else None
    if source.count("/") != 1:
        return None
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    cached = try_to_load_from_cache(source, "tokenizer.json")
    return Path(cached) if isinstance(cached, str) else None


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
