"""End to end in seconds, on text the test writes: ``mtkit pipeline`` runs tokenizer ->
prepare -> train (a few steps) -> translate -> score and writes a report with a signed score;
run again, it skips every finished stage. Needs nothing outside the repository."""

from __future__ import annotations

import json

from helpers.data import tokdata_experiment
from typer.testing import CliRunner

from mtkit.cli import app

runner = CliRunner()

SMOKE_SECTIONS = {
    "tokenizer": {"vocab_size": 120, "num_threads": 1},
    "model": {"size": "tiny"},
    "train": {
        "max_tokens": 400, "max_steps": 4, "warmup_steps": 2, "lr": 0.003, "log_every": 2, "valid_every": 4,
        "valid_bleu": False, "best_metric": "loss", "threads": 1, "precision": "fp32",
    },
    "decode": {"beam": 2, "max_len_a": 1.0, "max_len_b": 3},
}


def test_pipeline_end_to_end_then_skips_finished_stages(tmp_path):
    config = tokdata_experiment(tmp_path, n=200, **SMOKE_SECTIONS)
    run = tmp_path / "run"

    first = runner.invoke(app, ["pipeline", "-c", str(config)])
    assert first.exit_code == 0, first.output
    report = json.loads((run / "report.json").read_text())
    assert report["test"]["sentences"] == 20
    assert 0 <= report["test"]["bleu"] <= 100
    assert report["test"]["signature"].startswith("nrefs:1|case:mixed")
    assert report["model"]["step"] == 4
    hyp = next((run / "translations").glob("test.hyp.*"))
    assert len(hyp.read_text(encoding="utf-8").splitlines()) == 20

    again = runner.invoke(app, ["pipeline", "-c", str(config)])
    assert again.exit_code == 0, again.output
    for stage in ("tokenizer", "prepare", "train", "select", "translate", "score"):
        assert f"pipeline: {stage}: up to date, skipped" in again.stderr
    assert json.loads((run / "report.json").read_text())["test"] == report["test"]


def test_pipeline_prepares_again_data_it_cannot_read_and_keeps_the_trained_model(tmp_path):
    """Data prepared by an older mtkit (another on-disk format) is prepared again on the next
    run; the inputs are the same, so training and what follows stay up to date."""
    config = tokdata_experiment(tmp_path, n=200, **SMOKE_SECTIONS)
    run = tmp_path / "run"
    assert runner.invoke(app, ["pipeline", "-c", str(config)]).exit_code == 0
    report = run / "data" / "report.json"
    old = json.loads(report.read_text())
    del old["format"]  # what an mtkit before data format 1 wrote
    report.write_text(json.dumps(old))

    again = runner.invoke(app, ["pipeline", "-c", str(config)])
    assert again.exit_code == 0, again.output
    assert "pipeline: prepare: running" in again.stderr
    for stage in ("tokenizer", "train", "translate", "score"):
        assert f"pipeline: {stage}: up to date, skipped" in again.stderr
    assert "format" in json.loads(report.read_text())
