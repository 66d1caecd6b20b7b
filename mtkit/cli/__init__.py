"""The ``mtkit`` command: one Typer module per command, joined here.

Heavy imports (torch, datasets) happen inside the commands, so ``mtkit --help`` is instant.
A user mistake raises MtkitError, which is printed as one line (no traceback) with the
error's exit code. Help is Click's plain text rather than Typer's rich panels: it wraps at the
terminal, never cuts an option name, and shows no placeholder on a flag.
"""

from __future__ import annotations

import inspect
import sys
from types import FrameType
from typing import TYPE_CHECKING

import typer
from typer.core import TyperGroup

from mtkit.errors import MtkitError, Stopped

if TYPE_CHECKING:
    from typer import _click as click  # the copy of Click that Typer runs on


class _Group(TyperGroup):
    """Turns MtkitError into ``mtkit: error: ...`` on stderr and a non-zero exit."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except Stopped as err:
            typer.echo(f"mtkit: {err}", err=True)
            raise typer.Exit(err.exit_code) from None
        except MtkitError as err:
            for line in str(err).splitlines() or ["unknown error"]:
                typer.echo(f"mtkit: error: {line}", err=True)
            raise typer.Exit(err.exit_code) from None
        except _Terminated:
            typer.echo("mtkit: terminated (SIGTERM)", err=True)
            raise typer.Exit(143) from None
        except KeyboardInterrupt:
            typer.echo("mtkit: interrupted", err=True)
            raise typer.Exit(130) from None
        except BrokenPipeError:
            # `mtkit ... | head`: the reader went away; stop quietly.
            _silence_stdout()
            raise typer.Exit(0) from None

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        # Click would cut each command's first sentence to one line; show it whole, wrapped.
        rows = []
        for name in self.list_commands(ctx):
            command = self.get_command(ctx, name)
            if command is not None and not command.hidden:
                summary = inspect.cleandoc(command.help or "").split("\n\n")[0]
                rows.append((name, " ".join(summary.split())))
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)


_COMMAND_ORDER = (
    "tokenizer", "prepare", "train", "translate", "backtranslate", "score", "compare", "pipeline", "average", "export",
    "serve", "config",
)


class _Main(_Group):
    """The ``mtkit`` group: lists its commands in the order of the work (Typer lists groups last)."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        names = super().list_commands(ctx)
        return [n for n in _COMMAND_ORDER if n in names] + [n for n in names if n not in _COMMAND_ORDER]


def _silence_stdout() -> None:
    import os

    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


app = typer.Typer(
    cls=_Main,
    name="mtkit",
    help="Machine translation with encoder-decoder and decoder-only Transformers: one YAML config, one CLI.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # sub-commands inherit it
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 120},
)


def _register() -> None:
    from mtkit.cli import (
        average_cmd,
        backtranslate_cmd,
        compare_cmd,
        config_cmd,
        export_cmd,
        import_cmd,
        pipeline_cmd,
        prepare_cmd,
        score_cmd,
        serve_cmd,
        tokenizer_cmd,
        train_cmd,
        translate_cmd,
    )

    app.add_typer(config_cmd.app, name="config", help="Show and check experiment configs.", cls=_Group)
    app.add_typer(tokenizer_cmd.app, name="tokenizer", help="Train and apply SentencePiece.", cls=_Group)
    app.command("prepare")(prepare_cmd.prepare)
    app.command("train")(train_cmd.train)
    app.command("translate")(translate_cmd.translate)
    app.command("backtranslate")(backtranslate_cmd.backtranslate)
    app.command("score")(score_cmd.score)
    app.command("pipeline")(pipeline_cmd.pipeline)
    app.command("average")(average_cmd.average)
    app.command("compare", cls=compare_cmd.CompareCommand)(compare_cmd.compare)
    app.command("serve")(serve_cmd.serve)
    app.add_typer(export_cmd.app, name="export", help="Export a trained model to other runtimes.", cls=_Group)
    app.add_typer(import_cmd.app, name="import", help="Import a released model as an mtkit run.", cls=_Group)


_register()


def _print_version(value: bool) -> None:
    if value:
        from mtkit import __version__

        typer.echo(f"mtkit {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    # Eager, so it answers before Click asks for the missing command.
    version: bool = typer.Option(
        False, "--version", is_eager=True, callback=_print_version, help="Print the mtkit version and exit."
    ),
) -> None:
    pass


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that the command unwinds and removes its temporary outputs
    (by default SIGTERM ends the process on the spot). ``mtkit train`` installs its own handler."""


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise _Terminated


def main(argv: list[str] | None = None) -> None:
    import signal

    from mtkit.malloc import huge_pages_for_large_tensors, keep_freed_memory

    signal.signal(signal.SIGTERM, _terminate)
    keep_freed_memory()  # large tensors are reused between steps instead of re-faulted
    huge_pages_for_large_tensors()  # and faulted in 2 MiB at a time when they are new
    app(args=argv, prog_name="mtkit")
