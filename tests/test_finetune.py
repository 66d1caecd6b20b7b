"""Fine-tuning a released model: ``pretrained.run`` / ``pretrained.huggingface`` in ``mtkit
train`` and ``mtkit pipeline``, through the CLI. A tiny opus-mt-like Marian model is built once
(``helpers.hf_models.make_marian``) and imported once; each test fine-tunes a copy."""

from __future__ import annotations

import copy
import json
import os
import shutil
import signal
from pathlib import Path

import pytest
import torch
from helpers.cli import invoke, one_line_error
from helpers.data import merge_sections, write_config, write_pairs
from safetensors.torch import load_file

import mtkit.train
from mtkit.config import load_config

pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")

MULTI30K = Path(__file__).resolve().parents[2] / "shared" / "data" / "multi30k"

TRAIN = {"max_tokens": 600, "max_steps": 6, "warmup_steps": 2, "lr": 0.001, "log_every": 2, "valid_every": 3,
         "valid_bleu": False, "best_metric": "loss", "keep_last": 2, "average_last": 2, "threads": 1,
         "precision": "fp32"}
DECODE = {"beam": 1, "max_len_a": 1.2, "max_len_b": 3, "backend": "torch"}


@pytest.fixture(scope="session")
def marian(tmp_path_factory) -> Path:
    from helpers.hf_models import make_marian

    # Fine-tuning needs the model's shape and tokenizer, not its skill: a few steps suffice.
    return make_marian(tmp_path_factory.mktemp("hf") / "marian")


@pytest.fixture(scope="module")
def imported(marian, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("imported") / "run"
    result = invoke("import", "huggingface", str(marian), "-o", str(out))
    assert result.exit_code == 0, result.stderr
    return out


@pytest.fixture(scope="module")
def prepared(imported, tmp_path_factory) -> dict:
    """A fine-tuning experiment on synthetic pairs, its tokenizer copied and its data prepared
    once: the config as a dict."""
    directory = tmp_path_factory.mktemp("tuned")
    config = {
        "experiment": {"dir": str(directory / "run")},
        "data": {split: write_pairs(directory, split, count, seed)
                 for split, count, seed in (("train", 200, 3), ("valid", 20, 4), ("test", 10, 5))},
        "pretrained": {"run": str(imported)},
        "model": {"dropout": 0.1},
        "train": TRAIN,
        "decode": DECODE,
    }
    path = write_config(directory / "config.yaml", config)
    result = invoke("tokenizer", "train", "-c", str(path))
    assert result.exit_code == 0, result.stderr
    assert "the pretrained model's" in result.stderr and "copied to" in result.stderr
    result = invoke("prepare", "-c", str(path))
    assert result.exit_code == 0, result.stderr
    return config


@pytest.fixture
def experiment(prepared, tmp_path):
    """Factory: ``make(name, **sections) -> config path``: a copy of the prepared experiment."""

    def make(name: str = "run", **sections) -> Path:
        config = copy.deepcopy(prepared)
        shutil.copytree(config["experiment"]["dir"], tmp_path / name,
                        ignore=shutil.ignore_patterns("checkpoints", "tensorboard", "*.jsonl"))
        config["experiment"]["dir"] = str(tmp_path / name)
        for section, values in sections.items():
            config[section] = {**config.get(section, {}), **values}
        return write_config(tmp_path / f"{name}.yaml", config)

    return make


def train(config: Path, *args: str):
    return invoke("train", "-c", str(config), *args)


def weights(config: Path, link: str = "last") -> dict[str, torch.Tensor]:
    return load_file(str(load_config(config).experiment.dir / "checkpoints" / link / "model.safetensors"))


def pretrained_weights(imported: Path) -> dict[str, torch.Tensor]:
    return load_file(str(imported / "checkpoints" / "final" / "model.safetensors"))


# --------------------------------------------------------------------------- training from a pretrained run


def test_fine_tuning_starts_from_the_pretrained_model(experiment, imported):
    config = experiment(train={"lr": 1e-12, "warmup_steps": 0, "max_steps": 2, "valid_every": 2})
    result = train(config)
    assert result.exit_code == 0, result.stderr
    assert f"fine-tuning {(imported / 'checkpoints' / 'final').resolve()}: " in result.stderr
    # The model is the pretrained one (its description, with the config's dropout) ...
    saved = load_config(load_config(config).experiment.dir / "checkpoints" / "last" / "config.yaml")
    theirs = load_config(imported / "checkpoints" / "final" / "config.yaml").model
    assert saved.model.model_dump() == {**theirs.model_dump(), "dropout": 0.1}
    # ... and so are its weights, after two updates at a negligible learning rate.
    start = pretrained_weights(imported)
    for name, value in weights(config).items():
        torch.testing.assert_close(value, start[name], rtol=0, atol=1e-6)


def test_init_from_an_imported_run_is_the_same_path(experiment, imported):
    by_config = experiment("by_config")
    assert train(by_config).exit_code == 0
    by_flag = experiment("by_flag", pretrained={"run": None})
    result = train(by_flag, "--init-from", str(imported))
    assert result.exit_code == 0, result.stderr
    a, b = weights(by_config), weights(by_flag)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_is_exact_and_keeps_the_freezing(experiment, monkeypatch):
    # Dropout is on (0.1): equality needs the random streams and the data position restored.
    frozen = {"freeze": ["encoder"]}
    straight = experiment("straight", pretrained=frozen)
    assert train(straight).exit_code == 0

    interrupted = experiment("interrupted", pretrained=frozen)
    real_step, calls = mtkit.train.train_step, []

    def step_then_signal(*args, **kwargs):
        out = real_step(*args, **kwargs)
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return out

    monkeypatch.setattr(mtkit.train, "train_step", step_then_signal)
    result = train(interrupted)
    monkeypatch.undo()
    assert result.exit_code == 130 and "stopped by SIGINT at step 2" in result.stderr
    refused = train(interrupted, "--resume", "--set", "pretrained.freeze=[]")
    one_line_error(refused, "resume it with pretrained.freeze [encoder]")
    result = train(interrupted, "--resume")
    assert result.exit_code == 0, result.stderr
    a, b = weights(straight), weights(interrupted)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


@pytest.mark.parametrize("parts", [["embeddings"], ["encoder", "decoder"]])
def test_frozen_parts_stay_bit_identical(experiment, imported, parts):
    config = experiment(pretrained={"freeze": parts})
    result = train(config)
    assert result.exit_code == 0, result.stderr
    assert f"{', '.join(parts)} frozen; " in result.stderr
    start, tuned = pretrained_weights(imported), weights(config)
    prefixes = {"embeddings": ("src_embed.", "tgt_embed.", "output_proj."),  # tied: output_proj follows
                "encoder": ("encoder_",), "decoder": ("decoder_",)}
    kept = tuple(p for part in parts for p in prefixes[part])
    for name, value in tuned.items():
        if name.startswith(kept):
            assert torch.equal(value, start[name]), name
        else:
            assert not torch.equal(value, start[name]), name


@pytest.mark.parametrize(("model", "key"), [({"d_model": 64}, "model.d_model"), ({"size": "tiny"}, "model.size"),
                                            ({"norm": "pre"}, "model.norm")])
def test_a_model_key_that_differs_from_the_pretrained_model_is_refused(experiment, model, key):
    config = experiment(model=model)
    one_line_error(train(config), f"{key}: ", "differs from the pretrained model's", "dropout")


def test_a_key_equal_to_the_pretrained_model_is_accepted(experiment):
    config = experiment(model={"norm": "post", "activation": "silu", "attention_dropout": 0.1},
                        train={"max_steps": 1, "valid_every": 1})
    assert train(config).exit_code == 0


def test_a_tokenizer_of_its_own_is_refused(experiment, tmp_path):
    config = experiment()
    data = load_config(config).to_dict()
    data["pretrained"]["run"] = None
    other = write_config(tmp_path / "own.yaml", merge_sections(data, {"tokenizer": {"vocab_size": 60},
                                                                      "data": {"max_len": 40}}))
    assert invoke("tokenizer", "train", "-c", str(other)).exit_code == 0
    assert invoke("prepare", "-c", str(other)).exit_code == 0
    one_line_error(train(config), "different tokenizer", "mtkit tokenizer train -c CONFIG")


def test_freeze_without_a_pretrained_model_is_a_config_error(experiment):
    config = experiment(pretrained={"run": None, "freeze": ["encoder"]})
    result = train(config)
    assert result.exit_code == 2 and "pretrained: freeze needs a pretrained model" in result.stderr


# --------------------------------------------------------------------------- Multi30k


@pytest.mark.skipif(not (MULTI30K / "train.en.gz").exists(), reason="no Multi30k in ../shared/data")
def test_fine_tuning_on_multi30k_lowers_the_validation_loss(imported, tmp_path):
    from mtkit.checkpoint import finetuned_config, load_for_inference
    from mtkit.evaluate import validation_loss
    from mtkit.experiment import load_experiment
    from mtkit.runtime import setup_runtime

    corpus = {"format": "text", "src": str(MULTI30K / "train.en.gz"), "tgt": str(MULTI30K / "train.de.gz"),
              "limit": 400}
    valid = {"format": "text", "src": str(MULTI30K / "val.en.gz"), "tgt": str(MULTI30K / "val.de.gz"), "limit": 50}
    config = write_config(tmp_path / "m30k.yaml", {
        "experiment": {"dir": str(tmp_path / "m30k")},
        "data": {"src_lang": "en", "tgt_lang": "de", "train": corpus, "valid": valid, "max_len": 60},
        "pretrained": {"run": str(imported)},
        "train": {**TRAIN, "max_tokens": 1200, "max_steps": 30, "valid_every": 30, "lr": 0.003, "warmup_steps": 5},
        "decode": DECODE,
    })
    for command in (("tokenizer", "train"), ("prepare",), ("train",)):
        result = invoke(*command, "-c", str(config))
        assert result.exit_code == 0, result.stderr
    cfg = finetuned_config(load_config(config))
    exp, runtime = load_experiment(cfg), setup_runtime(cfg.train)
    assert exp.valid is not None
    before = validation_loss(load_for_inference(imported).model, exp.valid, 1200, runtime)["loss"]
    after = validation_loss(load_for_inference(cfg.experiment.dir).model, exp.valid, 1200, runtime)["loss"]
    assert after < before - 0.5, (before, after)


# --------------------------------------------------------------------------- the pipeline


def test_pipeline_imports_then_fine_tunes(marian, tmp_path):
    directory = tmp_path / "exp"
    directory.mkdir()
    config = write_config(tmp_path / "pipeline.yaml", {
        "experiment": {"dir": str(directory / "run")},
        "data": {split: write_pairs(directory, split, count, seed)
                 for split, count, seed in (("train", 200, 3), ("valid", 20, 4), ("test", 10, 5))},
        "pretrained": {"huggingface": str(marian)},
        "train": TRAIN,
        "decode": DECODE,
    })
    result = invoke("pipeline", "-c", str(config))
    assert result.exit_code == 0, result.stderr
    stages = [line.split(":")[1].strip() for line in result.stderr.splitlines() if line.startswith("pipeline: ")
              and line.endswith(" s") and ": done in " in line]
    assert stages == ["import", "tokenizer", "prepare", "train", "select", "translate", "score"]
    run = directory / "run"
    meta = json.loads((run / "pretrained" / "checkpoints" / "final" / "meta.json").read_text())
    assert meta["source"]["huggingface"] == str(marian.resolve())
    report = json.loads((run / "report.json").read_text())
    assert report["model"]["size"] == f"fine-tuned from {marian}" and report["test"]["sentences"] == 10
    assert 0 <= report["test"]["bleu"] <= 100
    again = invoke("pipeline", "-c", str(config))
    assert again.exit_code == 0, again.stderr
    assert again.stderr.count("up to date, skipped") == 7, again.stderr
    # A new dropout moves the run aside and trains again; the import and the tokenizer stay.
    changed = invoke("pipeline", "-c", str(config), "--set", "model.dropout=0.2")
    assert changed.exit_code == 0, changed.stderr
    assert "pipeline: import: up to date, skipped" in changed.stderr
    assert "pipeline: tokenizer: up to date, skipped" in changed.stderr
    assert "pipeline: train: moved the previous run aside" in changed.stderr
    assert "(model.dropout 0.0 -> 0.2)" in changed.stderr  # the imported model's dropout was 0


def test_pipeline_refuses_a_model_it_did_not_import(marian, tmp_path):
    config = write_config(tmp_path / "c.yaml", {"experiment": {"dir": str(tmp_path / "run")},
                                                "data": {"train": write_pairs(tmp_path, "train", 20, 0)},
                                                "pretrained": {"huggingface": str(marian)}})
    (tmp_path / "run" / "pretrained").mkdir(parents=True)
    (tmp_path / "run" / "pretrained" / "mine.txt").write_text("keep me")
    one_line_error(invoke("pipeline", "-c", str(config)), "holds a model that no pipeline imported")
    assert (tmp_path / "run" / "pretrained" / "mine.txt").read_text() == "keep me"


def test_hub_model_is_fetched_at_its_revision(tmp_path, monkeypatch):
    """The hub path up to the download: the id and revision go to snapshot_download."""
    import huggingface_hub

    asked = {}

    def refuse(repo_id, revision=None, **kwargs):
        asked.update(repo_id=repo_id, revision=revision)
        raise huggingface_hub.errors.LocalEntryNotFoundError("offline")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", refuse)
    config = write_config(tmp_path / "c.yaml", {
        "experiment": {"dir": str(tmp_path / "run")}, "data": {"train": write_pairs(tmp_path, "train", 20, 0)},
        "pretrained": {"huggingface": "Helsinki-NLP/opus-mt-en-de", "revision": "v1"}})
    result = invoke("pipeline", "-c", str(config))
    assert result.exit_code == 1 and "Traceback" not in result.stderr
    assert result.stderr.splitlines() == ["pipeline: import: importing Helsinki-NLP/opus-mt-en-de",
                                          "mtkit: error: Helsinki-NLP/opus-mt-en-de: cannot download from the Hugging "
                                          "Face hub (offline)"]
    assert asked == {"repo_id": "Helsinki-NLP/opus-mt-en-de", "revision": "v1"}
