"""What the benchmark scripts share: paths, the mtkit command, clocks, memory sampling, random
models, the Hugging Face Marian peer, and printing a result.

The benchmarks run as ``python scripts/bench/NAME.py``: Python puts ``scripts/bench/`` first on
``sys.path``, so ``import benchlib`` finds this file (the experiments in ``scripts/experiments/``
put this folder there themselves), and mtkit is the installed package
(``pip install -e '.[bench]'``, which also brings psutil and the peers). torch and mtkit's model
are imported where they are used, so that a benchmark that only runs the CLI stays light.
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mtkit.vocab import EOS_ID, PAD_ID

if TYPE_CHECKING:
    from torch import Tensor

    from mtkit.batching import Batch
    from mtkit.config import Config, ModelConfig
    from mtkit.models.encoder_decoder import Transformer
    from mtkit.tokenizer import Tokenizers

for _module in ("psutil", "transformers"):  # the bench extra: one line, not a traceback
    if importlib.util.find_spec(_module) is None:
        sys.exit(f"error: the benchmark scripts need {_module}, from the bench extra: pip install -e '.[bench]'")
import psutil  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
"""The repository: recipes are named relative to it, and runs go under ``ROOT/runs``."""
MULTI30K = ROOT.parent / "shared" / "data" / "multi30k"
MTKIT = [sys.executable, "-m", "mtkit"]
"""The mtkit CLI in a fresh interpreter of this environment."""


def sets(overrides: dict[str, Any]) -> list[str]:
    """``--set key=value`` arguments of the mtkit CLI for ``overrides``."""
    return [arg for key, value in overrides.items() for arg in ("--set", f"{key}={value}")]


def single_thread_env() -> dict[str, str]:
    """This environment with one OpenMP/MKL thread (for tiny models in a subprocess)."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


# --------------------------------------------------------------------------- time


class Clocks:
    """Wall-clock and CPU seconds (this process's CPU time: less sensitive to other load on
    the machine) summed per name over ``with clocks(name):`` blocks."""

    def __init__(self) -> None:
        self.wall: dict[str, float] = {}
        self.cpu: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        wall, cpu = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            self.wall[name] = self.wall.get(name, 0.0) + time.perf_counter() - wall
            self.cpu[name] = self.cpu.get(name, 0.0) + time.process_time() - cpu


# --------------------------------------------------------------------------- memory


def rss_mib(process: psutil.Process) -> float:
    """Resident memory of ``process`` and its children, MiB (0 once it has exited)."""
    try:
        procs = [process, *process.children(recursive=True)]
        return sum(p.memory_info().rss for p in procs) / 2**20
    except psutil.Error:
        return 0.0


class RssSampler:
    """The resident memory of process ``pid`` and its children (``rss_mib``), sampled by a
    thread every ``every`` seconds while the process lives: ``samples`` holds (monotonic
    seconds, MiB, ``progress()``), where ``progress`` says how far the process has come
    (lines written, steps made; 0 by default)."""

    def __init__(self, pid: int, every: float = 0.25, progress: Callable[[], int] = lambda: 0):
        self.process = psutil.Process(pid)
        self.every = every
        self.progress = progress
        self.samples: list[tuple[float, float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def _run(self) -> None:
        while True:
            rss = rss_mib(self.process)
            if rss:
                self.samples.append((time.monotonic(), rss, self.progress()))
            if self._stop.wait(self.every):
                return

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def peak(self) -> float:
        """The highest sample, MiB (nan without samples)."""
        return max((rss for _, rss, _ in self.samples), default=float("nan"))

    def window_peak(self, start: float, end: float) -> float:
        """The highest sample between the monotonic times ``start`` and ``end``, MiB (nan without one)."""
        return max((rss for t, rss, _ in self.samples if start <= t <= end), default=float("nan"))


class PeakMemory:
    """Peak resident memory of this process, per system: a thread samples every 10 ms and
    charges each sample to the system named in ``current`` (None: to nobody)."""

    def __init__(self) -> None:
        self.process = psutil.Process()
        self.current: str | None = None
        self.peak: dict[str, int] = {}
        self.start: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def enter(self, system: str) -> None:
        """Charge what follows to ``system`` (its first call records its starting RSS)."""
        rss = self.process.memory_info().rss
        self.start.setdefault(system, rss)
        self.peak[system] = max(self.peak.get(system, 0), rss)
        self.current = system

    def _sample(self) -> None:
        while not self._stop.wait(0.01):
            system = self.current
            if system is not None:
                self.peak[system] = max(self.peak[system], self.process.memory_info().rss)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


# --------------------------------------------------------------------------- models

SYLLABLES = ["ka", "to", "ri", "mu", "se", "na", "lo", "pe", "shi", "dra", "fen", "gul", "bor", "wix", "quo", "zat"]


def made_up_words(rng: random.Random, n: int) -> list[str]:
    """``n`` words of one to three made-up syllables: text for a tokenizer and a model where no
    corpus is needed."""
    return ["".join(rng.choice(SYLLABLES) for _ in range(rng.randint(1, 3))) for _ in range(n)]


def random_model(cfg: ModelConfig, tokenizers: Tokenizers) -> Transformer:
    """An untrained ``Transformer`` of ``cfg`` on ``tokenizers``' vocabularies, the same weights
    every time (seed 0)."""
    import torch

    from mtkit.models.encoder_decoder import Transformer

    torch.manual_seed(0)
    return Transformer(cfg, tokenizers.src.vocab_size, tokenizers.tgt.vocab_size, tokenizers.joint)


def save_random_checkpoint(config: Config, tokenizers: Tokenizers, run: Path) -> Path:
    """``random_model`` of ``config.model`` saved as the one checkpoint (step 1, the best) of
    the run directory ``run``; returns ``run``."""
    from mtkit.checkpoint import save_checkpoint

    save_checkpoint(run / "checkpoints", step=1, epoch=0, model=random_model(config.model, tokenizers),
                    config=config, tokenizers=tokenizers, metrics={}, trainer_state={}, best=True, keep_last=1)
    return run


def train_with_cli(config: Path, settings: list[str], timeout: float | None = None) -> None:
    """The recipe ``config`` trained through the mtkit CLI (tokenizer, prepare, train), with
    every ``KEY=VALUE`` of ``settings`` set at each stage (``experiment.dir`` says where)."""
    args = [f"--set={setting}" for setting in settings]
    for stage in (["tokenizer", "train"], ["prepare"], ["train"]):
        subprocess.run([*MTKIT, *stage, "-c", str(config), *args], check=True, cwd=ROOT, timeout=timeout)


# --------------------------------------------------------------------------- the Marian peer


def marian_peer(cfg: ModelConfig, src_vocab_size: int, tgt_vocab_size: int, joint_vocab: bool = True) -> Any:
    """A randomly initialised ``MarianMTModel`` with the architecture of
    ``Transformer(cfg, src_vocab_size, tgt_vocab_size, joint_vocab)`` (``mtkit.export``'s
    builder), in training mode."""
    from transformers.utils import logging

    from mtkit.export import marian_model

    logging.set_verbosity_error()
    return marian_model(cfg, src_vocab_size, tgt_vocab_size, joint_vocab).train()


def marian_loss(model: Any, batch: Batch, smoothing: float) -> Tensor:
    """The peer trained the way its users do: the model's logits at every position, then
    label-smoothed cross-entropy ignoring padding, summed over the target tokens."""
    import torch.nn.functional as F

    src = batch.src
    logits = model(input_ids=src, attention_mask=src != PAD_ID, decoder_input_ids=batch.tgt_in).logits
    return F.cross_entropy(logits.flatten(0, 1), batch.tgt_out.flatten(), ignore_index=PAD_ID,
                           label_smoothing=smoothing, reduction="sum")


def source_tensor(batch: list[list[int]]) -> Tensor:
    """``(B, S)`` source ids followed by EOS and right-padded, as mtkit feeds its encoder."""
    import torch

    src = torch.full((len(batch), max(map(len, batch)) + 1), PAD_ID, dtype=torch.long)
    for row, ids in enumerate(batch):
        src[row, : len(ids) + 1] = torch.tensor([*ids, EOS_ID])
    return src


# --------------------------------------------------------------------------- results


def print_result(result: dict[str, Any], as_json: bool, indent: int | None = None) -> None:
    """``result`` as one JSON object, or one aligned ``key  value`` line per entry."""
    if as_json:
        print(json.dumps(result, indent=indent))
        return
    width = max(map(len, result), default=0)
    for key, value in result.items():
        print(f"{key:>{width}}  {value}")
