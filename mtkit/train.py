"""Training: the loop, its optimiser, schedule, validation and progress reports.

``train(config, resume=..., init_from=...)`` reads the prepared data and tokenizer of an
experiment and trains until ``train.max_steps`` / ``max_epochs`` / ``max_minutes``, early
stopping, or a signal (SIGINT/SIGTERM save a checkpoint and return). The loop itself is
``_loop``: batch -> loss -> backward -> clip -> step -> log -> maybe validate/checkpoint, on
one ``Run`` (config, data, model, optimizer, state, ...) that ``_start`` sets up. The trainer
decides when to stop, early stopping included; progress reports (stderr, TensorBoard,
train_log.jsonl) are ``mtkit.progress.Reporter``; the checkpoint directory, resuming and what
a checkpoint's training state holds are ``mtkit.checkpoint``'s; the device is ``mtkit.runtime``'s;
the loss is ``mtkit.loss``'s, the prepared data ``mtkit.experiment``'s and validation's
scores ``mtkit.evaluate``'s.

Under ``torchrun`` (RANK/WORLD_SIZE/LOCAL_RANK in the environment) every rank builds the same
seeded batch order and takes its share of each update's batches; gradients are summed over
ranks and the loss is normalised by the target tokens of the whole update, so N ranks with
``update_freq`` u give the same update as one process with ``update_freq`` N*u. Only rank 0
validates, logs and writes checkpoints.
"""

from __future__ import annotations

import contextlib
import math
import random
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from mtkit.batching import Batch, TokenizedCorpus, epoch_batches, epoch_rows, padding_ratio
from mtkit.checkpoint import (
    TrainState,
    checkpoints_dir,
    dropout_seed,
    finetuned_config,
    init_weights_from,
    pack_trainer_state,
    pretrained_checkpoint,
    refuse_existing_run,
    resume_run,
    rng_state,
    save_checkpoint,
)
from mtkit.config import Config, TrainConfig
from mtkit.errors import MtkitError, Stopped
from mtkit.evaluate import validation_bleu, validation_loss
from mtkit.experiment import Experiment, SubwordSampling, load_experiment
from mtkit.loss import TranslationLoss
from mtkit.models import Model, build_model
from mtkit.progress import Reporter
from mtkit.runtime import Runtime, setup_runtime

# --------------------------------------------------------------------------- pieces with their own tests


def learning_rate(cfg: TrainConfig, step: int, progress: float | None = None) -> float:
    """The learning rate of update ``step`` (1-based): linear warm-up to ``cfg.lr`` over
    ``warmup_steps``, then inverse square root decay, cosine decay to ``min_lr`` at
    ``max_steps``, or constant. With ``cooldown`` > 0 the rate then falls linearly to ``min_lr``
    over the last ``cooldown`` of the run; ``progress`` is the fraction of the run done
    (default ``step / max_steps``; a time-bounded run passes its share of the time budget)."""
    warmup = cfg.warmup_steps
    if step <= warmup:
        lr = cfg.lr * step / warmup
    elif cfg.schedule == "inverse_sqrt":
        lr = cfg.lr * math.sqrt(max(warmup, 1) / step)
    elif cfg.schedule == "cosine":
        done = min(1.0, (step - warmup) / max(1, cfg.max_steps - warmup))
        lr = cfg.min_lr + (cfg.lr - cfg.min_lr) * 0.5 * (1.0 + math.cos(math.pi * done))
    else:
        lr = cfg.lr
    if cfg.cooldown > 0:
        progress = step / cfg.max_steps if progress is None else progress
        left = min(1.0, max(0.0, (1.0 - progress) / cfg.cooldown))
        lr = cfg.min_lr + (max(lr, cfg.min_lr) - cfg.min_lr) * left
    return lr


def run_progress(cfg: TrainConfig, step: int, elapsed_s: float) -> float:
    """The fraction of the run done at update ``step``: by steps, or by the wall-clock budget
    ``max_minutes`` when that is nearer."""
    progress = step / cfg.max_steps
    if cfg.max_minutes is not None:
        progress = max(progress, elapsed_s / (cfg.max_minutes * 60))
    return min(1.0, progress)


FREEZABLE: dict[str, tuple[str, ...]] = {
    # Parameter name prefixes of each part of ``pretrained.freeze``, in both architectures. A
    # tied output projection is the target embedding's own tensor, so it follows the embeddings.
    "embeddings": ("src_embed.", "tgt_embed.", "positions.", "decoder_positions."),
    "encoder": ("encoder_layers.", "encoder_layer_norm.", "encoder_embedding_norm."),
    "decoder": ("decoder_layers.", "decoder_layer_norm.", "decoder_embedding_norm.",
                "layers.", "layer_norm.", "embedding_norm."),
}


def freeze(model: Model, parts: Sequence[str]) -> list[str]:
    """Stop the parameters of ``parts`` (keys of ``FREEZABLE``) from training: no gradient, and
    so no place in the optimizer. Returns the names of the frozen parameters."""
    prefixes = tuple(prefix for part in parts for prefix in FREEZABLE[part])
    tied = model.get_submodule("output_proj").weight is model.get_parameter("tgt_embed.weight")
    if "embeddings" in parts and tied:
        prefixes += ("output_proj.",)  # the tied projection's bias (Marian's final_logits_bias) too
    names = [name for name, _ in model.named_parameters(remove_duplicate=False)]
    for part in parts:
        if not any(name.startswith(FREEZABLE[part]) for name in names):
            raise MtkitError(f"pretrained.freeze: the model has no {part} (model.arch {model.cfg.arch})")
    frozen = [name for name in names if name.startswith(prefixes)]
    for name in frozen:
        model.get_parameter(name).requires_grad_(False)
    return frozen


def make_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW; weight decay applies to matrices only (not biases, norms)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    # The fused kernel (CPU and CUDA) updates all parameters in one pass each: several times
    # faster than the default multi-tensor loop.
    fused = device.type in ("cpu", "cuda")
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, fused=fused)


class WeightAverage:
    """Exponential moving average of the parameters (Polyak averaging; Marian's
    ``exponential-smoothing``). Training updates the raw weights; validation, checkpoints and
    so translation use the average, which is smoother than the last update's weights.

    ``decay`` is the weight of the old average per update; early on it is lowered to
    ``(1 + step) / (10 + step)`` so that the average is not dominated by the initial weights.
    """

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.names = [name for name, _ in model.named_parameters()]
        self.params: list[Tensor] = [p for _, p in model.named_parameters()]
        self.average = [p.detach().clone() for p in self.params]

    @torch.no_grad()
    def update(self, step: int) -> None:
        """Fold in the weights after update ``step`` (1-based)."""
        decay = min(self.decay, (1 + step) / (10 + step))
        torch._foreach_lerp_(self.average, [p.detach() for p in self.params], 1.0 - decay)

    @contextlib.contextmanager
    def applied(self):
        """Put the average into the model for the ``with`` body, then the raw weights back.
        Yields the raw weights by parameter name (what a resumed run continues from)."""
        with torch.no_grad():
            raw = [p.detach().clone() for p in self.params]
            torch._foreach_copy_(self.params, self.average)
        try:
            yield dict(zip(self.names, raw, strict=True))
        finally:
            with torch.no_grad():
                torch._foreach_copy_(self.params, raw)


def _averaged(average: WeightAverage | None) -> contextlib.AbstractContextManager:
    """``average.applied()``, or nothing (yielding None) when training keeps no average."""
    return average.applied() if average is not None else contextlib.nullcontext()


# --------------------------------------------------------------------------- state


@dataclass
class TrainResult:
    state: TrainState
    reason: str
    """Why training stopped: max_steps, max_epochs, max_minutes, patience, SIGINT or SIGTERM."""
    checkpoint: Path | None
    """The last checkpoint directory."""
    metrics: dict[str, Any] = field(default_factory=dict)
    """The last validation's metrics (loss, ppl, bleu, chrf, signatures), if any."""

    @property
    def interrupted(self) -> bool:
        return self.reason in ("SIGINT", "SIGTERM")

    def stopped(self, then: str) -> Stopped:
        """The error that ends a command whose training a signal stopped; ``then``: how to go on."""
        return Stopped(self.reason, f"stopped by {self.reason} at step {self.state.step}; checkpoint saved in "
                                    f"{self.checkpoint}; {then}")


# --------------------------------------------------------------------------- the loop


@dataclass
class Run:
    """One training run, set up by ``_start``: what the loop, validation and checkpoints work on."""

    config: Config
    exp: Experiment
    runtime: Runtime
    model: Model
    """The bare model: what validation decodes with and checkpoints save."""
    loss_fn: nn.Module
    """The model with its loss (``TranslationLoss``), wrapped for DDP and ``torch.compile``
    when those are on: what an update calls."""
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    average: WeightAverage | None
    """The weight average that validation and checkpoints see, when the run keeps one."""
    state: TrainState
    reporter: Reporter
    root: Path
    """The ``checkpoints/`` directory."""
    metrics: dict[str, Any] = field(default_factory=dict)
    """The last validation's metrics."""
    decoded_step: int | None = None
    """The step of the last validation that decoded for BLEU/chrF."""

    @property
    def cfg(self) -> TrainConfig:
        return self.config.train


def train(config: Config, *, resume: bool = False, init_from: Path | None = None) -> TrainResult:
    """Train the experiment of ``config``; see the module docstring. With a pretrained model
    (``config.pretrained``, or ``init_from``, which stands for ``pretrained.run``), fine-tune
    it: its model description (``checkpoint.finetuned_config``) and weights, ``pretrained.freeze``
    parts left as they are."""
    if init_from is not None:
        # --init-from RUN is pretrained.run: RUN's model, tokenizer and weights.
        if config.pretrained.given:
            raise MtkitError("--init-from: the config names a pretrained model already (pretrained.huggingface "
                             "or pretrained.run); give one of them")
        config = config.model_copy(deep=True)
        config.pretrained.run = init_from
    cfg = config.train
    if cfg.best_metric in ("bleu", "chrf") and not cfg.valid_bleu:
        raise MtkitError(f"train.best_metric={cfg.best_metric} needs train.valid_bleu=true "
                         "(or set train.best_metric=loss)")
    threads = torch.get_num_threads()
    try:
        run = _start(config, resume)
        with _StopSignals() as signals:
            try:
                return _loop(run, signals)
            finally:
                run.reporter.close()
    finally:
        torch.set_num_threads(threads)  # train.threads is for this run, not for the caller


def _start(config: Config, resume: bool) -> Run:
    """Everything before the first update: device, data, model (a pretrained one's when
    fine-tuning), optimizer, and the state of the run resumed (or the refusal to start a new
    run over an existing one)."""
    cfg = config.train
    config = finetuned_config(config)
    pretrained = pretrained_checkpoint(config)
    runtime = setup_runtime(cfg)
    exp = load_experiment(config)
    root = checkpoints_dir(config.experiment.dir)
    _seed_everything(config.experiment.seed)
    model = build_model(config.model, exp.tokenizers.src.vocab_size, exp.tokenizers.tgt.vocab_size,
                        exp.tokenizers.shared_vocab)
    model.to(runtime.device)
    frozen = freeze(model, config.pretrained.freeze)
    optimizer = make_optimizer(model, cfg, runtime.device)
    scaler = torch.amp.GradScaler(runtime.device.type, enabled=runtime.precision == "fp16")
    state, raw_weights = TrainState(), None
    if resume:
        state, raw_weights = resume_run(root, config, exp.tokenizers, model, optimizer, scaler, runtime)
    else:
        refuse_existing_run(root)
        # Dropout differs between ranks and from the initialisation; initial weights do not
        # differ between ranks (DDP broadcasts rank 0's).
        torch.manual_seed(dropout_seed(config.experiment.seed, runtime.rank))
        if pretrained is not None:
            init_weights_from(pretrained, model, config, exp.tokenizers, runtime.device)
    # A checkpoint's weights are the average when the run kept one; its raw weights, saved
    # beside them, are what training continues from.
    average = WeightAverage(model, cfg.ema_decay) if cfg.ema_decay > 0 else None
    if raw_weights is not None:
        with torch.no_grad():
            for name, param in model.named_parameters():
                param.copy_(raw_weights[name])
    loss_fn: nn.Module = TranslationLoss(model, cfg.label_smoothing, cfg.source_loss_weight)
    if runtime.distributed:
        ids = [runtime.device.index] if runtime.device.type == "cuda" else None
        loss_fn = nn.parallel.DistributedDataParallel(loss_fn, device_ids=ids)
    if cfg.compile:
        loss_fn = cast(nn.Module, torch.compile(loss_fn, dynamic=True))
    reporter = Reporter(config, runtime, start_step=state.step, parameters=model.num_parameters,
                        pairs=len(exp.train))
    if pretrained is not None:
        training = sum(p.numel() for p in model.parameters() if p.requires_grad)
        kept = f"{', '.join(config.pretrained.freeze)} frozen; " if frozen else ""
        reporter.say(f"fine-tuning {pretrained}: {kept}{training:,} of {model.num_parameters:,} parameters train")
    return Run(config, exp, runtime, model, loss_fn, optimizer, scaler, average, state, reporter, root)


def _loop(run: Run, signals: _StopSignals) -> TrainResult:
    """batch -> loss -> backward -> clip -> step -> log -> maybe validate/checkpoint."""
    cfg, state, runtime, reporter = run.cfg, run.state, run.runtime, run.reporter
    groups = corpus_groups(run.config, run.exp.train_groups)
    plan = EpochPlan(run.exp.train, cfg, run.config.experiment.seed, runtime, run.exp.sampling,
                     lambda epoch: epoch_rows(groups, run.config.data.temperature, run.config.experiment.seed, epoch))
    reporter.say(f"{len(plan.batches_of(state.epoch)):,} batches per epoch, {plan.padding(state.epoch):.1%} padding")
    started = time.monotonic() - state.elapsed_s
    while True:
        update_started = time.monotonic()
        batches, position = plan.next_batches(state)
        # One collective per update: its target tokens on all ranks, and whether any rank
        # was signalled or ran out of time (so that all ranks stop at the same update).
        elapsed = time.monotonic() - started
        time_up = cfg.max_minutes is not None and elapsed >= cfg.max_minutes * 60
        tokens, signalled, time_up_anywhere = runtime.all_sum(
            [sum(b.target_tokens for b in batches), float(signals.received is not None), float(time_up)])
        reason = _stop_reason(cfg, state, position, bool(signalled), bool(time_up_anywhere), signals)
        if reason is not None:
            break
        lr = learning_rate(cfg, state.step + 1, run_progress(cfg, state.step + 1, elapsed))
        loss, nll, grad_norm = train_step(run.loss_fn, run.model, run.optimizer, run.scaler, batches, tokens, lr,
                                          cfg, runtime)
        state.step += 1
        if run.average is not None:
            run.average.update(state.step)
        state.epoch, state.batch_index = position
        state.elapsed_s = time.monotonic() - started
        state.target_tokens += int(tokens)
        state.update_s += time.monotonic() - update_started
        _count_nonfinite(state, grad_norm, run.scaler, cfg, reporter)
        reporter.update(state, batches, loss, nll, tokens, lr, grad_norm)
        if state.step % cfg.valid_every == 0:
            _checkpoint(run, validate=True)
            if _patience_spent(run):
                reason = "patience"
                break
    state.elapsed_s = time.monotonic() - started
    if reason in ("SIGINT", "SIGTERM"):
        saved = _checkpoint(run, validate=False)
    else:
        if state.last_saved_step != state.step or _last_validation_undecoded(run):
            _checkpoint(run, validate=True, final=True)
        saved = (run.root / "last").resolve()
    reporter.finish(state, reason)
    return TrainResult(state=state, reason=reason, checkpoint=saved, metrics=run.metrics)


def train_step(loss_fn, model, optimizer, scaler, batches: list[Batch], tokens: float, lr: float, cfg, runtime):
    """One update over this rank's ``batches``; returns (loss sum, nll sum, grad norm).

    Each batch's summed loss is divided by ``tokens`` (target tokens of the whole update on
    all ranks) and multiplied by the world size, as DDP averages gradients over ranks.
    """
    loss_sum = nll_sum = 0.0
    for i, batch in enumerate(batches):
        batch = batch.to(runtime.device)
        last = i == len(batches) - 1
        sync = contextlib.nullcontext() if last or not runtime.distributed else loss_fn.no_sync()
        with sync:
            try:
                with runtime.autocast():
                    loss, nll = loss_fn(batch.src, batch.tgt_in, batch.tgt_out)
                scaler.scale(loss * (runtime.world / tokens)).backward()
            except torch.OutOfMemoryError:
                raise MtkitError(
                    f"out of memory on a batch of {batch.src.shape[0]} sentences "
                    f"x {max(batch.src.shape[1], batch.tgt_out.shape[1])} tokens (train.max_tokens={cfg.max_tokens}); "
                    f"lower train.max_tokens (e.g. --set train.max_tokens={cfg.max_tokens // 2}) "
                    "and raise train.update_freq to keep the batch size"
                ) from None
        loss_sum += loss.detach()
        nll_sum += nll.detach()
    scaler.unscale_(optimizer)
    grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_norm or float("inf")))
    for group in optimizer.param_groups:
        group["lr"] = lr
    if math.isfinite(grad_norm) or scaler.is_enabled():
        scaler.step(optimizer)  # the scaler itself skips a non-finite step
        scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return float(loss_sum), float(nll_sum), grad_norm


def _count_nonfinite(state: TrainState, grad_norm: float, scaler: torch.amp.GradScaler, cfg: TrainConfig,
                     reporter: Reporter) -> None:
    """Warn about a skipped update; stop with an error after ``max_nonfinite`` in a row.
    fp16's scaler skips overflowing steps by design: those count only once the scale has
    been driven below 1, which means the loss itself is not finite."""
    if math.isfinite(grad_norm):
        state.nonfinite_in_row = 0
        return
    if scaler.is_enabled() and scaler.get_scale() >= 1.0:
        return
    state.nonfinite_in_row += 1
    reporter.warn(f"step {state.step}: non-finite loss or gradient; update skipped")
    if state.nonfinite_in_row >= cfg.max_nonfinite:
        raise MtkitError(
            f"{state.nonfinite_in_row} non-finite losses in a row (train.max_nonfinite={cfg.max_nonfinite}); "
            "lower train.lr, raise train.warmup_steps or use train.precision=fp32"
        )


def _stop_reason(cfg: TrainConfig, state: TrainState, position: tuple[int, int], signalled: bool, time_up: bool,
                 signals: _StopSignals) -> str | None:
    """Why not to take the next update (whose batches start at ``position``), if at all.
    ``time_up``: ``max_minutes`` of updates (and the validations among them) have been spent;
    the final validation and checkpoint come after the budget."""
    if signalled:
        return signals.received or "SIGTERM"  # (another rank was signalled)
    if state.step >= cfg.max_steps:
        return "max_steps"
    if cfg.max_epochs is not None and position[0] > cfg.max_epochs:
        return "max_epochs"
    if time_up:
        return "max_minutes"
    return None


def corpus_groups(config: Config, groups: list[Any]) -> list[tuple[str, int, int, float]]:
    """The training corpora as ``epoch_rows`` draws them: prepared row ranges (``mtkit.data.Group``),
    directions and ``data.train.N.weight``."""
    weights = [corpus.weight for corpus in config.data.train]
    if len(groups) != len(weights):
        if any(weight != 1.0 for weight in weights):
            raise MtkitError("data.train: corpus weights need data prepared by this version of mtkit; "
                             "run `mtkit prepare -c CONFIG` again")
        weights = [1.0] * len(groups)
    return [(group.direction, group.start, group.end, weight) for group, weight in zip(groups, weights, strict=True)]


class EpochPlan:
    """The seeded batch order of each epoch and each rank's share of an update's batches:
    update k of an epoch uses batches ``[k*g, (k+1)*g)`` with ``g = world * update_freq``;
    rank r takes every world-th of them from r. A last incomplete group is dropped. With
    ``sampling``, each epoch has its own segmentation of the corpus, and so its own batches;
    ``rows(epoch)`` gives an epoch's pairs when they are drawn (``epoch_rows``)."""

    def __init__(self, corpus: TokenizedCorpus, cfg: TrainConfig, seed: int, runtime: Runtime,
                 sampling: SubwordSampling | None = None,
                 rows: Callable[[int], np.ndarray | None] = lambda epoch: None):
        self.corpus, self.cfg, self.seed, self.runtime, self.sampling = corpus, cfg, seed, runtime, sampling
        self.rows = rows
        self.group = runtime.world * cfg.update_freq
        self.epoch, self.batches = -1, list[np.ndarray]()

    def batches_of(self, epoch: int) -> list[np.ndarray]:
        if epoch != self.epoch:
            if self.sampling is not None:
                self.corpus = self.sampling.corpus(epoch)
            self.epoch, self.batches = epoch, epoch_batches(self.corpus, self.cfg.max_tokens, self.seed, epoch,
                                                            self.rows(epoch))
            if len(self.batches) < self.group:
                raise MtkitError(
                    f"an epoch has {len(self.batches)} batches, fewer than one update needs "
                    f"({self.group} = world size x train.update_freq); lower train.max_tokens or update_freq"
                )
        return self.batches

    def next_batches(self, state: TrainState) -> tuple[list[Batch], tuple[int, int]]:
        """This rank's batches of the update after ``state``, and the (epoch, batch index)
        the data position moves to once that update is taken."""
        epoch, start = state.epoch, state.batch_index
        if start + self.group > len(self.batches_of(epoch)):
            epoch, start = epoch + 1, 0
        group = self.batches_of(epoch)[start : start + self.group]
        batches = [self.corpus.batch(ids) for ids in group[self.runtime.rank :: self.runtime.world]]
        return batches, (epoch, start + self.group)

    def padding(self, epoch: int) -> float:
        return padding_ratio(self.corpus, self.batches_of(epoch))


# --------------------------------------------------------------------------- validation and checkpoints


def _checkpoint(run: Run, validate: bool, final: bool = False) -> Path:
    """Validate (if ``validate``) and save a checkpoint, with the weight average in the model
    when the run keeps one. Every rank must call this; returns the checkpoint directory.
    ``final``: the run's last validation, which decodes whatever ``valid_bleu_from`` says."""
    with _averaged(run.average) as raw_weights:
        metrics, improved = _validate(run, final) if validate else ({}, False)
        return _save(run, metrics, improved, raw_weights)


def _validate(run: Run, final: bool) -> tuple[dict[str, Any], bool]:
    """Validate on rank 0 and update the best metric and the count of validations without a
    gain; returns the metrics and whether they are the best so far. A validation that does
    not decode (``train.valid_bleu_from``) neither improves nor spends patience when the best
    metric needs decoding."""
    cfg, state = run.cfg, run.state
    if not run.runtime.main:
        return {}, False
    if run.exp.valid is None:
        return {}, True  # without validation data the newest checkpoint is the best we know
    started = time.monotonic()
    metrics: dict[str, Any] = {**validation_loss(run.model, run.exp.valid, cfg.max_tokens, run.runtime)}
    decode = cfg.valid_bleu and (final or run_progress(cfg, state.step, state.elapsed_s) >= cfg.valid_bleu_from)
    if decode:
        metrics.update(validation_bleu(run.config, run.exp, run.model, run.runtime))
        run.decoded_step = state.step
    metrics["valid_time_s"] = time.monotonic() - started
    run.metrics = metrics
    if cfg.best_metric not in metrics:
        run.reporter.validated(state, metrics, None)
        return metrics, False
    value = metrics[cfg.best_metric]
    improved = state.best_metric is None or better(cfg.best_metric, value, state.best_metric)
    if improved:
        state.best_metric, state.best_step, state.bad_validations = value, state.step, 0
    else:
        state.bad_validations += 1
    run.reporter.validated(state, metrics, improved)
    return metrics, improved


def _last_validation_undecoded(run: Run) -> bool:
    """Whether the checkpoint of the current step was validated without decoding
    (``train.valid_bleu_from``), as rank 0 knows it; every rank must call this."""
    runtime, cfg = run.runtime, run.cfg
    undecoded = runtime.main and cfg.valid_bleu and run.exp.valid is not None and run.decoded_step != run.state.step
    return bool(runtime.all_sum([float(undecoded)])[0])


def better(metric: str, value: float, than: float) -> bool:
    """Whether ``value`` of ``train.best_metric`` ``metric`` beats ``than`` (loss: lower)."""
    return value < than if metric == "loss" else value > than


def _patience_spent(run: Run) -> bool:
    """Early stopping: ``train.patience`` validations in a row without a gain. Only rank 0
    validates; every rank must call this, and all stop together."""
    patience = run.cfg.patience
    spent = patience is not None and run.state.bad_validations >= patience
    return bool(run.runtime.all_sum([float(spent)])[0])


def _save(run: Run, metrics: dict[str, Any], best: bool, raw_weights: dict[str, Tensor] | None) -> Path:
    """Every rank contributes its RNG state; rank 0 writes. All ranks must call this.
    ``raw_weights``: the weights training continues from, when the model holds their average."""
    runtime, state = run.runtime, run.state
    rng = rng_state()
    if runtime.distributed:
        gathered: list[Any] = [None] * runtime.world
        dist.all_gather_object(gathered, rng)
    else:
        gathered = [rng]
    state.last_saved_step = state.step
    path = run.root / "last"
    if runtime.main:
        path = save_checkpoint(
            run.root, step=state.step, epoch=state.epoch, model=run.model, config=run.config,
            tokenizers=run.exp.tokenizers, metrics=metrics, best=best, keep_last=run.cfg.keep_last,
            trainer_state=pack_trainer_state(state, run.optimizer, run.scaler, gathered, raw_weights),
        )
    if runtime.distributed:
        dist.barrier()
    return path


# --------------------------------------------------------------------------- randomness


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


# --------------------------------------------------------------------------- signals


class _StopSignals:
    """SIGINT/SIGTERM ask the loop to stop after the current update and save; a second
    SIGINT aborts at once (KeyboardInterrupt)."""

    def __init__(self) -> None:
        self.received: str | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: object) -> None:
        name = signal.Signals(signum).name
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = name
        print(f"\nmtkit: {name} received; saving a checkpoint after this update (Ctrl-C again aborts)",
              file=sys.stderr, flush=True)

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
