"""The redactor that keeps forwarded credentials out of events, recordings and logs."""

from __future__ import annotations

import base64

import pytest
from streambus_proxy import REDACTED
from streambus_proxy._redact import HOLD_FROM, MIN_SECRET, Redactor, secrets_of

KEY = "sk-proj-0123456789abcdefXYZ"


def test_secrets_of_a_bearer_and_a_basic_header() -> None:
    basic = "Basic " + base64.b64encode(b"bob:long-password-1").decode()
    found = secrets_of([f"Bearer {KEY}", basic, "short"])
    assert f"Bearer {KEY}" in found and KEY in found
    assert basic in found and basic.split()[1] in found
    assert "bob:long-password-1" in found and "long-password-1" in found
    assert "short" not in found  # under MIN_SECRET: would mangle ordinary text
    assert all(len(s) >= MIN_SECRET for s in found)
    assert secrets_of(["Basic !!notbase64!!"]) == ["Basic !!notbase64!!", "!!notbase64!!"]


def test_text_and_nested_values() -> None:
    r = Redactor(secrets_of([f"Bearer {KEY}"]))
    assert r.text(f"Incorrect API key provided: Bearer {KEY}.") == f"Incorrect API key provided: {REDACTED}."
    assert r.text(f"{KEY}{KEY}") == REDACTED * 2
    meta = {"a": [KEY, {"b": f"x{KEY}"}], KEY: 1, "n": 2}
    assert r.value(meta) == {"a": [REDACTED, {"b": f"x{REDACTED}"}], REDACTED: 1, "n": 2}
    assert r.body(f"key={KEY}".encode()) == f"key={REDACTED}".encode()
    empty = Redactor([])
    assert not empty and empty.text(KEY) == KEY and empty.value(meta) is meta


@pytest.mark.parametrize("kind", ["text", "bytes"])
def test_a_secret_split_at_any_point_is_caught(kind: str) -> None:
    r = Redactor(secrets_of([f"Bearer {KEY}"]))
    whole = f"say Bearer {KEY} then {KEY[:5]} and {KEY}!"
    expected = r.text(whole)
    assert KEY not in expected

    def unprefixed(text: str) -> str:
        # A split within a secret's first HOLD_FROM - 1 characters passes them on: those only.
        for secret in r.secrets:
            for k in range(HOLD_FROM - 1, 0, -1):
                text = text.replace(secret[:k] + REDACTED, REDACTED)
        return text

    for cut in range(len(whole) + 1):
        for second in range(cut, len(whole) + 1):
            pieces = [whole[:cut], whole[cut:second], whole[second:]]
            if kind == "text":
                s = r.stream()
                out = "".join(s.feed(p) for p in pieces) + s.flush()
            else:
                b = r.byte_stream()
                out = (b"".join(b.feed(p.encode()) for p in pieces) + b.flush()).decode()
            assert KEY[HOLD_FROM - 1 :] not in out, pieces
            assert unprefixed(out) == expected, pieces


def test_one_character_pieces() -> None:
    s = Redactor([KEY]).stream()
    out = [s.feed(c) for c in f"ask {KEY}."] + [s.flush()]
    assert "".join(out) == f"ask {KEY[: HOLD_FROM - 1]}{REDACTED}."


def test_only_a_likely_secret_start_is_held_back() -> None:
    s = Redactor([KEY]).stream()
    assert s.feed("the sky is blue") == "the sky is blue"
    assert s.feed(" it is") == " it is"  # "s" alone could start the key, but is too common to hold
    assert s.feed(" sk-pr") == " "  # four characters of the key: held
    assert s.feed("ay") == "sk-pray"  # it was not the key
    assert s.feed(" s") == " s"
    assert s.feed(KEY[1:] + " ok") == f"{REDACTED} ok"  # the rest of the key, after its passed "s"
    assert s.flush() == ""
