"""The config keys every model producer shares (streambus.producing.ProducerOptions / HttpProducerOptions).

The timeouts, retries and ``start`` tags are declared once and checked once,
for every producer that derives its ``Options`` from them: from a config file
and from Python alike, with an error that names the key.
"""

from __future__ import annotations

import math
from typing import Any

import msgspec
import pytest

from streambus.config import parse_config
from streambus.errors import ConfigError
from streambus.plugins import PositiveFloat, check_bounds, load
from streambus.producing import HttpProducerOptions, ProducerOptions, check_http_url, check_messages


class Local(HttpProducerOptions):
    """A provider's options as a third-party plugin would write them."""

    base_url: str = "https://api.example.com"
    model: str = ""
    first_chunk_timeout: PositiveFloat = 300.0  # another default for a shared key


def test_shared_keys_and_their_defaults() -> None:
    o = Local()
    assert (o.timeout, o.first_chunk_timeout, o.connect_timeout) == (60.0, 300.0, 10.0)
    assert (o.retries, o.retry_backoff, o.retry_max_wait) == (2, 0.5, 30.0)
    assert o.meta == {} and o.headers == {} and o.api_key_env is None
    # The mutable defaults are not shared between instances.
    o.meta["a"] = 1
    assert Local().meta == {}


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        ({"timeout": 0}, "timeout: must be more than 0 and finite, got 0"),
        ({"timeout": math.inf}, "timeout: must be more than 0 and finite, got inf"),
        ({"first_chunk_timeout": math.nan}, "first_chunk_timeout: must be more than 0 and finite, got nan"),
        ({"connect_timeout": -1.0}, "connect_timeout: must be more than 0 and finite, got -1.0"),
        ({"retries": -1}, "retries: must be at least 0, got -1"),
        ({"retry_backoff": math.nan}, "retry_backoff: must be at least 0 and finite, got nan"),
        ({"retry_max_wait": -0.5}, "retry_max_wait: must be at least 0 and finite, got -0.5"),
        ({"base_url": "ftp://example.com"}, "base_url: expected an http:// or https:// URL, got 'ftp://example.com'"),
        ({"api_key_env": ""}, "api_key_env: must name an environment variable"),
    ],
)
def test_bad_shared_keys_are_refused_by_name(keys: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        Local(**keys)


def test_plain_producer_options_need_no_url() -> None:
    class Library(ProducerOptions):
        model: str = ""

    assert Library(retries=0).retries == 0
    with pytest.raises(ValueError, match="retry_backoff: must be at least 0 and finite, got inf"):
        Library(retry_backoff=math.inf)


def test_an_unbounded_number_is_not_checked() -> None:
    class Free(msgspec.Struct):
        weight: float = 0.0
        bounded: PositiveFloat = 1.0

    check_bounds(Free(weight=math.nan))  # a plain float: nan is the option's own business
    with pytest.raises(ValueError, match="bounded: must be more than 0 and finite, got nan"):
        check_bounds(Free(bounded=math.nan))


def test_check_http_url_and_messages() -> None:
    check_http_url("url", "http://127.0.0.1:1")
    with pytest.raises(ValueError, match="url: expected an http:// or https:// URL, got '127.0.0.1'"):
        check_http_url("url", "127.0.0.1")
    check_messages([{"role": "user", "content": "hi"}], None)
    check_messages(None, "a prompt")
    with pytest.raises(ValueError, match=r"^messages: required \(or a prompt\)$"):
        check_messages([], None)
    with pytest.raises(ValueError, match=r"requests\[1\]\.messages\[0\]\.role: required \(user or assistant\)"):
        check_messages([{"content": "no role"}], None, where="requests[1].")
    with pytest.raises(ValueError, match=r"messages\[1\]\.role: required \(system, user\)"):
        check_messages([{"role": "user"}, "not a table"], None, roles="system, user")  # type: ignore[list-item]


# Every provider producer shipped with streambus stands on the shared keys.
PRODUCERS = {
    "anthropic": {"model": "claude", "prompt": "hi"},
    "gemini": {"model": "gemini-2.5-flash", "prompt": "hi"},
    "litellm": {"model": "openai/m", "prompt": "hi"},
    "ollama": {"model": "llama3.2", "prompt": "hi"},
    "openai": {"model": "gpt", "messages": [{"role": "user", "content": "hi"}]},
}


@pytest.mark.parametrize("name", sorted(PRODUCERS))
def test_every_provider_producer_shares_the_keys(name: str) -> None:
    cls = load("producers", name)
    assert issubclass(cls.Options, ProducerOptions)
    fields = {f.name for f in msgspec.structs.fields(cls.Options)}
    assert {"timeout", "first_chunk_timeout", "retries", "retry_backoff", "retry_max_wait", "meta"} <= fields
    producer = cls(**PRODUCERS[name], retry_max_wait=5.0)
    assert producer.options.retry_max_wait == 5.0
    # From Python and from a config file alike, a bad shared key is refused by name.
    with pytest.raises(ValueError, match="retry_backoff: must be at least 0 and finite, got nan"):
        cls(**PRODUCERS[name], retry_backoff=math.nan)
    table = {"producers": [{"type": name, **PRODUCERS[name], "timeout": -1}]}
    with pytest.raises(ConfigError, match="timeout"):
        parse_config(table, path="x.toml")


# -- one asyncio check for every part built on an asyncio-only library -------------------------


async def test_asyncio_required_names_the_part_the_library_and_the_loop(anyio_backend: str) -> None:
    from streambus.errors import AsyncioRequired, StreamBusError

    if anyio_backend == "asyncio":
        AsyncioRequired.check("the x producer", needs="aiohttp")  # nothing to say
        return
    with pytest.raises(AsyncioRequired) as info:
        AsyncioRequired.check("the x producer", needs="aiohttp", hint="use y")
    error = info.value
    assert isinstance(error, StreamBusError) and isinstance(error, RuntimeError)
    assert (error.what, error.library) == ("the x producer", "trio")
    assert str(error) == "the x producer needs asyncio (aiohttp runs only on asyncio) but runs under trio; use y"


def test_asyncio_required_outside_any_loop() -> None:
    from streambus.errors import AsyncioRequired
    from streambus.producing import require_asyncio

    with pytest.raises(AsyncioRequired, match="the ollama producer needs asyncio .* under no event loop; run the bus"):
        require_asyncio("ollama")


def test_the_engines_raise_the_core_error() -> None:
    from streambus.errors import AsyncioRequired

    for module in ("streambus_redis", "streambus_nats"):
        plugin = __import__(module)
        assert plugin.AsyncioRequired is AsyncioRequired, module
