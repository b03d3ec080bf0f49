"""RetryPolicy and retry_after: backoff with jitter, the server's Retry-After, on asyncio and trio."""

from __future__ import annotations

import email.utils
import gc
import math

import pytest

from streambus.producing import Failure, RetryPolicy, retry_after

pytestmark = pytest.mark.anyio

BUSY = Failure("http_status", "HTTP 503: busy", retryable=True)


class Attempts:
    """An attempt that fails with the scripted failures, then succeeds."""

    def __init__(self, *failures: Failure) -> None:
        self.left = list(failures)
        self.calls = 0

    async def __call__(self) -> Failure | None:
        self.calls += 1
        return self.left.pop(0) if self.left else None


def recorded(policy: RetryPolicy) -> list[float]:
    """Make *policy* skip its waits; return the list they are recorded in."""
    waits: list[float] = []

    async def no_wait(seconds: float) -> None:
        waits.append(seconds)

    policy.sleep = no_wait
    return waits


def test_retry_after_reads_seconds_and_http_dates() -> None:
    now = 1_800_000_000.0
    in_90s = email.utils.formatdate(now + 90, usegmt=True)
    assert retry_after("1") == 1.0
    assert retry_after(" 120 ") == 120.0
    assert retry_after(in_90s, now=now) == 90.0
    assert retry_after(email.utils.formatdate(now - 60, usegmt=True), now=now) == 0.0  # already past
    for bad in (None, "", "soon", "-5", "1.5e3", "Wed, 99 Foo 2026"):
        assert retry_after(bad) is None, bad


async def test_success_after_failures_waits_with_exponential_backoff_and_jitter() -> None:
    policy = RetryPolicy(retries=3, backoff=1.0, max_wait=30.0)
    waits = recorded(policy)
    attempt = Attempts(BUSY, BUSY, BUSY)
    assert await policy.run(attempt) is None
    assert attempt.calls == 4
    assert list(policy.waits) == waits and len(waits) == 3
    for n, wait in enumerate(waits):
        assert 2**n <= wait <= 2**n + 1.0  # backoff * 2**n plus up to backoff of jitter


async def test_jitter_spreads_two_policies_apart() -> None:
    first, second = RetryPolicy(retries=5, backoff=1.0), RetryPolicy(retries=5, backoff=1.0)
    a, b = recorded(first), recorded(second)
    await first.run(Attempts(*[BUSY] * 5))
    await second.run(Attempts(*[BUSY] * 5))
    assert len(a) == len(b) == 5
    assert a != b


async def test_retry_after_sets_the_wait_instead_of_the_backoff() -> None:
    policy = RetryPolicy(retries=2, backoff=0.5, max_wait=30.0)
    waits = recorded(policy)
    attempt = Attempts(Failure("http_status", "HTTP 429: slow down", True, retry_after=7.0))
    assert await policy.run(attempt) is None
    assert waits == [7.0]


async def test_retry_after_beyond_max_wait_is_not_retried_and_says_so() -> None:
    policy = RetryPolicy(retries=5, backoff=0.5, max_wait=30.0)
    waits = recorded(policy)
    attempt = Attempts(Failure("http_status", "HTTP 429: slow down", True, retry_after=120.0))
    failure = await policy.run(attempt)
    assert attempt.calls == 1 and waits == []
    assert failure is not None and (failure.kind, failure.retryable) == ("http_status", True)
    assert failure.message == "HTTP 429: slow down (the server asked to wait 120 s, more than the 30 s allowed)"


async def test_retries_exhausted_return_the_last_failure() -> None:
    policy = RetryPolicy(retries=2, backoff=0.0)
    waits = recorded(policy)
    last = Failure("http_status", "HTTP 503: still busy", True)
    attempt = Attempts(BUSY, BUSY, last, BUSY)
    assert await policy.run(attempt) == last
    assert attempt.calls == 3 and waits == [0.0, 0.0]


async def test_only_retryable_failures_that_may_retry_are_retried() -> None:
    policy = RetryPolicy(retries=3, backoff=0.0)
    recorded(policy)
    refused = Failure("http_status", "HTTP 401: no", retryable=False)
    attempt = Attempts(refused)
    assert await policy.run(attempt) == refused and attempt.calls == 1
    attempt = Attempts(BUSY, BUSY)
    told: list[tuple[Failure, float]] = []
    result = await policy.run(attempt, may_retry=lambda f: attempt.calls < 2, on_retry=lambda f, s: told.append((f, s)))
    assert result == BUSY and attempt.calls == 2
    assert told == [(BUSY, 0.0)]


async def test_no_limit_retries_until_success_and_caps_the_wait() -> None:
    policy = RetryPolicy(retries=None, backoff=0.05, max_wait=2.0)
    waits = recorded(policy)
    assert await policy.run(Attempts(*[BUSY] * 40)) is None
    assert len(waits) == 40 and max(waits) == 2.0


async def test_an_exception_from_the_attempt_propagates_untouched() -> None:
    policy = RetryPolicy(retries=3, backoff=0.0)

    async def broken() -> Failure | None:
        raise KeyError("boom")

    with pytest.raises(KeyError, match="boom"):
        await policy.run(broken)


async def test_waits_with_the_running_backend() -> None:
    # No injected sleep: the default (anyio.sleep) must work under asyncio and trio alike.
    policy = RetryPolicy(retries=1, backoff=0.0)
    assert await policy.run(Attempts(BUSY)) is None
    assert list(policy.waits) == [0.0]


@pytest.mark.parametrize(
    ("keys", "problem"),
    [
        ({"retries": -1}, "retries: must be 0 or more, got -1"),
        ({"backoff": -0.5}, "backoff: must be 0 or more seconds, got -0.5"),
        ({"max_wait": math.inf}, "max_wait: must be 0 or more seconds, got inf"),
        ({"max_wait": math.nan}, "max_wait: must be 0 or more seconds, got nan"),
    ],
)
def test_bad_settings_name_what_was_wrong(keys: dict[str, float], problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        RetryPolicy(**keys)  # type: ignore[arg-type]


async def test_a_first_attempt_that_succeeds_leaves_no_cyclic_garbage() -> None:
    """A sink calls the policy for every batch it sends: its common path must not feed the cyclic collector.

    tenacity's machinery (built for the retries) is made of reference cycles;
    built for every call, at hundreds of batches a second it brought a full
    collection, which every event waits for, every few seconds. A first attempt
    that succeeds builds none of it; one that fails still goes through it.
    """
    policy = RetryPolicy(retries=2, backoff=0.0)
    attempt = Attempts()
    await policy.run(attempt)  # anything a first call sets up, once
    gc.collect()
    gc.disable()
    try:
        for _ in range(200):
            assert await policy.run(attempt) is None
        assert gc.collect() == 0
    finally:
        gc.enable()
    assert attempt.calls == 201

    waits = recorded(policy)
    failing = Attempts(BUSY)
    assert await policy.run(failing) is None
    assert failing.calls == 2 and len(waits) == 1
