"""Kill tests: ``prepare``, ``train`` and ``translate -o`` killed (SIGKILL) at exact points, and
stopped by SIGINT/SIGTERM, as real processes.

Each scenario runs ``mtkit`` in a fresh interpreter whose wrapper (tests/fault_wrapper.py)
sends the signal at the N-th call of a chosen function, so the kill lands at the same point
every time without sleeps or hooks in library code. All scenarios start at once (they are
independent) and the tests then check what each left behind: (a) no output that looks
complete, (b) the previous checkpoint or data still loads, (c) re-running or ``--resume``
finishes, (d) for training, the resumed run ends with the same parameters as an uninterrupted
one.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from helpers.faults import FaultScenario as Scenario
from helpers.faults import faultkit_experiment, faultkit_launch, faultkit_random_checkpoint
from helpers.faults import faultkit_fault as fault
from safetensors.torch import load_file
from typer.testing import CliRunner

from mtkit.checkpoint import load_for_inference, read_meta
from mtkit.cli import app
from mtkit.compare import training_record
from mtkit.data import load_split

TRAIN = ["train", "-c", "config.yaml"]
PREPARE = ["prepare", "-c", "config.yaml", "--set", "data.chunk_size=50"]


@pytest.fixture(scope="module")
def killed(trainkit_prepared, tmp_path_factory) -> dict[str, Scenario]:
    base = tmp_path_factory.mktemp("killed")

    def place(name: str, **kwargs) -> Path:
        (base / name).mkdir()
        return faultkit_experiment(trainkit_prepared, base / name, **kwargs)

    model = faultkit_random_checkpoint(trainkit_prepared, base)
    source = base / "in.txt"
    source.write_text("".join(f"kato rimu sena {i}\n" for i in range(20)), encoding="utf-8")
    translate = ["translate", "-m", str(model), "-i", str(source), "--chunk-lines", "5", "--threads", "1"]
    lines = "mtkit.translate:Translator.translate_lines"

    scenarios = {
        # Training: 8 steps, a validated checkpoint every 4 (tests/helpers/data.py TRAINKIT_SECTIONS).
        "train_between_steps": Scenario(place("t1"), TRAIN, fault("mtkit.train:train_step", 6, "after")),
        # The second checkpoint's weights are on disk, its training state and meta.json are not.
        "train_in_checkpoint": Scenario(place("t2"), TRAIN, fault("mtkit.checkpoint:save_model", 2, "after")),
        # The second checkpoint is complete and renamed into place; `last` still names the first.
        "train_before_link": Scenario(place("t3"), TRAIN, fault("mtkit.checkpoint:_point", 3)),
        "train_sigterm": Scenario(place("t4"), TRAIN, fault("mtkit.train:train_step", 3, "after", "SIGTERM")),
        "train_sigint": Scenario(place("t5"), TRAIN, fault("mtkit.train:train_step", 3, "after", "SIGINT")),
        # Prepare: killed while encoding the training split (the third chunk of 50 pairs) ...
        "prepare_first": Scenario(place("p1", data=False), PREPARE, fault("mtkit.data:_encode", 3)),
        # ... over an earlier prepared data/ ...
        "prepare_over_previous": Scenario(place("p2"), PREPARE, fault("mtkit.data:_encode", 3)),
        # ... between moving the old data/ aside and renaming the new one into place.
        "prepare_in_rename": Scenario(place("p3"), PREPARE, fault("os:replace", 2)),
        "prepare_sigterm": Scenario(place("p4", data=False), PREPARE, fault("mtkit.data:_encode", 3, action="SIGTERM")),
        "prepare_sigint": Scenario(place("p5", data=False), PREPARE, fault("mtkit.data:_encode", 3, action="SIGINT")),
        # Translate -o: killed after two chunks of 5 lines were written to the temporary file.
        "translate_mid_output": Scenario(place("r1", data=False), [*translate, "-o", "out.txt"], fault(lines, 3)),
        "translate_sigterm": Scenario(place("r2", data=False), [*translate, "-o", "out.txt"],
                                      fault(lines, 3, action="SIGTERM")),
        "translate_sigint": Scenario(place("r3", data=False), [*translate, "-o", "out.txt"],
                                     fault(lines, 3, action="SIGINT")),
    }
    # `mtkit pipeline` stopped in its train stage (the tiny experiment with its validation split
    # as the test set, which the pipeline needs).
    config = place("t6")
    sections = yaml.safe_load(config.read_text())
    sections["data"]["test"] = sections["data"]["valid"]
    config.write_text(yaml.safe_dump(sections))
    scenarios["pipeline_sigterm"] = Scenario(config, ["pipeline", "-c", "config.yaml"],
                                             fault("mtkit.train:train_step", 3, "after", "SIGTERM"))
    # An earlier complete output that a killed run must leave as it was.
    (scenarios["translate_mid_output"].config.parent / "out.txt").write_text("previous\n")
    for name in ("prepare_over_previous", "prepare_in_rename"):
        scenarios[name].extra["before"] = load_split(scenarios[name].run, "train").to_dict()
    for name in ("translate_mid_output", "translate_sigterm", "translate_sigint"):
        scenarios[name].extra["translate"] = translate
    faultkit_launch(scenarios)
    # A second copy of what the kill before the link swap left, for a resume with other settings.
    source = scenarios["train_before_link"]
    shutil.copytree(source.config.parent, base / "t3b", symlinks=True)
    config = yaml.safe_load((base / "t3b" / "config.yaml").read_text())
    config["experiment"]["dir"] = str(base / "t3b" / "run")
    (base / "t3b" / "config.yaml").write_text(yaml.safe_dump(config))
    scenarios["train_before_link_copy"] = Scenario(base / "t3b" / "config.yaml", source.args, source.faults,
                                                   source.returncode, source.stderr)
    return scenarios


@pytest.fixture(scope="module")
def straight(trainkit_prepared, tmp_path_factory) -> dict[str, torch.Tensor]:
    """Final weights of the same training run, uninterrupted."""
    directory = tmp_path_factory.mktemp("straight")
    config = faultkit_experiment(trainkit_prepared, directory)
    result = CliRunner().invoke(app, ["train", "-c", str(config)])
    assert result.exit_code == 0, result.stderr
    return load_file(str(directory / "run" / "checkpoints" / "last" / "model.safetensors"))


def _visible_checkpoints_are_complete(run: Path) -> list[int]:
    """(a) every checkpoint a reader can see is complete; returns their steps."""
    root = run / "checkpoints"
    steps = []
    for entry in sorted(root.iterdir()):
        if entry.name.startswith("."):
            continue  # a hidden temporary: no stage reads it
        if entry.is_symlink():
            assert entry.resolve().is_dir(), f"{entry} points nowhere"
            continue
        steps.append(read_meta(entry)["step"])  # raises for an incomplete checkpoint
    return steps


def _resume_equals_straight(scenario: Scenario, straight: dict[str, torch.Tensor]) -> None:
    result = CliRunner().invoke(app, ["train", "-c", str(scenario.config), "--resume"])
    assert result.exit_code == 0, result.stderr
    assert "stopped at step 8" in result.stderr
    assert not [p for p in (scenario.run / "checkpoints").iterdir() if p.name.startswith(".")]
    resumed = load_file(str(scenario.run / "checkpoints" / "last" / "model.safetensors"))
    assert resumed.keys() == straight.keys()
    for name, value in straight.items():
        assert torch.equal(resumed[name], value), name


# --------------------------------------------------------------------------- train


@pytest.mark.parametrize(
    "name, last_good",
    [("train_between_steps", 4), ("train_in_checkpoint", 4), ("train_before_link", 4)],
)
def test_train_killed_keeps_last_checkpoint_and_resumes_identically(killed, straight, name, last_good):
    scenario = killed[name]
    assert scenario.returncode == -9, scenario.stderr  # really killed, at the intended point
    steps = _visible_checkpoints_are_complete(scenario.run)
    assert last_good in steps
    assert load_for_inference(scenario.run).meta["step"] == last_good  # (b)
    assert read_meta((scenario.run / "checkpoints" / "last").resolve())["step"] == last_good
    if name == "train_in_checkpoint":
        # The half-written checkpoint exists only under a hidden temporary name.
        assert steps == [4] and [p for p in (scenario.run / "checkpoints").iterdir() if p.name.startswith(".")]
    _resume_equals_straight(scenario, straight)  # (c), (d)


def test_resume_after_a_kill_before_the_link_keeps_its_own_weights(killed, straight):
    scenario = killed["train_before_link_copy"]
    assert scenario.returncode == -9
    # The resumed run differs from the killed one (another learning rate from step 5 on) ...
    result = CliRunner().invoke(app, ["train", "-c", str(scenario.config), "--resume", "--set", "train.lr=0.0001"])
    assert result.exit_code == 0, result.stderr
    resumed = load_file(str(scenario.run / "checkpoints" / "last" / "model.safetensors"))
    # ... so its step-8 weights must not be the killed run's (which equal the straight run's).
    assert any(not torch.equal(resumed[name], value) for name, value in straight.items())


@pytest.mark.parametrize("name, code", [("train_sigterm", 143), ("train_sigint", 130)])
def test_train_signal_saves_and_exits_with_message(killed, straight, name, code):
    scenario = killed[name]
    signal_name = name.split("_")[1].upper()
    assert scenario.returncode == code, scenario.stderr
    assert f"mtkit: {signal_name} received; saving a checkpoint" in scenario.stderr
    assert f"mtkit: stopped by {signal_name} at step 3; checkpoint saved" in scenario.stderr
    assert "--resume" in scenario.stderr and "Traceback" not in scenario.stderr
    assert _visible_checkpoints_are_complete(scenario.run) == [3]
    assert load_for_inference(scenario.run / "checkpoints" / "last").meta["step"] == 3
    _resume_equals_straight(scenario, straight)


def test_pipeline_stopped_in_training_is_not_done_and_resumes(killed):
    """A signal in the train stage saves and stops the whole pipeline, unstamped: the next
    select, translate and report would otherwise take 3 updates for a finished run."""
    scenario = killed["pipeline_sigterm"]
    assert scenario.returncode == 143, scenario.stderr
    assert "mtkit: stopped by SIGTERM at step 3; checkpoint saved" in scenario.stderr
    assert "resume with `mtkit pipeline -c config.yaml`" in scenario.stderr
    assert "Traceback" not in scenario.stderr and "pipeline: select" not in scenario.stderr
    assert not (scenario.run / "stages" / "train.json").exists()
    assert not (scenario.run / "report.json").exists()
    result = CliRunner().invoke(app, ["pipeline", "-c", str(scenario.config)])
    assert result.exit_code == 0, result.stderr
    assert "pipeline: train: resuming the interrupted run" in result.stderr
    assert load_for_inference(scenario.run / "checkpoints" / "last").meta["step"] == 8
    # The report's training time is both attempts' (the trainer's clock), not the resumed stage's.
    report = json.loads((scenario.run / "report.json").read_text())
    assert report["train_seconds"] == training_record(scenario.run / "checkpoints" / "last")[1]


# --------------------------------------------------------------------------- prepare


def _no_data_left(run: Path) -> None:
    """(a) no data/ that looks complete and nothing a reader would mistake for it."""
    assert not (run / "data").exists()
    assert not [p for p in run.iterdir() if p.name.startswith(".data.") and ".tmp" not in p.name
                and ".old-" not in p.name]


def _rerun_prepare(scenario: Scenario) -> None:
    result = CliRunner().invoke(app, ["prepare", "-c", str(scenario.config)])
    assert result.exit_code == 0, result.stderr
    assert not [p for p in scenario.run.iterdir() if p.name.startswith(".data.")]  # leftovers removed
    assert len(load_split(scenario.run, "train")) == 300


def test_prepare_killed_while_encoding_leaves_no_data(killed):
    scenario = killed["prepare_first"]
    assert scenario.returncode == -9, scenario.stderr
    _no_data_left(scenario.run)
    assert list(scenario.run.glob(".data.tmp-*"))  # killed mid-way: its temporary is there
    _rerun_prepare(scenario)


def test_prepare_killed_keeps_previous_data(killed):
    scenario = killed["prepare_over_previous"]
    assert scenario.returncode == -9, scenario.stderr
    assert load_split(scenario.run, "train").to_dict() == scenario.extra["before"]  # (b)
    _rerun_prepare(scenario)


def test_prepare_killed_between_renames_restores_previous_on_rerun(killed, monkeypatch):
    scenario = killed["prepare_in_rename"]
    assert scenario.returncode == -9, scenario.stderr
    _no_data_left(scenario.run)  # the window between the two renames: nothing looks complete
    assert len(list(scenario.run.glob(".data.old-*"))) == 1  # the previous data, moved aside whole
    # The next write puts the previous data back before trying, so a failing re-run keeps it.
    import mtkit.data

    def fail(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(mtkit.data, "_prepare_split", fail)
    assert CliRunner().invoke(app, ["prepare", "-c", str(scenario.config)]).exit_code == 130
    assert load_split(scenario.run, "train").to_dict() == scenario.extra["before"]
    monkeypatch.undo()
    _rerun_prepare(scenario)


@pytest.mark.parametrize("name, code, message", [("prepare_sigterm", 143, "mtkit: terminated (SIGTERM)"),
                                                 ("prepare_sigint", 130, "mtkit: interrupted")])
def test_prepare_signal_exits_cleanly(killed, name, code, message):
    scenario = killed[name]
    assert scenario.returncode == code, scenario.stderr
    assert scenario.stderr.strip().splitlines()[-1] == message and "Traceback" not in scenario.stderr
    assert not (scenario.run / "data").exists()
    assert not list(scenario.run.glob(".data.*"))  # unwound: the temporary directory is removed


# --------------------------------------------------------------------------- translate -o


def _uninterrupted(scenario: Scenario) -> str:
    args = scenario.extra["translate"]
    result = CliRunner().invoke(app, [*args, "-o", str(scenario.config.parent / "again.txt")])
    assert result.exit_code == 0, result.stderr
    return (scenario.config.parent / "again.txt").read_text()


def test_translate_killed_mid_output_keeps_previous_file(killed):
    scenario = killed["translate_mid_output"]
    directory = scenario.config.parent
    assert scenario.returncode == -9, scenario.stderr
    assert (directory / "out.txt").read_text() == "previous\n"
    partial = list(directory.glob(".out.txt.*.tmp"))
    assert len(partial) == 1 and partial[0].read_text().count("\n") == 10  # two chunks were written
    expected = _uninterrupted(scenario)
    result = CliRunner().invoke(app, [*scenario.extra["translate"], "-o", str(directory / "out.txt")])
    assert result.exit_code == 0, result.stderr
    assert (directory / "out.txt").read_text() == expected and expected.count("\n") == 20


@pytest.mark.parametrize("name, code, message", [("translate_sigterm", 143, "mtkit: terminated (SIGTERM)"),
                                                 ("translate_sigint", 130, "mtkit: interrupted")])
def test_translate_signal_exits_cleanly(killed, name, code, message):
    scenario = killed[name]
    assert scenario.returncode == code, scenario.stderr
    assert scenario.stderr.strip().splitlines()[-1] == message and "Traceback" not in scenario.stderr
    assert sorted(p.name for p in scenario.config.parent.iterdir()) == ["config.yaml", "run", "stderr.txt"]


def test_every_scenario_ended(killed):
    hung = [name for name, s in killed.items() if s.returncode == "hung"]
    assert not hung
