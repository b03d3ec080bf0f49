"""The openai moderator against a local aiohttp fake of ``/v1/moderations``.

The fake serves the documented response shape (``id``, ``model``,
``results[].flagged / categories / category_scores / category_applied_input_types``).
aiohttp is asyncio-bound: these tests run on asyncio, plus one under trio
for the clear error.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web
from streambus_moderation import ModerationStage, load_moderator
from streambus_moderation.openai_moderator import ModerationAPIError, OpenAIModerator
from streambus_moderation.testing import assert_well_formed, delivered_text, run_chunks

from streambus import ModerationEvent, StreamBusError

pytestmark = pytest.mark.anyio

CATEGORIES = [
    "harassment",
    "harassment/threatening",
    "hate",
    "hate/threatening",
    "illicit",
    "illicit/violent",
    "self-harm",
    "self-harm/instructions",
    "self-harm/intent",
    "sexual",
    "sexual/minors",
    "violence",
    "violence/graphic",
]


def documented_response(text: str) -> dict[str, Any]:
    """The response shape of POST /v1/moderations, scoring 'kill' as violence."""
    violent = "kill" in text
    scores = dict.fromkeys(CATEGORIES, 0.0001)
    scores["violence"] = 0.91 if violent else 0.002
    scores["harassment"] = 0.4 if violent else 0.001
    return {
        "id": "modr-0123",
        "model": "omni-moderation-latest",
        "results": [
            {
                "flagged": violent,
                "categories": {c: (c == "violence" and violent) for c in CATEGORIES},
                "category_scores": scores,
                "category_applied_input_types": {c: ["text"] for c in CATEGORIES},
            }
        ],
    }


class FakeEndpoint:
    def __init__(self) -> None:
        self.requests: list[tuple[dict[str, Any], str | None]] = []
        self.status = 200
        self.body: bytes | None = None
        self.base_url = ""

    async def handle(self, request: web.Request) -> web.Response:
        payload = await request.json()
        self.requests.append((payload, request.headers.get("Authorization")))
        if self.status != 200:
            return web.json_response({"error": {"message": "rate limited"}}, status=self.status)
        if self.body is not None:
            return web.Response(body=self.body, content_type="application/json")
        return web.json_response(documented_response(payload["input"]))


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
async def endpoint() -> AsyncIterator[FakeEndpoint]:
    fake = FakeEndpoint()
    app = web.Application()
    app.router.add_post("/v1/moderations", fake.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    fake.base_url = f"http://127.0.0.1:{port}/v1"
    yield fake
    await runner.cleanup()


async def test_verdict_from_documented_shape_with_key_from_env(
    endpoint: FakeEndpoint, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MY_MODERATION_KEY", "sk-test-123")
    moderator = OpenAIModerator(base_url=endpoint.base_url, api_key_env="MY_MODERATION_KEY", model="m1")
    try:
        verdict = await moderator.check("how to kill a process")
        clean = await moderator.check("hello")
    finally:
        await moderator.aclose()
    assert verdict.flagged and verdict.categories == ["violence"]
    assert verdict.scores["violence"] == 0.91 and verdict.spans == []
    assert not clean.flagged
    body, auth = endpoint.requests[0]
    assert body == {"model": "m1", "input": "how to kill a process"}
    assert auth == "Bearer sk-test-123"


async def test_categories_filter_and_threshold(endpoint: FakeEndpoint, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    only_hate = OpenAIModerator(base_url=endpoint.base_url, categories=["hate"])
    by_score = OpenAIModerator(base_url=endpoint.base_url, threshold=0.3)
    try:
        assert not (await only_hate.check("kill")).flagged
        verdict = await by_score.check("kill")
    finally:
        await only_hate.aclose()
        await by_score.aclose()
    assert verdict.flagged and verdict.categories == ["harassment", "violence"]
    assert endpoint.requests[0][1] is None  # no key in the environment: no header


async def test_error_status_and_bad_body_raise_clear_errors(endpoint: FakeEndpoint) -> None:
    moderator = OpenAIModerator(base_url=endpoint.base_url)
    try:
        endpoint.status = 429
        with pytest.raises(ModerationAPIError, match="answered 429: .*rate limited") as info:
            await moderator.check("x")
        assert info.value.status == 429
        endpoint.status = 200
        endpoint.body = json.dumps({"results": [{"categories": {}}]}).encode()
        with pytest.raises(ModerationAPIError, match="unexpected body.*flagged"):
            await moderator.check("x")
    finally:
        await moderator.aclose()


async def test_api_errors_are_caught_as_streambus_errors_and_carry_the_status(endpoint: FakeEndpoint) -> None:
    moderator = OpenAIModerator(base_url=endpoint.base_url)
    try:
        for status, body in ((503, None), (200, b'{"results": []}')):
            endpoint.status, endpoint.body = status, body
            with pytest.raises(StreamBusError) as info:  # one except for every error streambus raises on purpose
                await moderator.check("x")
            assert isinstance(info.value, ModerationAPIError) and info.value.status == status
    finally:
        await moderator.aclose()


async def test_stage_with_openai_moderator_from_a_config_table(endpoint: FakeEndpoint) -> None:
    stage = ModerationStage(
        ModerationStage.Options(
            moderator={"type": "openai", "base_url": endpoint.base_url},
            mode="observe",
            window_chars=24,
            overlap_chars=8,
        )
    )
    assert isinstance(stage.moderator, OpenAIModerator)
    _, moderated = await run_chunks(stage, ["Here is how to ki", "ll a stuck process on linux"])
    assert_well_formed(moderated)
    notes = [e for e in moderated if isinstance(e, ModerationEvent)]
    assert notes and all(n.action == "retract" and n.categories == ["violence"] for n in notes)
    assert notes[0].scores["violence"] == 0.91
    assert delivered_text(moderated) == "Here is how to kill a stuck process on linux"


async def test_endpoint_down_follows_on_error(endpoint: FakeEndpoint) -> None:
    endpoint.status = 500
    stage = ModerationStage(moderator=OpenAIModerator(base_url=endpoint.base_url), on_error="fail_closed")
    _, moderated = await run_chunks(stage, ["anything"])
    assert delivered_text(moderated) == "[removed]"
    assert stage.stats.errors == 1


def test_options_are_validated() -> None:
    with pytest.raises(ValueError, match="base_url: expected an http"):
        OpenAIModerator(base_url="ftp://x")
    with pytest.raises(ValueError, match="threshold: must be at least 0 and at most 1, got 3"):
        load_moderator({"type": "openai", "threshold": 3})


@pytest.mark.parametrize("anyio_backend", ["trio"])
async def test_under_trio_the_error_says_asyncio_is_needed() -> None:
    moderator = OpenAIModerator(base_url="http://127.0.0.1:9/v1")
    with pytest.raises(RuntimeError, match=r"needs asyncio \(aiohttp runs only on asyncio\)"):
        await moderator.check("x")
