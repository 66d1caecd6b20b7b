"""`mtkit pipeline`: every stage in order, skipping what is up to date; every shipped recipe
runs end to end on a cut-down budget so that none can rot."""

import gzip
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mtkit.cli import app

ROOT = Path(__file__).resolve().parents[1]
MULTI30K = ROOT.parent / "shared" / "data" / "multi30k"
pytestmark = pytest.mark.skipif(not MULTI30K.is_dir(), reason="Multi30k not found in ../shared")
runner = CliRunner()

# A few hundred lines, a few updates, a small vocabulary: minutes become seconds.
CUT_DOWN = [
    "data.train.0.limit=300",
    "data.valid.limit=12",
    "data.test.limit=12",
    "tokenizer.vocab_size=250",
    "train.max_steps=2",
    "train.valid_every=2",
    "train.valid_max_sentences=6",
    "train.max_tokens=500",
    "train.warmup_steps=2",
    "train.threads=1",
    "train.log_every=1",
    "decode.beam=2",
    "decode.max_len_b=5",
]


def cut_down(config: str) -> list[str]:
    """``CUT_DOWN`` for ``config``: a multilingual one limits each of its corpora."""
    from mtkit.config import load_config

    data = load_config(ROOT / config).data
    if not data.multilingual:
        return CUT_DOWN
    limits = [f"data.train.{i}.limit=300" for i in range(len(data.train))]
    limits += [f"data.{split}.{i}.limit=12" for split in ("valid", "test") for i in range(len(data.eval_sets(split)))]
    return limits + [item for item in CUT_DOWN if not item.startswith(("data.train", "data.valid", "data.test"))]


def run_pipeline(config: str, exp: Path, *extra: str):
    args = ["pipeline", "-c", config, "--set", f"experiment.dir={exp}"]
    for item in (*cut_down(config), *extra):
        args += ["--set", item]
    return runner.invoke(app, args)


@pytest.fixture
def in_repo(monkeypatch):
    monkeypatch.chdir(ROOT)  # recipes name ../shared relative to the repo root


def fake_hub(monkeypatch):
    """Serve Multi30k as if it were a hub dataset with translation records."""
    import datasets

    files = {"train": "train", "validation": "val", "test": "test_2016_flickr"}

    def load_dataset(name, subset=None, split=None, streaming=False):
        stem = files[split]
        with gzip.open(MULTI30K / f"{stem}.en.gz", "rt") as en, gzip.open(MULTI30K / f"{stem}.de.gz", "rt") as de:
            rows = [{"translation": {"en": e.rstrip("\n"), "de": d.rstrip("\n")}} for e, d in zip(en, de, strict=True)]
        return iter(rows)

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)


def fake_model_hub(monkeypatch, directory: Path) -> tuple[str, ...]:
    """Serve a tiny opus-mt-like model (untrained: only the path matters) as the hub's; returns
    the overrides that fit Multi30k to its 64 positions."""
    import huggingface_hub
    from helpers.hf_models import make_marian

    model = make_marian(directory / "hub_model", steps=1)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo_id, revision=None, **kwargs: str(model))
    return ("data.max_len=60",)


@pytest.mark.parametrize("recipe", sorted(p.name for p in (ROOT / "configs").glob("*.yaml")))
def test_every_recipe_runs_cut_down(recipe, tmp_path, in_repo, monkeypatch):
    extra: tuple[str, ...] = ()
    if "hub" in recipe:
        fake_hub(monkeypatch)
    if "finetune" in recipe:
        extra = fake_model_hub(monkeypatch, tmp_path)
    result = run_pipeline(f"configs/{recipe}", tmp_path / "exp", *extra)
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "exp" / "report.json").read_text())
    assert report["test"]["sentences"] == 12 * len(report["test"].get("directions") or [0])
    assert report["test"]["signature"].startswith("nrefs:1|case:mixed")
    for key in ("bleu", "chrf"):
        assert 0 <= report["test"][key] <= 100
    assert (tmp_path / "exp" / "report.md").read_text().count("test BLEU") == 2
    assert (tmp_path / "exp" / "training.png").stat().st_size > 1000


def test_rerun_skips_what_is_up_to_date(tmp_path, in_repo):
    exp = tmp_path / "exp"
    assert run_pipeline("configs/tiny.yaml", exp).exit_code == 0
    hyp = exp / "translations" / "test.hyp.de"
    first = hyp.stat().st_mtime_ns

    again = run_pipeline("configs/tiny.yaml", exp)
    assert again.exit_code == 0
    assert again.stderr.count("up to date, skipped") == 6
    assert hyp.stat().st_mtime_ns == first

    # A decoding change re-runs translation and scoring only.
    changed = run_pipeline("configs/tiny.yaml", exp, "decode.beam=1")
    assert changed.exit_code == 0
    for stage in ("tokenizer", "prepare", "train"):
        assert f"pipeline: {stage}: up to date, skipped" in changed.stderr
    assert "pipeline: translate: running" in changed.stderr

    forced = run_pipeline("configs/tiny.yaml", exp, "decode.beam=1")
    assert "pipeline: translate: up to date" in forced.stderr
    forced = runner.invoke(app, ["pipeline", "-c", "configs/tiny.yaml", "--from", "train",
                                 "--set", f"experiment.dir={exp}", *sum((["--set", c] for c in CUT_DOWN), []),
                                 "--set", "decode.beam=1"])
    assert forced.exit_code == 0, forced.output
    assert "pipeline: train: moved the previous run aside to " in forced.stderr


def test_final_model_is_chosen_on_the_whole_validation_set(tmp_path, in_repo):
    """Four checkpoints: the final model is the best by chrF on all 12 validation sentences
    of best, last and the average of the last 3 (training validated on 6); the report tells
    the updates made apart from the chosen step. Another average re-runs selection only."""
    from mtkit.checkpoint import resolve

    exp = tmp_path / "exp"
    result = run_pipeline("configs/tiny.yaml", exp, "train.max_steps=4", "train.valid_every=1")
    assert result.exit_code == 0, result.output
    selection = json.loads((exp / "selection.json").read_text())
    assert selection["metric"] == "chrf" and selection["sentences"] == 12 and selection["updates"] == 4
    candidates = selection["candidates"]
    assert "average" in candidates and set(candidates) <= {"best", "last", "average"}
    assert candidates[selection["chosen"]]["chrf"] == max(row["chrf"] for row in candidates.values())
    chosen = exp / "checkpoints" / candidates[selection["chosen"]]["checkpoint"]
    assert resolve(exp) == (exp / "checkpoints" / "final").resolve() == chosen.resolve()
    if selection["chosen"] == "average":
        assert selection["averaged_steps"] == [2, 3, 4]
    report = json.loads((exp / "report.json").read_text())
    assert report["model"]["updates"] == 4 and report["model"]["step"] == selection["step"]
    assert report["valid"]["chrf"] == pytest.approx(candidates[selection["chosen"]]["chrf"], abs=1e-3)
    markdown = (exp / "report.md").read_text()
    assert "| model | tiny, " in markdown and ", 4 updates |" in markdown
    assert "| final model | " in markdown and "highest chrF on the 12 validation sentences" in markdown

    again = run_pipeline("configs/tiny.yaml", exp, "train.max_steps=4", "train.valid_every=1", "train.average_last=2")
    assert again.exit_code == 0, again.output
    assert "pipeline: train: up to date, skipped" in again.stderr
    assert "pipeline: select: running" in again.stderr


def test_unknown_stage_is_refused(tmp_path, in_repo):
    result = runner.invoke(app, ["pipeline", "-c", "configs/tiny.yaml", "--from", "deploy",
                                 "--set", f"experiment.dir={tmp_path}"])
    assert result.exit_code == 1
    assert "--from deploy: unknown stage" in result.stderr
