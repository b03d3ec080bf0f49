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

import importlib.util

from ._handoff import Handoff
from ._producer import TransformersProducer

# Checked, not imported: importing torch and transformers takes seconds, and
# listing plugins or running a pipeline without this producer should not pay
# for it. The producer imports them when it loads a model.
_missing = [name for name in ("torch", "transformers") if importlib.util.find_spec(name) is None]
if _missing:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        f"streambus-transformers needs torch and transformers (missing: {', '.join(_missing)}). "
        "Install them with: pip install 'streambus-transformers[transformers]'"
    )

__all__ = ["Handoff", "TransformersProducer"]
