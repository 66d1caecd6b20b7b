"""Processes killed or faulted at exact points: the kit of tests/test_kill.py and
tests/test_faults.py. Each scenario runs ``mtkit`` in a fresh interpreter through
``tests/fault_wrapper.py``, which arms the faults before the command starts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from helpers.data import copy_experiment, random_checkpoint

WRAPPER = Path(__file__).resolve().parents[1] / "fault_wrapper.py"
FAULTKIT_HANG_GUARD_S = 300  # a scenario that runs this long has hung


def faultkit_command(args: list[str], faults: list[dict] | None = None) -> list[str]:
    """The argv of ``mtkit ARGS`` in a fresh interpreter, with ``faults`` injected (see
    tests/fault_wrapper.py)."""
    return [sys.executable, str(WRAPPER), json.dumps(faults or []), "--", *args]


def faultkit_env() -> dict[str, str]:
    """One thread everywhere: tiny models gain nothing from more, and OpenMP threads spin."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1"}


def faultkit_fault(target: str, nth: int, when: str = "before", action: str = "SIGKILL") -> list[dict]:
    """``action`` at the ``nth`` call of ``target`` ("module:attr.path"), before or after it runs."""
    return [{"target": target, "nth": nth, "when": when, "action": action}]


@dataclass
class FaultScenario:
    """One killed process: its command, where it ran, and (once finished) what it did."""

    config: Path
    args: list[str]
    faults: list[dict]
    returncode: int | str | None = None
    """Exit status (negative: killed by that signal), or "hung" past the guard."""
    stderr: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def run(self) -> Path:
        return Path(yaml.safe_load(self.config.read_text())["experiment"]["dir"])


def faultkit_launch(scenarios: dict[str, FaultScenario]) -> None:
    """Run every scenario at once (each in the directory of its config); record exit status
    (negative: killed by that signal; "hung" past the guard) and stderr."""
    running = {}
    for name, s in scenarios.items():
        log = open(s.config.parent / "stderr.txt", "w+", encoding="utf-8")  # noqa: SIM115
        proc = subprocess.Popen(faultkit_command(s.args, s.faults), cwd=s.config.parent, env=faultkit_env(),
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log)
        running[name] = (proc, log)
    for name, (proc, log) in running.items():
        try:
            scenarios[name].returncode = proc.wait(timeout=FAULTKIT_HANG_GUARD_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            scenarios[name].returncode = "hung"
        log.seek(0)
        scenarios[name].stderr = log.read()
        log.close()


def faultkit_experiment(prepared: dict[str, Any], directory: Path, *, data: bool = True,
                        **sections: dict[str, Any]) -> Path:
    """A copy of the session's prepared tiny experiment (without its prepared data unless
    ``data``) in ``directory/run``, with ``sections`` merged over its config
    (``directory/config.yaml``, returned)."""
    return copy_experiment(prepared, directory / "run", directory / "config.yaml", data=data, **sections)


def faultkit_random_checkpoint(prepared: dict[str, Any], directory: Path) -> Path:
    """A run directory holding one checkpoint of a random tiny model (for translate)."""
    return random_checkpoint(prepared, directory)
