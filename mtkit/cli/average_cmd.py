"""``mtkit average``: average checkpoint weights into a new checkpoint.

The output lies outside every input and the run that holds it: ``--force`` replaces an earlier
average, never an input, a run or a directory that is not a checkpoint. Its meta.json names
the steps averaged (``averaged_steps``) and holds no validation scores: the newest input's are
not the average's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def average(
    checkpoints: Annotated[
        list[Path], typer.Argument(help="A run directory (with --last) or checkpoint directories.", show_default=False)
    ],
    output: Annotated[Path, typer.Option("--output", "-o", help="The new checkpoint directory, outside the inputs "
                                         "and their runs.", show_default=False)],
    last: Annotated[int | None, typer.Option("--last", help="Average the last K (2 or more) step checkpoints of a "
                                             "run.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing output (an earlier average).")] = False,
) -> None:
    """Average the weights of several checkpoints (e.g. the last K of a run) into one."""
    from mtkit.checkpoint import META, average_checkpoints, resolve, step_checkpoints
    from mtkit.errors import MtkitError
    from mtkit.fileio import refuse_overlap

    if output.exists() and not force:
        raise MtkitError(f"{output}: already exists; pass --force to replace it")
    if last is not None:
        if len(checkpoints) != 1:
            raise MtkitError("--last takes one run directory")
        if last < 2:
            raise MtkitError(f"--last {last}: an average needs two or more checkpoints")
        found = step_checkpoints(checkpoints[0])
        if len(found) < last:
            raise MtkitError(f"{checkpoints[0]}: has {len(found)} step checkpoints, fewer than --last {last}")
        directories = found[-last:]
        runs = {checkpoints[0].resolve()}
    else:
        directories = [resolve(path) for path in checkpoints]
        if len(directories) == 1:
            raise MtkitError(f"{checkpoints[0]}: one checkpoint is no average; name two or more checkpoint "
                             "directories, or a run directory with --last K")
        seen: dict[Path, Path] = {}
        for path, directory in zip(checkpoints, directories, strict=True):
            if directory.resolve() in seen:
                raise MtkitError(f"{path}: the same checkpoint as {seen[directory.resolve()]}; name each one once")
            seen[directory.resolve()] = path
        runs = set()
    # --force replaces the output whole: never a run that holds an input, nor anything in one.
    runs.update(d.resolve().parent.parent for d in directories if d.resolve().parent.name == "checkpoints")
    refuse_overlap(output, sorted(runs), "the run")
    refuse_overlap(output, directories, "the checkpoint")
    if output.exists() and not (output / META).is_file():
        raise MtkitError(f"{output}: not a checkpoint; --force replaces only a checkpoint directory")
    average_checkpoints(directories, output)
    typer.echo(f"averaged {len(directories)} checkpoints ({', '.join(d.name for d in directories)}) into {output}",
               err=True)
