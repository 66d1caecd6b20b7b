"""Disk faults: a checkpoint, prepared data, a tokenizer or a translation written to a full or
read-only directory gives a one-line error naming the path and keeps the last good state.

Faults are real where that needs no privileges: a full disk is RLIMIT_FSIZE (from the chosen
moment on, the kernel fails every write past 4 KiB with EFBIG, also inside safetensors' Rust
and torch's C++ writers); a read-only directory is chmod 555 when not root, and (as root, whom
chmod does not stop) os functions that refuse with EACCES. One case raises ENOSPC itself. Each
process runs with the fault armed at an exact call (tests/fault_wrapper.py); all start at
once.
"""

from __future__ import annotations

import pytest
from helpers.faults import FaultScenario as Scenario
from helpers.faults import faultkit_experiment, faultkit_launch, faultkit_random_checkpoint
from helpers.faults import faultkit_fault as fault
from typer.testing import CliRunner

from mtkit.checkpoint import load_for_inference, read_meta
from mtkit.cli import app
from mtkit.data import load_split
from mtkit.tokenizer import Tokenizers

TRAIN = ["train", "-c", "config.yaml"]


@pytest.fixture(scope="module")
def faulted(trainkit_prepared, tmp_path_factory) -> dict[str, Scenario]:
    base = tmp_path_factory.mktemp("faults")

    def place(name: str, **kwargs):
        (base / name).mkdir()
        return faultkit_experiment(trainkit_prepared, base / name, **kwargs)

    def readonly(name: str, sub: str = "") -> str:
        return f"READONLY:{base / name / 'run' / sub}"

    model = faultkit_random_checkpoint(trainkit_prepared, base)
    source = base / "in.txt"
    source.write_text("".join(f"kato rimu sena {i}\n" for i in range(3000)), encoding="utf-8")
    translate = ["translate", "-m", str(model), "-i", str(source), "--threads", "1", "--beam", "1", "-o"]
    save = "mtkit.train:save_checkpoint"
    scenarios = {
        # The disk fills up when the second checkpoint (step 8) is written: first its weights ...
        "train_full_weights": Scenario(place("w"), TRAIN, fault(save, 2, action="FSIZE")),
        # ... then, with the weights written, its training state (torch.save) ...
        "train_full_state": Scenario(place("s"), TRAIN, fault("mtkit.checkpoint:save_model", 2, "after", "FSIZE")),
        # ... then its config (a Python-level write, here raising ENOSPC itself).
        "train_nospace_config": Scenario(place("c"), TRAIN, fault("mtkit.checkpoint:save_config", 2, action="ENOSPC")),
        "train_readonly_checkpoints": Scenario(place("r"), TRAIN, fault(save, 2, action=readonly("r", "checkpoints"))),
        # The experiment directory is read-only from the start (logs cannot be written either).
        "train_readonly_experiment": Scenario(
            place("e"), TRAIN, fault("mtkit.train:load_experiment", 1, "after", readonly("e"))
        ),
        # Prepare over earlier data: the disk fills while writing the train split (after valid) ...
        "prepare_full": Scenario(place("pf"), ["prepare", "-c", "config.yaml"],
                                 fault("mtkit.data:_prepare_split", 2, action="FSIZE")),
        # ... or the experiment directory is read-only.
        "prepare_readonly": Scenario(place("pr"), ["prepare", "-c", "config.yaml"],
                                     fault("mtkit.data:prepare", 1, action=readonly("pr"))),
        "tokenizer_readonly": Scenario(place("k"), ["tokenizer", "train", "-c", "config.yaml"],
                                       fault("mtkit.data:train_tokenizer", 1, action=readonly("k"))),
        # Translate -o: 3,000 lines (more than 4 KiB of output) onto a full disk, or a read-only directory.
        "translate_full": Scenario(place("tf", data=False), [*translate, "out.txt"],
                                   fault("mtkit.translate:Translator.translate_lines", 1, action="FSIZE")),
        "translate_readonly": Scenario(place("tr", data=False), [*translate, "sub/out.txt"],
                                       fault("mtkit.checkpoint:load_for_inference", 1,
                                             action=f"READONLY:{base / 'tr' / 'sub'}")),
    }
    for name in ("prepare_full", "prepare_readonly"):
        scenarios[name].extra["before"] = load_split(scenarios[name].run, "train").to_dict()
    scenarios["tokenizer_readonly"].extra["before"] = Tokenizers.load(
        scenarios["tokenizer_readonly"].run / "tokenizer").fingerprint()
    (base / "tf" / "out.txt").write_text("previous\n")
    (base / "tr" / "sub").mkdir()
    (base / "tr" / "sub" / "out.txt").write_text("previous\n")
    faultkit_launch(scenarios)
    return scenarios


def _one_line_error(scenario: Scenario, *parts: str) -> None:
    """Exit 1; stderr ends in exactly one ``mtkit: error:`` line that holds every part."""
    assert scenario.returncode == 1, scenario.stderr
    assert "Traceback" not in scenario.stderr, scenario.stderr
    errors = [line for line in scenario.stderr.splitlines() if line.startswith("mtkit: error: ")]
    assert len(errors) == 1 and scenario.stderr.strip().splitlines()[-1] == errors[0], scenario.stderr
    for part in parts:
        assert part in errors[0], errors[0]


def _keeps_step_4_and_resumes(scenario: Scenario) -> None:
    root = scenario.run / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["best", "last", "step_00000004"]  # no half-written step 8
    assert read_meta(root / "last")["step"] == 4
    assert load_for_inference(scenario.run).meta["step"] == 4
    result = CliRunner().invoke(app, ["train", "-c", str(scenario.config), "--resume"])  # the disk has room again
    assert result.exit_code == 0, result.stderr
    assert read_meta(root / "last")["step"] == 8


# --------------------------------------------------------------------------- train


@pytest.mark.parametrize("name", ["train_full_weights", "train_full_state", "train_nospace_config",
                                  "train_readonly_checkpoints"])
def test_failed_checkpoint_write_keeps_the_last_good_one(faulted, name):
    assert faulted[name].returncode != 0, faulted[name].stderr
    _keeps_step_4_and_resumes(faulted[name])


@pytest.mark.parametrize(
    "name, reason",
    [
        ("train_nospace_config", "No space left on device"),
        ("train_readonly_checkpoints", "Permission denied"),
        ("train_full_weights", "File too large"),
        ("train_full_state", "File too large"),
    ],
)
def test_failed_checkpoint_write_is_one_line_naming_the_path(faulted, name, reason):
    _one_line_error(faulted[name], str(faulted[name].run / "checkpoints" / "step_00000008"), reason)


def test_readonly_experiment_directory_is_one_line(faulted):
    scenario = faulted["train_readonly_experiment"]
    _one_line_error(scenario, str(scenario.run), "Permission denied")


# --------------------------------------------------------------------------- prepare, tokenizer


@pytest.mark.parametrize("name, reason", [("prepare_full", "File too large"),
                                          ("prepare_readonly", "Permission denied")])
def test_failed_prepare_keeps_previous_data(faulted, name, reason):
    scenario = faulted[name]
    _one_line_error(scenario, str(scenario.run / "data"), reason)
    assert load_split(scenario.run, "train").to_dict() == scenario.extra["before"]
    assert not [p for p in scenario.run.iterdir() if p.name.startswith(".data.")]


def test_failed_tokenizer_training_keeps_previous_tokenizer(faulted):
    scenario = faulted["tokenizer_readonly"]
    _one_line_error(scenario, str(scenario.run / "tokenizer"), "Permission denied")
    assert Tokenizers.load(scenario.run / "tokenizer").fingerprint() == scenario.extra["before"]


# --------------------------------------------------------------------------- translate -o


@pytest.mark.parametrize("name, output, reason", [("translate_full", "out.txt", "File too large"),
                                                  ("translate_readonly", "sub/out.txt", "Permission denied")])
def test_failed_translation_output_keeps_previous_file(faulted, name, output, reason):
    scenario = faulted[name]
    out = scenario.config.parent / output
    _one_line_error(scenario, f"{out.name}: cannot write: {reason}")
    assert out.read_text() == "previous\n"
    assert sorted(p.name for p in out.parent.iterdir() if p.name.startswith(".")) == []  # temporary removed
