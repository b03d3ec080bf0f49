"""streambus-litellm: the long tail of providers (Bedrock, Vertex, Mistral, Groq, Azure...) through LiteLLM.

:class:`LiteLLMProducer` (entry point ``litellm`` in ``streambus.producers``)
runs ``litellm.acompletion(..., stream=True)`` and maps its OpenAI-shaped
chunks and usage to bus events. LiteLLM itself is optional:
``pip install 'streambus-litellm[litellm]'``.
"""

from __future__ import annotations

from ._producer import LiteLLMProducer, chunk_pieces, usage_of

__all__ = ["LiteLLMProducer", "chunk_pieces", "usage_of"]
