"""The CUDA paths: model numerics, training in each precision, the out-of-memory message and
translation on the GPU. They run only where CUDA is available (never in CI, which has no GPU);
`pytest tests/test_cuda.py` on a GPU machine checks them."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from mtkit.cli import app
from mtkit.config import ModelConfig, load_config
from mtkit.models.encoder_decoder import Transformer
from mtkit.vocab import PAD_ID

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.double() - ref.double()).norm() / ref.double().norm())


def random_batch(gen: torch.Generator, vocab: int, rows: int = 8, src_len: int = 21, tgt_len: int = 17):
    src = torch.randint(4, vocab, (rows, src_len), generator=gen)
    tgt = torch.randint(4, vocab, (rows, tgt_len), generator=gen)
    for row in range(rows):  # ragged rows: padding must not leak into the others
        src[row, src_len - row:] = PAD_ID
    return src, tgt


def train_rows(config: Path) -> list[dict]:
    log = load_config(config).experiment.dir / "train_log.jsonl"
    return [row for row in map(json.loads, log.read_text().splitlines()) if row["type"] == "train"]


# --------------------------------------------------------------------------- model numerics


def test_cuda_forward_matches_float64_cpu_reference():
    gen = torch.Generator().manual_seed(0)
    model = Transformer(ModelConfig(size="small", dropout=0.0), 300, 300).eval()
    src, tgt = random_batch(gen, 300)
    with torch.no_grad():
        ref = model.double()(src, tgt)
        model.float().cuda()
        out = model(src.cuda(), tgt.cuda()).cpu()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            bf16 = model(src.cuda(), tgt.cuda()).float().cpu()
        with torch.autocast("cuda", dtype=torch.float16):
            fp16 = model(src.cuda(), tgt.cuda()).float().cpu()
    assert rel_err(out, ref) < 1e-3  # fp32, or tf32 where a matmul takes it
    assert rel_err(bf16, ref) < 2e-2
    assert rel_err(fp16, ref) < 5e-3
    assert torch.isfinite(bf16).all() and torch.isfinite(fp16).all()


def test_cuda_incremental_decoding_equals_full_recomputation():
    gen = torch.Generator().manual_seed(1)
    model = Transformer(ModelConfig(size="small", dropout=0.0), 300, 300).cuda().eval()
    src, tgt = (t.cuda() for t in random_batch(gen, 300))
    with torch.no_grad():
        full = model(src, tgt)
        state = model.encode(src)
        steps = [model.decode_step(tgt[:, t : t + 1], state) for t in range(tgt.shape[1])]
    assert rel_err(torch.stack(steps, dim=1), full) < 1e-4


def test_cuda_training_gradients_match_cpu():
    gen = torch.Generator().manual_seed(2)
    torch.manual_seed(0)
    model = Transformer(ModelConfig(size="tiny", dropout=0.0), 100, 100)
    src, tgt = random_batch(gen, 100, src_len=12, tgt_len=10)
    model(src, tgt).float().logsumexp(-1).sum().backward()
    cpu_grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    model.cuda()
    model(src.cuda(), tgt.cuda()).float().logsumexp(-1).sum().backward()
    for name, p in model.named_parameters():
        assert rel_err(p.grad.cpu(), cpu_grads[name]) < 1e-3, name


# --------------------------------------------------------------------------- training through the CLI


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_cuda_training_learns_in_each_precision(trainkit_experiment, precision):
    config = trainkit_experiment(
        precision,
        train={"device": "cuda", "precision": precision, "max_steps": 40, "log_every": 10, "valid_every": 20},
    )
    result = CliRunner().invoke(app, ["train", "-c", str(config)])
    assert result.exit_code == 0, result.stderr
    assert f"({precision})" in result.stderr
    losses = [row["loss"] for row in train_rows(config)]
    assert len(losses) == 4 and all(math.isfinite(x) for x in losses)
    assert losses[-1] < 0.8 * losses[0], losses
    state = torch.load(load_config(config).experiment.dir / "checkpoints" / "last" / "trainer_state.pt",
                       weights_only=True)
    scaler = state.get("scaler") or {}
    if precision == "fp16":  # the loss scale travels with the checkpoint
        assert scaler.get("scale", 0) > 0, state.keys()


def test_cuda_fp16_run_resumes(trainkit_experiment):
    config = trainkit_experiment(train={"device": "cuda", "precision": "fp16", "max_steps": 10, "valid_every": 5})
    runner = CliRunner()
    assert runner.invoke(app, ["train", "-c", str(config), "--set", "train.max_steps=5"]).exit_code == 0
    result = runner.invoke(app, ["train", "-c", str(config), "--resume"])
    assert result.exit_code == 0, result.stderr
    assert [row["step"] for row in train_rows(config)][-1] == 10


def test_cuda_out_of_memory_is_one_line(tokdata_experiment):
    config = tokdata_experiment(
        3000,
        model={"size": "base", "dropout": 0.1},
        train={"device": "cuda", "precision": "fp32", "max_tokens": 200000, "max_steps": 2, "valid_bleu": False,
               "best_metric": "loss"},
    )
    runner = CliRunner()
    for command in ("tokenizer", "prepare"):
        args = ["tokenizer", "train"] if command == "tokenizer" else ["prepare"]
        result = runner.invoke(app, [*args, "-c", str(config)])
        assert result.exit_code == 0, result.stderr
    # The GPU is shared out to this process as 1.5 GiB: the base model and its optimiser fit,
    # one batch of every training pair does not.
    limit = 1.5 * 2**30 / torch.cuda.get_device_properties(0).total_memory
    code = (f"import sys, torch; torch.cuda.set_per_process_memory_fraction({limit}); "
            "from mtkit.cli import main; main(['train', '-c', sys.argv[1]])")
    done = subprocess.run([sys.executable, "-c", code, str(config)], capture_output=True, text=True, timeout=600)
    assert done.returncode != 0
    errors = [line for line in done.stderr.splitlines() if line.startswith("mtkit: error:")]
    assert len(errors) == 1 and "out of memory" in errors[0] and "train.max_tokens" in errors[0], done.stderr
    assert "Traceback" not in done.stderr


# --------------------------------------------------------------------------- translation on the GPU


def test_cuda_translation_equals_cpu_translation(trainkit_experiment, tmp_path):
    config = trainkit_experiment(train={"max_steps": 30, "valid_every": 30})
    runner = CliRunner()
    assert runner.invoke(app, ["train", "-c", str(config)]).exit_code == 0
    run_dir = load_config(config).experiment.dir
    source = yaml.safe_load(config.read_text())["data"]["valid"]["src"]
    outputs = {}
    for device in ("cpu", "cuda"):
        out = tmp_path / f"out.{device}"
        result = runner.invoke(app, ["translate", "-m", str(run_dir), "-i", source, "-o", str(out),
                                     "--device", device, "--beam", "4"])
        assert result.exit_code == 0, result.stderr
        outputs[device] = out.read_text().splitlines()
    assert len(outputs["cuda"]) == len(Path(source).read_text().splitlines())
    assert outputs["cuda"] == outputs["cpu"]


def test_a_rank_past_the_last_gpu_is_one_line(trainkit_experiment, monkeypatch, tmp_path):
    missing = torch.cuda.device_count()
    monkeypatch.setenv("LOCAL_RANK", str(missing))  # as torchrun sets it for one process too many
    config = trainkit_experiment(train={"device": "cuda"})
    result = CliRunner().invoke(app, ["train", "-c", str(config)])
    assert result.exit_code == 1
    assert f"train.device=cuda: cuda:{missing} does not exist" in result.stderr and "LOCAL_RANK" in result.stderr
    monkeypatch.delenv("LOCAL_RANK")
    source = yaml.safe_load(config.read_text())["data"]["valid"]["src"]
    result = CliRunner().invoke(app, ["translate", "-m", str(load_config(config).experiment.dir), "-i", source,
                                      "--device", f"cuda:{missing}"])
    assert result.exit_code == 1 and f"--device cuda:{missing}: cuda:{missing} does not exist" in result.stderr
