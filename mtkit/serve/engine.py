"""The batching engine: concurrent requests for one model become few ``translate_lines`` calls.

``Engine`` turns concurrent requests into few ``Translator.translate_lines`` calls: requests
queue their sentences; one worker thread waits up to ``max_wait`` after the oldest pending
request arrived (or until ``batch_tokens`` source tokens are pending), then translates the
sentences of every pending request in one call, so that ten clients at once cost little more
than one. A multilingual model has one engine for all its language pairs: each request names
its languages, and only requests of the same languages share a call. The queue is bounded
(``QueueFull``), every request has a deadline, and a request that timed out or whose client
went away has its not-yet-started sentences dropped. The event loop never runs the model: it
only queues sentences and awaits the result.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mtkit.translate import Translation, Translator

log = logging.getLogger(__name__)


class QueueFull(Exception):
    """The engine's queue holds ``queue_size`` requests already (HTTP 503)."""


class Stopped(Exception):
    """The engine is shutting down and takes no new requests (HTTP 503)."""


@dataclass(eq=False)
class _Job:
    """One request's sentences. The worker takes them in order (``taken``); results come
    back into ``results``; ``future`` (of the submitting event loop) gets the list."""

    segments: list[str]
    lengths: list[int]  # source tokens of each segment, EOS included
    nbest: int
    languages: Languages
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[list[Translation]]
    arrived: float
    results: list[Translation | None] = field(default_factory=list)
    taken: int = 0
    done: int = 0
    cancelled: bool = False


@dataclass
class EngineStats:
    """Counters since start: ``batches`` is the number of ``translate_lines`` calls."""

    requests: int = 0
    sentences: int = 0
    batches: int = 0
    dropped_sentences: int = 0
    rejected: int = 0
    timeouts: int = 0
    largest_batch: int = 0


Languages = tuple[str | None, str | None] | None
"""A multilingual model's (source, target) codes, as ``Translator`` takes them; None: the
translator's own."""


class Engine:
    """Batches the sentences of concurrent requests for one ``Translator`` (one model).

    batch_tokens: most source tokens in one merged call (a request's sentences may be split
      across calls; a single longer sentence goes alone).
    max_wait: seconds the worker waits after the oldest pending request arrived for others
      to join its batch (0: take whatever is pending).
    queue_size: most requests waiting (not yet fully started); beyond it ``QueueFull``.
    batching: False translates one request at a time (all its sentences in one call), the
      way LibreTranslate serves; for comparisons.
    workers: worker threads taking batches from the one queue. With two, one batch is
      translated while the next forms and the other's Python work overlaps the first's
      tensor work; give each fewer torch threads (``mtkit serve --workers``). Always 1 when
      ``batching`` is False (one request at a time).
    Requests are batched only with requests asking the same ``nbest`` hypotheses in the same
    ``languages`` (a multilingual model's: ``translate(..., languages)``).
    """

    def __init__(
        self,
        translator: Translator,
        *,
        batch_tokens: int | None = None,
        max_wait: float = 0.01,
        queue_size: int = 256,
        batching: bool = True,
        workers: int = 1,
        name: str = "engine",
    ):
        if queue_size < 1:
            raise ValueError(f"queue_size={queue_size}: need at least 1")
        if workers < 1:
            raise ValueError(f"workers={workers}: need at least 1")
        self.translator = translator
        self.batch_tokens = batch_tokens or translator.decode.batch_tokens
        self.max_wait = max_wait
        self.queue_size = queue_size
        self.batching = batching
        self.stats = EngineStats()
        self._jobs: deque[_Job] = deque()
        self._cv = threading.Condition()
        self._stopping = False
        # A multilingual model's other language pairs: Translators sharing this one's engine.
        self._translators: dict[Languages, Translator] = {None: translator}
        self._threads = [threading.Thread(target=self._work, name=f"mtkit-serve-{name}-{i}", daemon=True)
                         for i in range(workers if batching else 1)]
        for thread in self._threads:
            thread.start()

    # ------------------------------------------------------------------ the event loop's side

    @property
    def running(self) -> bool:
        return all(thread.is_alive() for thread in self._threads) and not self._stopping

    @property
    def pending(self) -> int:
        """Requests waiting for the worker (some of their sentences not yet started)."""
        return len(self._jobs)

    async def translate(self, segments: list[str], nbest: int = 1, timeout: float | None = None,
                        languages: Languages = None) -> list[Translation]:
        """One ``Translation`` per segment (each with up to ``nbest`` hypotheses), in
        ``languages`` (a multilingual model's source and target codes; None: the translator's).
        Raises ``QueueFull``, ``Stopped``, ``TimeoutError`` after ``timeout`` seconds in all; on a
        timeout or a cancellation (the client went away) the segments not yet started are
        dropped; MtkitError for a language the model lacks."""
        if not segments:
            return []
        translator = self._translator(languages)
        extra = len(translator.source_prefix) + 1  # the language token, the EOS
        lengths = [len(ids) + extra for ids in translator.tokenizers.encode_source(segments)]
        loop = asyncio.get_running_loop()
        job = _Job(segments, lengths, nbest, languages, loop, loop.create_future(), time.monotonic(),
                   results=[None] * len(segments))
        with self._cv:
            if self._stopping:
                raise Stopped("the server is shutting down")
            if len(self._jobs) >= self.queue_size:
                self.stats.rejected += 1
                raise QueueFull(f"{len(self._jobs)} requests are waiting already")
            self._jobs.append(job)
            self.stats.requests += 1
            self._cv.notify()
        try:
            return await asyncio.wait_for(job.future, timeout)
        except asyncio.TimeoutError:
            self.stats.timeouts += 1
            self._drop(job)
            raise TimeoutError(f"no translation within {timeout:g} s") from None
        except BaseException:  # cancelled: the client disconnected
            self._drop(job)
            raise

    def close(self, timeout: float | None = None) -> None:
        """Finish the requests already queued, then stop the workers."""
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        end = None if timeout is None else time.monotonic() + timeout
        for thread in self._threads:
            thread.join(None if end is None else max(0.0, end - time.monotonic()))

    def _translator(self, languages: Languages) -> Translator:
        """The translator of ``languages``: one sharing the first's model and search engine."""
        from mtkit.translate import Translator

        with self._cv:
            found = self._translators.get(languages)
        if found is None:
            assert languages is not None
            base = self.translator
            found = Translator(base.model, base.tokenizers, base.decode, base.device, warn=base.warn,
                               backend=base.backend, src_lang=languages[0], tgt_lang=languages[1])
            with self._cv:
                found = self._translators.setdefault(languages, found)
        return found

    def _drop(self, job: _Job) -> None:
        with self._cv:
            job.cancelled = True
            if job in self._jobs:
                self._jobs.remove(job)
            self.stats.dropped_sentences += len(job.segments) - job.taken

    # ------------------------------------------------------------------ the worker's side

    def _work(self) -> None:
        while True:
            with self._cv:
                while not self._jobs and not self._stopping:
                    self._cv.wait()
                if not self._jobs:
                    return  # stopping, and nothing left
                if self.batching:
                    deadline = self._jobs[0].arrived + self.max_wait
                    while (not self._stopping and self._jobs and self._pending_tokens() < self.batch_tokens
                           and (left := deadline - time.monotonic()) > 0):
                        self._cv.wait(left)
                pieces = self._take()
            if pieces:
                self._translate(pieces)

    def _pending_tokens(self) -> int:
        first = self._jobs[0]
        return sum(sum(j.lengths[j.taken:]) for j in self._jobs if _batched_with(j, first))

    def _take(self) -> list[tuple[_Job, int, int]]:
        """Under the lock: the next batch as ``(job, start, stop)`` slices of segments, oldest
        request first, at most ``batch_tokens`` tokens (at least one segment)."""
        if not self._jobs:
            return []
        first = self._jobs[0]
        pieces: list[tuple[_Job, int, int]] = []
        tokens = 0
        for job in list(self._jobs):
            if not _batched_with(job, first):
                continue
            start = stop = job.taken
            if not self.batching:
                stop = len(job.segments)
            else:
                while stop < len(job.segments) and (tokens + job.lengths[stop] <= self.batch_tokens or not tokens):
                    tokens += job.lengths[stop]
                    stop += 1
            if stop > start:
                pieces.append((job, start, stop))
                job.taken = stop
                if stop == len(job.segments):
                    self._jobs.remove(job)
            if not self.batching or stop < len(job.segments):
                break  # one request at a time, or the budget is spent
        return pieces

    def _translate(self, pieces: list[tuple[_Job, int, int]]) -> None:
        if all(job.cancelled for job, _, _ in pieces):
            return  # every requester went away between taking and translating
        lines = [line for job, start, stop in pieces for line in job.segments[start:stop]]
        first = pieces[0][0]
        try:
            translations = self._translator(first.languages).translate_lines(lines, nbest=first.nbest)
        except Exception as err:  # reported to each waiting request; the worker lives on
            log.exception("translation failed")
            for job, _, _ in pieces:
                _call_in_loop(job, _fail, err)
            return
        position = 0
        with self._cv:  # another worker may hold other sentences of the same requests
            self.stats.batches += 1
            self.stats.sentences += len(lines)
            self.stats.largest_batch = max(self.stats.largest_batch, len(lines))
            for job, start, stop in pieces:
                job.results[start:stop] = translations[position : position + stop - start]
                position += stop - start
                job.done += stop - start
                if job.done == len(job.segments):
                    _call_in_loop(job, _resolve, job.results)


def _batched_with(job: _Job, first: _Job) -> bool:
    """Whether ``job``'s sentences may share a ``translate_lines`` call with ``first``'s."""
    return (job.nbest, job.languages) == (first.nbest, first.languages)


def _resolve(future: asyncio.Future[Any], value: Any) -> None:
    if not future.done():  # not cancelled meanwhile (timeout, disconnect)
        future.set_result(value)


def _fail(future: asyncio.Future[Any], err: BaseException) -> None:
    if not future.done():
        future.set_exception(err)


def _call_in_loop(job: _Job, callback: Callable[..., None], value: Any) -> None:
    """Run ``callback(job.future, value)`` in the job's event loop, unless that loop has
    closed meanwhile (its requester is gone; the worker must live on)."""
    with contextlib.suppress(RuntimeError):
        job.loop.call_soon_threadsafe(callback, job.future, value)
