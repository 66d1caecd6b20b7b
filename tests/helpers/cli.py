"""Running the CLI in-process and reading its one-line errors."""

from __future__ import annotations

from typer.testing import CliRunner

from mtkit.cli import app


def invoke(*args: str, input: bytes | str | None = None):
    """``mtkit ARGS`` through Typer's runner (stdout and stderr apart)."""
    return CliRunner().invoke(app, list(args), input=input)


def one_line_error(result, *parts: str) -> str:
    """Exit 1 and a single ``mtkit: error:`` line on stderr holding every part."""
    assert result.exit_code == 1, (result.exit_code, result.stderr, result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mtkit: error: "), result.stderr
    for part in parts:
        assert part in lines[0], lines[0]
    return lines[0]
