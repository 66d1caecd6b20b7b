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
    doc: Annotated[bool, typer.Option("--doc", help="List every key with its default and meaning.")] = False,
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
    """Validate a config; report every problem at once."""
    from mtkit.config import load_config

    load_config(config, overrides)
    typer.echo("config OK", err=True)
