"""Text in, text out: SentencePiece + a model + ``mtkit.search``.

``Translator.translate(lines)`` is what training's validation and ``mtkit translate`` both
use, so a validation BLEU is the BLEU that ``mtkit translate | mtkit score`` would give (with
the PyTorch engine; ``mtkit.engines.open_translator`` builds the ``Translator`` that
``mtkit translate``, the pipeline's test translation, ``mtkit serve`` and ``mtkit compare`` use,
on the engine ``decode.backend`` picks, and says which).

Input lines (and prefixes) are normalised as ``mtkit prepare`` normalises corpora
(``mtkit.corpus.normalize``: control characters out, whitespace runs to one space), so the
model sees text as it saw it in training whatever the tokenizer's normalisation rule.

Guarantees, for any input: exactly one ``Translation`` per input line, in input order; an
empty (or all-whitespace) line gives an empty translation without running the model; a
line longer than the model accepts is truncated to ``max_positions - 1`` subwords (one
position is the EOS) with a warning, never dropped; a translation never contains a line
break, so output lines stay aligned with input lines.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from itertools import islice
from typing import TYPE_CHECKING, Protocol

import numpy as np
import torch

from mtkit.batching import pack
from mtkit.config import DecodeConfig
from mtkit.corpus import normalize
from mtkit.engines.pytorch import TorchBackend
from mtkit.errors import MtkitError
from mtkit.models import Model
from mtkit.runtime import Shard
from mtkit.search import Hypothesis
from mtkit.sentences import fit_pieces
from mtkit.tokenizer import language_prefixes

if TYPE_CHECKING:
    from mtkit.tokenizer import Tokenizers

log = logging.getLogger(__name__)

# Everything str.splitlines() would split on: none of it may reach an output line.
_LINE_BREAKS = re.compile("[\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029]")


def one_line(text: str) -> str:
    """``text`` with every line-breaking character replaced by a space."""
    return _LINE_BREAKS.sub(" ", text)


@dataclass
class Translation:
    """The result for one input line: ``text`` is the best hypothesis (empty for an empty
    line), ``score`` its length-penalised log-probability (None when the model did not run),
    ``nbest`` all returned hypotheses as ``(text, score)``, best first."""

    text: str
    score: float | None = None
    nbest: list[tuple[str, float]] = field(default_factory=list)
    pieces: int = 1
    """More than 1: the line was longer than the model accepts and translated in this many pieces."""


OUTPUT_FORMATS = ("text", "jsonl")


class SearchBackend(Protocol):
    """The engine of ``Translator``'s search: ``mtkit.engines.pytorch.TorchBackend`` or
    ``mtkit.engines.ctranslate2.CT2Translator``."""

    def search(
        self, batches: list[list[list[int]]], prefixes: list[list[list[int]]] | None, decode: DecodeConfig,
        forced: int = 0,
    ) -> list[list[Hypothesis]]:
        """Per sentence of ``batches`` (in order, batch after batch), its n-best hypotheses;
        the first ``forced`` tokens of every prefix score 0."""
        ...

    def close(self) -> None:
        """Release what the backend started (worker processes)."""
        ...


def format_translations(translations: list[Translation], output_format: str = "text") -> str:
    """The output records of ``translations``, each ending in a newline: ``text``, the best
    translation; ``jsonl``, a JSON object with ``translation``, ``score`` and ``nbest`` (a list
    of ``{"translation", "score"}``, best first)."""
    if output_format == "text":
        return "".join(t.text + "\n" for t in translations)
    if output_format != "jsonl":
        raise ValueError(f"output_format={output_format!r}; choose from {', '.join(OUTPUT_FORMATS)}")
    rows = []
    for t in translations:
        record = {"translation": t.text, "score": t.score,
                  "nbest": [{"translation": text, "score": score} for text, score in t.nbest]}
        rows.append(json.dumps(record, ensure_ascii=False) + "\n")
    return "".join(rows)


class Translator:
    """Translate text with ``model`` (in eval mode: dropout would make search random) and
    ``tokenizers`` (an ``mtkit.tokenizer.Tokenizers``) under the ``decode`` settings.

    warn: called with a one-line message for each truncated line (default: logging).
    seed: seeds sampling (only used with ``decode.sampling``).
    backend: runs the search (default: mtkit's own search on ``model``, in this process, seeded
    by ``seed``); built by ``mtkit.engines.open_engine``, which also seeds its sampling.
    ``mtkit.engines.open_translator`` builds the whole Translator for a run or checkpoint.
    """

    def __init__(
        self,
        model: Model,
        tokenizers: Tokenizers,
        decode: DecodeConfig,
        device: str | torch.device = "cpu",
        *,
        seed: int = 1,
        warn: Callable[[str], None] | None = None,
        backend: SearchBackend | None = None,
        src_lang: str | None = None,
        tgt_lang: str | None = None,
    ):
        self.model = model
        self.tokenizers = tokenizers
        self.decode = decode
        self.device = torch.device(device)
        self.warn = warn or log.warning
        self.source_prefix, self.target_prefix = language_prefixes(tokenizers, src_lang, tgt_lang)
        self.max_source = model.max_source_length() - len(self.source_prefix)
        # What a prompt template and BOS add to every source (about: a template's text next to
        # the source's may encode a subword more or less), kept free when a long line is cut.
        self.framing = len(tokenizers.encode_source([""])[0]) if tokenizers.prompt or tokenizers.source_bos else 0
        self.split_lines = 0  # lines too long for the model, translated in pieces (decode.long_lines: split)
        self.backend: SearchBackend = backend or TorchBackend(
            model, self.device, generator=torch.Generator(device=self.device).manual_seed(seed))

    # ------------------------------------------------------------------ public

    def translate(self, lines: list[str], *, beam: int | None = None) -> list[str]:
        """The best translation of each line, in input order."""
        return [t.text for t in self.translate_lines(lines, beam=beam)]

    def translate_lines(
        self, lines: list[str], prefixes: list[str] | None = None, first_line: int = 1, line_step: int = 1, *,
        nbest: int | None = None, beam: int | None = None, long_lines: str | None = None,
    ) -> list[Translation]:
        """One ``Translation`` per line, in input order. ``prefixes``: per line, text the
        translation must start with ('' for none). Warnings number line ``i`` of ``lines`` as
        ``first_line + i * line_step``. ``nbest``, ``beam``, ``long_lines``: this call's, over
        ``decode``'s."""
        decode = self._settings(nbest, beam, long_lines)
        if prefixes is not None and len(prefixes) != len(lines):
            raise ValueError(f"{len(prefixes)} prefixes for {len(lines)} lines")
        numbers = range(first_line, first_line + len(lines) * line_step, line_step)
        # All-whitespace lines (str.isspace: also NEL, U+2028, U+3000...) normalise to empty.
        normalized = normalize(lines)
        src_ids = self.tokenizers.encode_source(normalized)
        too_long = [row for row, ids in enumerate(src_ids) if len(ids) > self.max_source]
        if too_long and decode.long_lines == "split":
            return self._split_long(normalized, prefixes, numbers, too_long, decode, src_ids)
        for row in too_long:
            self.warn(f"line {numbers[row]}: {len(src_ids[row])} subwords, more than the model accepts; "
                      f"truncated to {self.max_source} (decode.long_lines: truncate)")
            del src_ids[row][self.max_source :]
        prefix_ids = self._encode_prefixes(prefixes, numbers) if prefixes is not None else None
        if self.target_prefix:
            prefix_ids = [self.target_prefix + ids for ids in (prefix_ids or [[] for _ in lines])]
        results = [Translation("") for _ in lines]
        todo = [i for i, ids in enumerate(src_ids) if ids and normalized[i]]  # a prompt frames empty text too
        if self.source_prefix:
            src_ids = [self.source_prefix + ids for ids in src_ids]
        lengths = np.array([len(src_ids[i]) + 1 for i in todo], dtype=np.int64)
        order = np.argsort(lengths, kind="stable")  # stable: equal lengths keep input order
        batches = [[todo[i] for i in batch] for batch in pack(lengths, order, decode.batch_tokens,
                                                              oversized="alone", max_items=decode.batch_sentences)]
        # Every batch at once: a backend may run them concurrently.
        hyps = self.backend.search([[src_ids[r] for r in rows] for rows in batches],
                                   [[prefix_ids[r] for r in rows] for rows in batches] if prefix_ids else None,
                                   decode, forced=len(self.target_prefix))
        # One call decodes every hypothesis: SentencePiece's batch API has a cost per call.
        texts = iter(self.tokenizers.tgt.decode([h.tokens for found in hyps for h in found]))
        for row, found in zip([r for rows in batches for r in rows], hyps, strict=True):
            pairs = [(one_line(next(texts)), h.score) for h in found]
            if pairs:
                results[row] = Translation(pairs[0][0], pairs[0][1], pairs)
        return results

    def translate_stream(
        self,
        lines: Iterable[str],
        prefixes: Iterable[str] | None = None,
        chunk_lines: int = 10_000,
        shard: Shard | None = None,
        ready: Callable[[], bool] | None = None,
    ) -> Iterator[list[Translation]]:
        """Translate an unbounded stream ``chunk_lines`` lines at a time (each chunk sorted and
        batched by length), yielding each chunk's translations in input order.

        ready: for input that may pause (a pipe, a terminal): called after each line, True when
        the next line is already there (e.g. ``LineReader.ready`` with a short wait). On False
        the chunk ends early, so what has arrived is translated and yielded before the reader
        waits for more, as an interactive translator does; a file never pauses and keeps
        full chunks.
        shard: under torchrun, every rank reads the same stream and translates every
        ``world``-th line of each chunk; the chunk is gathered on rank 0, which alone yields it
        (other ranks yield nothing). Every rank must cut the same chunks: no ``ready`` there.
        """
        if shard is not None and ready is not None:
            raise ValueError("ready: ranks under torchrun must cut the same chunks")
        prefix_iter = iter(prefixes) if prefixes is not None else None
        first = 1
        for chunk in _chunks(iter(lines), chunk_lines, ready):
            chunk_prefixes = None
            if prefix_iter is not None:
                chunk_prefixes = list(islice(prefix_iter, len(chunk)))
                if len(chunk_prefixes) < len(chunk):
                    missing = first + len(chunk_prefixes)
                    raise MtkitError(f"prefixes: fewer lines than the input (which has line {missing})")
            if shard is None:
                yield self.translate_lines(chunk, chunk_prefixes, first_line=first)
            else:
                mine = slice(shard.rank, None, shard.world)
                part = self.translate_lines(chunk[mine], chunk_prefixes[mine] if chunk_prefixes else None,
                                            first_line=first + shard.rank, line_step=shard.world)
                parts = shard.gather(part)
                if parts is not None:
                    merged: list[Translation] = [Translation("")] * len(chunk)
                    for rank, translations in enumerate(parts):
                        merged[rank :: shard.world] = translations
                    yield merged
            first += len(chunk)

    def search(self, src_ids: list[list[int]], prefix_ids: list[list[int]] | None = None) -> list[list[Hypothesis]]:
        """Run the configured search on sentences of subword ids (no EOS, none empty)."""
        return self.backend.search([src_ids], [prefix_ids] if prefix_ids is not None else None, self.decode)

    def close(self) -> None:
        """Stop what the engine started (worker processes)."""
        self.backend.close()

    def __enter__(self) -> Translator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ internals

    def _settings(self, nbest: int | None, beam: int | None, long_lines: str | None = None) -> DecodeConfig:
        """``decode`` with this call's n-best, beam size and long-line rule (checked as the config
        checks them)."""
        update = {key: value for key, value in (("nbest", nbest), ("beam", beam), ("long_lines", long_lines))
                  if value is not None and value != getattr(self.decode, key)}
        if not update:
            return self.decode
        return DecodeConfig.model_validate({**self.decode.model_dump(), **update})

    def _split_long(self, texts: list[str], prefixes: list[str] | None, numbers: range, too_long: list[int],
                    decode: DecodeConfig, src_ids: list[list[int]]) -> list[Translation]:
        """``translate_lines`` where the lines ``too_long`` are longer than the model accepts: each
        is cut into pieces that fit (``mtkit.sentences.fit_pieces``), and all the pieces are
        translated with the other lines in one call; a line's translation joins its pieces' (a
        forced prefix starts its first), its score is their mean, its n-best that one entry."""
        src = self.tokenizers.src
        limit = max(1, self.max_source - self.framing)
        layouts = {row: fit_pieces(texts[row], src.encode, src.decode, limit) for row in too_long}
        rows, pieces, piece_prefixes = [], [], []
        for row, text in enumerate(texts):
            parts = layouts[row].sentences if row in layouts else [text]
            rows += [row] * len(parts)
            pieces += parts
            piece_prefixes += [prefixes[row] if prefixes is not None and i == 0 else "" for i in range(len(parts))]
        for row in too_long:
            self.split_lines += 1
            self.warn(f"line {numbers[row]}: {len(src_ids[row])} subwords, more than the model accepts "
                      f"({self.max_source}); translated in {len(layouts[row].sentences)} pieces cut at sentence "
                      "boundaries and joined")
        # The pieces fit (a run of a word, decoded and encoded again, might gain a subword: then
        # truncated, never split again). Warnings on pieces name the call's first line.
        found = self.translate_lines(pieces, piece_prefixes if prefixes is not None else None, numbers.start,
                                     nbest=decode.nbest, beam=decode.beam, long_lines="truncate")
        results: list[Translation] = [Translation("") for _ in texts]
        by_row: dict[int, list[Translation]] = {}
        for row, translation in zip(rows, found, strict=True):
            by_row.setdefault(row, []).append(translation)
        for row, translated in by_row.items():
            if row not in layouts:
                results[row] = translated[0]
                continue
            text = layouts[row].join([t.text for t in translated])
            scores = [t.score for t in translated if t.score is not None]
            score = sum(scores) / len(scores) if scores else None
            results[row] = Translation(text, score, [(text, score)] if score is not None else [], len(translated))
        return results

    def _encode_prefixes(self, prefixes: list[str], numbers: Iterable[int]) -> list[list[int]]:
        limit = self.model.cfg.max_positions - 1
        encoded = self.tokenizers.tgt.encode(normalize(prefixes))
        for number, ids in zip(numbers, encoded, strict=True):
            if len(ids) > limit:
                self.warn(f"prefix line {number}: longer than the model accepts; truncated to {limit}")
                del ids[limit:]
        return encoded


def _chunks(lines: Iterator[str], size: int, ready: Callable[[], bool] | None) -> Iterator[list[str]]:
    """``lines`` in lists of ``size``; with ``ready``, a list also ends where it says False."""
    if ready is None:
        while chunk := list(islice(lines, size)):
            yield chunk
        return
    chunk = []
    for line in lines:  # waits for the first line of a chunk as long as it takes
        chunk.append(line)
        if len(chunk) == size or not ready():
            yield chunk
            chunk = []
    if chunk:
        yield chunk
