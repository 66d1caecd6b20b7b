"""``mtkit train``: train the experiment's model on its prepared data."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Annotated

import typer

from mtkit.cli.options import ConfigOption, SetOption


def train(
    config: ConfigOption,
    overrides: SetOption = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue from checkpoints/last exactly where it stopped.")
    ] = False,
    init_from: Annotated[
        Path | None,
        typer.Option("--init-from", show_default=False,
                     help="Fine-tune: start from the model and weights of this checkpoint directory or run "
                          "directory (its final, else best, else last checkpoint), as pretrained.run does."),
    ] = None,
) -> None:
    """Train on {experiment.dir}/data; checkpoints go to {experiment.dir}/checkpoints.

    Stops at train.max_steps, max_epochs or max_minutes, or early (train.patience).
    Ctrl-C or SIGTERM saves a checkpoint first; --resume continues from it. Under
    `torchrun --nproc_per_node N -m mtkit train ...` the batches are shared between N processes.
    """
    from mtkit.config import load_config
    from mtkit.errors import MtkitError
    from mtkit.rundir import exclusive
    from mtkit.train import train as run_training

    if resume and init_from is not None:
        raise MtkitError("--resume and --init-from exclude each other: resume continues a run, init-from starts one")
    cfg = load_config(config, overrides)
    with exclusive(cfg.experiment.dir):
        result = run_training(cfg, resume=resume, init_from=init_from)
    if result.interrupted:
        # The whole command: another config or override would resume another run.
        sets = [arg for item in overrides or [] for arg in ("--set", item)]
        if init_from is not None:  # the run goes on from its start: --init-from is pretrained.run
            sets += ["--set", f"pretrained.run={init_from}"]
        command = shlex.join(["mtkit", "train", "-c", str(config), *sets, "--resume"])
        raise result.stopped(f"continue with `{command}`")
