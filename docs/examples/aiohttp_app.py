"""aiohttp serving bus streams (see docs/frontends.md). Run: ``python docs/examples/aiohttp_app.py``.

Two ways: :func:`~streambus_http.aio.add_routes` mounts the ``http`` sink's
routes on your app; :func:`~streambus_http.aio.stream_response` answers one
request from your own handler.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from aiohttp import web
from streambus_http import StreamHub
from streambus_http.aio import add_routes, origin_guard, stream_response

from streambus import Bus
from streambus.access import OriginPolicy

HUB = web.AppKey("hub", StreamHub)
BUS = web.AppKey("bus", Bus)


async def bus_context(app: web.Application) -> AsyncIterator[None]:
    async with Bus() as bus:
        app[BUS] = bus
        app[HUB] = StreamHub.attach(bus)
        add_routes(app, app[HUB], prefix="/bus")  # GET /bus/streams/{id}/{format}, /bus/events/{format}, ...
        yield
        await bus.shutdown()


async def answer_text(request: web.Request) -> web.StreamResponse:
    """Your own handler: the plain text of one stream."""
    return await stream_response(request, request.app[HUB], "text", stream=request.match_info["id"])


def create_app() -> web.Application:
    # Host and Origin first: a page elsewhere, or a DNS name rebound to 127.0.0.1, gets 403.
    app = web.Application(middlewares=[origin_guard(OriginPolicy(bind_host="127.0.0.1", port=8080))])
    app.cleanup_ctx.append(bus_context)
    app.router.add_get("/answers/{id}", answer_text)
    return app


if __name__ == "__main__":
    web.run_app(create_app(), host="127.0.0.1", port=8080)
