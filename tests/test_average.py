"""``mtkit average``: its output never replaces, holds or lies inside an input checkpoint or
the run that holds one (with or without --force); a single checkpoint is no average; the
average's meta.json names the steps averaged and carries no scores of its own."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers.cli import one_line_error
from typer.testing import CliRunner

from mtkit.checkpoint import read_meta, save_checkpoint
from mtkit.cli import app
from mtkit.config import validate_config
from mtkit.models.encoder_decoder import Transformer
from mtkit.tokenizer import Tokenizers, tokenizer_dir

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def run(trainkit_prepared, tmp_path) -> Path:
    """A run directory with step checkpoints 2, 4 and 6, each with a validation loss."""
    config = validate_config({**trainkit_prepared, "experiment": {"dir": str(tmp_path / "run")}})
    tokenizers = Tokenizers.load(tokenizer_dir(validate_config(trainkit_prepared)))
    torch.manual_seed(0)
    model = Transformer(config.model, tokenizers.src.vocab_size, tokenizers.tgt.vocab_size)
    for step in (2, 4, 6):
        save_checkpoint(tmp_path / "run" / "checkpoints", step=step, epoch=1, model=model, config=config,
                        tokenizers=tokenizers, metrics={"loss": 1.0 / step}, trainer_state={}, best=False,
                        keep_last=5)
    return tmp_path / "run"


def average(*args: str):
    return CliRunner().invoke(app, ["average", *args])


def listing(directory: Path) -> list[tuple[str, int]]:
    """Every file under ``directory`` with its size: what a refused command must leave alone."""
    return sorted((str(p.relative_to(directory)), p.lstat().st_size) for p in directory.rglob("*"))


def step(run: Path, number: int) -> Path:
    return run / "checkpoints" / f"step_{number:08d}"


@pytest.mark.parametrize("target", [
    "an_input", "the_run", "the_checkpoints_dir", "inside_an_input", "inside_the_run", "the_last_link",
])
@pytest.mark.parametrize("force", [False, True])
def test_the_output_never_overwrites_an_input_or_its_run(run, target, force):
    output = {
        "an_input": step(run, 6),
        "the_run": run,
        "the_checkpoints_dir": run / "checkpoints",
        "inside_an_input": step(run, 6) / "tokenizer",
        "inside_the_run": run / "checkpoints" / "average",
        "the_last_link": run / "checkpoints" / "last",
    }[target]
    before = listing(run)
    result = average(str(step(run, 4)), str(step(run, 6)), "-o", str(output), *(["--force"] if force else []))
    if output.exists() and not force:
        one_line_error(result, str(output), "already exists")
    else:
        line = one_line_error(result, str(output))
        assert "would replace" in line or "lies inside" in line
    assert listing(run) == before
    # The same through --last.
    result = average(str(run), "--last", "2", "-o", str(output), "--force")
    one_line_error(result, str(output))
    assert listing(run) == before


def test_force_replaces_an_earlier_average_only(run, tmp_path):
    other = tmp_path / "notes"
    other.mkdir()
    (other / "mine.txt").write_text("keep me\n")
    one_line_error(average(str(run), "--last", "2", "-o", str(other), "--force"), str(other), "not a checkpoint")
    assert (other / "mine.txt").read_text() == "keep me\n"

    output = tmp_path / "avg"
    assert average(str(run), "--last", "2", "-o", str(output)).exit_code == 0
    assert average(str(run), "--last", "3", "-o", str(output), "--force").exit_code == 0
    assert read_meta(output)["averaged_steps"] == [2, 4, 6]


def test_the_average_names_its_steps_and_carries_no_scores(run, tmp_path):
    result = average(str(run), "--last", "2", "-o", str(tmp_path / "avg"))
    assert result.exit_code == 0, result.stderr
    meta = json.loads((tmp_path / "avg" / "meta.json").read_text())
    assert meta["averaged_steps"] == [4, 6] and meta["metrics"] == {}
    assert meta["step"] == 6


@pytest.mark.parametrize("args, message", [
    (["{run}"], "one checkpoint is no average; name two or more checkpoint directories, or a run directory "
                "with --last K"),
    (["{step6}"], "one checkpoint is no average"),
    (["{run}", "--last", "1"], "--last 1: an average needs two or more checkpoints"),
    (["{step6}", "{run}/checkpoints/last"], "the same checkpoint as"),
])
def test_one_checkpoint_is_no_average(run, tmp_path, args, message):
    names = {"run": str(run), "step6": str(step(run, 6))}
    result = average(*[arg.format(**names) for arg in args], "-o", str(tmp_path / "avg"))
    one_line_error(result, message)
    assert not (tmp_path / "avg").exists()
