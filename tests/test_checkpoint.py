import json
import os
from pathlib import Path

import pytest
import torch

from mtkit.checkpoint import (
    TrainState,
    load_for_inference,
    load_trainer_state,
    pack_trainer_state,
    refuse_existing_run,
    resolve,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from mtkit.config import validate_config
from mtkit.errors import MtkitError
from mtkit.models.encoder_decoder import Transformer
from mtkit.tokenizer import Tokenizers, tokenizer_dir


@pytest.fixture
def setup(trainkit_prepared, tmp_path):
    config = validate_config({**trainkit_prepared, "experiment": {"dir": str(tmp_path / "run")}})
    tokenizers = Tokenizers.load(tokenizer_dir(validate_config(trainkit_prepared)))
    torch.manual_seed(0)
    model = Transformer(config.model, tokenizers.src.vocab_size, tokenizers.tgt.vocab_size)
    return config, tokenizers, model, tmp_path / "run" / "checkpoints"


def save(setup, step: int, best: bool = False, keep_last: int = 2, tokenizers=None) -> Path:
    config, toks, model, root = setup
    state = {"step": torch.tensor(step), "rng": [torch.get_rng_state()], "note": [1, 2.5, "x", None]}
    return save_checkpoint(
        root, step=step, epoch=1, model=model, config=config, tokenizers=tokenizers or toks,
        metrics={"loss": 1.0 / step}, trainer_state=state, best=best, keep_last=keep_last,
    )


def test_round_trip_keeps_tied_weights_and_outputs(setup):
    config, tokenizers, model, root = setup
    path = save(setup, 10, best=True)
    loaded = load_for_inference(path.parents[1])  # the run directory
    assert loaded.path == path and not loaded.model.training
    assert loaded.meta["step"] == 10 and loaded.meta["tokenizer_fingerprint"] == tokenizers.fingerprint()
    assert loaded.model.output_proj.weight is loaded.model.tgt_embed.weight
    assert loaded.tokenizers.fingerprint() == tokenizers.fingerprint()
    assert loaded.config.model == config.model
    src, tgt = torch.randint(4, 100, (2, 5)), torch.randint(4, 100, (2, 4))
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(src, tgt), model.eval()(src, tgt), rtol=0, atol=0)
    state = load_trainer_state(path)
    assert state["step"].item() == 10 and state["note"] == [1, 2.5, "x", None]


def test_links_best_last_and_keep_last(setup):
    root = setup[3]
    save(setup, 1, best=True)
    for step in (2, 3, 4):
        save(setup, step)
    assert os.readlink(root / "last") == "step_00000004"
    assert os.readlink(root / "best") == "step_00000001"
    assert sorted(p.name for p in root.iterdir()) == ["best", "last", "step_00000001", "step_00000003", "step_00000004"]
    assert resolve(root.parent) == root / "step_00000001"  # a run directory means its best
    (root / "best").unlink()
    assert resolve(root.parent) == root / "step_00000004"
    assert resolve(root / "step_00000003") == root / "step_00000003"


def test_a_failed_save_leaves_the_previous_checkpoint(setup):
    root = setup[3]
    save(setup, 1)

    class Broken:
        src = tgt = setup[1].src

        def copy_to(self, directory):
            raise OSError(28, "No space left on device")

    with pytest.raises(MtkitError, match="No space left"):
        save(setup, 2, tokenizers=Broken())
    assert sorted(p.name for p in root.iterdir()) == ["last", "step_00000001"]
    assert load_for_inference(root.parent).meta["step"] == 1


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda d: (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:1000]), "truncated"),
        (lambda d: (d / "meta.json").write_text('{"format": "mtkit-che'), "unreadable or truncated"),
        (lambda d: (d / "meta.json").write_text('{"format": "something-else"}'), "not an mtkit checkpoint"),
        (lambda d: (d / "meta.json").unlink(), "incomplete checkpoint"),
        (lambda d: (d / "model.safetensors").write_bytes(b"\0" * (d / "model.safetensors").stat().st_size),
         r"corrupt \(checksum mismatch\); pick another checkpoint"),
    ],
)
def test_damaged_checkpoints_are_refused_in_one_line(setup, damage, message):
    path = save(setup, 5)
    damage(path)
    with pytest.raises(MtkitError, match=message) as err:
        load_for_inference(path)
    assert "\n" not in str(err.value)


def test_foreign_and_missing_paths_are_refused(tmp_path):
    with pytest.raises(MtkitError, match="no such checkpoint"):
        load_for_inference(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(MtkitError, match="no checkpoint found"):
        load_for_inference(tmp_path / "empty")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "meta.json").write_text(json.dumps({"step": 3}))
    with pytest.raises(MtkitError, match="not an mtkit checkpoint"):
        load_for_inference(foreign)
    (tmp_path / "file").write_text("x")
    with pytest.raises(MtkitError, match="not a checkpoint directory"):
        load_for_inference(tmp_path / "file")


def test_weights_of_another_shape_are_refused(setup):
    path = save(setup, 5)
    text = (path / "config.yaml").read_text().replace("d_model: 64", "d_model: 32")
    (path / "config.yaml").write_text(text)
    meta = json.loads((path / "meta.json").read_text())
    meta["files"]["config.yaml"] = (path / "config.yaml").stat().st_size
    (path / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(MtkitError, match="weights do not fit this model"):
        load_for_inference(path)


def test_average_of_checkpoints_is_the_mean_and_loads(setup, tmp_path):
    from typer.testing import CliRunner

    from mtkit.cli import app

    config, tokenizers, model, root = setup
    params = []
    for step in (2, 4, 6):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.01 * step)
        params.append({k: v.clone() for k, v in model.state_dict().items()})
        save(setup, step, keep_last=5)
    out = tmp_path / "avg"
    result = CliRunner().invoke(app, ["average", str(tmp_path / "run"), "--last", "2", "-o", str(out)])
    assert result.exit_code == 0, result.output
    loaded = load_for_inference(out)
    assert loaded.meta["step"] == 6 and len(loaded.meta["averaged_from"]) == 2
    for name, value in loaded.model.state_dict().items():
        torch.testing.assert_close(value, (params[1][name] + params[2][name]) / 2)
    # Shared weights stay shared after averaging.
    assert loaded.model.output_proj.weight is loaded.model.tgt_embed.weight

    again = CliRunner().invoke(app, ["average", str(tmp_path / "run"), "--last", "2", "-o", str(out)])
    assert again.exit_code == 1 and "already exists" in again.stderr
    too_many = CliRunner().invoke(app, ["average", str(tmp_path / "run"), "--last", "9", "-o", str(tmp_path / "x")])
    assert too_many.exit_code == 1 and "fewer than --last 9" in too_many.stderr


def test_a_new_run_is_refused_over_an_existing_one(setup):
    root = setup[3]
    refuse_existing_run(root)  # nothing there yet
    save(setup, 1)
    with pytest.raises(MtkitError, match="already holds checkpoints of a run; continue it with --resume"):
        refuse_existing_run(root)


def test_rng_state_round_trip_replays_the_same_numbers():
    import random

    saved = rng_state()
    first = (torch.rand(3), random.random())
    set_rng_state(saved)
    again = (torch.rand(3), random.random())
    torch.testing.assert_close(again[0], first[0], rtol=0, atol=0)
    assert again[1] == first[1]


def test_packed_trainer_state_loads_back_as_plain_data(setup):
    config, tokenizers, model, root = setup
    optimizer = torch.optim.AdamW(model.parameters())
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    state = TrainState(step=3, epoch=2, batch_index=5, best_metric=1.5, best_step=3)
    packed = pack_trainer_state(state, optimizer, scaler, [rng_state()], raw_weights=None)
    path = save_checkpoint(root, step=3, epoch=2, model=model, config=config, tokenizers=tokenizers, metrics={},
                           trainer_state=packed, best=False, keep_last=1)
    loaded = load_trainer_state(path)
    assert TrainState(**loaded["state"]) == state
    assert loaded["world_size"] == 1 and "model_weights" not in loaded
