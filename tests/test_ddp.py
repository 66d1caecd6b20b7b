"""Two CPU processes (gloo) under torchrun train exactly like one process that accumulates
the same batches: rank r takes batch r of each update's group, the loss is normalised by the
update's target tokens over both ranks, and resuming a distributed run works the same way."""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from mtkit.cli import app
from mtkit.config import load_config

SETTINGS = {"model": {"size": "tiny", "dropout": 0.0}}


def torchrun(config: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "mtkit", "train", "-c", str(config), *args]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=300,
                          cwd=Path(__file__).resolve().parents[1])


def without_key_bias(name: str, value: torch.Tensor) -> torch.Tensor:
    """Attention is invariant to the key bias, so its gradient is rounding noise that Adam
    scales up to full steps in either run: drop it from the comparison."""
    d = 64  # tiny d_model
    if name.endswith("qkv_proj.bias"):
        return torch.cat([value[:d], value[2 * d :]])
    if name.endswith("kv_proj.bias"):
        return value[d:]
    return value


def test_two_ranks_equal_one_rank_with_update_freq_two(trainkit_experiment):
    single = trainkit_experiment("single", **SETTINGS, train={"update_freq": 2, "max_steps": 4})
    assert CliRunner().invoke(app, ["train", "-c", str(single)]).exit_code == 0

    ddp = trainkit_experiment("ddp", **SETTINGS, train={"update_freq": 1, "max_steps": 4})
    first = torchrun(ddp, "--set", "train.max_steps=2")
    assert first.returncode == 0, first.stderr[-3000:]
    assert "2 processes" in first.stderr
    second = torchrun(ddp, "--resume")
    assert second.returncode == 0, second.stderr[-3000:]

    one, two = (load_config(c).experiment.dir for c in (single, ddp))
    a = load_file(str(one / "checkpoints" / "last" / "model.safetensors"))
    b = load_file(str(two / "checkpoints" / "last" / "model.safetensors"))
    for name in a:
        torch.testing.assert_close(without_key_bias(name, b[name]), without_key_bias(name, a[name]),
                                   rtol=1e-4, atol=1e-5, msg=name)
    logs = [[json.loads(line) for line in (d / "train_log.jsonl").read_text().splitlines()] for d in (one, two)]
    losses = [[row["loss"] for row in rows if row["type"] == "train"] for rows in logs]
    assert len(losses[0]) == len(losses[1]) == 2  # only rank 0 logged
    for x, y in zip(*losses, strict=True):
        assert abs(x - y) < 1e-4
    trainer_state = torch.load(two / "checkpoints" / "last" / "trainer_state.pt", weights_only=True)
    assert len(trainer_state["rng"]) == 2 and trainer_state["world_size"] == 2


def test_two_ranks_decode_the_last_validation_when_decoding_starts_late(trainkit_experiment):
    # Every update validates (loss only before 90% of the run); max_epochs stops the run first,
    # so its last checkpoint is validated again, decoded, on rank 0 while rank 1 waits.
    config = trainkit_experiment("late", **SETTINGS, train={
        "max_steps": 1000, "max_epochs": 1, "valid_every": 1, "valid_bleu": True, "best_metric": "chrf",
        "valid_max_sentences": 4, "valid_bleu_from": 0.9})
    result = torchrun(config)
    assert result.returncode == 0, result.stderr[-3000:]
    log = load_config(config).experiment.dir / "train_log.jsonl"
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    valid = [row for row in rows if row["type"] == "valid"]
    assert "chrf" in valid[-1] and valid[-1]["best"] and not any("chrf" in row for row in valid[:-1])
    assert valid[-1]["step"] == valid[-2]["step"]
    # A run that ends on a decoded validation does not validate again (on either rank).
    decoded = trainkit_experiment("decoded", **SETTINGS, train={
        "max_steps": 2, "valid_every": 2, "valid_bleu": True, "best_metric": "chrf", "valid_max_sentences": 4})
    result = torchrun(decoded)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stderr.count("valid step") == 1
