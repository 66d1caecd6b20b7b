"""Options shared by every command that reads a config."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

ConfigOption = Annotated[
    Path, typer.Option("--config", "-c", help="Experiment config (YAML).", show_default=False)
]
OptionalConfigOption = Annotated[
    Path | None, typer.Option("--config", "-c", help="Experiment config (YAML).", show_default=False)
]
SetOption = Annotated[
    list[str] | None,
    typer.Option(
        "--set",
        "-s",
        metavar="KEY=VALUE",
        help="Override a config key: --set tokenizer.vocab_size=16000 (repeatable).",
        show_default=False,
    ),
]
