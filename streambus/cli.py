"""The ``streambus`` command line.

Core commands live here; plugins add their own through the
``streambus.commands`` entry point group (a :mod:`click` command each).
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

import anyio
import click
import orjson

from . import __version__
from .config import Pipeline, load_config
from .errors import PluginNotFound, StreamBusError
from .logging import configure_logging
from .plugins import GROUPS, discover, install_hint, load

__all__ = ["main"]


# Commands the project's own plugins provide, for a helpful hint when one is missing.
_PLUGIN_COMMANDS = {
    "demo": "streambus-demo",
    "proxy": "streambus-proxy",
    "stats": "streambus-stats",
    "tail": "streambus-websocket",
}


class _Group(click.Group):
    """A click group that also offers the commands plugins register."""

    def _plugin_names(self) -> list[str]:
        return [info.name for info in discover("commands")]

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(super().list_commands(ctx)) | set(self._plugin_names()))

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        command = super().get_command(ctx, cmd_name)
        if command is not None:
            return command
        try:
            loaded = load("commands", cmd_name)
        except PluginNotFound:
            dist = _PLUGIN_COMMANDS.get(cmd_name)
            if dist is not None:
                raise click.UsageError(
                    f"'streambus {cmd_name}' comes with the {dist} plugin. Install it with: {install_hint(dist)}"
                ) from None
            return None
        except StreamBusError as exc:
            raise click.ClickException(str(exc)) from None
        return loaded if isinstance(loaded, click.Command) else None


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="streambus")
def main() -> None:
    """streambus: an async streaming event bus for LLM output."""


def _load(path: str) -> Pipeline:
    try:
        return load_config(path)
    except StreamBusError as exc:
        raise click.ClickException(str(exc)) from None


@main.command()
@click.argument("configs", nargs=-1, required=True, type=click.Path(dir_okay=False))
def check(configs: tuple[str, ...]) -> None:
    """Validate pipeline CONFIGS; exit 1 naming the file, table and key on the first error.

    Besides the options, each plugin's own check runs: files it reads must
    exist, directories it writes to must be writable. Nothing is started.
    """
    failed = False
    for path in configs:
        try:
            pipeline = load_config(path)
            pipeline.check()
        except StreamBusError as exc:
            click.echo(f"error: {exc}", err=True)
            failed = True
            continue
        click.echo(f"ok: {path} ({len(pipeline.producers)} producers, {len(pipeline.sinks)} sinks)")
    if failed:
        sys.exit(1)


@main.command()
@click.argument("config", type=click.Path(dir_okay=False))
@click.option(
    "--serve", is_flag=True, help="Keep running until SIGINT/SIGTERM instead of stopping when producers finish."
)
def run(config: str, serve: bool) -> None:
    """Run the pipeline in CONFIG until producers finish and sinks drain (or a signal, with --serve)."""
    pipeline = _load(config)
    _run(pipeline, serve)


def _run(pipeline: Pipeline, serve: bool) -> None:
    configure_logging(pipeline.log.level, pipeline.log.format)
    try:
        anyio.run(lambda: pipeline.run(serve=serve))
    except StreamBusError as exc:
        raise click.ClickException(str(exc)) from None
    except KeyboardInterrupt:
        pass


@main.command(name="plugins")
def plugins_command() -> None:
    """List the producers, sinks, moderators and commands found by entry point."""
    failed = False
    for kind in GROUPS:
        infos = discover(kind)
        click.echo(f"{kind}:")
        if not infos:
            click.echo("  (none)")
        for info in infos:
            origin = f"{info.distribution} {info.version}" if info.distribution else info.value
            if info.ok:
                click.echo(f"  {info.name:<14} {origin:<28} {info.summary}")
            else:
                failed = True
                click.echo(f"  {info.name:<14} {origin:<28} NOT LOADED: {info.error}")
    if failed:
        click.echo("some plugins could not be loaded (see NOT LOADED above)", err=True)


def _parse_ttl(value: str) -> float:
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    text = value.strip().lower()
    factor = units.get(text[-1:])
    number = text[:-1] if factor is not None else text
    try:
        seconds = float(number) * (factor or 1)
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a duration (e.g. 900, 15m, 2h, 1d)") from None
    if not 0 < seconds <= 366 * 86400:
        raise click.BadParameter(f"{value!r}: must be more than 0 and at most a year")
    return seconds


@main.command(name="token")
@click.option("--stream", "streams", multiple=True, help="A stream id the token may read (repeat it); '*': any id.")
@click.option("--meta", "meta", multiple=True, help="KEY=VALUE a stream's start.meta must carry (repeat a key: any of)")
@click.option("--stop", is_flag=True, help="Let the bearer stop (abort) the streams it may read.")
@click.option("--ttl", default="1h", show_default=True, help="How long the token is valid: seconds, or 15m, 2h, 1d.")
@click.option("--secret-env", metavar="VAR", help="Environment variable holding the HMAC secret (HS256).")
@click.option(
    "--secret-file",
    type=click.Path(dir_okay=False),
    help="File holding the HMAC secret (HS256); instead of --secret-env.",
)
@click.option(
    "--private-key-file",
    type=click.Path(dir_okay=False),
    help="PEM private key (RSA, EC or Ed25519) to sign with; the servers verify with its public key.",
)
@click.option("--algorithm", help="Signing algorithm (default: HS256 with a secret, RS256/ES256/EdDSA after the key).")
@click.option("--subject", help="The token's sub claim (who it is for; shown in no log).")
@click.option("--audience", help="The token's aud claim (when the servers set jwt_audience).")
@click.option("--issuer", help="The token's iss claim (when the servers set jwt_issuer).")
def token_command(
    streams: tuple[str, ...],
    meta: tuple[str, ...],
    stop: bool,
    ttl: str,
    secret_env: str | None,
    secret_file: str | None,
    private_key_file: str | None,
    algorithm: str | None,
    subject: str | None,
    audience: str | None,
    issuer: str | None,
) -> None:
    """Mint a scoped token for development: print a JWT that reads the given streams or meta.

    \b
    export STREAMBUS_JWT_SECRET=$(python -c 'import secrets; print(secrets.token_urlsafe(32))')
    streambus token --secret-env STREAMBUS_JWT_SECRET --meta tenant=acme --meta user=u42 --stop --ttl 15m

    The servers verify it with the same secret (jwt_secret_env), or with the
    public key of --private-key-file (jwt_public_key_file). In production,
    mint tokens in your backend with any JWT library (docs/security.md).
    """
    from .tokens import load_private_key, mint_token, read_secret

    if sum(x is not None for x in (secret_env, secret_file, private_key_file)) != 1:
        raise click.UsageError("give exactly one of --secret-env, --secret-file and --private-key-file")
    tags: dict[str, list[str]] = {}
    for item in meta:
        tag, sep, value = item.partition("=")
        if not sep or not tag.strip():
            raise click.BadParameter(f"{item!r} is not KEY=VALUE", param_hint="--meta")
        tags.setdefault(tag.strip(), []).append(value)
    if not streams and not tags:
        raise click.UsageError("name what the token may read: --stream ID (or --stream '*') and/or --meta KEY=VALUE")
    seconds = _parse_ttl(ttl)
    chosen: list[str] | str | None = None
    if streams:
        chosen = "*" if "*" in streams else list(streams)
    key: object
    try:
        if private_key_file is not None:
            key = load_private_key(private_key_file)
            algorithm = algorithm or _algorithm_for(key)
        else:
            key = read_secret(env=secret_env, file=secret_file, prefix="--")
            algorithm = algorithm or "HS256"
        token = mint_token(
            key,
            streams=chosen,
            meta={k: v[0] if len(v) == 1 else v for k, v in tags.items()} or None,
            stop=stop,
            ttl=seconds,
            algorithm=algorithm,
            subject=subject,
            audience=audience,
            issuer=issuer,
        )
    except ValueError as exc:
        # Names the option, variable or file; never the secret.
        raise click.ClickException(
            str(exc).replace("--secret_env", "--secret-env").replace("--secret_file", "--secret-file")
        ) from None
    click.echo(token)


def _algorithm_for(key: object) -> str:
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

    if isinstance(key, rsa.RSAPrivateKey):
        return "RS256"
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return "ES256"
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return "EdDSA"
    raise ValueError("private key file: an RSA, EC or Ed25519 key is needed")


@main.command(name="abort")
@click.argument("url")
@click.argument("stream")
@click.option("--reason", default="stopped from the command line", show_default=True, help="The abort's reason.")
@click.option(
    "--token-env",
    default="STREAMBUS_TOKEN",
    show_default=True,
    help="Environment variable holding the bearer token, if the server needs one (never pass it as an argument).",
)
@click.option("--timeout", default=10.0, show_default=True, type=click.FloatRange(min=0.1), help="Seconds to wait.")
def abort_command(url: str, stream: str, reason: str, token_env: str, timeout: float) -> None:
    """Stop STREAM through the server at URL, wherever its producer runs.

    URL is the http sink's base URL (``http://127.0.0.1:8090``, with its
    prefix) or the WebSocket broadcaster's (``ws://127.0.0.1:8765/ws``).
    Prints ``STREAM: stopped`` (or ``forwarded``, or ``ended`` when it had
    already ended) and exits 0; exits 1 naming the reason when the stream is
    unknown, the token is refused or the server cannot be reached.
    """
    token = os.environ.get(token_env) or None
    scheme = urllib.parse.urlsplit(url).scheme
    if scheme in ("http", "https"):
        outcome = _abort_http(url, stream, reason, token, timeout)
    elif scheme in ("ws", "wss"):
        outcome = _abort_ws(url, stream, reason, token, timeout)
    else:
        raise click.UsageError(f"URL must start with http://, https://, ws:// or wss://, got {url!r}")
    click.echo(f"{stream}: {outcome}")


def _abort_http(url: str, stream: str, reason: str, token: str | None, timeout: float) -> str:
    target = f"{url.rstrip('/')}/streams/{urllib.parse.quote(stream, safe='')}/abort"
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(target, data=orjson.dumps({"reason": reason}), headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            answer: Any = orjson.loads(response.read())
    except urllib.error.HTTPError as exc:
        body = exc.read()
        try:
            detail = orjson.loads(body)
        except orjson.JSONDecodeError:
            detail = {"error": body.decode(errors="replace").strip()}
        if isinstance(detail, dict) and detail.get("outcome") == "unknown":
            raise click.ClickException(f"{stream}: unknown (no live stream of that id)") from None
        message = detail.get("error") if isinstance(detail, dict) else None
        raise click.ClickException(f"{stream}: HTTP {exc.code}: {message or exc.reason}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason_text = getattr(exc, "reason", exc)
        raise click.ClickException(f"cannot reach {url}: {reason_text}") from None
    return str(answer.get("outcome", "?")) if isinstance(answer, dict) else "?"


def _abort_ws(url: str, stream: str, reason: str, token: str | None, timeout: float) -> str:
    try:
        from websockets.exceptions import InvalidStatus, WebSocketException
        from websockets.sync.client import connect
    except ImportError:
        raise click.ClickException(
            "a ws:// URL needs the websockets library: pip install streambus-websocket"
        ) from None
    headers = {"Authorization": f"Bearer {token}"} if token else None
    try:
        with connect(url, additional_headers=headers, open_timeout=timeout, proxy=None) as ws:
            ws.send(orjson.dumps({"op": "abort", "stream": stream, "reason": reason, "id": "cli"}).decode())
            while True:
                frame = orjson.loads(ws.recv(timeout=timeout))
                op = frame.get("op") if isinstance(frame, dict) else None
                if op == "aborted" and frame.get("id") == "cli":
                    return str(frame.get("outcome", "?"))
                if op == "error":
                    code = frame.get("code")
                    if code == "unknown_stream":
                        raise click.ClickException(f"{stream}: unknown (no live stream of that id)")
                    raise click.ClickException(f"{stream}: {code}: {frame.get('message', '')}")
    except TimeoutError:
        raise click.ClickException(f"{url} did not answer within {timeout:g} s") from None
    except InvalidStatus as exc:
        raise click.ClickException(f"{url} refused the connection: HTTP {exc.response.status_code}") from None
    except (WebSocketException, OSError) as exc:
        detail = getattr(exc, "rcvd", None)
        if detail is not None and detail.code == 4001:
            raise click.ClickException(
                f"{url}: unauthorized (the token is missing or wrong; see --token-env)"
            ) from None
        raise click.ClickException(f"cannot reach {url}: {exc}") from None
