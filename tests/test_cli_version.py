"""``mtkit --version`` through the real entry point: one line, exit 0, and ``--help`` unchanged."""

from __future__ import annotations

import subprocess
import sys

import mtkit


def _mtkit(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mtkit", *args], capture_output=True, text=True, timeout=120)


def test_version_prints_the_package_version_and_exits_0():
    result = _mtkit("--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"mtkit {mtkit.__version__}\n"


def test_help_still_lists_the_commands():
    result = _mtkit("--help")
    assert result.returncode == 0, result.stderr
    assert "--version" in result.stdout and "translate" in result.stdout
