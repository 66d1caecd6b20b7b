"""``mtkit pipeline``: every stage in order, skipping what is up to date."""

from __future__ import annotations

import shlex
from typing import Annotated

import typer

from mtkit.cli.options import ConfigOption, SetOption


def pipeline(
    config: ConfigOption,
    overrides: SetOption = None,
    start: Annotated[
        str | None,
        typer.Option("--from", help="Re-run from this stage on: import, tokenizer, prepare, train, select, translate, "
                                    "score."),
    ] = None,
) -> None:
    """Run tokenizer, prepare, train, select (the final model, on the validation set), translate
    (test set) and score; write report.md/json. With pretrained.huggingface, import comes first
    and training fine-tunes the imported model.

    A stage whose outputs are complete and up to date for the config is skipped. A finished
    training run continues when train.max_steps (max_epochs, max_minutes) grows; one that the
    config no longer describes, or that --from train replaces, is moved aside to
    checkpoints.KEY/, never deleted.
    """
    from mtkit.config import load_config
    from mtkit.pipeline import run_pipeline
    from mtkit.rundir import ExperimentDir, exclusive

    cfg = load_config(config, overrides)
    # What continues this run: the same config and overrides, without --from (which starts afresh).
    sets = [arg for item in overrides or [] for arg in ("--set", item)]
    command = shlex.join(["mtkit", "pipeline", "-c", str(config), *sets])
    with exclusive(cfg.experiment.dir):
        run_pipeline(cfg, start=start, log=lambda line: typer.echo(line, err=True), command=command)
    report = ExperimentDir(cfg.experiment.dir).report_md
    typer.echo(report.read_text(), nl=False)
    typer.echo(f"\nreport: {report} (and report.json, training.png)", err=True)
