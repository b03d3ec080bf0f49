"""Token counting when the provider reports no usage: tiktoken if it can load, else the approximation."""

from __future__ import annotations

import math
import re
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from streambus_stats import StatsAggregator, TokenCounter, approximate_tokens

from streambus.events import DeltaEvent, EndEvent, StartEvent, Usage


def stream(usage: Usage | None, model: str = "gpt-4o", **meta: Any) -> list:
    return [
        StartEvent(stream="s", seq=0, ts=0.0, model=model, provider="openai", meta=meta),
        DeltaEvent(stream="s", seq=1, ts=0.5, text="Hello"),
        DeltaEvent(stream="s", seq=2, ts=0.75, text=", world!"),
        EndEvent(stream="s", seq=3, ts=1.0, usage=usage),
    ]


def test_approximation_is_documented_rule() -> None:
    assert approximate_tokens("") == 0
    assert approximate_tokens("   ") == 0
    assert approximate_tokens("Hi") == 1
    assert approximate_tokens("Hello, world!") == 2 + 1 + 2 + 1
    assert approximate_tokens("internationalization") == 5  # 20 chars / 4


_RULE = re.compile(r"\w+|[^\w\s]")

_TEXT = st.text(
    alphabet=st.one_of(
        st.sampled_from("ab_9 \t\n.,!?'-é中ß٣\u00a0\u2028\U0001f600"),  # ASCII, accents, CJK, digits, odd spaces
        st.characters(),
    ),
    max_size=200,
)


@given(_TEXT)
def test_approximation_counts_as_the_rule_reads(text: str) -> None:
    # The rule as docs/stats.md states it, piece by piece; the counter gets the same number without the pieces.
    assert approximate_tokens(text) == sum(math.ceil(len(piece) / 4) for piece in _RULE.findall(text))


def test_missing_usage_is_counted_and_marked(monkeypatch: pytest.MonkeyPatch) -> None:
    agg = StatsAggregator(tokenizer="approx")
    agg.feed_many(stream(None, prompt="What do you say?"))
    (r,) = agg.streams
    assert r.completion_tokens == approximate_tokens("Hello, world!")
    assert r.prompt_tokens == approximate_tokens("What do you say?")
    assert r.total_tokens == r.prompt_tokens + r.completion_tokens
    assert (r.usage_source, r.token_method) == ("counted", "approx")
    assert agg.snapshot()["overall"]["tokens"]["completion"]["counted"] == r.completion_tokens


def test_partial_provider_usage_is_completed_and_marked_counted() -> None:
    agg = StatsAggregator(tokenizer="approx")
    agg.feed_many(stream(Usage(prompt_tokens=12)))
    (r,) = agg.streams
    assert r.prompt_tokens == 12
    assert r.completion_tokens == approximate_tokens("Hello, world!")
    assert r.usage_source == "counted"


def test_provider_usage_wins_over_counting() -> None:
    agg = StatsAggregator(tokenizer="approx")
    agg.feed_many(stream(Usage(prompt_tokens=3, completion_tokens=4, total_tokens=7), prompt="ignored"))
    (r,) = agg.streams
    assert (r.prompt_tokens, r.completion_tokens, r.total_tokens, r.usage_source) == (3, 4, 7, "provider")


def test_tiktoken_offline_falls_back_to_approximation(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    # The real tiktoken code path with an empty cache: the counter must not even try the
    # network, and must fall back once (not per stream) to the documented rule.
    tiktoken = pytest.importorskip("tiktoken")
    import requests

    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    calls = []

    def no_network(*args: Any, **kwargs: Any) -> Any:
        calls.append(args)
        raise requests.ConnectionError("network is unreachable in this test")

    monkeypatch.setattr(requests, "get", no_network)
    monkeypatch.setattr(requests.Session, "request", no_network)
    tiktoken.registry.ENCODINGS.pop("o200k_base", None)
    counter = TokenCounter()
    assert counter.count("Hello, world!", "gpt-4o") == (approximate_tokens("Hello, world!"), "approx")
    assert counter.count("again", "gpt-4o") == (2, "approx")
    assert calls == []  # never a download attempt
    assert "is not in tiktoken's cache" in counter.fallbacks["gpt-4o"]
    assert "never downloads" in counter.fallbacks["gpt-4o"]
    agg = StatsAggregator(counter=counter)
    agg.feed_many(stream(None))
    assert (agg.streams[0].usage_source, agg.streams[0].token_method) == ("counted", "approx")
    assert agg.snapshot()["tokenizer_fallbacks"] == counter.fallbacks


def test_unknown_model_falls_back_without_network() -> None:
    pytest.importorskip("tiktoken")
    counter = TokenCounter()
    assert counter.count("Hello", "llama3.2:1b") == (2, "approx")
    assert "does not know" in counter.fallbacks["llama3.2:1b"]


def test_tiktoken_encoding_is_used_when_it_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    tiktoken = pytest.importorskip("tiktoken")

    class FakeEncoding:
        name = "fake_base"

        def encode(self, text: str, disallowed_special: Any = ()) -> list[int]:
            return list(range(len(text.split(","))))

    monkeypatch.setattr(tiktoken, "encoding_for_model", lambda model: FakeEncoding())
    agg = StatsAggregator()
    agg.feed_many(stream(None))
    (r,) = agg.streams
    assert (r.completion_tokens, r.usage_source, r.token_method) == (2, "counted", "tiktoken:fake_base")


def test_approx_tokenizer_never_tries_tiktoken(monkeypatch: pytest.MonkeyPatch) -> None:
    tiktoken = pytest.importorskip("tiktoken")
    monkeypatch.setattr(tiktoken, "encoding_for_model", lambda model: pytest.fail("tiktoken was asked"))
    assert TokenCounter("approx").count("Hi", "gpt-4o") == (1, "approx")
    with pytest.raises(ValueError, match="tokenizer"):
        TokenCounter("bpe")  # type: ignore[arg-type]


def _train_tokenizer(directory: Any) -> Any:
    """A small BPE tokenizer trained here (no download), saved as ``tokenizer.json`` in *directory*."""
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import models, pre_tokenizers, trainers

    tok = tokenizers.Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["[UNK]"])
    tok.train_from_iterator(["Hello, world! Hello again, world."] * 50, trainer=trainer)
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    return tok


def test_the_models_own_tokenizer_counts_when_it_is_on_this_machine(tmp_path: Any) -> None:
    tok = _train_tokenizer(tmp_path / "llama")
    expected = len(tok.encode("Hello, world!", add_special_tokens=False).ids)
    assert expected != approximate_tokens("Hello, world!")  # so the test tells the two apart
    source = str(tmp_path / "llama")
    agg = StatsAggregator(hf_tokenizers={"llama3.2": source})
    agg.feed_many(stream(None, model="llama3.2"))
    record = agg.streams[0]
    assert (record.usage_source, record.token_method) == ("counted", f"hf:{source}")
    assert record.completion_tokens == expected
    # a file works as well as its directory
    counter = TokenCounter(hf_tokenizers={"m": str(tmp_path / "llama" / "tokenizer.json")})
    assert counter.count("Hello, world!", "m") == (expected, f"hf:{tmp_path / 'llama' / 'tokenizer.json'}")


def test_a_hub_model_name_finds_its_tokenizer_in_the_local_cache(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A model served under its hub name (vLLM, TGI) is counted with the cached tokenizer, never a download."""
    pytest.importorskip("huggingface_hub")
    snapshot = tmp_path / "hub" / "models--acme--tiny" / "snapshots" / "abc123"
    tok = _train_tokenizer(snapshot)
    (tmp_path / "hub" / "models--acme--tiny" / "refs").mkdir()
    (tmp_path / "hub" / "models--acme--tiny" / "refs" / "main").write_text("abc123")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    counter = TokenCounter()
    expected = len(tok.encode("Hello, world!", add_special_tokens=False).ids)
    assert counter.count("Hello, world!", "acme/tiny") == (expected, "hf:acme/tiny")
    assert counter.count("Hello", "acme/not-cached") == (2, "approx")


def test_falling_back_is_said_once_in_one_short_line(tmp_path: Any) -> None:
    from structlog.testing import capture_logs

    counter = TokenCounter(hf_tokenizers={"a": str(tmp_path / "missing"), "b": str(tmp_path / "also-missing")})
    with capture_logs() as logs:
        assert counter.count("Hello", "a")[1] == "approx"
        assert counter.count("Hello", "b")[1] == "approx"
        assert counter.count("Hello", "llama3.2")[1] == "approx"
    warnings = [entry for entry in logs if entry["log_level"] == "warning"]
    assert len(warnings) == 1
    assert warnings[0]["event"] == "stats.tokens_approximated"
    assert "no tokenizer.json at" in counter.fallbacks["a"]
    assert "no tokenizer.json at" in counter.fallbacks["b"]


def test_cli_hf_tokenizer_option(tmp_path: Any) -> None:
    from click.testing import CliRunner

    from streambus.cli import main
    from streambus.recording import write_recording

    tok = _train_tokenizer(tmp_path / "tok")
    recording = tmp_path / "r.jsonl"
    write_recording(recording, stream(None, model="llama3.2"))
    ran = CliRunner().invoke(
        main, ["stats", str(recording), "--json", "--streams", "--hf-tokenizer", f"llama3.2={tmp_path / 'tok'}"]
    )
    assert ran.exit_code == 0, ran.output
    import orjson

    (record,) = orjson.loads(ran.stdout)["streams"]
    assert record["completion_tokens"] == len(tok.encode("Hello, world!", add_special_tokens=False).ids)
    bad = CliRunner().invoke(main, ["stats", str(recording), "--hf-tokenizer", "no-equals-sign"])
    assert bad.exit_code == 2
    assert "'no-equals-sign': expected MODEL=TOKENIZER" in bad.stderr
