"""``mtkit config show|check``."""

from __future__ import annotations

from typing import Annotated

import typer

from mtkit.cli.options import OptionalConfigOption, SetOption

app = typer.Typer(no_args_is_help=True)


@app.command("show")
def show(
    config: OptionalConfigOption = None,
    overrides: SetOption = None,
    doc: Annotated[
        bool, typer.Option("--doc", help="List every key with its default, its allowed values and its meaning.")
    ] = False,
) -> None:
    """Print the resolved config (defaults filled in, overrides applied) as YAML."""
    from mtkit.config import describe_fields, load_config

    if doc:
        for key, default, text in describe_fields():
            typer.echo(f"{key:32} {default:14} {text}".rstrip())
        return
    typer.echo(load_config(config, overrides).to_yaml(), nl=False)


@app.command("check")
def check(config: OptionalConfigOption = None, overrides: SetOption = None) -> None:
    """Validate a config and the local corpora it names; report every problem at once."""
    from mtkit.config import load_config
    from mtkit.corpus import input_problems
    from mtkit.errors import ConfigError

    if config is None:  # the defaults alone name no corpora: there would be nothing to run
        raise ConfigError(["config check: no config given; pass -c FILE (and --set KEY=VALUE to override)"])
    problems = input_problems(load_config(config, overrides).data)
    if problems:
        raise ConfigError(problems)
    typer.echo(f"{config}: config OK", err=True)
