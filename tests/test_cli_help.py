"""Help pages of every command at 80 and 120 columns: option names whole, text wrapped at the
terminal, no placeholder on a flag, commands in the order of the work, choices and checkpoint
resolution spelled out."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

import mtkit
from mtkit.cli import app

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()
WORK_ORDER = ["tokenizer", "prepare", "train", "translate", "backtranslate", "score", "compare", "pipeline", "average",
              "export", "serve", "config"]
SECTIONS = ("Arguments:", "Options:", "Commands:")


def _commands(command, path=()):
    """(path, click command) for the root and every command and group below it."""
    yield path, command
    for name, sub in getattr(command, "commands", {}).items():
        yield from _commands(sub, (*path, name))


COMMANDS = [pytest.param(path, command, id=" ".join(("mtkit", *path))) for path, command in
            _commands(typer.main.get_command(app))]


def _help(path: tuple[str, ...], width: int) -> str:
    result = runner.invoke(app, [*path, "--help"], terminal_width=width)
    assert result.exit_code == 0, result.output
    return result.output


def _description(page: str) -> list[list[str]]:
    """The paragraphs between the usage line and the first section, each a list of lines."""
    lines = page.splitlines()
    end = next((i for i, line in enumerate(lines) if line in SECTIONS), len(lines))
    paragraphs: list[list[str]] = [[]]
    for line in lines[1:end]:
        if line.strip():
            paragraphs[-1].append(line)
        elif paragraphs[-1]:
            paragraphs.append([])
    return [p for p in paragraphs if p]


@pytest.mark.parametrize("width", [80, 120])
@pytest.mark.parametrize("path, command", COMMANDS)
def test_help_shows_every_option_whole_and_wraps_at_the_terminal(path, command, width):
    page = _help(path, width)
    for param in command.params:
        for name in (*param.opts, *param.secondary_opts):
            if name.startswith("-"):
                assert re.search(rf"(?<![\w-]){re.escape(name)}(?![\w-])", page), (name, page)
    assert "<bool>" not in page and "…" not in page
    assert all(len(line) <= width for line in page.splitlines()), page
    # Wrapped at the terminal, not at the docstring's line breaks: each line of a paragraph
    # is as full as it can be, so the next line's first word would not have fitted on it.
    for paragraph in _description(page):
        for line, after in zip(paragraph, paragraph[1:], strict=False):
            assert len(line) + 1 + len(after.split()[0]) > width - 2, (line, after)


def test_root_help_lists_the_commands_in_the_order_of_the_work_through_the_real_cli():
    env = {**os.environ, "COLUMNS": "80"}
    done = subprocess.run([sys.executable, "-m", "mtkit", "--help"], capture_output=True, text=True, env=env,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    # A command's row: its name at the start of a line (after any border), then a gap.
    rows = {name: re.search(rf"^\W*{name}\s\s", done.stdout, flags=re.MULTILINE) for name in WORK_ORDER}
    assert all(rows.values()), done.stdout
    assert sorted(WORK_ORDER, key=lambda name: rows[name].start()) == WORK_ORDER, done.stdout
    assert "<bool>" not in done.stdout
    # Each command's first sentence whole, not cut at the width.
    flat = " ".join(done.stdout.split())
    assert "Average the weights of several checkpoints (e.g. the last K of a run) into one." in flat


def test_config_show_doc_lists_the_allowed_values_of_choice_keys():
    result = runner.invoke(app, ["config", "show", "--doc"])
    assert result.exit_code == 0, result.output
    rows = {line.split()[0]: line for line in result.output.splitlines()}
    assert "[pre|post]" in rows["model.norm"]
    assert "[auto|torch|ctranslate2]" in rows["decode.backend"]
    assert "[unigram|bpe]" in rows["tokenizer.type"]
    assert "[text|tsv|jsonl|tmx|hub]" in rows["data.valid.format"]
    assert "[" not in rows["model.dropout"]  # a number has no list of values


@pytest.mark.parametrize("path", [("translate",), ("train",), ("compare",), ("serve",), ("export", "ctranslate2"),
                                  ("export", "huggingface")], ids=" ".join)
def test_help_says_which_checkpoint_a_run_directory_resolves_to(path):
    # As mtkit.checkpoint.resolve picks it.
    assert "final, else best, else last checkpoint" in " ".join(_help(path, 80).split())


def test_cli_and_package_describe_both_architectures():
    said = [
        " ".join(_help((), 80).split()),
        mtkit.__doc__ or "",
        re.search(r'^description = "(.*)"$', (ROOT / "pyproject.toml").read_text(), re.MULTILINE)[1],
    ]
    for text in said:
        assert "encoder-decoder" in text and "decoder-only" in text, text
