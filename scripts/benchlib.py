"""What the benchmark scripts share: paths, the mtkit command, clocks, resident memory, the
Hugging Face Marian peer, and printing a result.

The scripts run as ``python scripts/NAME.py``: Python puts ``scripts/`` first on ``sys.path``,
so ``import benchlib`` finds this file, and mtkit is the installed package
(``pip install -e '.[bench]'``, which also brings psutil and the peers).
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from mtkit.batching import Batch
from mtkit.config import ModelConfig
from mtkit.vocab import EOS_ID, PAD_ID

for _module in ("psutil", "transformers"):  # the bench extra: one line, not a traceback
    if importlib.util.find_spec(_module) is None:
        sys.exit(f"error: the benchmark scripts need {_module}, from the bench extra: pip install -e '.[bench]'")
import psutil  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
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
    src = batch.src
    logits = model(input_ids=src, attention_mask=src != PAD_ID, decoder_input_ids=batch.tgt_in).logits
    return F.cross_entropy(logits.flatten(0, 1), batch.tgt_out.flatten(), ignore_index=PAD_ID,
                           label_smoothing=smoothing, reduction="sum")


def source_tensor(batch: list[list[int]]) -> Tensor:
    """``(B, S)`` source ids followed by EOS and right-padded, as mtkit feeds its encoder."""
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
