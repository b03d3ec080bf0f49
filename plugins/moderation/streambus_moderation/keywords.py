"""The ``keywords`` moderator: word lists and regular expressions, Unicode-aware.

::

    KeywordModerator(KeywordModerator.Options(
        words={"violence": ["kill", "殺す"]},
        patterns={"pii": [r"\\b\\d{3}-\\d{4}-\\d{4}\\b"]},
    ))

Text and terms are compared after NFKC normalisation and case folding, so
``ＫＩＬＬ``, ``Kill`` and ``kill`` are the same word, and half-width
``ｺﾛｽ`` is ``コロス``. Terms written in scripts that separate words with
spaces (Latin, Greek, Cyrillic, digits) match whole words only (``kill`` does
not match ``skills``) unless ``whole_words = false``; terms in scripts
without spaces (Japanese, Chinese) match anywhere. Regular expressions run on
the normalised text (write them in lower case) and are never wrapped in word
boundaries.
"""  # noqa: RUF002

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, ClassVar

import msgspec

from streambus.plugins import PluginBase

from .normalize import _fold, normalize
from .verdict import Span, Verdict

__all__ = ["KeywordModerator"]

# Characters of scripts that put spaces between words: a term starting or
# ending with one must not touch another such character to match.
_SPACED = (
    r"0-9a-z\u00aa\u00b5\u00ba\u00c0-\u024f\u0370-\u03ff\u0400-\u052f\u0531-\u058f"
    r"\u0590-\u05ff\u0600-\u06ff\u0e00-\u0e7f\u1e00-\u1fff\uac00-\ud7af"
)
_SPACED_CHAR = re.compile(f"[{_SPACED}]")


def _trie_regex(terms: list[str]) -> str:
    """A regex matching any of *terms*, longest first, built from their trie."""
    trie: dict[str, Any] = {}
    for term in terms:
        node = trie
        for char in term:
            node = node.setdefault(char, {})
        node[""] = {}

    def render(node: dict[str, Any]) -> str:
        ends_here = "" in node
        branches = [re.escape(char) + render(child) for char, child in sorted(node.items()) if char]
        if not branches:
            return ""
        body = branches[0] if len(branches) == 1 and len(branches[0]) == 1 else f"(?:{'|'.join(branches)})"
        if len(branches) == 1 and not ends_here:
            return branches[0]
        return f"{body}?" if ends_here else body

    return render(trie)


class KeywordModerator(PluginBase):
    """Flag windows that contain listed words or match listed regular expressions.

    Each match becomes one :class:`~streambus_moderation.Span` with its
    category, so the stage retracts or redacts exactly the matched text.
    """

    class Options(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
        """Config keys of the ``keywords`` moderator."""

        words: dict[str, list[str]] = {}
        """Category -> terms, e.g. ``{violence = ["kill", "殺す"]}``."""
        patterns: dict[str, list[str]] = {}
        """Category -> regular expressions, matched against normalised text."""
        files: dict[str, str] = {}
        """Category -> path of a word list (one term per line, ``#`` comments)."""
        whole_words: bool = True
        """Match terms of spaced scripts as whole words only."""

        def __post_init__(self) -> None:
            for category, terms in self.words.items():
                for i, term in enumerate(terms):
                    if not _fold(term).strip():
                        raise ValueError(f"words.{category}[{i}]: empty term")
            for category, patterns in self.patterns.items():
                for i, pattern in enumerate(patterns):
                    try:
                        compiled = re.compile(pattern)
                    except re.error as exc:
                        raise ValueError(f"patterns.{category}[{i}]: invalid regular expression: {exc}") from None
                    if compiled.match(""):
                        raise ValueError(f"patterns.{category}[{i}]: matches the empty string")
            if not (self.words or self.patterns or self.files):
                raise ValueError("words: no words, patterns or files given; the moderator would flag nothing")

    name: ClassVar[str] = "keywords"

    def __init__(self, options: Options | None = None, **kwargs: object) -> None:
        options = self.resolve_options(options, kwargs)
        self.options = options
        words: dict[str, list[str]] = {c: list(t) for c, t in options.words.items()}
        for category, path in options.files.items():
            try:
                lines = Path(path).read_text(encoding="utf-8").splitlines()
            except OSError as exc:
                raise ValueError(f"files.{category}: cannot read {path}: {exc.strerror or exc}") from None
            words.setdefault(category, []).extend(
                line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")
            )
        alternatives: list[str] = []
        self._categories: list[str] = []
        longest = 0
        for category, terms in words.items():
            folded = {_fold(t).strip() for t in terms if _fold(t).strip()}
            if not folded:
                continue
            longest = max(longest, *map(len, folded))
            alternatives.append(f"(?P<g{len(self._categories)}>{self._category_regex(folded, options.whole_words)})")
            self._categories.append(category)
        self._words = re.compile("|".join(alternatives)) if alternatives else None
        # Patterns run one by one: combined, their own groups and backreferences would clash.
        self._patterns = [
            (re.compile(pattern, re.IGNORECASE), category)
            for category, patterns in options.patterns.items()
            for pattern in patterns
        ]
        self.context_chars = 2 * longest
        """Overlap the stage needs so no listed word is cut between windows.

        Twice the longest normalised term: a normalised character can come
        from two original ones (``ｶﾞ``)."""

    @staticmethod
    def _category_regex(terms: set[str], whole_words: bool) -> str:
        """One regex for a category's terms: a trie per kind of word edge.

        A plain alternation of hundreds of words makes ``re`` try every word
        at every position; a trie shares prefixes, so each position costs
        about one branch. Terms are grouped by whether each edge needs a word
        boundary (only edges in spaced scripts do), and the lookarounds wrap
        the whole trie of a group.
        """
        groups: dict[tuple[bool, bool], list[str]] = {}
        for term in terms:
            left = whole_words and bool(_SPACED_CHAR.match(term[0]))
            right = whole_words and bool(_SPACED_CHAR.match(term[-1]))
            groups.setdefault((left, right), []).append(term)
        parts = []
        for (left, right), group in sorted(groups.items()):
            body = _trie_regex(group)
            parts.append((f"(?<![{_SPACED}])" if left else "") + f"(?:{body})" + (f"(?![{_SPACED}])" if right else ""))
        return "|".join(parts)

    def scan(self, text: str) -> list[Span]:
        """Return every match in *text* as spans of the original text (synchronous)."""
        ascii = text.isascii()
        # Most text is clean: search a whole-string normalisation first (fast,
        # in C) and build the offset map only when something matched.
        fast = [] if ascii else self._matches(_fold(text))
        if not ascii and not fast:
            return []
        norm = normalize(text)
        spans = [
            Span(start=start, end=end, category=category)
            for a, b, category in self._matches(norm.text)
            for start, end in [norm.source_span(a, b)]
        ]
        if not spans and not ascii:
            # Composition across segments found what segment-wise folding cannot
            # place: report the whole text rather than let it through.
            return [Span(start=0, end=len(text), category=fast[0][2])]
        spans.sort(key=lambda s: (s.start, s.end))
        return spans

    def _matches(self, folded: str) -> list[tuple[int, int, str | None]]:
        found: list[tuple[int, int, str | None]] = []
        if self._words is not None:
            for match in self._words.finditer(folded):
                group = match.lastgroup
                found.append((match.start(), match.end(), self._categories[int(group[1:])] if group else None))
        for regex, category in self._patterns:
            for match in regex.finditer(folded):
                if match.end() > match.start():
                    found.append((match.start(), match.end(), category))
        return found

    async def check(self, text: str) -> Verdict:
        """Return a flagged verdict with one span per match, or a clean one."""
        spans = self.scan(text)
        if not spans:
            return Verdict()
        categories = sorted({s.category for s in spans if s.category})
        return Verdict(flagged=True, categories=categories, scores=dict.fromkeys(categories, 1.0), spans=spans)
