"""Test doubles: a tiny random-weight GPT-2 and a tokenizer trained on the spot (no download).

::

    from streambus_transformers.testing import tiny_model, tiny_tokenizer

    tokenizer = tiny_tokenizer()
    model = tiny_model(tokenizer)

Generation from random weights is gibberish, but deterministic for a given
seed, fast (2 layers, 32-wide), and exercises the real ``generate`` loop,
streamer and tokenizer.
"""

from __future__ import annotations

from typing import Any

__all__ = ["CHAT_TEMPLATE", "tiny_model", "tiny_tokenizer"]

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
"""A minimal Jinja chat template for :func:`tiny_tokenizer` (``chat_template=True``)."""

_CORPUS = (
    "the bus carries every token from the model to each subscriber. "
    "streams start, carry deltas of text, and end with usage and timings. "
    "a slow reader gets bigger chunks and never loses a character. "
    "hello world, how are you today? fine, thanks: the quick brown fox jumps over the lazy dog. "
    "<|user|> <|assistant|> <|system|>\n"
)


def tiny_tokenizer(*, vocab_size: int = 320, chat_template: bool = True) -> Any:
    """Train a byte-level BPE tokenizer on a small built-in corpus; return a ``PreTrainedTokenizerFast``.

    ``<|endoftext|>`` is its end-of-sequence (and padding) token; with
    *chat_template* it carries :data:`CHAT_TEMPLATE`.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([_CORPUS] * 4, trainer)
    fast = PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>", pad_token="<|endoftext|>"
    )
    if chat_template:
        fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_model(tokenizer: Any, *, seed: int = 0, layers: int = 2, width: int = 32, positions: int = 512) -> Any:
    """Build a GPT-2 with random weights sized for *tokenizer* (``eval`` mode, CPU)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=positions,
        n_embd=width,
        n_layer=layers,
        n_head=2,
        # Wider initial weights make greedy decoding wander instead of repeating one token.
        initializer_range=0.5,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.eos_token_id,
    )
    config.name_or_path = "tiny-gpt2"
    return GPT2LMHeadModel(config).eval()  # type: ignore[no-untyped-call]
