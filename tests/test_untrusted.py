"""A checkpoint from elsewhere is data only: nothing in its config, its meta.json, its
tokenizer's meta.json or its links makes mtkit read (or copy on) a file outside it, and the
training state is read only by a torch whose ``weights_only`` loader cannot be bypassed."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from helpers.backends import needs_ct2
from helpers.cli import invoke, one_line_error
from helpers.data import write_config, write_pairs

from mtkit.checkpoint import SAFE_TORCH, load_for_inference, load_trainer_state, save_checkpoint
from mtkit.config import validate_config
from mtkit.engines import open_engine
from mtkit.engines.precision import CHECK_SENTENCES, TORCH_RECORD
from mtkit.errors import MtkitError
from mtkit.evaluate import validation_set
from mtkit.models.encoder_decoder import Transformer
from mtkit.tokenizer import Tokenizer, Tokenizers, tokenizer_dir

pytestmark = pytest.mark.usefixtures("one_thread")

FAST = ["--beam", "1", "--max-len-a", "0", "--max-len-b", "3"]


def checkpoint(prepared: dict, root: Path, *, tokenizers: Tokenizers | None = None, **data) -> Path:
    """A random tiny model saved under ``root`` (a plain directory, not a run's ``checkpoints/``),
    its config's data section updated with ``data``; returns the checkpoint directory."""
    config = validate_config({**prepared, "data": {**prepared["data"], **data}})
    tokenizers = tokenizers or Tokenizers.load(tokenizer_dir(validate_config(prepared)))
    torch.manual_seed(0)
    model = Transformer(config.model, tokenizers.src.vocab_size, tokenizers.tgt.vocab_size)
    return save_checkpoint(root, step=1, epoch=0, model=model, config=config, tokenizers=tokenizers,
                           metrics={}, trainer_state={}, best=True, keep_last=1)


@pytest.fixture
def outside(trainkit_prepared, tmp_path) -> Path:
    """A copy of the tokenizer model elsewhere: what a crafted checkpoint points at (the same
    bytes, so that only where it lies can give it away)."""
    directory = tmp_path / "elsewhere"
    directory.mkdir()
    source = tokenizer_dir(validate_config(trainkit_prepared)) / "spm.model"
    return Path(shutil.copyfile(source, directory / "spm.model"))


@pytest.mark.parametrize("how", ["absolute", "relative"])
def test_a_tokenizer_meta_naming_a_model_outside_the_checkpoint_is_refused(trainkit_prepared, tmp_path, outside, how):
    crafted = tmp_path / "crafted"
    shutil.copytree(tokenizer_dir(validate_config(trainkit_prepared)), crafted)
    meta = json.loads((crafted / "meta.json").read_text())
    name = str(outside) if how == "absolute" else os.path.relpath(outside, tmp_path / "ckpts" / "step_00000001"
                                                                                   / "tokenizer")
    meta["files"] = {"src": name, "tgt": name}
    (crafted / "meta.json").write_text(json.dumps(meta))
    model = Tokenizer(crafted / "spm.model")
    directory = checkpoint(trainkit_prepared, tmp_path / "ckpts", tokenizers=Tokenizers(model, model, joint=True))

    result = invoke("translate", "-m", str(directory), *FAST, input="kato rimu\n")
    one_line_error(result, str(directory / "tokenizer" / "meta.json"), "outside")


def test_links_out_of_a_checkpoint_or_a_run_are_refused(trainkit_prepared, tmp_path, outside):
    run = tmp_path / "run"
    directory = checkpoint(trainkit_prepared, run / "checkpoints")
    model = directory / "tokenizer" / "spm.model"
    model.unlink()
    model.symlink_to(outside)
    one_line_error(invoke("translate", "-m", str(run), *FAST, input="kato rimu\n"), str(model), "a link out of")
    # Averaging would copy the file it names into the new checkpoint.
    other = checkpoint(trainkit_prepared, tmp_path / "other")
    result = invoke("average", str(other), str(directory), "-o", str(tmp_path / "avg"))
    one_line_error(result, str(model), "a link out of")
    assert not (tmp_path / "avg").exists()

    # A run whose `best` names a checkpoint elsewhere.
    elsewhere = checkpoint(trainkit_prepared, tmp_path / "elsewhere" / "ckpts")
    second = tmp_path / "second"
    (second / "checkpoints").mkdir(parents=True)
    (second / "checkpoints" / "best").symlink_to(elsewhere)
    result = invoke("translate", "-m", str(second), *FAST, input="kato rimu\n")
    one_line_error(result, str(second / "checkpoints" / "best"), "points outside")


def test_a_meta_json_naming_a_file_outside_the_checkpoint_is_refused(trainkit_prepared, tmp_path, outside):
    directory = checkpoint(trainkit_prepared, tmp_path / "ckpts")
    meta = json.loads((directory / "meta.json").read_text())
    meta["files"]["../../elsewhere/spm.model"] = outside.stat().st_size
    (directory / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(MtkitError, match="names a file outside the checkpoint"):
        load_for_inference(directory)


def test_the_precision_check_never_reads_the_checkpoints_data_valid(trainkit_prepared, tmp_path):
    """The checkpoint's config names a validation set elsewhere: the check skips (float32),
    unless the run holding the checkpoint has one prepared or the user names one."""
    valid = write_pairs(tmp_path, "secret", 30, seed=3)
    directory = checkpoint(trainkit_prepared, tmp_path / "ckpts", valid=valid)
    assert validation_set(load_for_inference(directory), CHECK_SENTENCES) is None

    # The run the checkpoint lies in: its own prepared split.
    run = Path(trainkit_prepared["experiment"]["dir"])
    inside = checkpoint(trainkit_prepared, tmp_path / "copy" / "checkpoints", valid=valid)
    shutil.copytree(run / "data", tmp_path / "copy" / "data")
    found = validation_set(load_for_inference(inside), CHECK_SENTENCES)
    assert found is not None and found[2] == f"{tmp_path / 'copy'}/data (valid)" and len(found[0]) == 20


@needs_ct2
def test_translate_checks_precision_on_the_users_validation_set_only(trainkit_prepared, tmp_path):
    valid = write_pairs(tmp_path, "secret", 30, seed=3)
    directory = checkpoint(trainkit_prepared, tmp_path / "ckpts", valid=valid)
    result = invoke("translate", "-m", str(directory), *FAST, input="kato rimu\n")
    assert result.exit_code == 0, result.stderr
    assert "ctranslate2 float32 on cpu (no validation set to check int8 against)" in result.stderr

    mine = write_config(tmp_path / "mine.yaml", {"data": {"valid": valid}})
    result = invoke("translate", "-m", str(directory), "-c", str(mine), *FAST, input="kato rimu\n")
    assert result.exit_code == 0, result.stderr
    assert "on 30 validation sentences, measured now" in result.stderr


@needs_ct2
def test_export_samples_no_run_that_the_checkpoints_config_names(trainkit_prepared, tmp_path):
    """The checkpoint's experiment.dir names a prepared run elsewhere: its valid split is not read."""
    directory = checkpoint(trainkit_prepared, tmp_path / "ckpts")
    assert (Path(trainkit_prepared["experiment"]["dir"]) / "data" / "valid.arrow").is_file()
    result = invoke("export", "ctranslate2", str(directory), str(tmp_path / "ct2"), "--sample-lines", "2")
    assert result.exit_code == 0, result.stderr
    assert "parity on 2 sentences from built-in sentences" in result.stdout


def test_a_forged_compute_type_record_is_measured_again_not_obeyed(trainkit_prepared, tmp_path, monkeypatch):
    import mtkit.runtime

    directory = checkpoint(trainkit_prepared, tmp_path / "ckpts")
    (directory / TORCH_RECORD).write_text(json.dumps({"torch cpu": {"choice": "float16", "bleu": {}}}))
    monkeypatch.setattr(mtkit.runtime, "cpu_has_native_bf16", lambda: True)
    loaded = load_for_inference(directory)
    said: list[str] = []
    decode = loaded.config.decode.model_copy(update={"backend": "torch", "compute_type": "auto"})
    backend = open_engine(loaded, decode, say=said.append, warn=said.append)
    assert backend.dtype == torch.float32 and said == []


def test_training_state_is_read_only_by_a_torch_without_the_weights_only_bypass(trainkit_prepared, tmp_path,
                                                                               monkeypatch):
    directory = checkpoint(trainkit_prepared, tmp_path / "ckpts")
    assert load_trainer_state(directory) == {}
    monkeypatch.setattr(torch, "__version__", torch.torch_version.TorchVersion("2.5.1"))
    with pytest.raises(MtkitError, match=r"^torch 2.5.1 cannot read trainer_state.pt safely .*torch>=2.6"):
        load_trainer_state(directory)
    assert f'"torch>={SAFE_TORCH}"' in (Path(__file__).parents[1] / "pyproject.toml").read_text()  # the floor
