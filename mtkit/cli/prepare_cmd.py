"""``mtkit prepare``: clean, filter and encode the corpora into the experiment's data/ (Arrow IPC files)."""

from __future__ import annotations

import typer

from mtkit.cli.options import ConfigOption, SetOption


def prepare(config: ConfigOption, overrides: SetOption = None) -> None:
    """Read data.train/valid/test, normalise, filter, de-duplicate and encode them with the
    trained tokenizer into {experiment.dir}/data (with report.json and report.txt)."""
    from mtkit.config import load_config
    from mtkit.data import data_dir
    from mtkit.data import prepare as prepare_data
    from mtkit.rundir import exclusive

    cfg = load_config(config, overrides)
    with exclusive(cfg.experiment.dir):
        report = prepare_data(cfg)
    typer.echo(report.to_text(), err=True, nl=False)
    typer.echo(f"prepared data written to {data_dir(cfg.experiment.dir)}", err=True)
