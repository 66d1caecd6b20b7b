"""Progress for people and tools.

``Reporter``: a training run's progress: a line redrawn in place (on a terminal, with rich) and
a plain line per ``log_every`` updates on stderr, TensorBoard scalars and ``EXP/train_log.jsonl``
(one JSON row per log interval, ``"type": "train"``, and per validation, ``"type": "valid"``).
Only rank 0 writes; every rank takes part in the interval's sums. It reports; the trainer
decides (when to validate, when to stop).

``LineProgress``: ``translated N lines (X lines/s)`` redrawn on a terminal.

Where stderr is not a terminal (logs, pipes, tests) nothing is redrawn: the plain lines alone.
"""

from __future__ import annotations

import json
import math
import sys
import time
from typing import IO, TYPE_CHECKING, Any

from mtkit.errors import MtkitError
from mtkit.fileio import atomic_write_text
from mtkit.rundir import ExperimentDir

if TYPE_CHECKING:
    from rich.console import Console
    from rich.live import Live
    from torch.utils.tensorboard import SummaryWriter

    from mtkit.batching import Batch
    from mtkit.checkpoint import TrainState
    from mtkit.config import Config
    from mtkit.runtime import Runtime


class _LiveLine:
    """One line at the bottom of a terminal's stderr, redrawn in place (rich), with permanent
    lines printed above it."""

    def __init__(self) -> None:
        from rich.console import Console
        from rich.live import Live

        self.console: Console = Console(stderr=True, highlight=False)
        # No auto refresh: the line changes when its owner says so, with no thread.
        self.live: Live = Live(console=self.console, auto_refresh=False, transient=True,
                               redirect_stdout=False, redirect_stderr=False)
        self.started = False

    def show(self, text: str) -> None:
        from rich.text import Text

        if not self.started:
            self.live.start()
            self.started = True
        # One line always: cut at the terminal's width rather than wrapped.
        self.live.update(Text(text, no_wrap=True, overflow="ellipsis"), refresh=True)

    def print(self, text: str) -> None:
        """A permanent line above the redrawn one, which is blank until its next ``show``."""
        from rich.text import Text

        if self.started:
            self.live.update(Text(""), refresh=True)
        self.console.print(Text(text), soft_wrap=True)  # soft_wrap: the terminal wraps, as for print()

    def stop(self) -> None:
        if self.started:
            self.live.stop()
            self.started = False


class Reporter:
    """Progress for people (stderr), TensorBoard scalars and ``train_log.jsonl`` (rank 0).

    On a terminal a single line is redrawn with loss, lr, tokens/s and ETA; otherwise one
    plain line per ``log_every`` updates. ``parameters`` and ``pairs`` (the model's size and
    the training pairs) go into the first line.
    """

    def __init__(self, config: Config, runtime: Runtime, start_step: int, parameters: int, pairs: int):
        self.cfg, self.runtime = config.train, runtime
        self.active = runtime.main
        self.tty = sys.stderr.isatty()
        self._reset()
        self._last_draw = 0.0
        self._live: _LiveLine | None = _LiveLine() if self.tty and self.active else None
        self._writer: SummaryWriter | None = None
        self._jsonl: IO[str] | None = None
        if not self.active:
            return
        layout = ExperimentDir(config.experiment.dir)
        exp_dir, log = layout.root, layout.train_log
        try:
            exp_dir.mkdir(parents=True, exist_ok=True)
            if start_step and log.exists():
                # A resumed run repeats the steps after its checkpoint: drop their old rows.
                rows = [line for line in log.read_text(encoding="utf-8").splitlines(keepends=True)
                        if _step_of(line) <= start_step]
                atomic_write_text(log, "".join(rows))
            self._jsonl = open(log, "a", encoding="utf-8")  # noqa: SIM115
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=str(layout.tensorboard),
                                         purge_step=start_step + 1 if start_step else None)
        except OSError as err:
            raise MtkitError(f"{err.filename or log}: cannot write: {err.strerror}") from None
        self.say(
            f"training {parameters / 1e6:.2f}M parameters on {runtime.device} ({runtime.precision}"
            f"{f', {runtime.world} processes' if runtime.distributed else ''}); "
            f"{pairs:,} pairs, max_tokens {self.cfg.max_tokens}, update_freq {self.cfg.update_freq}"
        )

    def _reset(self) -> None:
        self._since = time.monotonic()
        self._acc = {"loss": 0.0, "nll": 0.0, "tokens": 0.0, "real": 0.0, "padded": 0.0, "steps": 0.0, "gnorm": 0.0}

    def say(self, text: str) -> None:
        """A permanent line (above the redrawn one on a terminal)."""
        if not self.active:
            return
        if self._live is not None:
            self._live.print(text)
        else:
            print(text, file=sys.stderr, flush=True)

    def warn(self, text: str) -> None:
        self.say(f"warning: {text}")

    def update(self, state: TrainState, batches: list[Batch], loss: float, nll: float, tokens: float, lr: float,
               grad_norm: float) -> None:
        """Count an update into the interval; log at every ``log_every``-th update."""
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
        elif self._live is not None and time.monotonic() - self._last_draw > 0.5:
            self._draw(state, lr)

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

    def _draw(self, state: TrainState, lr: float) -> None:
        assert self._live is not None
        row = self._rates(state, lr, all_ranks=False)
        self._last_draw = time.monotonic()
        self._live.show(self._line(row, state))

    def _log(self, state: TrainState, lr: float) -> None:
        row = self._rates(state, lr, all_ranks=True)
        if self.active:
            self.say(self._line(row, state))
            self._write(row)
            self._scalars("train", row, ("loss", "ppl", "lr", "grad_norm", "tgt_tok_per_s", "padding"), state.step)
        self._reset()

    def validated(self, state: TrainState, metrics: dict[str, Any], improved: bool | None) -> None:
        """Report a validation (rank 0): ``improved`` says whether it is the best so far (None:
        it did not decode, and the best metric needs decoding)."""
        parts = [f"valid step {state.step:,} | loss {metrics['loss']:.3f} | ppl {metrics['ppl']:.2f}"]
        if "bleu" in metrics:
            parts.append(f"BLEU {metrics['bleu']:.2f} | chrF {metrics['chrf']:.2f} ({metrics['sentences']} sentences)")
        gain = ("loss only" if improved is None else "new best" if improved
                else f"no gain for {state.bad_validations}")
        parts.append(f"{metrics['valid_time_s']:.1f}s | {gain}")
        self.say(" | ".join(parts))
        for direction, scores in metrics.get("directions", {}).items():
            self.say(f"  {direction}: BLEU {scores['bleu']:.2f} | chrF {scores['chrf']:.2f} "
                     f"({scores['sentences']} sentences)")
            self._scalars("valid", {f"bleu_{direction}": scores["bleu"], f"chrf_{direction}": scores["chrf"]},
                          (f"bleu_{direction}", f"chrf_{direction}"), state.step)
        if "bleu_signature" in metrics:
            self.say(f"  BLEU signature: {metrics['bleu_signature']}")
        self._write({"type": "valid", "step": state.step, "epoch": state.epoch, **metrics,
                     "best": improved, "elapsed_s": state.elapsed_s, "time": time.time()})
        self._scalars("valid", metrics, ("loss", "ppl", "bleu", "chrf"), state.step)
        if self._writer is not None:
            self._writer.flush()
        self._reset()  # validation time is not training throughput

    def _write(self, row: dict[str, Any]) -> None:
        if self._jsonl is not None:
            self._jsonl.write(json.dumps(row) + "\n")
            self._jsonl.flush()

    def _scalars(self, group: str, values: dict[str, Any], keys: tuple[str, ...], step: int) -> None:
        if self._writer is not None:
            for key in keys:
                if key in values:
                    self._writer.add_scalar(f"{group}/{key}", values[key], step)

    def finish(self, state: TrainState, reason: str) -> None:
        if self.active:
            best = f"; best {self.cfg.best_metric} {state.best_metric:.3f} at step {state.best_step:,}" if (
                state.best_metric is not None) else ""
            self.say(f"stopped at step {state.step:,} (epoch {state.epoch}): {reason}{best}")

    def close(self) -> None:
        if self._live is not None:
            self._live.stop()
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


class LineProgress:
    """``translated N lines (X lines/s)`` redrawn in place on a terminal's stderr; nothing at
    all when stderr is not a terminal. ``update(count)`` after each chunk, ``done(count)`` once
    at the end (the line stays); ``close()`` (or leaving a ``with`` block) removes the line
    when the command ends early."""

    def __init__(self) -> None:
        self.start = time.monotonic()
        self._live: _LiveLine | None = _LiveLine() if sys.stderr.isatty() else None

    def _text(self, count: int) -> str:
        rate = count / max(time.monotonic() - self.start, 1e-9)
        return f"translated {count} lines ({rate:.1f} lines/s)"

    def update(self, count: int) -> None:
        if self._live is not None:
            self._live.show(self._text(count))

    def done(self, count: int) -> None:
        if self._live is not None:
            self._live.stop()
            self._live.print(self._text(count))
            self._live = None

    def close(self) -> None:
        if self._live is not None:
            self._live.stop()
            self._live = None

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
