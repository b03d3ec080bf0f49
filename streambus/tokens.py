"""Signed scoped tokens: which streams a bearer may read, and whether it may stop them.

A scoped token is a JWT (RFC 7519) that a product's backend mints for one user
and hands to that user's browser or service. The servers of streambus (the
WebSocket broadcaster, the http sink) verify it and then serve the bearer only
the streams the token covers::

    {
      "exp": 1767225600,                  required: the token's end (seconds since the epoch)
      "sub": "user-42",                   optional: who it was minted for
      "streambus": {                      the scope (this claim is required)
        "streams": ["chat-1", "chat-2"],  stream ids it may read ("*": any id)
        "meta": {"tenant": "acme"},       tags a stream's start.meta must carry (a value or a list)
        "stop": true                      whether it may stop (abort) the streams it may read
      }
    }

A stream is readable when its id is in ``streams`` (when given) *and* its
``start.meta`` carries each ``meta`` tag with one of the listed values (when
given). A scope must name ``streams`` or ``meta``: a token that reads
everything says ``"streams": "*"`` on purpose. Meta values are strings, so a
tag never matches by accident across types (``1`` and ``true`` are not
``"1"``).

Verification (:class:`TokenVerifier`) accepts only the algorithms of its
allow-list, and judges each against the key of its own family: HMAC
(``HS256``...) against the shared secret, RSA/ECDSA/EdDSA against the public
key. ``none`` is never accepted, and a token cannot pass an HMAC check keyed
with the public key (the "algorithm confusion" attack). ``exp`` is required;
``nbf`` and ``iat`` are checked when present, with a small configurable
leeway.

:class:`Authenticator` puts the static tokens of single-operator setups and a
verifier behind one call; a static token grants :data:`OPERATOR` (everything,
stop included). The servers call it once per connection or request::

    auth = Authenticator(static=["s3cret"], verifier=TokenVerifier(secret=key))
    scope = auth.authenticate(bearer_credential(headers.get("Authorization"), query.get("token")))
    if not scope.may_read(start): ...

Errors::

    StreamBusError
    ├── TokenError     the credential is missing, malformed, forged, expired... (401, close 4001)
    └── OutOfScope     a valid token asked for streams it does not cover (403, error ``forbidden``)

Neither message ever contains the token, the secret or the key: each is one
of a few fixed sentences, plus what the client itself asked for (stream ids,
meta tags) where that helps.
"""

from __future__ import annotations

import hmac
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal, Protocol

import jwt
import msgspec

from .errors import StreamBusError
from .subscription import Filter
from .validation import validation_problem

__all__ = [
    "ANY_STREAM",
    "CLAIM",
    "HMAC_ALGORITHMS",
    "MAX_TOKEN_BYTES",
    "MIN_SECRET_BYTES",
    "OPERATOR",
    "PUBLIC_KEY_ALGORITHMS",
    "Authenticator",
    "JwtSettings",
    "OutOfScope",
    "Scope",
    "TokenError",
    "TokenVerifier",
    "bearer_credential",
    "check_jwt_settings",
    "load_private_key",
    "mint_token",
    "read_secret",
    "verifier_from_settings",
]

CLAIM: Final = "streambus"
"""The JWT claim holding the scope (a private claim name, so it collides with no registered one)."""
ANY_STREAM: Final = "*"
"""``"streams": "*"``: the token may read any stream id (still narrowed by ``meta`` when given)."""
MAX_TOKEN_BYTES: Final = 4096
"""Credentials longer than this are refused before any parsing."""
MIN_SECRET_BYTES: Final = 32
"""The shortest HMAC secret accepted (RFC 7518 asks for at least the hash's size: 32 bytes for HS256)."""
HMAC_ALGORITHMS: Final = frozenset({"HS256", "HS384", "HS512"})
"""Algorithms verified against the shared secret."""
PUBLIC_KEY_ALGORITHMS: Final = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"}
)
"""Algorithms verified against the public key."""

_MESSAGE_LIMIT = 200
# RFC 7518 3.2: an HMAC key at least as long as the hash.
_HMAC_MIN_BYTES = {"HS256": 32, "HS384": 48, "HS512": 64}
# With static tokens only, which of the two went wrong is not worth telling apart.
_STATIC_REFUSAL = "missing or wrong token"


class TokenError(StreamBusError):
    """The credential was refused: missing, too large, malformed, forged, expired, not yet valid...

    ``reason`` is a short fixed sentence, safe to send to the client and to
    log: it never contains the token, the secret or the key. Answer with 401
    (HTTP) or close code 4001 (WebSocket); the client needs a new token.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class OutOfScope(StreamBusError):
    """A valid token asked for something its scope does not cover (answer 403, or the ``forbidden`` error).

    ``streams`` are the stream ids refused (the ones the client named), and
    ``meta`` the tag refused, when that is the reason.
    """

    def __init__(self, message: str, *, streams: Sequence[str] = (), meta: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.streams = tuple(streams)
        self.meta = meta


def _shown_ids(ids: Iterable[str]) -> str:
    """Stream ids for a message: at most five, each bounded and printable."""
    items = sorted(ids)
    shown = ", ".join(repr(i[:64].encode("ascii", "backslashreplace").decode("ascii")) for i in items[:5])
    return shown + (f" and {len(items) - 5} more" if len(items) > 5 else "")


@dataclass(frozen=True, slots=True)
class Scope:
    """What one bearer may do: read the streams it covers, and stop them when ``stop`` is true.

    ``streams`` is the set of stream ids it may read (``None``: any id),
    ``meta`` the tags a stream's ``start.meta`` must carry (each with one of
    the listed string values; ``None``: no tag needed). ``expires`` is when
    the grant ends: the token's ``exp`` plus the verifier's leeway (``None``
    for a static token); a server ends what the token opened then.
    ``subject`` is the token's ``sub``. :data:`OPERATOR` covers everything.
    """

    streams: frozenset[str] | None = None
    meta: Mapping[str, frozenset[str]] | None = None
    stop: bool = False
    expires: float | None = None
    subject: str | None = field(default=None, repr=False)

    @property
    def unrestricted(self) -> bool:
        """Whether this scope reads every stream (a static token, or ``"streams": "*"`` without meta)."""
        return self.streams is None and not self.meta

    def covers_id(self, stream: str) -> bool:
        """Whether the stream id alone is within scope (its ``meta`` may still rule it out once known)."""
        return self.streams is None or stream in self.streams

    def may_read(self, start: Any) -> bool:
        """Whether the stream opened by *start* (a :class:`~streambus.StartEvent`) is within scope."""
        if self.streams is not None and start.stream not in self.streams:
            return False
        if self.meta:
            have = start.meta
            for key, allowed in self.meta.items():
                value = have.get(key)
                if not isinstance(value, str) or value not in allowed:
                    return False
        return True

    def may_stop(self, start: Any) -> bool:
        """Whether the bearer may stop (abort) the stream opened by *start*: the stop right, and the stream in scope."""
        return self.stop and self.may_read(start)

    def check_read(self, start: Any) -> None:
        """Raise :class:`OutOfScope` naming the stream unless the bearer may read the stream opened by *start*."""
        if not self.may_read(start):
            raise OutOfScope(
                f"stream {_shown_ids([start.stream])} is outside this token's scope", streams=[start.stream]
            )

    def check_stop(self, start: Any) -> None:
        """Raise :class:`OutOfScope` unless the bearer may stop the stream opened by *start* (names what is missing).

        The stop right is judged first: a token without it learns nothing about the stream.
        """
        if not self.stop:
            raise OutOfScope("this token may not stop streams (it lacks the stop right)", streams=[start.stream])
        self.check_read(start)

    def check_ids(self, streams: Iterable[str]) -> None:
        """Raise :class:`OutOfScope` naming the ids of *streams* outside the token's ``streams``."""
        if self.streams is None:
            return
        outside = [s for s in streams if s not in self.streams]
        if outside:
            raise OutOfScope(f"stream {_shown_ids(outside)} is outside this token's scope", streams=outside)

    def narrow(self, flt: Filter) -> Filter:
        """The part of *flt* within scope: what a subscription or a filtered request may be served.

        Raises :class:`OutOfScope` when *flt* itself asks for something
        outside the scope (names a stream id the token does not list, or a
        meta value it does not allow): that request is refused, not silently
        shrunk. Anything *flt* leaves open (no stream ids, no value for a
        tag) is closed to the scope's own streams and tags.
        """
        if self.unrestricted:
            return flt
        streams = flt.streams
        if self.streams is not None:
            if streams is None:
                streams = self.streams
            else:
                self.check_ids(streams)
        meta: dict[str, Any] = dict(flt.meta or {})
        for key, allowed in (self.meta or {}).items():
            if key not in meta:
                meta[key] = sorted(allowed)
                continue
            asked = meta[key]
            values = list(asked) if isinstance(asked, list | tuple | set | frozenset) else [asked]
            if not all(isinstance(v, str) and v in allowed for v in values):
                raise OutOfScope(f"meta {key!r}: the value asked for is outside this token's scope", meta=key)
        return Filter(streams=streams, models=flt.models, providers=flt.providers, meta=meta or None)


OPERATOR: Final = Scope(stop=True)
"""The scope of a static token (or of a server without tokens): every stream, stop included."""


class _ScopeClaim(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    streams: list[str] | Literal["*"] | None = None
    meta: dict[str, str | list[str]] | None = None
    stop: bool = False


def _scope_from_claims(claims: Mapping[str, Any], leeway: float) -> Scope:
    raw = claims.get(CLAIM)
    if raw is None:
        raise TokenError(f"token lacks the {CLAIM!r} claim naming its scope")
    try:
        claim = msgspec.convert(raw, _ScopeClaim)
    except msgspec.ValidationError as exc:
        problem = validation_problem(exc).describe()[:_MESSAGE_LIMIT]
        raise TokenError(f"token claim {CLAIM!r}: {problem}") from None
    if claim.streams is None and not claim.meta:
        raise TokenError(f'token claim {CLAIM!r} names no streams and no meta (use "streams": "*" for every stream)')
    meta = {k: frozenset([v] if isinstance(v, str) else v) for k, v in (claim.meta or {}).items()}
    exp = claims.get("exp")
    sub = claims.get("sub")
    return Scope(
        streams=None if claim.streams is None or claim.streams == ANY_STREAM else frozenset(claim.streams),
        meta=meta or None,
        stop=claim.stop,
        expires=float(exp) + leeway if isinstance(exp, int | float) else None,
        subject=sub if isinstance(sub, str) else None,
    )


def _load_public_key(data: bytes, where: str) -> Any:
    try:
        from cryptography.hazmat.primitives.serialization import load_pem_public_key
    except ImportError:  # pragma: no cover - depends on the environment
        raise ValueError(f"{where}: public keys need the 'cryptography' library: pip install 'PyJWT[crypto]'") from None
    try:
        return load_pem_public_key(data)
    except (ValueError, TypeError):
        raise ValueError(
            f"{where}: not a PEM public key (BEGIN PUBLIC KEY); give the public half, never the private key"
        ) from None


def _key_algorithms(key: Any) -> frozenset[str]:
    """The asymmetric algorithms a public key can verify."""
    from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa

    if isinstance(key, rsa.RSAPublicKey):
        return frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"})
    if isinstance(key, ec.EllipticCurvePublicKey):
        return frozenset({"ES256", "ES384", "ES512"})
    if isinstance(key, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey):
        return frozenset({"EdDSA"})
    return frozenset()


_DEFAULT_FOR_KEY = {"RS256": "RS256", "ES256": "ES256", "EdDSA": "EdDSA"}


class TokenVerifier:
    """Verify scoped tokens against a shared *secret* (HMAC) and/or a *public_key* (PEM: RSA, EC or Ed25519).

    *algorithms* is the allow-list (default: ``HS256`` with a secret, and
    ``RS256``, ``ES256`` or ``EdDSA`` after the public key's type); each
    algorithm must fit a configured key, and ``none`` is refused. *leeway* is
    the clock skew in seconds tolerated on ``exp``/``nbf``/``iat``.
    *audience* and *issuer*, when given, are required in every token
    (``aud``/``iss``). Raises :class:`ValueError` naming the parameter when
    the configuration is unsafe or inconsistent.
    """

    __slots__ = ("_public_key", "_secret", "algorithms", "audience", "issuer", "leeway", "max_bytes")

    def __init__(
        self,
        *,
        secret: str | bytes | None = None,
        public_key: str | bytes | None = None,
        algorithms: Iterable[str] | None = None,
        leeway: float = 5.0,
        audience: str | None = None,
        issuer: str | None = None,
        max_bytes: int = MAX_TOKEN_BYTES,
    ) -> None:
        if secret is None and public_key is None:
            raise ValueError("a token verifier needs a secret or a public key")
        self._secret = secret.encode() if isinstance(secret, str) else secret
        if self._secret is not None and len(self._secret) < MIN_SECRET_BYTES:
            raise ValueError(
                f"secret: at least {MIN_SECRET_BYTES} bytes are needed for HMAC "
                "(make one with: python -c 'import secrets; print(secrets.token_urlsafe(32))')"
            )
        self._public_key: Any = None
        key_algorithms: frozenset[str] = frozenset()
        if public_key is not None:
            data = public_key.encode() if isinstance(public_key, str) else public_key
            self._public_key = _load_public_key(data, "public_key")
            key_algorithms = _key_algorithms(self._public_key)
        if algorithms is None:
            chosen = {"HS256"} if self._secret is not None else set()
            chosen |= {a for a in _DEFAULT_FOR_KEY if a in key_algorithms}
        else:
            chosen = set(algorithms)
            if not chosen:
                raise ValueError("algorithms: name at least one algorithm")
        for name in sorted(chosen):
            if name.lower() == "none":
                raise ValueError("algorithms: 'none' (unsigned tokens) is never accepted")
            if name in HMAC_ALGORITHMS:
                if self._secret is None:
                    raise ValueError(f"algorithms: {name} needs a shared secret, and none is configured")
                if len(self._secret) < _HMAC_MIN_BYTES[name]:
                    raise ValueError(f"secret: {name} needs at least {_HMAC_MIN_BYTES[name]} bytes")
            elif name in PUBLIC_KEY_ALGORITHMS:
                if self._public_key is None:
                    raise ValueError(f"algorithms: {name} needs a public key, and none is configured")
                if name not in key_algorithms:
                    raise ValueError(f"algorithms: {name} does not fit the configured public key's type")
            else:
                known = ", ".join(sorted(HMAC_ALGORITHMS | PUBLIC_KEY_ALGORITHMS))
                raise ValueError(f"algorithms: unknown algorithm {name!r} (known: {known})")
        if not 0 <= leeway <= 300:
            raise ValueError(f"leeway: must be within 0-300 seconds, got {leeway}")
        if max_bytes < 64:
            raise ValueError(f"max_bytes: must be at least 64, got {max_bytes}")
        self.algorithms: frozenset[str] = frozenset(chosen)
        """The allow-list, checked against each token's ``alg`` header before anything else."""
        self.leeway = float(leeway)
        self.audience = audience
        self.issuer = issuer
        self.max_bytes = max_bytes

    def __repr__(self) -> str:
        # Never the secret or the key.
        return f"TokenVerifier(algorithms={sorted(self.algorithms)}, leeway={self.leeway})"

    @classmethod
    def load(
        cls,
        *,
        secret_env: str | None = None,
        secret_file: str | None = None,
        public_key_file: str | None = None,
        algorithms: Iterable[str] | None = None,
        leeway: float = 5.0,
        audience: str | None = None,
        issuer: str | None = None,
        prefix: str = "",
    ) -> TokenVerifier | None:
        """Build a verifier from where its keys live (``None`` when no source is given).

        The secret is read from the environment variable *secret_env* or the
        file *secret_file* (its whitespace stripped), the public key from the
        PEM file *public_key_file*. Errors name the option (with *prefix*,
        e.g. ``jwt_``), the variable or the file, never their content.
        """
        if not (secret_env or secret_file or public_key_file):
            return None
        secret = read_secret(env=secret_env, file=secret_file, prefix=prefix) if (secret_env or secret_file) else None
        public_key: bytes | None = None
        if public_key_file:
            try:
                public_key = Path(public_key_file).read_bytes()
            except OSError as exc:
                raise ValueError(f"{prefix}public_key_file: cannot read {public_key_file}: {exc.strerror}") from None
        try:
            return cls(
                secret=secret,
                public_key=public_key,
                algorithms=list(algorithms) if algorithms else None,
                leeway=leeway,
                audience=audience,
                issuer=issuer,
            )
        except ValueError as exc:
            # Name the option the value came from: "jwt_secret_env: ...", "jwt_public_key_file: ...".
            key, sep, problem = str(exc).partition(": ")
            source = {"secret": "secret_env" if secret_env else "secret_file", "public_key": "public_key_file"}
            raise ValueError(f"{prefix}{source.get(key, key)}{sep}{problem}") from None

    def verify(self, token: str) -> Scope:
        """The scope *token* grants; raises :class:`TokenError` with a safe reason when it is not acceptable."""
        if len(token) > self.max_bytes:
            raise TokenError(f"token too large (more than {self.max_bytes} bytes)")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.InvalidTokenError:
            raise TokenError("malformed token (expected a signed JWT)") from None
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in self.algorithms:
            allowed = ", ".join(sorted(self.algorithms))
            raise TokenError(f"token algorithm not allowed (this server accepts {allowed})")
        # Each algorithm meets the key of its own family only: never the public key as an HMAC secret.
        key: Any = self._secret if alg in HMAC_ALGORITHMS else self._public_key
        options: dict[str, Any] = {
            "require": ["exp"] + (["aud"] if self.audience else []) + (["iss"] if self.issuer else [])
        }
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=[alg],
                options=options,  # type: ignore[arg-type]
                leeway=self.leeway,
                audience=self.audience,
                issuer=self.issuer,
            )
        except jwt.ExpiredSignatureError:
            raise TokenError("token expired") from None
        except jwt.ImmatureSignatureError:
            raise TokenError("token not valid yet (nbf or iat in the future)") from None
        except jwt.InvalidSignatureError:
            raise TokenError("token signature does not verify") from None
        except jwt.MissingRequiredClaimError as exc:
            raise TokenError(f"token lacks the required claim {exc.claim!r}") from None
        except jwt.InvalidAudienceError:
            raise TokenError("token audience (aud) is not this server's") from None
        except jwt.InvalidIssuerError:
            raise TokenError("token issuer (iss) is not the configured one") from None
        except jwt.InvalidTokenError:
            raise TokenError("malformed token (expected a signed JWT)") from None
        return _scope_from_claims(claims, self.leeway)


def read_secret(*, env: str | None = None, file: str | None = None, prefix: str = "") -> bytes:
    """Read a secret from the environment variable *env* or the file *file* (exactly one), whitespace stripped.

    Raises :class:`ValueError` naming the variable or file (never the value)
    when it is unset, empty or unreadable.
    """
    if bool(env) == bool(file):
        raise ValueError(f"give exactly one of {prefix}secret_env and {prefix}secret_file")
    if env:
        value = os.environ.get(env, "").strip()
        if not value:
            raise ValueError(f"{prefix}secret_env: environment variable {env} is not set or empty")
        return value.encode()
    assert file is not None
    try:
        data = Path(file).read_bytes().strip()
    except OSError as exc:
        raise ValueError(f"{prefix}secret_file: cannot read {file}: {exc.strerror}") from None
    if not data:
        raise ValueError(f"{prefix}secret_file: {file} is empty")
    return data


def load_private_key(path: str) -> Any:
    """Load a PEM private key (RSA, EC or Ed25519) from *path* to sign tokens with :func:`mint_token`.

    Raises :class:`ValueError` naming the file, never its content.
    """
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ValueError(f"private key file: cannot read {path}: {exc.strerror}") from None
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    try:
        return load_pem_private_key(data, password=None)
    except (ValueError, TypeError):
        raise ValueError(f"private key file: {path} is not an unencrypted PEM private key") from None


def mint_token(
    key: str | bytes | Any,
    *,
    streams: Iterable[str] | Literal["*"] | None = None,
    meta: Mapping[str, str | Sequence[str]] | None = None,
    stop: bool = False,
    ttl: float = 3600.0,
    algorithm: str = "HS256",
    subject: str | None = None,
    audience: str | None = None,
    issuer: str | None = None,
    now: float | None = None,
) -> str:
    """Sign a scoped token with *key* (the HMAC secret, or a private key object from :func:`load_private_key`).

    The token lets its bearer read *streams* (ids, or ``"*"``) whose
    ``start.meta`` carries *meta*, stop them when *stop*, for *ttl* seconds
    from *now*. Meant for development and for backends in Python; any JWT
    library that writes the same claims works as well.
    """
    if streams is None and not meta:
        raise ValueError('name streams, meta or both (streams="*" for every stream)')
    if ttl <= 0:
        raise ValueError(f"ttl: must be positive, got {ttl}")
    if algorithm.lower() == "none":
        raise ValueError("algorithm: 'none' is never used")
    if algorithm in HMAC_ALGORITHMS:
        secret = key.encode() if isinstance(key, str) else key
        if not isinstance(secret, bytes) or len(secret) < _HMAC_MIN_BYTES[algorithm]:
            raise ValueError(f"key: {algorithm} needs an HMAC secret of at least {_HMAC_MIN_BYTES[algorithm]} bytes")
        key = secret
    scope: dict[str, Any] = {"stop": stop}
    if streams is not None:
        scope["streams"] = ANY_STREAM if streams == ANY_STREAM else sorted(streams)
    if meta:
        scope["meta"] = {k: v if isinstance(v, str) else list(v) for k, v in meta.items()}
    issued = int(time.time() if now is None else now)
    claims: dict[str, Any] = {"iat": issued, "exp": issued + max(1, round(ttl)), CLAIM: scope}
    if subject is not None:
        claims["sub"] = subject
    if audience is not None:
        claims["aud"] = audience
    if issuer is not None:
        claims["iss"] = issuer
    try:
        return jwt.encode(claims, key, algorithm=algorithm)
    # PyJWT raises NotImplementedError for an algorithm its installed backends cannot sign with.
    except (TypeError, ValueError, jwt.InvalidKeyError, NotImplementedError):
        raise ValueError(f"key: does not fit the algorithm {algorithm!r}") from None


class Authenticator:
    """The credentials one server accepts: static tokens (full access) and/or scoped tokens through a verifier.

    :meth:`authenticate` answers with the :class:`Scope` granted, or raises
    :class:`TokenError`. With neither static tokens nor a verifier every
    request is the operator's (a loopback server without a token).
    """

    __slots__ = ("_static", "verifier")

    def __init__(self, static: Iterable[str | bytes] = (), verifier: TokenVerifier | None = None) -> None:
        self._static = [t.encode() if isinstance(t, str) else t for t in static]
        if not all(self._static):
            raise ValueError("static tokens must not be empty")
        self.verifier = verifier
        """The scoped-token verifier, or ``None`` when only static tokens are accepted."""

    def __repr__(self) -> str:
        return f"Authenticator(static={len(self._static)}, verifier={self.verifier!r})"

    @property
    def required(self) -> bool:
        """Whether a credential is needed at all."""
        return bool(self._static) or self.verifier is not None

    def authenticate(self, credential: str | None) -> Scope:
        """The scope *credential* grants (:data:`OPERATOR` for a static token, or when no credential is needed).

        Raises :class:`TokenError` when it is missing or not acceptable. Static
        tokens are compared in constant time, every one of them each call.
        """
        if not self.required:
            return OPERATOR
        if not credential:
            raise TokenError("missing token" if self.verifier is not None else _STATIC_REFUSAL)
        limit = self.verifier.max_bytes if self.verifier is not None else MAX_TOKEN_BYTES
        if len(credential) > limit:
            raise TokenError(f"token too large (more than {limit} bytes)")
        candidate = credential.encode()
        ok = False
        for token in self._static:
            ok |= hmac.compare_digest(candidate, token)
        if ok:
            return OPERATOR
        if self.verifier is None:
            raise TokenError(_STATIC_REFUSAL)
        return self.verifier.verify(credential)


def bearer_credential(authorization: str | None, query_token: str | None = None) -> str | None:
    """The credential a request presents: ``Authorization: Bearer <token>``, else the ``token`` query parameter."""
    if authorization and authorization[:7].lower() == "bearer ":
        return authorization[7:].strip() or None
    return query_token or None


class JwtSettings(Protocol):
    """The ``jwt_*`` options of a server that accepts scoped tokens (the websocket and http sinks carry them)."""

    @property
    def jwt_secret_env(self) -> str | None:
        """Environment variable holding the HMAC secret."""

    @property
    def jwt_secret_file(self) -> str | None:
        """File holding the HMAC secret."""

    @property
    def jwt_public_key_file(self) -> str | None:
        """PEM file holding the public key (RS/ES/PS/EdDSA)."""

    @property
    def jwt_algorithms(self) -> Sequence[str]:
        """Algorithms accepted (empty: those of the key given)."""

    @property
    def jwt_leeway(self) -> float:
        """Seconds of clock skew allowed on ``exp`` and ``nbf``."""

    @property
    def jwt_audience(self) -> str | None:
        """Required ``aud``, if any."""

    @property
    def jwt_issuer(self) -> str | None:
        """Required ``iss``, if any."""


def check_jwt_settings(settings: JwtSettings) -> None:
    """Raise :class:`ValueError` naming the ``jwt_*`` key that is wrong (called when options are built)."""
    if settings.jwt_secret_env is not None and not settings.jwt_secret_env:
        raise ValueError("jwt_secret_env: must name an environment variable")
    if settings.jwt_secret_env and settings.jwt_secret_file:
        raise ValueError("jwt_secret_env, jwt_secret_file: give one of them, not both")
    if not 0 <= settings.jwt_leeway <= 300:
        raise ValueError(f"jwt_leeway: must be within 0-300 seconds, got {settings.jwt_leeway}")
    has_source = settings.jwt_secret_env or settings.jwt_secret_file or settings.jwt_public_key_file
    if settings.jwt_algorithms and not has_source:
        raise ValueError("jwt_algorithms: set jwt_secret_env, jwt_secret_file or jwt_public_key_file too")


def verifier_from_settings(settings: JwtSettings) -> TokenVerifier | None:
    """The verifier the ``jwt_*`` options describe (``None``: no key source given).

    Raises :class:`ValueError` naming the ``jwt_*`` key whose source cannot be
    read, never the secret itself.
    """
    return TokenVerifier.load(
        secret_env=settings.jwt_secret_env,
        secret_file=settings.jwt_secret_file,
        public_key_file=settings.jwt_public_key_file,
        algorithms=settings.jwt_algorithms or None,
        leeway=settings.jwt_leeway,
        audience=settings.jwt_audience,
        issuer=settings.jwt_issuer,
        prefix="jwt_",
    )
