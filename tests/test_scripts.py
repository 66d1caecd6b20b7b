"""The benchmark and experiment scripts start the way their docstrings say, from the repository
root (``python scripts/bench/NAME.py``, ``python scripts/experiments/NAME.py``): every import
resolves, benchlib's among them. ``--help`` runs nothing else."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(path.relative_to(ROOT).as_posix() for folder in ("bench", "experiments")
                 for path in (ROOT / "scripts" / folder).glob("*.py") if path.name != "benchlib.py")


def test_benchmarks_stand_apart_from_experiments():
    folders = {Path(script).name: Path(script).parent.name for script in SCRIPTS}
    assert folders.get("bench_serve.py") == "bench" and folders.get("compare_peer.py") == "experiments"
    assert (ROOT / "scripts" / "bench" / "benchlib.py").is_file()


@pytest.mark.skipif(any(importlib.util.find_spec(m) is None for m in ("psutil", "transformers")),
                    reason="the scripts need the bench extra (psutil, transformers)")
@pytest.mark.parametrize("script", SCRIPTS)
def test_a_script_starts_from_the_repository_root(script):
    done = subprocess.run([sys.executable, script, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: ")
