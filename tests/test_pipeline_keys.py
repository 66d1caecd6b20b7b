"""What `mtkit pipeline` runs again after a change, and what becomes of a finished training
run: each class of change re-runs exactly the stages whose outputs it changes; a larger budget
resumes the run; a change of its weights moves it aside, never deletes it. All through the
real CLI, on one tiny experiment trained once and copied for each case."""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
import signal
from pathlib import Path

import pytest
from helpers.data import tokdata_experiment
from typer.testing import CliRunner

import mtkit.train
from mtkit.cli import app

pytestmark = pytest.mark.usefixtures("one_thread")
runner = CliRunner()
STAGES = ("tokenizer", "prepare", "train", "select", "translate", "score")

SECTIONS = {
    "model": {"size": "tiny"},
    "train": {"max_tokens": 300, "max_steps": 4, "warmup_steps": 2, "lr": 0.003, "log_every": 2, "valid_every": 2,
              "valid_bleu": False, "best_metric": "loss", "keep_last": 2, "average_last": 2, "threads": 1,
              "precision": "fp32"},
    "decode": {"beam": 1, "max_len_a": 1.2, "max_len_b": 3, "backend": "torch"},
}


def pipeline(config: Path, run: Path, *overrides: str, flags: tuple[str, ...] = ()):
    sets = [arg for item in (f"experiment.dir={run}", *overrides) for arg in ("--set", item)]
    return runner.invoke(app, ["pipeline", "-c", str(config), *sets, *flags])


def outcomes(stderr: str) -> dict[str, str]:
    """What each stage did, by its first `pipeline: STAGE:` line."""
    words = {"up to date": "skipped", "running": "ran", "resuming": "resumed", "moved the previous run aside": "aside"}
    found: dict[str, str] = {}
    for line in stderr.splitlines():
        for stage in STAGES:
            prefix = f"pipeline: {stage}: "
            if line.startswith(prefix) and stage not in found:
                found[stage] = next(v for k, v in words.items() if line[len(prefix):].startswith(k))
    return found


def last_step(run: Path) -> int:
    return json.loads((run / "checkpoints" / "last" / "meta.json").read_text())["step"]


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny experiment that the pipeline ran to the end: (config, run directory)."""
    directory = tmp_path_factory.mktemp("keys")
    config = tokdata_experiment(directory, 200, **SECTIONS)
    result = pipeline(config, directory / "run")
    assert result.exit_code == 0, result.output
    return config, directory / "run"


@pytest.fixture
def copy(base, tmp_path) -> tuple[Path, Path]:
    config, run = base
    shutil.copytree(run, tmp_path / "run", symlinks=True)
    return config, tmp_path / "run"


S, R = "skipped", "ran"
TABLE = {
    # change: (overrides, flags, what tokenizer, prepare, train, select, translate and score do)
    "nothing": ((), (), (S, S, S, S, S, S)),
    "operational keys": (("train.threads=2", "train.device=cpu", "train.log_every=1", "train.compile=true",
                          "train.max_nonfinite=2", "tokenizer.num_threads=2", "data.num_proc=2",
                          "data.chunk_size=7"), (), (S, S, S, S, S, S)),
    # prepare runs (it writes the test split), in chunks of another size: the rows of train and
    # valid, not the bytes of their files, are what training reads.
    "the test split": (("data.test.limit=12", "data.chunk_size=7"), (), (S, R, S, S, R, R)),
    "a larger budget": (("train.max_steps=6",), (), (S, S, "resumed", R, R, R)),
    "a smaller budget": (("train.max_steps=2",), (), (S, S, "aside", R, R, R)),
    "the weights": (("model.dropout=0.2",), (), (S, S, "aside", R, R, R)),
    "the training data": (("data.max_len=20",), (), (S, R, "aside", R, R, R)),
    "decoding": (("decode.beam=2",), (), (S, S, S, R, R, R)),
    "normalisation": (("tokenizer.normalization=nmt_nfkc",), (), (R, R, "aside", R, R, R)),
    "--from train": ((), ("--from", "train"), (S, S, "aside", R, R, R)),
}


@pytest.mark.parametrize("change", TABLE)
def test_a_change_re_runs_the_stages_it_changes(change, copy):
    config, run = copy
    overrides, flags, expected = TABLE[change]
    before = sorted(p.name for p in (run / "checkpoints").iterdir())
    result = pipeline(config, run, *overrides, flags=flags)
    assert result.exit_code == 0, result.output
    assert outcomes(result.stderr) == dict(zip(STAGES, expected, strict=True)), result.stderr
    aside = sorted(run.glob("checkpoints.*"))
    if "aside" in expected:
        # The old run, whole, with its logs; the line names where it went.
        assert len(aside) == 1 and f"aside to {aside[0]} (" in result.stderr
        assert sorted(p.name for p in aside[0].iterdir()) == sorted([*before, "tensorboard", "train_log.jsonl"])
        assert json.loads((aside[0] / "last" / "meta.json").read_text())["step"] == 4
    else:
        assert aside == []
    if change == "a larger budget":
        assert "resuming the run at step 4 (train.max_steps 4 -> 6)" in result.stderr
        assert last_step(run) == 6
        assert [r["step"] for r in map(json.loads, (run / "train_log.jsonl").read_text().splitlines())
                if r.get("type") == "valid"] == [2, 4, 6]
    if change == "the weights":
        assert "(model.dropout 0.1 -> 0.2)" in result.stderr
    again = pipeline(config, run, *overrides)
    assert again.exit_code == 0, again.output
    assert set(outcomes(again.stderr).values()) == {"skipped"}, again.stderr


def test_a_tokenizer_of_another_normalisation_is_not_reused(copy):
    """A tokenizer whose meta records no normalisation was trained with SentencePiece's old
    default, nmt_nfkc: not the config's identity, so it is trained again."""
    config, run = copy
    meta = json.loads((run / "tokenizer" / "meta.json").read_text())
    del meta["normalization"]
    (run / "tokenizer" / "meta.json").write_text(json.dumps(meta))
    result = pipeline(config, run)
    assert result.exit_code == 0, result.output
    assert outcomes(result.stderr)["tokenizer"] == "ran"
    assert json.loads((run / "tokenizer" / "meta.json").read_text())["normalization"] == "identity"


def test_checkpoints_of_mtkit_train_are_resumed_or_refused(copy):
    """Checkpoints that no pipeline stamped (as `mtkit train` leaves them): continued when the
    config describes their run, refused (and kept) when it does not."""
    config, run = copy
    shutil.rmtree(run / "stages")
    refused = pipeline(config, run, "model.dropout=0.2")
    assert refused.exit_code == 1
    assert "holds a run of `mtkit train` that this config does not continue (model.dropout 0.1 -> 0.2); " in (
        refused.stderr) and "Traceback" not in refused.stderr
    command = shlex.join(["mtkit", "pipeline", "-c", str(config), "--set", f"experiment.dir={run}",
                          "--set", "model.dropout=0.2"])
    assert f"or move it aside and train afresh with `{command} --from train`" in refused.stderr
    assert last_step(run) == 4 and not list(run.glob("checkpoints.*"))
    result = pipeline(config, run, "train.max_steps=5")
    assert result.exit_code == 0, result.output
    assert "pipeline: train: resuming the run at step 4 (train.max_steps 4 -> 5)" in result.stderr
    assert last_step(run) == 5


def _legacy_stamps(config: Path, run: Path) -> None:
    """Stamp every stage as mtkit 0.2 did: a hash of the stage's sections (tokenizer.normalization
    left out at identity) and input files, chained through the hash before."""
    from mtkit.config import load_config

    data = load_config(config, [f"experiment.dir={run}"]).to_dict()
    del data["tokenizer"]["normalization"]
    data["train"].pop("average_last")
    files = {"tokenizer": ["train"], "prepare": ["train", "valid", "test"]}
    sections = {"tokenizer": ("tokenizer", "data.train"), "prepare": ("data",),
                "train": ("model", "train", "experiment.seed"), "select": ("train.best_metric", "decode"),
                "translate": ("decode",), "score": ("data.tgt_lang",)}
    previous = ""
    for stage in STAGES:
        picked = {key: data[key.split(".")[0]][key.split(".")[1]] if "." in key else data[key]
                  for key in sections[stage]}
        if stage == "select":
            picked["train.average_last"] = 2
        stats = []
        for split in files.get(stage, []):
            for side in ("src", "tgt"):
                path = data["data"]["train"][0][side] if split == "train" else data["data"][split][side]
                stat = os.stat(path)
                stats.append([path, stat.st_size, stat.st_mtime_ns])
        blob = json.dumps({"sections": picked, "files": stats, "previous": previous}, sort_keys=True, default=str)
        previous = hashlib.sha256(blob.encode()).hexdigest()[:16]
        (run / "stages" / f"{stage}.json").write_text(json.dumps({"hash": previous, "seconds": 1.0}))


def test_stamps_of_mtkit_0_2_stay_valid(copy):
    config, run = copy
    _legacy_stamps(config, run)
    result = pipeline(config, run)
    assert result.exit_code == 0, result.output
    assert set(outcomes(result.stderr).values()) == {"skipped"}, result.stderr
    assert "key" in json.loads((run / "stages" / "train.json").read_text())


def _stop_after_two_updates(monkeypatch) -> None:
    real_step, calls = mtkit.train.train_step, []

    def step_then_signal(*args, **kwargs):
        out = real_step(*args, **kwargs)
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return out

    monkeypatch.setattr(mtkit.train, "train_step", step_then_signal)


def test_the_resume_hint_is_the_whole_command(tmp_path, monkeypatch):
    """After SIGTERM, `mtkit train` and `mtkit pipeline` name the command that continues this
    very run, every --set override included and shell-quoted, and following it does."""
    config = tokdata_experiment(tmp_path, 200, **SECTIONS)
    run = tmp_path / "my run"
    sets = ["--set", f"experiment.dir={run}", "--set", "train.lr=0.002"]
    for command in (["tokenizer", "train"], ["prepare"]):
        assert runner.invoke(app, [*command, "-c", str(config), *sets]).exit_code == 0
    _stop_after_two_updates(monkeypatch)
    stopped = runner.invoke(app, ["train", "-c", str(config), *sets])
    monkeypatch.undo()
    assert stopped.exit_code == 143
    hint = shlex.join(["mtkit", "train", "-c", str(config), *sets, "--resume"])
    assert f"continue with `{hint}`" in stopped.stderr
    resumed = runner.invoke(app, shlex.split(hint)[1:])
    assert resumed.exit_code == 0, resumed.output
    assert last_step(run) == 4

    _stop_after_two_updates(monkeypatch)
    stopped = runner.invoke(app, ["pipeline", "-c", str(config), *sets, "--set", "train.max_steps=8", "--from",
                                  "train"])
    monkeypatch.undo()
    assert stopped.exit_code == 143
    hint = shlex.join(["mtkit", "pipeline", "-c", str(config), *sets, "--set", "train.max_steps=8"])
    assert f"resume with `{hint}`" in stopped.stderr
    resumed = runner.invoke(app, shlex.split(hint)[1:])
    assert resumed.exit_code == 0, resumed.output
    assert "pipeline: train: resuming the interrupted run" in resumed.stderr
    assert last_step(run) == 8
