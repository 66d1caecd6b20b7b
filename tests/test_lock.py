"""The experiment-directory lock (mtkit.rundir.exclusive), through the real CLI: a second
writer fails at once naming the first, a lock left by a killed process never blocks, and the
pipeline (which holds the lock and runs its stages in-process) still runs."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mtkit.cli import app
from mtkit.config import load_config
from mtkit.rundir import ExperimentDir, exclusive

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="no fcntl: no lock on Windows")
ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


def mtkit(*args: str, log: Path | None = None) -> subprocess.Popen:
    """``python -m mtkit ARGS`` as its own process (outside any torchrun of the test's)."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    out = open(log, "w") if log is not None else subprocess.PIPE  # noqa: SIM115 (closed by the child's exit)
    return subprocess.Popen([sys.executable, "-m", "mtkit", *args], stdout=subprocess.DEVNULL, stderr=out,
                            text=True, env=env, cwd=ROOT)


def wait_for_holder(exp: Path, process: subprocess.Popen) -> dict:
    """The lock file's record once ``process`` has taken the lock."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert process.poll() is None, "the first run ended before it was seen holding the lock"
        try:
            holder = json.loads(ExperimentDir(exp).lock_file.read_text())
            if holder["pid"] == process.pid:
                return holder
        except (OSError, ValueError):
            pass
        time.sleep(0.05)
    raise AssertionError("the first run did not take the lock")


def test_second_train_on_the_same_experiment_fails_naming_the_first(trainkit_experiment, tmp_path):
    config = trainkit_experiment()
    exp = load_config(config).experiment.dir
    first = mtkit("train", "-c", str(config), log=tmp_path / "first.log")
    try:
        holder = wait_for_holder(exp, first)
        assert holder["command"] == f"mtkit train -c {config}"
        os.kill(first.pid, signal.SIGSTOP)  # so that it cannot finish while the second starts
        try:
            second = mtkit("train", "-c", str(config))
            _, stderr = second.communicate(timeout=120)
        finally:
            os.kill(first.pid, signal.SIGCONT)
        assert second.returncode == 1
        assert stderr.splitlines() == [
            f"mtkit: error: {exp}: in use by pid {first.pid} (mtkit train -c {config}); "
            "wait for it to finish, or stop it, and run this again"
        ]
        assert first.wait(timeout=300) == 0, (tmp_path / "first.log").read_text()[-3000:]
    finally:
        if first.poll() is None:
            first.kill()
    # The first run's checkpoints alone: the second wrote nothing.
    assert os.readlink(exp / "checkpoints" / "last") == "step_00000008"
    rows = [json.loads(line) for line in (exp / "train_log.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows if row["type"] == "train"] == [2, 4, 6, 8]
    assert ExperimentDir(exp).lock_file.read_text() == ""  # released: no holder named


def test_lock_left_by_a_killed_run_does_not_block(trainkit_experiment, tmp_path):
    config = trainkit_experiment()
    exp = load_config(config).experiment.dir
    first = mtkit("train", "-c", str(config), log=tmp_path / "first.log")
    wait_for_holder(exp, first)
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=60)
    # The lock file still names the dead process; the kernel released its lock.
    assert json.loads(ExperimentDir(exp).lock_file.read_text())["pid"] == first.pid
    shutil.rmtree(exp / "checkpoints", ignore_errors=True)  # whatever the killed run got to write
    result = runner.invoke(app, ["train", "-c", str(config)])
    assert result.exit_code == 0, result.stderr
    assert os.readlink(exp / "checkpoints" / "last") == "step_00000008"


def test_lock_is_reentrant_in_one_process_and_excludes_the_others(trainkit_experiment):
    config = trainkit_experiment()
    exp = load_config(config).experiment.dir
    with exclusive(exp, "the test"):
        # Other processes: tokenizer train and prepare fail at once, naming the holder.
        for command in (["tokenizer", "train"], ["prepare"]):
            _, stderr = (process := mtkit(*command, "-c", str(config))).communicate(timeout=120)
            assert process.returncode == 1
            assert stderr.splitlines() == [
                f"mtkit: error: {exp}: in use by pid {os.getpid()} (the test); "
                "wait for it to finish, or stop it, and run this again"
            ]
        # This process: a command run in-process while the lock is held goes ahead.
        with exclusive(exp):
            pass
        result = runner.invoke(app, ["prepare", "-c", str(config)])
        assert result.exit_code == 0, result.stderr
        assert json.loads(ExperimentDir(exp).lock_file.read_text())["command"] == "the test"  # still held
    assert ExperimentDir(exp).lock_file.read_text() == ""


def test_pipeline_holds_the_lock_and_runs_its_stages(tokdata_experiment):
    config = tokdata_experiment(
        model={"size": "tiny"},
        train={"max_steps": 2, "valid_every": 2, "valid_max_sentences": 4, "max_tokens": 300,
               "warmup_steps": 1, "threads": 1, "log_every": 1, "precision": "fp32"},
        decode={"beam": 1, "max_len_b": 3},
    )
    exp = load_config(config).experiment.dir
    result = runner.invoke(app, ["pipeline", "-c", str(config)])
    assert result.exit_code == 0, result.stderr
    assert (exp / "report.json").is_file()
    assert ExperimentDir(exp).lock_file.read_text() == ""


# (`mtkit pipeline` writes the resolved config and its stage stamps first: those stay, a record
# of what was started.)
@pytest.mark.parametrize("command", [["tokenizer", "train"], ["prepare"], ["train"]])
def test_a_failed_command_leaves_no_directory_it_made(tokdata_experiment, command):
    config = tokdata_experiment()
    (config.parent / "train.src").unlink()
    fresh = config.parent / "new" / "run"
    result = runner.invoke(app, [*command, "-c", str(config), "--set", f"experiment.dir={fresh}"])
    assert result.exit_code != 0
    assert not (config.parent / "new").exists(), result.stderr
    # A directory that was there before stays, with whatever it held.
    mine = config.parent / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("kept\n")
    assert runner.invoke(app, [*command, "-c", str(config), "--set", f"experiment.dir={mine}"]).exit_code != 0
    assert (mine / "notes.txt").read_text() == "kept\n"


def test_a_failed_body_keeps_what_it_wrote(tmp_path):
    exp = tmp_path / "a" / "run"
    with pytest.raises(RuntimeError), exclusive(exp):
        (exp / "data").mkdir()
        raise RuntimeError("stop")
    assert (exp / "data").is_dir()
