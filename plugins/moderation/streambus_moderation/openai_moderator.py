"""The ``openai`` moderator: any OpenAI-compatible ``/v1/moderations`` endpoint.

::

    [sinks.moderator]
    type = "openai"
    base_url = "https://api.openai.com/v1"   # or your gateway / local server
    model = "omni-moderation-latest"
    api_key_env = "OPENAI_API_KEY"           # the key is read from this variable
    categories = ["hate", "violence"]        # optional: only these count
    threshold = 0.5                          # optional: flag on scores, not on `flagged`

It posts ``{"model": ..., "input": window}`` and reads the documented
response, ``{"results": [{"flagged", "categories", "category_scores"}]}``.
The verdict covers the whole window (the endpoint reports no spans).

Uses aiohttp, which is bound to asyncio: under trio, :meth:`check` raises a
``RuntimeError`` saying so (and the stage applies its ``on_error`` policy).
"""

from __future__ import annotations

import os
from typing import Any, ClassVar

import msgspec

from streambus.errors import AsyncioRequired, StreamBusError
from streambus.plugins import Fraction, PluginBase, check_bounds

from .verdict import Verdict

try:
    import aiohttp
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("the openai moderator needs aiohttp: pip install 'streambus-moderation[openai]'") from exc

__all__ = ["ModerationAPIError", "OpenAIModerator"]


class ModerationAPIError(StreamBusError):
    """The moderation endpoint answered with an error status or an unexpected body.

    ``status`` is the HTTP status (200 when the body was the problem). Part of
    streambus's error tree (``except StreamBusError`` catches it); inside a
    stage it never reaches you: the stage counts it in ``stats.errors`` and
    applies ``on_error``. React to ``status`` (429/5xx: retry later), not to the message.
    """

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class _Result(msgspec.Struct):
    flagged: bool
    categories: dict[str, bool | None] = {}
    category_scores: dict[str, float | None] = {}


class _Response(msgspec.Struct):
    results: list[_Result]


_decoder = msgspec.json.Decoder(_Response)


class OpenAIModerator(PluginBase):
    """Ask an OpenAI-compatible moderation endpoint about each window.

    In Python: ``OpenAIModerator(base_url="http://127.0.0.1:8000/v1")``.
    Close it with :meth:`aclose` (the stage does this for you).
    """

    class Options(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
        """Config keys of the ``openai`` moderator."""

        base_url: str = "https://api.openai.com/v1"
        """The API root; ``/moderations`` is appended."""
        model: str = "omni-moderation-latest"
        api_key_env: str = "OPENAI_API_KEY"
        """Environment variable holding the API key (no header is sent when it is unset)."""
        categories: list[str] | None = None
        """Only these categories count (default: all)."""
        threshold: Fraction | None = None
        """Flag when a counted category's score reaches this, instead of using ``flagged``."""
        headers: dict[str, str] = {}
        """Extra request headers (e.g. an organisation or gateway header)."""

        def __post_init__(self) -> None:
            check_bounds(self)
            if not self.base_url.startswith(("http://", "https://")):
                raise ValueError(f"base_url: expected an http:// or https:// URL, got {self.base_url!r}")
            if self.threshold is not None and not 0.0 <= self.threshold <= 1.0:
                raise ValueError(f"threshold: must be between 0 and 1, got {self.threshold}")
            if not self.api_key_env:
                raise ValueError("api_key_env: must name an environment variable")

    name: ClassVar[str] = "openai"

    def __init__(self, options: Options | None = None, **kwargs: Any) -> None:
        options = self.resolve_options(options, kwargs)
        self.options = options
        self.url = options.base_url.rstrip("/") + "/moderations"
        self._session: aiohttp.ClientSession | None = None

    async def setup(self) -> None:
        """Check the async backend; the HTTP session opens on first use."""
        self._require_asyncio()

    def _require_asyncio(self) -> None:
        AsyncioRequired.check(
            "the openai moderator",
            needs="aiohttp",
            hint="run the bus with anyio's asyncio backend or use another moderator",
        )

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json", **self.options.headers}
        key = os.environ.get(self.options.api_key_env)
        if key:
            headers["Authorization"] = f"Bearer {key}"
        return headers

    async def check(self, text: str) -> Verdict:
        """POST *text* to the endpoint and return its verdict for the whole window.

        Raises :class:`ModerationAPIError` on an error status or a body that is
        not the documented shape.
        """
        self._require_asyncio()
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession()
        body = msgspec.json.encode({"model": self.options.model, "input": text})
        async with self._session.post(self.url, data=body, headers=self._headers()) as resp:
            payload = await resp.read()
            if resp.status != 200:
                snippet = payload[:200].decode("utf-8", "replace")
                raise ModerationAPIError(f"{self.url} answered {resp.status}: {snippet}", status=resp.status)
        try:
            response = _decoder.decode(payload)
        except msgspec.DecodeError as exc:
            raise ModerationAPIError(f"{self.url} sent an unexpected body: {exc}", status=200) from None
        if not response.results:
            raise ModerationAPIError(f"{self.url} sent no results", status=200)
        return self._verdict(response.results[0])

    def _verdict(self, result: _Result) -> Verdict:
        wanted = set(self.options.categories) if self.options.categories is not None else None
        scores = {k: float(v) for k, v in result.category_scores.items() if v is not None}
        if wanted is not None:
            scores = {k: v for k, v in scores.items() if k in wanted}
        if self.options.threshold is not None:
            hits = sorted(k for k, v in scores.items() if v >= self.options.threshold)
            flagged = bool(hits)
        else:
            hits = sorted(k for k, v in result.categories.items() if v and (wanted is None or k in wanted))
            flagged = bool(hits) if wanted is not None else result.flagged
        return Verdict(flagged=flagged, categories=hits, scores=scores)

    async def aclose(self) -> None:
        """Close the HTTP session."""
        if self._session is not None:
            await self._session.close()
            self._session = None
