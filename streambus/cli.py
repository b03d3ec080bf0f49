"""The ``streambus`` command line.

Core commands live here; plugins add their own through the
``streambus.commands`` entry point group (a :mod:`click` command each).
"""

from __future__ import annotations

import sys

import anyio
import click

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
