"""Scoped tokens (streambus.tokens): verification, the attacks on it, scope rules and `streambus token`."""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import time
from pathlib import Path
from typing import Any

import jwt
import orjson
import pytest
from click.testing import CliRunner
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from streambus import Filter, StartEvent
from streambus.cli import main
from streambus.tokens import (
    OPERATOR,
    Authenticator,
    OutOfScope,
    Scope,
    TokenError,
    TokenVerifier,
    bearer_credential,
    mint_token,
)

SECRET = secrets.token_urlsafe(64)  # long enough for HS512 too


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _hand_made(header: dict[str, Any], claims: dict[str, Any], sign: bytes | None) -> str:
    """A JWT built by hand, as an attacker would: *sign* is the HMAC key, or None for no signature."""
    head = _b64(orjson.dumps(header)) + "." + _b64(orjson.dumps(claims))
    signature = b"" if sign is None else hmac.new(sign, head.encode(), hashlib.sha256).digest()
    return head + "." + _b64(signature)


def _claims(**scope: Any) -> dict[str, Any]:
    now = int(time.time())
    return {"iat": now, "exp": now + 60, "streambus": scope or {"meta": {"tenant": "a"}}}


def _start(stream: str = "s1", **meta: Any) -> StartEvent:
    return StartEvent(stream=stream, seq=0, ts=0.0, model="m", provider="p", meta=meta)


def _pem_public(key: Any) -> bytes:
    return bytes(
        key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )


def _pem_private(key: Any) -> bytes:
    return bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def ed_key() -> ed25519.Ed25519PrivateKey:
    return ed25519.Ed25519PrivateKey.generate()


# -- verification ---------------------------------------------------------------------------------


def test_hs256_token_carries_its_scope() -> None:
    token = mint_token(SECRET, streams=["a", "b"], meta={"tenant": "acme"}, stop=True, ttl=60, subject="u1")
    scope = TokenVerifier(secret=SECRET).verify(token)
    assert scope.streams == frozenset({"a", "b"})
    assert scope.meta == {"tenant": frozenset({"acme"})}
    assert scope.stop is True
    assert scope.subject == "u1"
    assert scope.expires is not None and time.time() < scope.expires <= time.time() + 61 + 5  # exp + leeway
    assert "u1" not in repr(scope)


def test_rs256_and_eddsa_verify_with_the_public_key(rsa_key: Any, ed_key: Any) -> None:
    for key, algorithm in ((rsa_key, "RS256"), (ed_key, "EdDSA")):
        verifier = TokenVerifier(public_key=_pem_public(key))
        assert verifier.algorithms == {algorithm}
        token = mint_token(key, meta={"user": ["u1", "u2"]}, algorithm=algorithm)
        scope = verifier.verify(token)
        assert scope.meta == {"user": frozenset({"u1", "u2"})} and scope.stop is False and scope.streams is None


def test_a_token_signed_by_another_key_is_refused(rsa_key: Any) -> None:
    forged = mint_token(secrets.token_urlsafe(32), streams="*")
    with pytest.raises(TokenError, match="^token signature does not verify$"):
        TokenVerifier(secret=SECRET).verify(forged)
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    with pytest.raises(TokenError, match="^token signature does not verify$"):
        TokenVerifier(public_key=_pem_public(rsa_key)).verify(mint_token(other, streams="*", algorithm="RS256"))


def test_a_tampered_payload_is_refused() -> None:
    token = mint_token(SECRET, meta={"tenant": "a"})
    head, _payload, signature = token.split(".")
    widened = _b64(orjson.dumps(_claims(streams="*")))
    with pytest.raises(TokenError, match="signature does not verify"):
        TokenVerifier(secret=SECRET).verify(f"{head}.{widened}.{signature}")


@pytest.mark.parametrize("alg", ["none", "None", "NONE"])
def test_alg_none_is_never_accepted(alg: str) -> None:
    unsigned = _hand_made({"alg": alg, "typ": "JWT"}, _claims(streams="*"), None)
    with pytest.raises(TokenError, match=r"^token algorithm not allowed \(this server accepts HS256\)$"):
        TokenVerifier(secret=SECRET).verify(unsigned)
    with pytest.raises(ValueError, match="'none' .* is never accepted"):
        TokenVerifier(secret=SECRET, algorithms=["HS256", alg])


def test_algorithm_confusion_public_key_as_hmac_secret_is_refused(rsa_key: Any) -> None:
    public = _pem_public(rsa_key)
    # The classic attack: sign HS256 with the server's public key (which the attacker knows).
    confused = _hand_made({"alg": "HS256", "typ": "JWT"}, _claims(streams="*"), public)
    with pytest.raises(TokenError, match="algorithm not allowed"):
        TokenVerifier(public_key=public).verify(confused)
    # Even with HS256 allowed (a secret configured too), HMAC is keyed with the secret, never the public key.
    both = TokenVerifier(secret=SECRET, public_key=public, algorithms=["HS256", "RS256"])
    with pytest.raises(TokenError, match="signature does not verify"):
        both.verify(confused)
    assert both.verify(mint_token(rsa_key, streams="*", algorithm="RS256")).unrestricted
    assert both.verify(mint_token(SECRET, streams="*")).unrestricted


def test_an_algorithm_outside_the_allow_list_is_refused(rsa_key: Any) -> None:
    verifier = TokenVerifier(secret=SECRET)
    for algorithm in ("HS384", "HS512"):
        with pytest.raises(TokenError, match="algorithm not allowed"):
            verifier.verify(mint_token(SECRET, streams="*", algorithm=algorithm))
    assert (
        TokenVerifier(secret=SECRET, algorithms=["HS512"])
        .verify(mint_token(SECRET, streams="*", algorithm="HS512"))
        .unrestricted
    )
    with pytest.raises(TokenError, match="algorithm not allowed"):
        verifier.verify(mint_token(rsa_key, streams="*", algorithm="RS256"))


def test_expiry_not_before_and_leeway() -> None:
    verifier = TokenVerifier(secret=SECRET, leeway=5)
    now = time.time()
    with pytest.raises(TokenError, match="^token expired$"):
        verifier.verify(mint_token(SECRET, streams="*", ttl=1, now=now - 60))
    # Expired 2 s ago: within the 5 s leeway.
    assert verifier.verify(mint_token(SECRET, streams="*", ttl=1, now=now - 3)).unrestricted
    with pytest.raises(TokenError, match="^token expired$"):
        TokenVerifier(secret=SECRET, leeway=0).verify(mint_token(SECRET, streams="*", ttl=1, now=now - 3))
    claims = _claims(streams="*")
    claims["nbf"] = int(now) + 600
    with pytest.raises(TokenError, match=r"^token not valid yet"):
        verifier.verify(jwt.encode(claims, SECRET, algorithm="HS256"))
    claims = _claims(streams="*")
    del claims["exp"]
    with pytest.raises(TokenError, match="^token lacks the required claim 'exp'$"):
        verifier.verify(jwt.encode(claims, SECRET, algorithm="HS256"))


def test_audience_and_issuer_when_configured() -> None:
    verifier = TokenVerifier(secret=SECRET, audience="bus", issuer="https://auth.example")
    good = mint_token(SECRET, streams="*", audience="bus", issuer="https://auth.example")
    assert verifier.verify(good).unrestricted
    with pytest.raises(TokenError, match="audience"):
        verifier.verify(mint_token(SECRET, streams="*", audience="other", issuer="https://auth.example"))
    with pytest.raises(TokenError, match="issuer"):
        verifier.verify(mint_token(SECRET, streams="*", audience="bus", issuer="https://evil.example"))
    with pytest.raises(TokenError, match="required claim 'aud'"):
        verifier.verify(mint_token(SECRET, streams="*"))


@pytest.mark.parametrize(
    ("scope", "problem"),
    [
        (None, "token lacks the 'streambus' claim"),
        ({}, "names no streams and no meta"),
        ({"stop": True}, "names no streams and no meta"),
        ({"streams": "all"}, "token claim 'streambus'"),
        ({"streams": [1, 2]}, "expected `str`, got `int`"),
        ({"meta": {"tenant": 7}}, "token claim 'streambus'"),
        ({"meta": {"tenant": {"nested": "x"}}}, "token claim 'streambus'"),
        ({"streams": "*", "admin": True}, "unknown field"),
        ({"streams": "*", "stop": "yes"}, "expected `bool`"),
    ],
)
def test_bad_scope_claims_are_refused_with_the_field(scope: dict[str, Any] | None, problem: str) -> None:
    claims = _claims()
    if scope is None:
        del claims["streambus"]
    else:
        claims["streambus"] = scope
    with pytest.raises(TokenError, match=problem):
        TokenVerifier(secret=SECRET).verify(jwt.encode(claims, SECRET, algorithm="HS256"))


@pytest.mark.parametrize(
    "credential",
    [
        "abc",
        "a.b.c",
        "...",
        "eyJhbGciOiJIUzI1NiJ9",
        "eyJhbGciOiJIUzI1NiJ9.!!!.xyz",
        "\u00e9t\u00e9.\u00e9t\u00e9.\u00e9t\u00e9",
        _b64(b"[1,2]") + "." + _b64(b"{}") + ".",
        _b64(b'{"alg":"HS256"}') + "." + _b64(b"[1,2,3]") + "." + _b64(b"x" * 32),
    ],
)
def test_malformed_tokens_are_refused_without_echo(credential: str) -> None:
    with pytest.raises(TokenError) as caught:
        TokenVerifier(secret=SECRET).verify(credential)
    assert caught.value.reason.startswith(("malformed token", "token algorithm not allowed", "token signature"))
    assert credential not in str(caught.value) or len(credential) < 4


def test_oversized_tokens_are_refused_before_parsing() -> None:
    huge = mint_token(SECRET, streams=[f"stream-{i:05d}" for i in range(400)])
    assert len(huge) > 4096
    with pytest.raises(TokenError, match=r"^token too large \(more than 4096 bytes\)$"):
        TokenVerifier(secret=SECRET).verify(huge)
    with pytest.raises(TokenError, match="too large"):
        Authenticator(["static"], TokenVerifier(secret=SECRET)).authenticate("x" * 100_000)


def test_unsafe_or_inconsistent_verifier_settings_are_refused(rsa_key: Any, ed_key: Any) -> None:
    with pytest.raises(ValueError, match="needs a secret or a public key"):
        TokenVerifier()
    with pytest.raises(ValueError, match="at least 32 bytes"):
        TokenVerifier(secret="short")
    with pytest.raises(ValueError, match="HS256 needs a shared secret"):
        TokenVerifier(public_key=_pem_public(rsa_key), algorithms=["HS256"])
    with pytest.raises(ValueError, match="RS256 needs a public key"):
        TokenVerifier(secret=SECRET, algorithms=["RS256"])
    with pytest.raises(ValueError, match="RS256 does not fit"):
        TokenVerifier(public_key=_pem_public(ed_key), algorithms=["RS256"])
    with pytest.raises(ValueError, match="unknown algorithm 'XS1'"):
        TokenVerifier(secret=SECRET, algorithms=["XS1"])
    with pytest.raises(ValueError, match="leeway"):
        TokenVerifier(secret=SECRET, leeway=3600)
    private = _pem_private(rsa_key)
    with pytest.raises(ValueError, match="not a PEM public key") as caught:
        TokenVerifier(public_key=private)
    assert b"PRIVATE" not in str(caught.value).encode()
    assert SECRET not in repr(TokenVerifier(secret=SECRET))


def test_load_reads_the_secret_from_env_or_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert TokenVerifier.load() is None
    monkeypatch.setenv("SB_TEST_JWT", SECRET + "\n")
    token = mint_token(SECRET, streams="*")
    assert TokenVerifier.load(secret_env="SB_TEST_JWT").verify(token).unrestricted  # type: ignore[union-attr]
    (tmp_path / "secret").write_text(SECRET + "\n")
    assert TokenVerifier.load(secret_file=str(tmp_path / "secret")).verify(token).unrestricted  # type: ignore[union-attr]
    monkeypatch.setenv("SB_TEST_SHORT", "tooshort")
    for kwargs, problem in (
        ({"secret_env": "SB_TEST_UNSET_VAR"}, "jwt_secret_env: environment variable SB_TEST_UNSET_VAR is not set"),
        ({"secret_file": str(tmp_path / "nope")}, "jwt_secret_file: cannot read"),
        ({"public_key_file": str(tmp_path / "nope.pem")}, "jwt_public_key_file: cannot read"),
        ({"secret_env": "SB_TEST_SHORT"}, "jwt_secret_env: at least 32 bytes"),
    ):
        with pytest.raises(ValueError, match=problem) as caught:
            TokenVerifier.load(prefix="jwt_", **kwargs)  # type: ignore[arg-type]
        assert "tooshort" not in str(caught.value)


# -- scope rules ------------------------------------------------------------------------------------


def test_a_stream_is_readable_when_its_id_and_meta_are_in_scope() -> None:
    scope = Scope(streams=frozenset({"s1", "s2"}), meta={"tenant": frozenset({"a"})})
    assert scope.may_read(_start("s1", tenant="a"))
    assert not scope.may_read(_start("s3", tenant="a"))
    assert not scope.may_read(_start("s1", tenant="b"))
    assert not scope.may_read(_start("s1"))
    by_meta = Scope(meta={"tenant": frozenset({"1"})})
    # Meta values are strings: a number or a bool never matches by accident.
    assert by_meta.may_read(_start("x", tenant="1"))
    assert not by_meta.may_read(_start("x", tenant=1))
    assert not by_meta.may_read(_start("x", tenant=True))
    assert OPERATOR.may_read(_start("anything")) and OPERATOR.unrestricted


def test_stop_needs_the_right_and_the_stream_in_scope() -> None:
    reader = Scope(meta={"tenant": frozenset({"a"})})
    stopper = Scope(meta={"tenant": frozenset({"a"})}, stop=True)
    mine, theirs = _start("s1", tenant="a"), _start("s2", tenant="b")
    assert not reader.may_stop(mine)
    assert stopper.may_stop(mine)
    assert not stopper.may_stop(theirs)
    with pytest.raises(OutOfScope, match="may not stop streams"):
        reader.check_stop(mine)
    with pytest.raises(OutOfScope, match="'s2' is outside this token's scope") as caught:
        stopper.check_stop(theirs)
    assert caught.value.streams == ("s2",)
    stopper.check_stop(mine)
    OPERATOR.check_stop(theirs)


def test_narrow_closes_what_a_filter_leaves_open() -> None:
    scope = Scope(meta={"tenant": frozenset({"a"})})
    everything = scope.narrow(Filter())
    assert everything.matches(_start("s1", tenant="a"))
    assert not everything.matches(_start("s2", tenant="b"))
    assert not everything.matches(_start("s3"))
    by_model = scope.narrow(Filter.of(models="m", meta={"user": "u1"}))
    assert by_model.matches(_start("s1", tenant="a", user="u1"))
    assert not by_model.matches(_start("s1", tenant="b", user="u1"))
    ids = Scope(streams=frozenset({"s1", "s2"}))
    narrowed = ids.narrow(Filter())
    assert narrowed.streams == {"s1", "s2"}
    assert ids.narrow(Filter.of(streams="s1")).streams == {"s1"}
    assert OPERATOR.narrow(Filter.of(models="m")) == Filter.of(models="m")


def test_narrow_refuses_what_a_filter_asks_beyond_the_scope() -> None:
    ids = Scope(streams=frozenset({"s1"}))
    with pytest.raises(OutOfScope, match="'s2' is outside") as caught:
        ids.narrow(Filter.of(streams=["s1", "s2"]))
    assert caught.value.streams == ("s2",)
    tenant = Scope(meta={"tenant": frozenset({"a"})})
    with pytest.raises(OutOfScope, match="meta 'tenant'") as by_meta:
        tenant.narrow(Filter.of(meta={"tenant": "b"}))
    assert by_meta.value.meta == "tenant"
    with pytest.raises(OutOfScope, match="meta 'tenant'"):
        tenant.narrow(Filter.of(meta={"tenant": ["a", "b"]}))
    with pytest.raises(OutOfScope, match="meta 'tenant'"):
        tenant.narrow(Filter.of(meta={"tenant": 1}))
    assert tenant.narrow(Filter.of(meta={"tenant": ["a"]})).matches(_start("s", tenant="a"))


# -- static tokens and verifier together ------------------------------------------------------------


def test_authenticator_accepts_static_and_scoped_tokens() -> None:
    auth = Authenticator(["op-token"], TokenVerifier(secret=SECRET))
    assert auth.authenticate("op-token") is OPERATOR
    scoped = auth.authenticate(mint_token(SECRET, meta={"tenant": "a"}))
    assert scoped.meta == {"tenant": frozenset({"a"})}
    with pytest.raises(TokenError, match="^missing token$"):
        auth.authenticate(None)
    with pytest.raises(TokenError, match="malformed token"):
        auth.authenticate("op-tokeN")
    static_only = Authenticator(["op-token"])
    for wrong in (None, "", "op-toke", mint_token(SECRET, streams="*")):
        with pytest.raises(TokenError, match="^missing or wrong token$"):
            static_only.authenticate(wrong)
    assert Authenticator().authenticate(None) is OPERATOR
    assert "op-token" not in repr(auth) and SECRET not in repr(auth)


def test_no_refusal_message_contains_the_token_or_the_secret() -> None:
    auth = Authenticator(["op-token-1234"], TokenVerifier(secret=SECRET))
    now = time.time()
    good = mint_token(SECRET, meta={"tenant": "a"})
    candidates = [
        mint_token(secrets.token_urlsafe(32), streams="*"),
        mint_token(SECRET, streams="*", ttl=1, now=now - 600),
        _hand_made({"alg": "none"}, _claims(), None),
        good[:-4] + "AAAA",
        good + "x" * 5000,
        good.replace(".", "", 1),
    ]
    for credential in candidates:
        with pytest.raises(TokenError) as caught:
            auth.authenticate(credential)
        text = str(caught.value)
        assert SECRET not in text and "op-token-1234" not in text
        for part in credential.split("."):
            assert len(part) < 8 or part not in text


def test_bearer_credential_reads_the_header_then_the_query() -> None:
    assert bearer_credential("Bearer abc", "q") == "abc"
    assert bearer_credential("bearer  abc ", None) == "abc"
    assert bearer_credential(None, "q") == "q"
    assert bearer_credential("Basic xyz", "q") == "q"
    assert bearer_credential("Bearer ", "q") is None
    assert bearer_credential(None, None) is None


# -- streambus token -------------------------------------------------------------------------------


def test_cli_mints_an_hs256_token_from_an_env_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SB_CLI_SECRET", SECRET)
    result = CliRunner().invoke(
        main,
        [
            "token", "--secret-env", "SB_CLI_SECRET", "--meta", "tenant=acme", "--meta", "user=u1",
            "--meta", "user=u2", "--stream", "s1", "--stop", "--ttl", "15m", "--subject", "dev",
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    token = result.stdout.strip()
    assert SECRET not in result.output
    scope = TokenVerifier(secret=SECRET).verify(token)
    assert scope.streams == {"s1"} and scope.stop
    assert scope.meta == {"tenant": frozenset({"acme"}), "user": frozenset({"u1", "u2"})}
    assert scope.expires is not None and 14 * 60 < scope.expires - time.time() <= 15 * 60 + 5  # exp + leeway


def test_cli_signs_with_a_private_key_file(tmp_path: Path, ed_key: Any) -> None:
    (tmp_path / "key.pem").write_bytes(_pem_private(ed_key))
    result = CliRunner().invoke(main, ["token", "--private-key-file", str(tmp_path / "key.pem"), "--stream", "*"])
    assert result.exit_code == 0, result.output
    scope = TokenVerifier(public_key=_pem_public(ed_key)).verify(result.stdout.strip())
    assert scope.unrestricted and not scope.stop
    assert scope.expires is not None and scope.expires - time.time() > 3500


@pytest.mark.parametrize(
    ("args", "problem"),
    [
        (["--stream", "s"], "exactly one of --secret-env, --secret-file and --private-key-file"),
        (["--secret-env", "SB_CLI_SECRET"], "name what the token may read"),
        (["--secret-env", "SB_CLI_SECRET", "--meta", "tenant"], "'tenant' is not KEY=VALUE"),
        (["--secret-env", "SB_CLI_SECRET", "--stream", "s", "--ttl", "soon"], "is not a duration"),
        (["--secret-env", "SB_CLI_SECRET", "--stream", "s", "--ttl", "0"], "must be more than 0"),
        (["--secret-env", "SB_CLI_UNSET", "--stream", "s"], "--secret-env: environment variable SB_CLI_UNSET"),
        (["--secret-env", "SB_CLI_SHORT", "--stream", "s"], "at least 32 bytes"),
        (["--secret-env", "SB_CLI_SECRET", "--stream", "s", "--algorithm", "none"], "'none' is never used"),
        (["--secret-env", "SB_CLI_SECRET", "--stream", "s", "--algorithm", "RS256"], "does not fit the algorithm"),
        (["--private-key-file", "/nonexistent/key.pem", "--stream", "s"], "cannot read /nonexistent/key.pem"),
    ],
)
def test_cli_refuses_bad_input_clearly(monkeypatch: pytest.MonkeyPatch, args: list[str], problem: str) -> None:
    monkeypatch.setenv("SB_CLI_SECRET", SECRET)
    monkeypatch.setenv("SB_CLI_SHORT", "tiny-secret")
    result = CliRunner().invoke(main, ["token", *args])
    assert result.exit_code != 0
    assert problem in result.output, result.output
    assert SECRET not in result.output and "tiny-secret" not in result.output
