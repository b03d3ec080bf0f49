"""Who may talk to a listening server: the Host and Origin rules every streambus server applies.

Anything that listens (the WebSocket broadcaster, the http sink, the proxy)
checks each request against one :class:`OriginPolicy` before doing anything
else. The rules, and the attacks they stop, are in ``docs/security.md``:

- **Host.** The request's ``Host`` must be one of the server's own names: the
  loopback names (``localhost``, ``127.0.0.1``, ``::1``...), the address it is
  bound to, and the names given in ``allowed_hosts``. This is what defeats DNS
  rebinding: a page at ``attacker.example`` whose name now resolves to
  127.0.0.1 still sends ``Host: attacker.example``.
- **Origin.** A request without ``Origin`` does not come from a web page
  (``curl``, SDKs, services) and passes. A request with one passes only when
  the origin is listed in ``allowed_origins`` (``"*"``: any), or when it is the
  server's own origin, judged against the server's names and port, never
  against the request's ``Host``.
- **Duplicates.** Two ``Host``, ``Origin`` or ``Authorization`` headers are
  refused: which one a proxy in front of us used cannot be known.

A refusal is a :class:`Refusal` value, not an exception, so each server turns
it into its own answer (HTTP 400/403, or a refused WebSocket handshake)::

    policy = OriginPolicy(bind_host="127.0.0.1", port=8765)
    refusal = policy.check(hosts=request_hosts, origins=request_origins)
    if refusal is not None:
        return http_response(refusal.status, refusal.reason)
"""

from __future__ import annotations

import ipaddress
import urllib.parse
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

__all__ = ["LOOPBACK_NAMES", "OriginPolicy", "Refusal", "is_loopback_host", "split_host_port"]

#: Host names that always mean this machine (``ip6-localhost`` is Debian's name for ``::1``).
LOOPBACK_NAMES = frozenset({"localhost", "ip6-localhost", "ip6-loopback", "127.0.0.1", "::1"})


def is_loopback_host(host: str) -> bool:
    """Whether *host* (a name or an address, IPv6 with or without brackets) means this machine only.

    ``*.localhost`` names count, as RFC 6761 reserves them for loopback.
    """
    name = host.strip().lower().rstrip(".")
    if name.startswith("[") and name.endswith("]"):
        name = name[1:-1]
    if name in LOOPBACK_NAMES or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def split_host_port(value: str) -> tuple[str, int | None]:
    """Split a ``Host`` header value (``name``, ``name:port``, ``[v6]:port``) into a lower-case name and port.

    Raises :class:`ValueError` naming the value when it is not a host.
    """
    text = value.strip()
    if not text or any(c.isspace() or c in "/@?#\\" for c in text):
        raise ValueError(f"not a host: {value!r}")
    port: int | None = None
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ValueError(f"not a host: {value!r} (unclosed '[')")
        name, rest = text[1:end], text[end + 1 :]
        if rest:
            if not rest.startswith(":") or not rest[1:].isdigit():
                raise ValueError(f"not a host: {value!r}")
            port = int(rest[1:])
    elif text.count(":") == 1:
        name, _, port_text = text.partition(":")
        if not port_text.isdigit():
            raise ValueError(f"not a host: {value!r} (port {port_text!r})")
        port = int(port_text)
    elif ":" in text:
        name = text  # a bare IPv6 address
    else:
        name = text
    if port is not None and not 0 < port < 65536:
        raise ValueError(f"not a host: {value!r} (port out of range)")
    if not name:
        raise ValueError(f"not a host: {value!r}")
    return name.lower().rstrip("."), port


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why a request was refused: an HTTP *status* (400 or 403) and a one-line *reason* safe to show the client.

    The reason never repeats a header's value beyond what the client sent in
    ``Host``/``Origin``; it never contains a credential.
    """

    status: int
    reason: str


class OriginPolicy:
    """The Host and Origin rules of one listening server (see the module docstring).

    *bind_host* is the address the server listens on, *port* the port it
    answers on (``None`` when unknown: then a same-origin page may use any
    port), *allowed_hosts* further names the server is reached by (behind a
    reverse proxy, or on a LAN name; ``"*"`` accepts any ``Host``), and
    *allowed_origins* the web origins allowed to use it from a browser
    (``"*"``: any page).
    """

    __slots__ = ("allowed_origins", "any_host", "any_origin", "names", "port")

    def __init__(
        self,
        *,
        bind_host: str,
        port: int | None = None,
        allowed_hosts: Iterable[str] = (),
        allowed_origins: Iterable[str] = (),
    ) -> None:
        hosts = [h.strip().lower().rstrip(".") for h in allowed_hosts]
        origins = [o.strip().rstrip("/") for o in allowed_origins]
        for origin in origins:
            if origin != "*" and not origin.startswith(("http://", "https://")):
                raise ValueError(f"allowed_origins: {origin!r} must be '*' or start with http:// or https://")
        self.any_host = "*" in hosts
        self.any_origin = "*" in origins
        names = {h.strip("[]") for h in hosts if h != "*"} | LOOPBACK_NAMES
        bind = bind_host.strip().lower().strip("[]")
        if bind and bind not in ("0.0.0.0", "::"):
            names.add(bind)
        self.names: frozenset[str] = frozenset(names)
        self.allowed_origins: frozenset[str] = frozenset(o.lower() for o in origins if o != "*")
        self.port = port

    def with_port(self, port: int) -> OriginPolicy:
        """The same policy for a server that learned its *port* after binding (port 0)."""
        other = OriginPolicy.__new__(OriginPolicy)
        other.any_host, other.any_origin = self.any_host, self.any_origin
        other.names, other.allowed_origins, other.port = self.names, self.allowed_origins, port
        return other

    def host_allowed(self, host: str) -> bool:
        """Whether a ``Host`` header value names this server."""
        try:
            name, _port = split_host_port(host)
        except ValueError:
            return False
        return self.any_host or name in self.names or is_loopback_host(name)

    def origin_allowed(self, origin: str) -> bool:
        """Whether a page at *origin* (the ``Origin`` header's value) may use this server."""
        value = origin.strip().rstrip("/").lower()
        if self.any_origin or value in self.allowed_origins:
            return True
        parsed = urllib.parse.urlsplit(value)
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            return False  # "null" (sandboxed frames, file:// pages) and other schemes
        try:
            port = parsed.port or (443 if parsed.scheme == "https" else 80)
        except ValueError:
            return False
        if self.port is not None and port != self.port:
            return False
        host = parsed.hostname
        return host in self.names or is_loopback_host(host)

    def check(self, *, hosts: Sequence[str], origins: Sequence[str], authorizations: int = 0) -> Refusal | None:
        """Judge one request by its ``Host`` and ``Origin`` header values; ``None`` lets it through.

        Pass every value of each header (``headers.getall(name, [])``), and the
        number of ``Authorization`` headers, so duplicates are caught.
        """
        for name, count in (("Host", len(hosts)), ("Origin", len(origins)), ("Authorization", authorizations)):
            if count > 1:
                return Refusal(400, f"duplicate {name} header")
        if hosts and not self.host_allowed(hosts[0]):
            return Refusal(403, f"Host {_shown(hosts[0])} is not a name of this server (see allowed_hosts)")
        if origins and not self.origin_allowed(origins[0]):
            return Refusal(403, f"origin {_shown(origins[0])} is not allowed (see allowed_origins)")
        return None


def _shown(value: str) -> str:
    """A header value for a message: bounded and printable."""
    text = value[:100].encode("ascii", "backslashreplace").decode("ascii")
    return repr(text)
