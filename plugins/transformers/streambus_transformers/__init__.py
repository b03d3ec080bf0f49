"""streambus-transformers: stream an in-process Hugging Face ``transformers`` model onto the bus.

::

    from streambus import Bus
    from streambus_transformers import TransformersProducer

    async with Bus() as bus:
        producer = TransformersProducer(model=model, tokenizer=tokenizer, max_new_tokens=64)
        stream_id = await producer.generate(bus, messages=[{"role": "user", "content": "Hi"}])

``generate`` runs in a worker thread; its text reaches the bus through a
bounded handoff (no busy-waiting, no unbounded queue); aborting the stream
stops generation with a stopping criterion and joins the thread. Needs the
``transformers`` extra: ``pip install 'streambus-transformers[transformers]'``.
See ``docs/plugins/transformers.md``.
"""

from __future__ import annotations

try:
    import torch  # noqa: F401
    import transformers  # noqa: F401
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        f"streambus-transformers needs torch and transformers ({exc}). "
        "Install them with: pip install 'streambus-transformers[transformers]'"
    ) from exc

from ._handoff import Handoff
from ._producer import TransformersProducer

__all__ = ["Handoff", "TransformersProducer"]
