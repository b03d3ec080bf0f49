"""Unicode normalisation for matching, with a map back to the original offsets.

:func:`normalize` applies NFKC and case folding (Unicode's "NFKC_Casefold"
idea) so full-width letters (``ＫＩＬＬ``), compatibility forms (``ﬁ``,
``㍻``), half-width katakana (``ｶﾞ`` becomes ``ガ``) and case variants all
compare equal to the plain form. Matching happens on the normalised text;
:class:`Normalized` maps a match back to the characters of the original
text, so a span reported to clients covers what they were actually shown.
"""  # noqa: RUF002

from __future__ import annotations

import unicodedata

__all__ = ["Normalized", "normalize"]

# Marks that attach to the previous character under NFKC although their own
# combining class is 0 (half-width katakana voiced / semi-voiced sound marks).
_ATTACHING = frozenset("\uff9e\uff9f")


# Folding one character at a time is the slow path's cost: text repeats its
# characters, so each is folded once (bounded by the characters in use).
_CHAR_CACHE: dict[str, str] = {}


def _fold(text: str) -> str:
    return unicodedata.normalize("NFKC", unicodedata.normalize("NFKC", text).casefold())


class Normalized:
    """Normalised text plus the original span of every normalised character.

    ``text`` is what to match against; :meth:`source_span` turns a match
    ``[start, end)`` in ``text`` into the original ``[start, end)``.
    """

    __slots__ = ("_ends", "_starts", "text")

    def __init__(self, text: str, starts: list[int] | None, ends: list[int] | None) -> None:
        self.text = text
        self._starts = starts
        self._ends = ends

    def source_span(self, start: int, end: int) -> tuple[int, int]:
        """Return the original-text span of the normalised span ``[start, end)``."""
        if self._starts is None or self._ends is None:
            return start, end
        if end <= start:
            pos = self._starts[start] if start < len(self._starts) else (self._ends[-1] if self._ends else 0)
            return pos, pos
        return self._starts[start], self._ends[end - 1]


def normalize(text: str) -> Normalized:
    """Return *text* NFKC-normalised and case-folded, with the offset map.

    Text that is already normalised and folds one character to one (plain
    ASCII, most Japanese) takes a fast path with an identity map.
    """
    folded = text.casefold() if not text.isascii() else text.lower()
    if len(folded) == len(text) and (
        text.isascii() or (unicodedata.is_normalized("NFKC", text) and unicodedata.is_normalized("NFKC", folded))
    ):
        return Normalized(folded, None, None)
    # Slow path: normalise grapheme-like segments (a base character plus the
    # marks that compose with it) one at a time, so each output character
    # knows which original characters it came from.
    out: list[str] = []
    starts: list[int] = []
    ends: list[int] = []
    n = len(text)
    i = 0
    while i < n:
        j = i + 1
        while j < n and (unicodedata.combining(text[j]) or text[j] in _ATTACHING):
            j += 1
        if j == i + 1:
            char = text[i]
            piece = _CHAR_CACHE.get(char)
            if piece is None:
                piece = _CHAR_CACHE[char] = _fold(char)
        else:
            piece = _fold(text[i:j])
        out.append(piece)
        starts.extend([i] * len(piece))
        ends.extend([j] * len(piece))
        i = j
    return Normalized("".join(out), starts, ends)
