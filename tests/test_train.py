import json
import math
import os
import signal
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from safetensors.torch import load_file
from typer.testing import CliRunner

import mtkit.experiment
import mtkit.loss
import mtkit.runtime
import mtkit.train
from mtkit.checkpoint import dropout_seed
from mtkit.cli import app
from mtkit.config import TrainConfig, load_config
from mtkit.loss import TranslationLoss, smoothed_nll
from mtkit.models.encoder_decoder import Transformer
from mtkit.train import WeightAverage, learning_rate, run_progress
from mtkit.vocab import PAD_ID


def run(config: Path, *args: str):
    return CliRunner().invoke(app, ["train", "-c", str(config), *args])


def run_dir(config: Path) -> Path:
    return load_config(config).experiment.dir


def weights(config: Path, step: str = "last") -> dict[str, torch.Tensor]:
    return load_file(str(run_dir(config) / "checkpoints" / step / "model.safetensors"))


def log_rows(config: Path, kind: str) -> list[dict]:
    lines = (run_dir(config) / "train_log.jsonl").read_text().splitlines()
    return [row for row in map(json.loads, lines) if row["type"] == kind]


# --------------------------------------------------------------------------- pieces


def test_schedules():
    inv = TrainConfig(lr=1.0, warmup_steps=4, schedule="inverse_sqrt")
    assert [learning_rate(inv, s) for s in (1, 2, 4)] == [0.25, 0.5, 1.0]
    assert learning_rate(inv, 16) == pytest.approx(0.5)
    cos = TrainConfig(lr=1.0, warmup_steps=2, schedule="cosine", max_steps=12, min_lr=0.1)
    assert learning_rate(cos, 2) == 1.0
    assert learning_rate(cos, 7) == pytest.approx(0.55)
    assert learning_rate(cos, 12) == pytest.approx(0.1) and learning_rate(cos, 50) == pytest.approx(0.1)
    const = TrainConfig(lr=0.3, warmup_steps=0, schedule="constant")
    assert learning_rate(const, 1) == learning_rate(const, 1000) == 0.3


def test_cooldown_by_steps_and_by_time():
    cfg = TrainConfig(lr=1.0, warmup_steps=0, schedule="constant", max_steps=100, cooldown=0.2, min_lr=0.1)
    assert learning_rate(cfg, 70) == 1.0 and learning_rate(cfg, 80) == pytest.approx(1.0)
    assert learning_rate(cfg, 90) == pytest.approx(0.55)
    assert learning_rate(cfg, 100) == pytest.approx(0.1)
    # A time-bounded run: progress comes from the clock when the budget ends before max_steps.
    timed = cfg.model_copy(update={"max_steps": 10**6, "max_minutes": 10.0})
    assert run_progress(timed, 50, elapsed_s=300.0) == pytest.approx(0.5)
    assert run_progress(timed, 50, elapsed_s=9999.0) == 1.0
    assert learning_rate(timed, 50, run_progress(timed, 50, 540.0)) == pytest.approx(0.55)
    # The cool-down multiplies whatever the schedule gives (here inverse square root).
    inv = TrainConfig(lr=1.0, warmup_steps=4, max_steps=16, cooldown=0.5)
    assert learning_rate(inv, 12) == pytest.approx(math.sqrt(4 / 12) * 0.5)


def test_weight_average_follows_the_weights_and_swaps_back():
    model = torch.nn.Linear(3, 2)
    history = [model.weight.detach().clone()]
    average = WeightAverage(model, decay=0.9)
    expected = history[0].clone()
    for step in range(1, 40):
        with torch.no_grad():
            model.weight.add_(float(step))
        decay = min(0.9, (1 + step) / (10 + step))  # low at first: not stuck at the initial weights
        expected = decay * expected + (1 - decay) * model.weight.detach()
        average.update(step)
    raw = model.weight.detach().clone()
    with average.applied() as saved:
        torch.testing.assert_close(model.weight.detach(), expected)
        assert torch.equal(saved["weight"], raw) and set(saved) == {"weight", "bias"}
    assert torch.equal(model.weight.detach(), raw)


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("chunk_elements", [33, 1 << 19])  # 3 rows a chunk, or all in one
def test_smoothed_loss_and_gradients_match_torch(smoothing, chunk_elements, monkeypatch):
    monkeypatch.setitem(mtkit.loss._CHUNK_ELEMENTS, "cpu", chunk_elements)
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(7, 5, generator=gen)
    weight = torch.randn(11, 5, generator=gen) * 3
    hidden[0] = weight[4] * -20.0  # a target whose probability underflows to 0 in fp32
    target = torch.randint(0, 11, (7,), generator=gen)
    target[0] = 4
    ours = [hidden.clone().requires_grad_(), weight.clone().requires_grad_()]
    theirs = [hidden.clone().requires_grad_(), weight.clone().requires_grad_()]
    loss, nll = smoothed_nll(*ours, target, smoothing)
    logits = theirs[0] @ theirs[1].T
    expected = F.cross_entropy(logits, target, label_smoothing=smoothing, reduction="sum")
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(nll, F.cross_entropy(logits, target, reduction="sum"))
    (loss * 0.5).backward()
    (expected * 0.5).backward()
    for mine, torchs in zip(ours, theirs, strict=True):
        torch.testing.assert_close(mine.grad, torchs.grad)
    with torch.no_grad():  # validation: no gradient is computed or kept
        torch.testing.assert_close(smoothed_nll(hidden, weight, target, smoothing)[0], expected.detach())


def test_smoothed_loss_under_bf16_autocast_matches_torch(monkeypatch):
    monkeypatch.setitem(mtkit.loss._CHUNK_ELEMENTS, "cpu", 4000)
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(300, 64, generator=gen)
    weight = torch.randn(1000, 64, generator=gen) * 0.3
    target = torch.randint(0, 1000, (300,), generator=gen)
    ours = [hidden.clone().requires_grad_(), weight.clone().requires_grad_()]
    theirs = [hidden.clone().requires_grad_(), weight.clone().requires_grad_()]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = smoothed_nll(*ours, target, 0.1)
        logits = F.linear(theirs[0], theirs[1])
    assert logits.dtype == torch.bfloat16
    expected = F.cross_entropy(logits.float(), target, label_smoothing=0.1, reduction="sum")
    torch.testing.assert_close(loss, expected, rtol=1e-3, atol=0)
    loss.backward()
    expected.backward()
    for mine, torchs in zip(ours, theirs, strict=True):
        assert mine.grad.dtype == torch.float32
        torch.testing.assert_close(mine.grad, torchs.grad, rtol=0.02, atol=0.02 * float(torchs.grad.abs().max()))


def test_training_loss_ignores_padding_and_equals_full_logits():
    from mtkit.config import ModelConfig

    torch.manual_seed(0)
    model = Transformer(ModelConfig(size="tiny", dropout=0.0), 30, 30)
    src = torch.tensor([[5, 6, 7, 3], [8, 3, 0, 0]])
    tgt_in = torch.tensor([[2, 9, 10], [2, 11, 0]])
    tgt_out = torch.tensor([[9, 10, 3], [11, 3, 0]])
    loss, nll = TranslationLoss(model, 0.1)(src, tgt_in, tgt_out)
    logits = model(src, tgt_in)
    expected = F.cross_entropy(logits.flatten(0, 1), tgt_out.flatten(), ignore_index=PAD_ID,
                               label_smoothing=0.1, reduction="sum")
    torch.testing.assert_close(loss, expected)


# --------------------------------------------------------------------------- the command


def test_train_logs_validates_and_checkpoints(trainkit_experiment):
    config = trainkit_experiment(train={"valid_bleu": True, "best_metric": "bleu", "valid_max_sentences": 4})
    result = run(config)
    assert result.exit_code == 0, result.stderr
    root = run_dir(config)
    assert {p.name for p in (root / "checkpoints").iterdir()} >= {"last", "best", "step_00000004", "step_00000008"}
    assert os.readlink(root / "checkpoints" / "last") == "step_00000008"
    train_rows, valid_rows = log_rows(config, "train"), log_rows(config, "valid")
    assert [r["step"] for r in train_rows] == [2, 4, 6, 8]
    assert train_rows[-1]["loss"] < train_rows[0]["loss"]
    assert {"lr", "grad_norm", "tgt_tok_per_s", "padding", "ppl"} <= set(train_rows[0])
    assert [r["step"] for r in valid_rows] == [4, 8]
    assert valid_rows[0]["bleu_signature"].startswith("nrefs:1|") and "chrf" in valid_rows[0]
    assert list((root / "tensorboard").glob("events.out.tfevents.*"))
    assert "step       8" in result.stderr and "BLEU" in result.stderr and "padding" in result.stderr
    meta = json.loads((root / "checkpoints" / "last" / "meta.json").read_text())
    assert meta["step"] == 8 and "bleu" in meta["metrics"]


def test_valid_bleu_from_decodes_late_validations_only(trainkit_experiment):
    # 8 updates, validations at 2, 4, 6, 8: 2 and 4 (25% and 50% of the run) compute the loss only.
    config = trainkit_experiment(train={"valid_bleu": True, "best_metric": "chrf", "valid_max_sentences": 4,
                                        "valid_every": 2, "valid_bleu_from": 0.6})
    result = run(config)
    assert result.exit_code == 0, result.stderr
    valid_rows = log_rows(config, "valid")
    assert [(r["step"], "chrf" in r, r["best"]) for r in valid_rows] == [
        (2, False, None), (4, False, None), (6, True, True), (8, True, valid_rows[-1]["chrf"] > valid_rows[2]["chrf"])]
    assert "loss only" in result.stderr
    root = run_dir(config) / "checkpoints"
    assert os.readlink(root / "best") in ("step_00000006", "step_00000008")
    # A run that stops (max_epochs) before decoding began still decodes its last checkpoint.
    early = trainkit_experiment("early", train={"valid_bleu": True, "best_metric": "chrf", "valid_max_sentences": 4,
                                                "max_steps": 1000, "max_epochs": 1, "valid_every": 1,
                                                "valid_bleu_from": 0.9})
    result = run(early)
    assert result.exit_code == 0, result.stderr
    valid_rows = log_rows(early, "valid")
    assert "chrf" in valid_rows[-1] and not any("chrf" in r for r in valid_rows[:-2])
    last = os.readlink(run_dir(early) / "checkpoints" / "last")
    assert os.readlink(run_dir(early) / "checkpoints" / "best") == last
    assert valid_rows[-1]["step"] == int(last.split("_")[1])


@pytest.mark.parametrize("train", [{"ema_decay": 0.0}, {"ema_decay": 0.9},
                                   {"ema_decay": 0.0, "subword_alpha": 0.3, "max_tokens": 2400}],
                         ids=["plain", "ema", "subword_sampling"])
def test_interrupted_and_resumed_run_equals_uninterrupted_run(trainkit_experiment, monkeypatch, train):
    # Dropout is on (0.1): equality needs the RNG state and the data position restored; with a
    # weight average, also the raw weights saved beside the averaged ones; with subword
    # sampling (and batches large enough for 8 updates to cross into a second epoch), the
    # segmentation of each epoch drawn again.
    ema_decay = train["ema_decay"]
    straight = trainkit_experiment("straight", train=train)
    assert run(straight).exit_code == 0

    interrupted = trainkit_experiment("interrupted", train=train)
    real_step, calls = mtkit.train.train_step, []

    def step_then_signal(*args, **kwargs):
        out = real_step(*args, **kwargs)
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGINT)
        return out

    monkeypatch.setattr(mtkit.train, "train_step", step_then_signal)
    result = run(interrupted)
    monkeypatch.undo()
    assert result.exit_code == 130
    assert "stopped by SIGINT at step 3" in result.stderr and "--resume" in result.stderr
    assert os.readlink(run_dir(interrupted) / "checkpoints" / "last") == "step_00000003"

    # A hard kill would have left log rows after the checkpoint: resuming drops them.
    with open(run_dir(interrupted) / "train_log.jsonl", "a") as log:
        log.write(json.dumps({"type": "train", "step": 4, "loss": 0.0}) + "\n")
    # Resume in two legs: to step 5 (an override of max_steps), then to the end.
    assert run(interrupted, "--resume", "--set", "train.max_steps=5").exit_code == 0
    result = run(interrupted, "--resume")
    assert result.exit_code == 0, result.stderr
    a, b = weights(straight), weights(interrupted)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert [r["step"] for r in log_rows(interrupted, "train")] == [2, 4, 6, 8]
    counted = [torch.load(run_dir(c) / "checkpoints" / "last" / "trainer_state.pt", weights_only=True)["state"]
               for c in (straight, interrupted)]
    assert counted[0]["target_tokens"] == counted[1]["target_tokens"] > 0  # counted on, not restarted
    assert counted[0]["update_s"] > 0 and counted[1]["update_s"] > 0
    state = torch.load(run_dir(straight) / "checkpoints" / "last" / "trainer_state.pt", weights_only=True)
    if ema_decay:  # the checkpoint holds the average; training would go on from the raw weights
        raw = state["model_weights"]
        assert any(not torch.equal(raw[name], a[name]) for name in raw.keys() & a.keys())
    else:
        assert "model_weights" not in state


def test_sigterm_saves_and_exits_143(trainkit_experiment, monkeypatch):
    config = trainkit_experiment()
    real_step = mtkit.train.train_step

    def step_then_term(*args, **kwargs):
        out = real_step(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGTERM)
        return out

    monkeypatch.setattr(mtkit.train, "train_step", step_then_term)
    result = run(config)
    assert result.exit_code == 143 and "stopped by SIGTERM at step 1" in result.stderr
    assert (run_dir(config) / "checkpoints" / "step_00000001" / "meta.json").exists()


def test_init_from_loads_weights_only(trainkit_experiment):
    first = trainkit_experiment("first")
    assert run(first).exit_code == 0
    tuned = trainkit_experiment("tuned", train={"max_steps": 2, "valid_every": 2, "lr": 1e-12, "warmup_steps": 0})
    result = run(tuned, "--init-from", str(run_dir(first)))
    assert result.exit_code == 0, result.stderr
    assert json.loads((run_dir(tuned) / "checkpoints" / "last" / "meta.json").read_text())["step"] == 2
    best = weights(first, "best")
    for name, value in weights(tuned).items():
        torch.testing.assert_close(value, best[name], rtol=0, atol=1e-8)


def test_stops_at_max_epochs_and_max_minutes(trainkit_experiment):
    config = trainkit_experiment(train={"max_steps": 1000, "max_epochs": 1, "valid_every": 1000})
    result = run(config)
    assert result.exit_code == 0, result.stderr
    batches = int(result.stderr.split(" batches per epoch")[0].split()[-1])
    assert f"stopped at step {batches} (epoch 1): max_epochs" in result.stderr
    config = trainkit_experiment("timed", train={"max_steps": 1000, "max_minutes": 1e-6})
    result = run(config)
    assert result.exit_code == 0 and "max_minutes" in result.stderr


def test_cooldown_ends_the_run_annealed(trainkit_experiment):
    config = trainkit_experiment(train={"max_steps": 8, "warmup_steps": 2, "cooldown": 0.5, "log_every": 2,
                                        "valid_every": 100, "valid_bleu": False, "best_metric": "loss"})
    result = run(config)
    assert result.exit_code == 0, result.stderr
    log = Path(yaml.safe_load(config.read_text())["experiment"]["dir"]) / "train_log.jsonl"
    lrs = [row["lr"] for row in map(json.loads, log.read_text().splitlines()) if row["type"] == "train"]
    lr = yaml.safe_load(config.read_text())["train"]["lr"]
    # steps 2, 4, 6, 8 of 8: warm-up reaches the peak, then the rate falls to 0 over the last half
    assert lrs == pytest.approx([lr, lr * math.sqrt(2 / 4), lr * math.sqrt(2 / 6) * 0.5, 0.0])


@pytest.mark.parametrize("native_bf16", [True, False])
def test_auto_precision_on_cpu_follows_the_hardware(monkeypatch, native_bf16):
    monkeypatch.setattr(mtkit.runtime, "cpu_has_native_bf16", lambda: native_bf16)
    runtime = mtkit.runtime.setup_runtime(TrainConfig(device="cpu"))
    assert runtime.precision == ("bf16" if native_bf16 else "fp32")
    assert mtkit.runtime.setup_runtime(TrainConfig(device="cpu", precision="fp32")).precision == "fp32"


def test_bf16_autocast_trains_on_cpu(trainkit_experiment):
    config = trainkit_experiment(train={"precision": "bf16", "max_steps": 12, "log_every": 4, "valid_every": 12})
    result = run(config)
    assert result.exit_code == 0, result.stderr
    assert "(bf16)" in result.stderr
    log = Path(yaml.safe_load(config.read_text())["experiment"]["dir"]) / "train_log.jsonl"
    losses = [row["loss"] for row in map(json.loads, log.read_text().splitlines()) if row["type"] == "train"]
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]


def test_patience_stops_early(trainkit_experiment, monkeypatch):
    monkeypatch.setattr(mtkit.train, "validation_loss", lambda *a: {"loss": 2.0, "ppl": math.exp(2.0)})
    config = trainkit_experiment(train={"max_steps": 100, "valid_every": 2, "patience": 2})
    result = run(config)
    assert result.exit_code == 0, result.stderr
    assert "stopped at step 6 (epoch 1): patience" in result.stderr
    assert os.readlink(run_dir(config) / "checkpoints" / "best") == "step_00000002"


def test_nonfinite_losses_skip_updates_then_stop(trainkit_experiment, monkeypatch):
    real = mtkit.loss.smoothed_nll
    monkeypatch.setattr(mtkit.loss, "smoothed_nll", lambda *a: tuple(x * math.nan for x in real(*a)))
    config = trainkit_experiment(train={"max_nonfinite": 3})
    result = run(config)
    assert result.exit_code == 1
    assert result.stderr.count("update skipped") == 3
    assert result.stderr.strip().splitlines()[-1].startswith("mtkit: error: 3 non-finite losses in a row")


def _unprepare(config: Path) -> None:
    import shutil

    shutil.rmtree(run_dir(config) / "data")


def _other_tokenizer(config: Path) -> None:
    report = run_dir(config) / "data" / "report.json"
    report.write_text(report.read_text().replace('"tokenizer_fingerprint": "', '"tokenizer_fingerprint": "0'))


@pytest.mark.parametrize(
    "overrides, damage, message",
    [
        (["--set", "train.max_tokens=10"], None, "train.max_tokens=10 is smaller than the longest training pair"),
        (["--set", "train.precision=fp16"], None, "train.precision=fp16 needs a CUDA device"),
        ([], _unprepare, "data not prepared; run `mtkit prepare -c CONFIG` first"),
        ([], _other_tokenizer, "prepared with a different tokenizer"),
        (["--resume"], None, "no checkpoint to resume from"),
        (["--set", "train.valid_bleu=false", "--set", "train.best_metric=bleu"], None, "best_metric=bleu needs"),
    ],
)
def test_bad_setups_fail_in_one_line(trainkit_experiment, overrides, damage, message):
    config = trainkit_experiment()
    if damage is not None:
        damage(config)
    result = run(config, *overrides)
    assert result.exit_code == 1, result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("mtkit: error: ")
    assert message in result.stderr and "Traceback" not in result.stderr


def test_existing_run_is_not_overwritten(trainkit_experiment):
    config = trainkit_experiment(train={"max_steps": 2, "valid_every": 2})
    assert run(config).exit_code == 0
    result = run(config)
    assert result.exit_code == 1 and "already holds checkpoints" in result.stderr


def test_resume_with_other_batches_says_it_will_not_be_exact(trainkit_experiment):
    """Another max_tokens or seed changes the batch order: allowed (the out-of-memory message
    suggests a smaller max_tokens), but said once, naming the settings."""
    config = trainkit_experiment()
    assert run(config, "--set", "train.max_steps=4").exit_code == 0
    with pytest.warns(UserWarning, match=r"train\.max_tokens=300 -> 400.*will not equal an uninterrupted one"):
        result = run(config, "--resume", "--set", "train.max_tokens=400")
    assert result.exit_code == 0, result.stderr
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same settings: no warning
        assert run(config, "--resume", "--set", "train.max_tokens=400", "--set", "train.max_steps=8").exit_code == 0


def test_dropout_stream_does_not_replay_the_initialisation(trainkit_experiment, monkeypatch):
    """The weights are drawn from the experiment's seed; the dropout masks come from a seed
    derived from it (and from the rank), not from the same stream restarted."""
    seeds: list[int] = []
    manual_seed = torch.manual_seed
    monkeypatch.setattr(torch, "manual_seed", lambda seed: (seeds.append(seed), manual_seed(seed))[1])
    config = trainkit_experiment()
    assert run(config, "--set", "train.max_steps=2").exit_code == 0
    seed = load_config(config).experiment.seed
    assert seeds == [seed, dropout_seed(seed, rank=0)]
    assert len({seed, *(dropout_seed(seed, rank) for rank in range(4)), dropout_seed(seed, 0, step=8)}) == 6


def test_subword_sampling_draws_each_epoch_anew(trainkit_experiment):
    """train.subword_alpha: every epoch a new segmentation of the same text, the same one for
    the same (seed, epoch); pairs keep their lengths' order of magnitude and their text."""
    config = load_config(trainkit_experiment(train={"subword_alpha": 0.3}))
    exp = mtkit.experiment.load_experiment(config)
    sampling = exp.sampling
    assert sampling is not None
    first, again, second = sampling.corpus(0), sampling.corpus(0), sampling.corpus(1)
    rows = range(len(exp.train))
    assert len(first) == len(exp.train)
    assert [first.ids(r) for r in rows] == [again.ids(r) for r in rows]
    changed = sum(first.ids(r) != exp.train.ids(r) for r in rows)
    assert changed > len(exp.train) // 10
    assert sum(first.ids(r) != second.ids(r) for r in rows) > len(exp.train) // 10
    for r in rows:  # another segmentation of the same text
        assert exp.tokenizers.src.decode([first.ids(r)[0]]) == exp.tokenizers.src.decode([exp.train.ids(r)[0]])
        assert exp.tokenizers.tgt.decode([first.ids(r)[1]]) == exp.tokenizers.tgt.decode([exp.train.ids(r)[1]])
    assert mtkit.experiment.load_experiment(load_config(trainkit_experiment("off"))).sampling is None


def test_subword_sampling_keeps_pairs_within_the_model(trainkit_experiment):
    """A drawn segmentation longer than the model's positions falls back to the best one."""
    config = load_config(trainkit_experiment(train={"subword_alpha": 0.01}))
    exp = mtkit.experiment.load_experiment(config)
    assert exp.sampling is not None
    longest = int(exp.train.sizes.max())
    limited = config.model_copy(update={"model": config.model.model_copy(update={"max_positions": longest})})
    exp.sampling.config = limited
    corpus = exp.sampling.corpus(0)
    assert int(corpus.sizes.max()) <= longest
    assert any(corpus.ids(r) != exp.train.ids(r) for r in range(len(corpus)))  # still sampled


@pytest.mark.parametrize("nbest", [0, 1, -2])
def test_subword_nbest_is_checked(trainkit_experiment, nbest):
    result = run(trainkit_experiment(), "--set", "train.subword_alpha=0.5", "--set", f"train.subword_nbest={nbest}")
    assert result.exit_code == 2 and "train.subword_nbest" in result.stderr
