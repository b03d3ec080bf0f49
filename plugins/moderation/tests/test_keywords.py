# ruff: noqa: RUF001  (full-width and half-width characters are the point of these tests)
"""The keywords moderator: normalisation, Japanese, whole words, regexes, option errors."""

from __future__ import annotations

from pathlib import Path

import pytest
from streambus_moderation import KeywordModerator, Span, normalize

pytestmark = pytest.mark.anyio


def spans(moderator: KeywordModerator, text: str) -> list[tuple[str, str | None]]:
    return [(text[s.start : s.end], s.category) for s in moderator.scan(text)]


@pytest.mark.parametrize(
    "text",
    [
        "I will kill you",
        "I will KILL you",
        "I will \uff2b\uff29\uff2c\uff2c you",  # full-width
        "I will Kill you",
        "I will k\u0131ll you".replace("\u0131", "i"),
    ],
)
def test_case_and_full_width_forms_are_caught(text: str) -> None:
    moderator = KeywordModerator(words={"violence": ["kill"]})
    found = spans(moderator, text)
    assert len(found) == 1
    assert found[0][1] == "violence"
    assert found[0][0].casefold() in {"kill", "\uff4b\uff49\uff4c\uff4c"}


def test_japanese_terms_match_inside_text_and_in_half_width_katakana() -> None:
    moderator = KeywordModerator(words={"violence": ["殺す", "コロス"]})
    assert spans(moderator, "お前を殺すぞ") == [("殺す", "violence")]
    # half-width katakana normalises to full-width; the span covers the original characters
    assert spans(moderator, "ｺﾛｽぞ") == [("ｺﾛｽ", "violence")]
    # half-width voiced marks compose with the previous character (ｶﾞ -> ガ)
    voiced = KeywordModerator(words={"x": ["ガス"]})
    assert spans(voiced, "あのｶﾞｽです") == [("ｶﾞｽ", "x")]
    # mixed with Latin text and no spaces
    latin = KeywordModerator(words={"violence": ["kill"]})
    assert spans(latin, "彼はkillした") == [("kill", "violence")]


def test_compatibility_forms_and_ligatures_map_back_to_original_span() -> None:
    moderator = KeywordModerator(words={"x": ["find", "平成"]})
    text = "we \ufb01nd it in ㍻"
    assert spans(moderator, text) == [("\ufb01nd", "x"), ("㍻", "x")]


def test_whole_words_only_for_spaced_scripts_unless_disabled() -> None:
    strict = KeywordModerator(words={"x": ["kill"]})
    assert spans(strict, "skills and killer") == []
    assert spans(strict, "kill, killing") == [("kill", "x")]
    loose = KeywordModerator(words={"x": ["kill"]}, whole_words=False)
    assert [t for t, _ in spans(loose, "skills and killer")] == ["kill", "kill"]


def test_regex_patterns_run_on_normalised_text_with_their_category() -> None:
    moderator = KeywordModerator(words={"v": ["kill"]}, patterns={"pii": [r"\d{3}-\d{4}"]})
    # full-width digits normalise to ASCII, so the pattern still matches
    assert spans(moderator, "call ０９０-１２３４ or kill") == [("０９０-１２３４", "pii"), ("kill", "v")]


async def test_check_returns_flagged_verdict_with_categories_and_spans() -> None:
    moderator = KeywordModerator(words={"v": ["kill"], "s": ["spam"]})
    verdict = await moderator.check("spam then kill")
    assert verdict.flagged
    assert verdict.categories == ["s", "v"]
    assert verdict.spans == [Span(start=0, end=4, category="s"), Span(start=10, end=14, category="v")]
    assert not (await moderator.check("all good")).flagged


def test_word_files_are_read_with_comments(tmp_path: Path) -> None:
    words = tmp_path / "words.txt"
    words.write_text("# violent words\nkill\n\n  murder  \n", encoding="utf-8")
    moderator = KeywordModerator(files={"violence": str(words)})
    assert spans(moderator, "murder and kill") == [("murder", "violence"), ("kill", "violence")]
    assert moderator.context_chars == 2 * len("murder")


def test_bad_options_name_the_key(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"patterns\.pii\[0\]: invalid regular expression"):
        KeywordModerator(patterns={"pii": ["("]})
    with pytest.raises(ValueError, match=r"patterns\.x\[0\]: matches the empty string"):
        KeywordModerator(patterns={"x": ["a*"]})
    with pytest.raises(ValueError, match=r"words\.x\[1\]: empty term"):
        KeywordModerator(words={"x": ["ok", "  "]})
    with pytest.raises(ValueError, match="no words, patterns or files"):
        KeywordModerator(KeywordModerator.Options())
    with pytest.raises(ValueError, match=r"files\.x: cannot read"):
        KeywordModerator(files={"x": str(tmp_path / "missing.txt")})


def test_normalize_maps_every_character_back() -> None:
    text = "ＡＢｶﾞc\u0301ß"
    norm = normalize(text)
    assert norm.text == "abガćss"
    assert norm.source_span(0, 2) == (0, 2)
    assert norm.source_span(2, 3) == (2, 4)  # ガ came from ｶﾞ
    assert norm.source_span(3, 4) == (4, 6)  # ć came from c + combining acute
    assert norm.source_span(4, 6) == (6, 7)  # ss came from ß
    plain = normalize("plain ascii")
    assert plain.text == "plain ascii" and plain.source_span(1, 3) == (1, 3)


def test_composition_across_characters_is_still_flagged() -> None:
    # Conjoining Hangul jamo compose under NFKC (U+1100 U+1161 -> U+AC00) although
    # neither is a combining mark: the match cannot be mapped to exact characters,
    # so the whole text is reported rather than let through.
    moderator = KeywordModerator(words={"x": ["\uac00\ub098"]}, whole_words=False)
    text = "ok \u1100\u1161\u1102\u1161 ok"
    assert [(s.start, s.end, s.category) for s in moderator.scan(text)] == [(0, len(text), "x")]
