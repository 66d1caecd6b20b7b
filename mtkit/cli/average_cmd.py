"""``mtkit average``: average checkpoint weights into a new checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def average(
    checkpoints: Annotated[
        list[Path], typer.Argument(help="A run directory (with --last) or checkpoint directories.", show_default=False)
    ],
    output: Annotated[Path, typer.Option("--output", "-o", help="The new checkpoint directory.", show_default=False)],
    last: Annotated[int | None, typer.Option("--last", help="Average the last K step checkpoints of a run.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing output.")] = False,
) -> None:
    """Average the weights of several checkpoints (e.g. the last K of a run) into one."""
    from mtkit.checkpoint import average_checkpoints, resolve, step_checkpoints
    from mtkit.errors import MtkitError

    if output.exists() and not force:
        raise MtkitError(f"{output}: already exists; pass --force to replace it")
    if last is not None:
        if len(checkpoints) != 1:
            raise MtkitError("--last takes one run directory")
        found = step_checkpoints(checkpoints[0])
        if len(found) < last:
            raise MtkitError(f"{checkpoints[0]}: has {len(found)} step checkpoints, fewer than --last {last}")
        directories = found[-last:]
    else:
        directories = [resolve(path) for path in checkpoints]
    average_checkpoints(directories, output)
    typer.echo(f"averaged {len(directories)} checkpoints ({', '.join(d.name for d in directories)}) into {output}",
               err=True)
