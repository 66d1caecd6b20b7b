"""The PyTorch engine: mtkit's own search (``mtkit.search``) on the model, the reference
that every other engine is checked against, and the engine for GPUs and for models that
CTranslate2 cannot run.

``TorchBackend.search`` takes a list of batches of subword ids and returns every sentence's
n-best hypotheses, as ``mtkit.engines.ctranslate2.CT2Translator.search`` does, so
``mtkit.translate.Translator`` drives either.

Two ways to go faster than one process of float32 (``mtkit.engines.open_engine`` picks them):

- **Precision.** The model's weights in ``bfloat16`` (or ``float16``) on a CPU that multiplies
  bf16 in hardware or on a GPU; the log-probabilities that the search compares stay float32.
  ``decode.compute_type: auto`` keeps it only where it holds validation BLEU and is faster
  (as for CTranslate2's int8; ``mtkit.engines.precision``).
- **Worker processes.** On a CPU, ``workers`` processes of one torch thread each search
  different batches at once: on a few cores a beam-search step is mostly small operations
  that threads within one batch cannot share out, so concurrent batches use the cores better
  (CTranslate2's ``inter_threads``, Marian's ``--cpu-threads``). The workers are forked from
  this process once it has the model (Linux only: elsewhere, and for sampling, whose seeded
  stream is one sequence, the search stays in this process), at the first call with at least
  two batches, and live until ``close()``. Results do not depend on the number of workers.
"""

from __future__ import annotations

import multiprocessing
import signal
import sys
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

import torch

from mtkit.config import DecodeConfig
from mtkit.errors import MtkitError
from mtkit.models import Model
from mtkit.search import Hypothesis, beam_search, sample
from mtkit.vocab import EOS_ID, PAD_ID

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
"""``decode.compute_type`` values the PyTorch backend runs (the weights' dtype)."""


class TorchBackend:
    """mtkit's search on ``model`` (in eval mode, already in the dtype it should run in) on
    ``device``. generator: seeds sampling. workers: processes searching batches at once on a
    CPU (1: this process only)."""

    def __init__(self, model: Model, device: str | torch.device = "cpu", *, workers: int = 1,
                 generator: torch.Generator | None = None):
        self.model, self.device = model, torch.device(device)
        self.generator = generator if generator is not None else torch.Generator(device=self.device).manual_seed(1)
        forkable = sys.platform.startswith("linux") and self.device.type == "cpu"
        self.workers = workers if forkable else 1
        self._pool: Any = None

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def search(
        self,
        batches: list[list[list[int]]],
        prefixes: list[list[list[int]]] | None,
        decode: DecodeConfig,
        forced: int = 0,
    ) -> list[list[Hypothesis]]:
        """Per sentence of ``batches`` (each a list of non-empty source id lists, no EOS), its
        n-best hypotheses, best first; the sentences in order, batch after batch. ``prefixes``:
        per batch, per sentence, target ids the output starts with ([] for none), of which the
        first ``forced`` score 0 (a language token the model is told)."""
        jobs = [(batch, prefixes[number] if prefixes is not None else None, forced)
                for number, batch in enumerate(batches)]
        if self.workers > 1 and len(jobs) > 1 and not decode.sampling:
            # The largest batches first, so that no worker is left with a long one at the end.
            order = sorted(range(len(jobs)), key=lambda i: -sum(len(ids) + 1 for ids in jobs[i][0]))
            found: list[list[list[Hypothesis]]] = [[] for _ in jobs]
            try:
                for i, result in zip(order, self._start().map(_search_in_worker, [(*jobs[i][:2], decode, jobs[i][2])
                                                                                 for i in order]),
                                     strict=True):
                    found[i] = result
            except BrokenProcessPool:
                self.close()
                raise MtkitError("a PyTorch worker process died (killed, or out of memory?); "
                                 "translate with --threads 1 to search in one process") from None
        else:
            found = [self.search_batch(batch, prefix, decode, forced) for batch, prefix, forced in jobs]
        return [nbest for batch in found for nbest in batch]

    def search_batch(self, src_ids: list[list[int]], prefix_ids: list[list[int]] | None,
                     decode: DecodeConfig, forced: int = 0) -> list[list[Hypothesis]]:
        """One batch, in this process."""
        width = max(len(ids) for ids in src_ids) + 1
        src = torch.full((len(src_ids), width), PAD_ID, dtype=torch.long)
        for row, ids in enumerate(src_ids):
            src[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            src[row, len(ids)] = EOS_ID
        src = src.to(self.device)
        d = decode
        common: dict[str, Any] = dict(lenpen=d.lenpen, max_len_a=d.max_len_a, max_len_b=d.max_len_b,
                                      min_len=d.min_len, prefix=prefix_ids, allow_unk=d.allow_unk,
                                      lenpen_form=d.length_penalty_form, forced=forced)
        if d.sampling:
            return sample(self.model, src, nbest=d.nbest, temperature=d.temperature, top_k=d.top_k,
                          top_p=d.top_p, generator=self.generator, **common)
        return beam_search(self.model, src, beam=d.beam, nbest=d.nbest, **common)

    def close(self) -> None:
        """Stop the worker processes (if they were started)."""
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)
            self._pool = None

    def _start(self) -> ProcessPoolExecutor:
        if self._pool is None:
            # Forked, the workers share this process's model (copy-on-write) without pickling it;
            # a worker that dies fails the call (BrokenProcessPool) instead of hanging it.
            self._pool = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("fork"),
                                             initializer=_start_worker, initargs=(self,))
        return self._pool


_worker: TorchBackend | None = None


def _start_worker(backend: TorchBackend) -> None:
    global _worker
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    torch.set_num_threads(1)
    _worker = backend


def _search_in_worker(job: tuple[list[list[int]], list[list[int]] | None, DecodeConfig, int]
                      ) -> list[list[Hypothesis]]:
    assert _worker is not None
    return _worker.search_batch(*job)
