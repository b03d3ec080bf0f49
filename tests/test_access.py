"""The Host and Origin rules every streambus server applies (streambus.access)."""

from __future__ import annotations

import pytest

from streambus.access import OriginPolicy, Refusal, is_loopback_host, split_host_port


@pytest.mark.parametrize("host", ["localhost", "LOCALHOST.", "127.0.0.1", "127.5.0.1", "::1", "[::1]", "app.localhost"])
def test_loopback_names(host: str) -> None:
    assert is_loopback_host(host)


@pytest.mark.parametrize("host", ["attacker.example", "10.0.0.1", "0.0.0.0", "localhost.attacker.example", ""])
def test_not_loopback(host: str) -> None:
    assert not is_loopback_host(host)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("Example.COM", ("example.com", None)),
        ("example.com:8080", ("example.com", 8080)),
        ("[::1]:9", ("::1", 9)),
        ("[::1]", ("::1", None)),
        ("::1", ("::1", None)),
    ],
)
def test_split_host_port(value: str, expected: tuple[str, int | None]) -> None:
    assert split_host_port(value) == expected


@pytest.mark.parametrize("value", ["", "a b", "h:notaport", "[::1", "[::1]x", "user@h", "h:0", "h:70000", "h/x"])
def test_split_host_port_refuses_junk(value: str) -> None:
    with pytest.raises(ValueError, match="not a host"):
        split_host_port(value)


def test_dns_rebinding_is_refused_on_host_not_origin() -> None:
    """The attack: the attacker's name resolves to 127.0.0.1, so Host and Origin agree with each other."""
    policy = OriginPolicy(bind_host="127.0.0.1", port=8765)
    refusal = policy.check(hosts=["attacker.example:8765"], origins=["http://attacker.example:8765"])
    assert refusal == Refusal(403, "Host 'attacker.example:8765' is not a name of this server (see allowed_hosts)")
    # Even with a loopback Host, a foreign page is not same-origin.
    refusal = policy.check(hosts=["127.0.0.1:8765"], origins=["http://attacker.example:8765"])
    assert refusal is not None
    assert refusal.status == 403
    assert "origin" in refusal.reason


def test_same_origin_is_judged_against_the_servers_names_and_port() -> None:
    policy = OriginPolicy(bind_host="127.0.0.1", port=8765)
    assert policy.check(hosts=["127.0.0.1:8765"], origins=["http://127.0.0.1:8765"]) is None
    assert policy.check(hosts=["localhost:8765"], origins=["http://localhost:8765"]) is None
    assert policy.check(hosts=["[::1]:8765"], origins=["http://[::1]:8765"]) is None
    # Another local port is another origin (a notebook, a dev server...).
    assert policy.check(hosts=["127.0.0.1:8765"], origins=["http://127.0.0.1:3000"]) is not None
    assert policy.check(hosts=["127.0.0.1:8765"], origins=["null"]) is not None
    assert policy.check(hosts=["127.0.0.1:8765"], origins=["file://"]) is not None


def test_requests_without_origin_pass() -> None:
    policy = OriginPolicy(bind_host="127.0.0.1", port=1)
    assert policy.check(hosts=["127.0.0.1:1"], origins=[]) is None
    assert policy.check(hosts=[], origins=[]) is None


def test_allowed_hosts_and_origins() -> None:
    policy = OriginPolicy(
        bind_host="0.0.0.0",
        port=8765,
        allowed_hosts=["chat.example.com"],
        allowed_origins=["https://app.example.com/"],
    )
    assert policy.check(hosts=["chat.example.com"], origins=["https://app.example.com"]) is None
    assert policy.check(hosts=["CHAT.example.com:443"], origins=[]) is None
    assert policy.check(hosts=["0.0.0.0:8765"], origins=[]) is not None
    assert policy.check(hosts=["other.example.com"], origins=[]) is not None
    assert policy.check(hosts=["chat.example.com"], origins=["https://evil.example.com"]) is not None
    anyone = OriginPolicy(bind_host="0.0.0.0", allowed_hosts=["*"], allowed_origins=["*"])
    assert anyone.check(hosts=["whatever"], origins=["https://evil.example.com"]) is None


def test_bound_address_is_a_name() -> None:
    policy = OriginPolicy(bind_host="192.0.2.7", port=80)
    assert policy.check(hosts=["192.0.2.7"], origins=["http://192.0.2.7"]) is None


def test_port_learned_after_binding() -> None:
    policy = OriginPolicy(bind_host="127.0.0.1").with_port(4000)
    assert policy.check(hosts=["127.0.0.1:4000"], origins=["http://127.0.0.1:4000"]) is None
    assert policy.check(hosts=["127.0.0.1:4000"], origins=["http://127.0.0.1:4001"]) is not None


@pytest.mark.parametrize("header", ["Host", "Origin", "Authorization"])
def test_duplicate_headers_are_refused(header: str) -> None:
    policy = OriginPolicy(bind_host="127.0.0.1", port=1)
    hosts = ["127.0.0.1:1", "127.0.0.1:1"] if header == "Host" else ["127.0.0.1:1"]
    origins = ["http://127.0.0.1:1"] * (2 if header == "Origin" else 1)
    refusal = policy.check(hosts=hosts, origins=origins, authorizations=2 if header == "Authorization" else 1)
    assert refusal == Refusal(400, f"duplicate {header} header")


def test_bad_allowed_origin_is_named() -> None:
    with pytest.raises(ValueError, match="'example.com' must be"):
        OriginPolicy(bind_host="127.0.0.1", allowed_origins=["example.com"])


def test_refusal_reason_is_bounded_and_printable() -> None:
    policy = OriginPolicy(bind_host="127.0.0.1", port=1)
    refusal = policy.check(hosts=["x" * 5000 + "\x00"], origins=[])
    assert refusal is not None
    assert len(refusal.reason) < 200
    assert "\x00" not in refusal.reason
