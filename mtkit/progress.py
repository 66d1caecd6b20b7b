"""Progress of a training run for people and tools: a redrawn line (terminal) or a plain line
per ``log_every`` updates on stderr, TensorBoard scalars and ``EXP/train_log.jsonl`` (one JSON
row per log interval, ``"type": "train"``, and per validation, ``"type": "valid"``).
Only rank 0 writes; every rank takes part in the interval's sums.
"""

from __future__ import annotations

import json
import math
import sys
import time
from typing import TYPE_CHECKING, Any

from mtkit.errors import MtkitError
from mtkit.fileio import atomic_write_text

if TYPE_CHECKING:
    from mtkit.batching import Batch
    from mtkit.config import Config
    from mtkit.model import Transformer
    from mtkit.train import Experiment, Runtime, TrainState


class Reporter:
    """Progress for people (stderr), TensorBoard scalars and ``train_log.jsonl`` (rank 0).

    On a terminal a single line is redrawn with loss, lr, tokens/s and ETA; otherwise one
    plain line per ``log_every`` updates.
    """

    def __init__(self, config: Config, runtime: Runtime, exp: Experiment, model: Transformer, start_step: int):
        self.cfg, self.runtime = config.train, runtime
        self.active = runtime.main
        self.stop_early = False
        self.last_valid: dict[str, Any] = {}
        self.tty = sys.stderr.isatty()
        self._reset()
        self._last_draw = 0.0
        self._writer = None
        self._jsonl = None
        if not self.active:
            return
        exp_dir = config.experiment.dir
        log = exp_dir / "train_log.jsonl"
        try:
            exp_dir.mkdir(parents=True, exist_ok=True)
            if start_step and log.exists():
                # A resumed run repeats the steps after its checkpoint: drop their old rows.
                rows = [line for line in log.read_text(encoding="utf-8").splitlines(keepends=True)
                        if _step_of(line) <= start_step]
                atomic_write_text(log, "".join(rows))
            self._jsonl = open(log, "a", encoding="utf-8")  # noqa: SIM115
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=str(exp_dir / "tensorboard"),
                                         purge_step=start_step + 1 if start_step else None)
        except OSError as err:
            raise MtkitError(f"{err.filename or log}: cannot write: {err.strerror}") from None
        self.say(
            f"training {model.num_parameters / 1e6:.2f}M parameters on {runtime.device} ({runtime.precision}"
            f"{f', {runtime.world} processes' if runtime.distributed else ''}); "
            f"{len(exp.train):,} pairs, max_tokens {self.cfg.max_tokens}, update_freq {self.cfg.update_freq}"
        )

    def _reset(self) -> None:
        self._since = time.monotonic()
        self._acc = {"loss": 0.0, "nll": 0.0, "tokens": 0.0, "real": 0.0, "padded": 0.0, "steps": 0.0, "gnorm": 0.0}

    def say(self, text: str) -> None:
        if self.active:
            print(("\r\x1b[K" if self.tty else "") + text, file=sys.stderr, flush=True)

    def warn(self, text: str) -> None:
        self.say(f"warning: {text}")

    def update(self, state: TrainState, batches: list[Batch], loss, nll, tokens, lr, grad_norm) -> None:
        acc = self._acc
        acc["loss"] += loss
        acc["nll"] += nll
        acc["tokens"] += tokens  # already summed over ranks
        acc["real"] += sum(b.real_tokens for b in batches)
        acc["padded"] += sum(b.padded_tokens for b in batches)
        acc["steps"] += 1
        acc["gnorm"] += grad_norm if math.isfinite(grad_norm) else 0.0
        if state.step % self.cfg.log_every == 0:
            self._log(state, lr)
        elif self.tty and self.active and time.monotonic() - self._last_draw > 0.5:
            self._draw(state, lr, final=False)

    def _rates(self, state: TrainState, lr: float, all_ranks: bool) -> dict[str, Any]:
        """The interval's averages; ``all_ranks`` sums over ranks (every rank must call then)."""
        acc = self._acc
        sums = [acc["loss"], acc["nll"], acc["real"], acc["padded"]]
        loss_sum, nll_sum, real, padded = self.runtime.all_sum(sums) if all_ranks else sums
        seconds = max(time.monotonic() - self._since, 1e-9)
        tokens = max(acc["tokens"], 1.0)
        return {
            "type": "train",
            "step": state.step,
            "epoch": state.epoch,
            "loss": loss_sum / tokens,
            "nll": nll_sum / tokens,
            "ppl": math.exp(min(nll_sum / tokens, 100.0)),
            "lr": lr,
            "grad_norm": acc["gnorm"] / max(acc["steps"], 1),
            "tgt_tok_per_s": acc["tokens"] / seconds,
            "tok_per_s": real / seconds,
            "padding": 1.0 - real / max(padded, 1.0),
            "elapsed_s": state.elapsed_s,
            "time": time.time(),
        }

    def _eta(self, state: TrainState, seconds_per_step: float) -> float:
        remaining = (self.cfg.max_steps - state.step) * seconds_per_step
        if self.cfg.max_minutes is not None:
            remaining = min(remaining, self.cfg.max_minutes * 60 - state.elapsed_s)
        return max(remaining, 0.0)

    def _line(self, row: dict[str, Any], state: TrainState) -> str:
        per_step = (time.monotonic() - self._since) / max(self._acc["steps"], 1)
        eta = self._eta(state, per_step)
        return (
            f"step {row['step']:>7,} | epoch {row['epoch']:>3} | loss {row['loss']:.3f} | ppl {row['ppl']:8.2f} | "
            f"lr {row['lr']:.2e} | gnorm {row['grad_norm']:.2f} | {row['tgt_tok_per_s']:,.0f} tgt tok/s | "
            f"pad {row['padding']:.1%} | eta {_clock(eta)}"
        )

    def _draw(self, state: TrainState, lr: float, final: bool) -> None:
        row = self._rates(state, lr, all_ranks=False)
        self._last_draw = time.monotonic()
        print("\r\x1b[K" + self._line(row, state), end="\n" if final else "", file=sys.stderr, flush=True)

    def _log(self, state: TrainState, lr: float) -> None:
        row = self._rates(state, lr, all_ranks=True)
        if self.active:
            self.say(self._line(row, state))
            self._write(row)
            for key in ("loss", "ppl", "lr", "grad_norm", "tgt_tok_per_s", "padding"):
                self._writer.add_scalar(f"train/{key}", row[key], state.step)
        self._reset()

    def validated(self, state: TrainState, metrics: dict[str, Any], improved: bool) -> None:
        self.last_valid = metrics
        patience = self.cfg.patience
        self.stop_early = patience is not None and state.bad_validations >= patience
        parts = [f"valid step {state.step:,} | loss {metrics['loss']:.3f} | ppl {metrics['ppl']:.2f}"]
        if "bleu" in metrics:
            parts.append(f"BLEU {metrics['bleu']:.2f} | chrF {metrics['chrf']:.2f} ({metrics['sentences']} sentences)")
        gain = "new best" if improved else f"no gain for {state.bad_validations}"
        parts.append(f"{metrics['valid_time_s']:.1f}s | {gain}")
        self.say(" | ".join(parts))
        if "bleu_signature" in metrics:
            self.say(f"  BLEU signature: {metrics['bleu_signature']}")
        self._write({"type": "valid", "step": state.step, "epoch": state.epoch, **metrics,
                     "best": improved, "elapsed_s": state.elapsed_s, "time": time.time()})
        for key in ("loss", "ppl", "bleu", "chrf"):
            if key in metrics:
                self._writer.add_scalar(f"valid/{key}", metrics[key], state.step)
        self._writer.flush()
        self._reset()  # validation time is not training throughput

    def _write(self, row: dict[str, Any]) -> None:
        self._jsonl.write(json.dumps(row) + "\n")
        self._jsonl.flush()

    def finish(self, state: TrainState, reason: str) -> None:
        if self.active:
            best = f"; best {self.cfg.best_metric} {state.best_metric:.3f} at step {state.best_step:,}" if (
                state.best_metric is not None) else ""
            self.say(f"stopped at step {state.step:,} (epoch {state.epoch}): {reason}{best}")

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        if self._jsonl is not None:
            self._jsonl.close()


def _step_of(line: str) -> float:
    """The step of a train_log.jsonl line (infinity for a damaged line, so it is dropped)."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return math.inf


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
