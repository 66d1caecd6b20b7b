"""The CTranslate2 engine: ``CT2Translator`` (and ``CT2Generator`` for decoder-only models)
search as mtkit does on a model converted by ``mtkit.export.CTranslate2Exporter``; the
conversion cache that ``mtkit translate`` converts into on first use (``ct2_model_dir``);
``ct2_problems``, what stands in the way of translating a checkpoint with it; and
``ct2_parity``, how often it agrees with the PyTorch engine. Converting is ``mtkit.export``'s
(as CTranslate2 keeps its converters apart from its runtime); this module only runs.

``ctranslate2`` is a dependency of mtkit that may still be missing (mtkit then translates with
PyTorch); it is imported only when used.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mtkit.checkpoint import Loaded
from mtkit.config import DecodeConfig
from mtkit.errors import MtkitError
from mtkit.export import SPECIAL_PIECES, CTranslate2Exporter, require
from mtkit.fileio import fsync_path
from mtkit.integrity import damage, file_checksum
from mtkit.search import Hypothesis
from mtkit.vocab import BOS_ID, EOS_ID, PAD_ID

DEVICES = ("cpu", "cuda")
"""Where CTranslate2 runs."""


def ct2_problems(loaded: Loaded, decode: DecodeConfig, device: torch.device) -> list[str]:
    """Why CTranslate2 cannot translate ``loaded`` under ``decode`` on ``device`` (empty: it can),
    one short clause each, the first the most basic."""
    try:
        import ctranslate2
    except ImportError:
        return ["ctranslate2 is not installed (pip install ctranslate2)"]
    if device.type not in DEVICES:
        return [f"CTranslate2 runs on CPUs and CUDA GPUs, not {device.type}"]
    if device.type == "cuda" and ctranslate2.get_cuda_device_count() == 0:
        return ["this ctranslate2 has no CUDA device"]
    if not loaded.model.has_encoder:
        # Exported, it is a CTranslate2 Generator (mtkit export ctranslate2); this engine
        # drives a Translator.
        return ["the model: decoder-only models translate with PyTorch (the CTranslate2 backend runs "
                "encoder-decoder models)"]
    problems = [f"the model: {problem}" for problem in CTranslate2Exporter().problems(loaded)]
    if decode.length_penalty_form == "gnmt" and decode.lenpen != 0:
        problems.append("decode.length_penalty_form=gnmt: CTranslate2 divides by length ** lenpen only "
                        "(set decode.length_penalty_form=length)")
    supported = ctranslate2.get_supported_compute_types(device.type, device.index or 0)
    if decode.compute_type != "auto" and decode.compute_type not in supported:
        problems.append(f"decode.compute_type={decode.compute_type}: not supported on this {device.type} "
                        f"(supported: {', '.join(sorted(supported))})")
    return problems


CT2_PREFIX = "ctranslate2-"
"""Converted models live in ``{checkpoint}/ctranslate2-{key}/`` (or the cache directory)."""
CT2_MARKER = "complete.json"
"""Written last into a conversion, after its other files are on disk: their sizes and checksums.
A conversion without it is incomplete; one whose files differ from it is damaged."""
_CT2_CONVERTER_VERSION = 4  # bump when ctranslate2_spec changes what it writes


class DamagedConversion(MtkitError):
    """A complete CTranslate2 conversion whose files no longer match its marker."""


def ct2_model_dir(loaded: Loaded, warn: Callable[[str], None], *, repair: bool = True) -> Path:
    """The CTranslate2 conversion of ``loaded``, made on first use and reused afterwards.

    It is keyed by a hash of the weights ``loaded`` holds (not of the file, which may have
    changed since), the model config, the tokenizers and the versions of the converter and of
    ctranslate2, so a stale conversion is never used (it is replaced, and removed). Written
    into the checkpoint directory, or where that is read-only into ``mtkit_cache_dir()``
    (``warn`` says so), through a temporary directory renamed into place whole; it counts once
    its marker (``CT2_MARKER``, written last) is there, and is used only while every file
    matches the marker, which is checked on each call, before CTranslate2 reads a byte. A
    damaged conversion is converted again, or with ``repair`` False raises DamagedConversion.
    Two processes converting at once each finish their own and the second rename loses to the
    first, harmlessly. MtkitError when neither place is writable."""
    require("ctranslate2")
    name = CT2_PREFIX + _ct2_key(loaded)
    checkpoint = Path(loaded.path).resolve()
    # One cache folder per checkpoint path, so that pruning stale conversions stays within it.
    folder = hashlib.blake2b(str(checkpoint).encode(), digest_size=8).hexdigest()
    places = [checkpoint, mtkit_cache_dir() / "ctranslate2" / folder]
    problems = []
    for number, parent in enumerate(places):
        target = parent / name
        if target.is_dir():
            problem = _conversion_damage(target)
            if problem is None:
                return target
            if (target / CT2_MARKER).exists():
                if not repair:
                    raise DamagedConversion(f"{target}: damaged CTranslate2 model ({problem})")
                warn(f"{target}: damaged CTranslate2 model ({problem}); converting it again")
        try:
            _convert_into(loaded, target)
        except OSError as err:
            problems.append(f"{parent}: {err.strerror or err}")
            continue
        if number:
            warn(f"{places[0]}: not writable; the CTranslate2 model is in {target}")
        return target
    raise MtkitError("cannot store the CTranslate2 model: " + "; ".join(problems))


def mtkit_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/mtkit`` (default ``~/.cache/mtkit``)."""
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "mtkit"


def _ct2_key(loaded: Loaded) -> str:
    """A hash of what the conversion is made from: the weights in memory (names, types, shapes,
    bytes), the model config, the tokenizer files and the converter's and ctranslate2's versions."""
    import xxhash

    ctranslate2 = require("ctranslate2")
    digest = xxhash.xxh3_64()
    header = {"converter": _CT2_CONVERTER_VERSION, "ctranslate2": ctranslate2.__version__,
              "model": loaded.config.model.model_dump(mode="json")}
    digest.update(json.dumps(header, sort_keys=True).encode())
    for name, tensor in sorted(loaded.model.state_dict().items()):
        digest.update(f"{name} {tensor.dtype} {tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    for path in loaded.tokenizers.model_files():
        digest.update(file_checksum(path).encode())
    return digest.hexdigest()


def _conversion_damage(directory: Path) -> str | None:
    """None when ``directory`` holds a complete conversion whose files match its marker; else
    what is wrong, in words."""
    try:
        marker = json.loads((directory / CT2_MARKER).read_text(encoding="utf-8"))
        sizes, checksums = marker["files"], marker["checksums"]
        if not isinstance(checksums, dict) or not isinstance(sizes, dict) or "model.bin" not in checksums:
            raise TypeError
    except FileNotFoundError:
        return f"incomplete: no {CT2_MARKER}"
    except (OSError, ValueError, KeyError, TypeError):
        return f"unreadable {CT2_MARKER}"
    for name, checksum in checksums.items():
        size = sizes.get(name)
        problem = damage(directory / name, size if isinstance(size, int) else None, str(checksum))
        if problem is not None:
            return f"{name} {problem}"
    return None


def _convert_into(loaded: Loaded, target: Path) -> None:
    """Convert into a temporary directory beside ``target`` and rename it to ``target``,
    replacing an incomplete or damaged one; a concurrent conversion that got there first wins."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        CTranslate2Exporter().write(loaded, tmp)
        files = sorted(path.name for path in tmp.iterdir() if path.is_file())
        for name in files:
            fsync_path(tmp / name)
        marker = {"files": {name: (tmp / name).stat().st_size for name in files},
                  "checksums": {name: file_checksum(tmp / name) for name in files}}
        # A plain write: the rename of the directory below is the atomic step.
        (tmp / CT2_MARKER).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")
        fsync_path(tmp / CT2_MARKER)
        tmp.chmod(0o755)
        if target.exists() and _conversion_damage(target) is not None:
            aside = target.with_name(f".{target.name}.old-{os.getpid()}")
            with contextlib.suppress(FileNotFoundError):  # another process moved it first
                os.replace(target, aside)
            shutil.rmtree(aside, ignore_errors=True)
        try:
            os.rename(tmp, target)
        except OSError:
            if _conversion_damage(target) is not None:
                raise
        with contextlib.suppress(OSError):  # some file systems cannot fsync a directory
            fsync_path(target.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for stale in target.parent.glob(CT2_PREFIX + "*"):
        if stale.name != target.name and stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)


# --------------------------------------------------------------------------- translating with CTranslate2


class CT2Translator:
    """Text in, text out through a CTranslate2 model exported by mtkit, decoding as mtkit
    does (``search`` is the CTranslate2 engine of ``mtkit.translate.Translator``): same beam
    size, n-best, minimum length, length penalty (``length`` form: CTranslate2 divides by
    length ** lenpen, the EOS counted as mtkit counts it), sampling settings and prefixes, PAD
    and BOS never generated, at most ``floor(max_len_a * (source_length + 1) + max_len_b)``
    tokens (the source length counts its EOS, as in ``mtkit.search``). CTranslate2 takes one
    length limit per call, so with ``exact_lengths`` sentences with different limits go in
    separate calls (exact); without it a batch uses its longest sentence's limit (for the
    benchmark's bare baseline). Calls of ``search`` run concurrently on ``inter_threads``
    threads of ``intra_threads`` each; with ``decode.sampling``, on one thread of
    ``max(intra_threads, inter_threads)``, so that a seed gives the same samples every run.

    Scores are mtkit's: where CTranslate2 leaves out a prefix's tokens, or the EOS that mtkit
    forces at the maximum length, the hypothesis is scored again whole (``score_batch``, in
    batches spread over the threads), unless its score cannot reach the n best. Both
    end a sentence's beam search once ``beam`` hypotheses have finished (``mtkit.search`` under
    the length form). Two differences remain. CTranslate2 renormalises the probabilities over
    the tokens it allows (no PAD, BOS, UNK unless allowed, nor EOS before the minimum length),
    mtkit (as transformers' generate) does not, so
    scores differ by the probability the model gives those, and where candidates are that close
    the two can pick different translations. And without a length penalty (``lenpen`` 0),
    hypotheses cut at the maximum length are ranked by CTranslate2 without the EOS that mtkit
    forces there."""

    def __init__(
        self,
        model_dir: Path,
        tokenizers: Any,
        decode: DecodeConfig,
        *,
        device: str = "cpu",
        device_index: int = 0,
        compute_type: str = "default",
        intra_threads: int = 0,
        inter_threads: int = 1,
        exact_lengths: bool = True,
        max_positions: int | None = None,
    ):
        ctranslate2 = require("ctranslate2")
        if decode.sampling and inter_threads > 1:
            # Each inter thread draws from its own generator (seeded by ctranslate2.set_random_seed
            # at its first draw) and takes whichever batch comes next: which batch gets which draws
            # would change from run to run. One thread takes the batches in order instead.
            intra_threads, inter_threads = max(intra_threads, inter_threads), 1
        self.translator = ctranslate2.Translator(
            str(model_dir), device=device, device_index=device_index, compute_type=compute_type,
            intra_threads=intra_threads, inter_threads=inter_threads,
        )
        self.tokenizers, self.decode, self.exact_lengths = tokenizers, decode, exact_lengths
        self.max_positions = max_positions
        self.src_pieces = tokenizers.src.vocabulary()
        self.tgt_pieces = tokenizers.tgt.vocabulary()
        self.tgt_ids = {piece: i for i, piece in enumerate(self.tgt_pieces)}

    def close(self) -> None:
        """Nothing to release: CTranslate2's threads end with the translator."""

    def max_length(self, source_length: int, floor: int = 0, decode: DecodeConfig | None = None) -> int:
        """mtkit's output limit (tokens before EOS) for a source of ``source_length`` subwords:
        at least ``floor`` (the prefix length, the minimum length), at most what the model's
        positions allow (as ``mtkit.search.max_lengths``)."""
        d = decode or self.decode
        limit = max(int(math.floor(d.max_len_a * (source_length + 1) + d.max_len_b)), floor)
        return limit if self.max_positions is None else min(limit, self.max_positions - 1)

    def translate_ids(self, batch: list[list[int]]) -> list[list[int]]:
        """Best hypothesis ids (no BOS/EOS) for non-empty source id lists (no BOS/EOS), in order."""
        limits = [self.max_length(len(ids)) for ids in batch]
        groups = [list(range(len(batch)))]
        if self.exact_lengths:
            groups = [[i for i, limit in enumerate(limits) if limit == value] for value in sorted(set(limits))]
        out: list[list[int]] = [[] for _ in batch]
        for rows in groups:
            results = self.translator.translate_batch(
                [[self.src_pieces[i] for i in batch[r]] for r in rows],
                beam_size=self.decode.beam,
                length_penalty=self.decode.lenpen,
                max_decoding_length=max(limits[r] for r in rows),
                min_decoding_length=self.decode.min_len,
                suppress_sequences=[[SPECIAL_PIECES[PAD_ID]], [SPECIAL_PIECES[BOS_ID]]],
                disable_unk=not self.decode.allow_unk,
                return_scores=False,
            )
            for r, result in zip(rows, results, strict=True):
                out[r] = [self.tgt_ids[p] for p in result.hypotheses[0]]
        return out

    def search(
        self,
        batches: list[list[list[int]]],
        prefixes: list[list[list[int]]] | None = None,
        decode: DecodeConfig | None = None,
        forced: int = 0,
    ) -> list[list[Hypothesis]]:
        """Per sentence of ``batches`` (each a list of non-empty source id lists, no EOS), its
        n-best ``Hypothesis`` list, best first, as ``mtkit.search`` returns them; the sentences
        in order, batch after batch. ``prefixes``: per batch, per sentence, target ids the
        output starts with ([] for none). All batches are submitted at once, so that they run
        concurrently on the translator's ``inter_threads``. The first ``forced`` prefix tokens
        (a multilingual model's target language) score 0, as CTranslate2 scores every prefix token:
        its score leaves a prefix's log-probabilities out, while the length it divides by counts
        them, as ``mtkit.search`` does with ``forced``."""
        d = decode or self.decode
        sources = [ids for batch in batches for ids in batch]
        forced_ids = [ids for batch in prefixes for ids in batch] if prefixes is not None else [[] for _ in sources]
        # A sentence's limit: CTranslate2 takes one per call, so each batch is cut into runs
        # of equal limit (sorted batches hold few distinct lengths).
        groups: dict[tuple[int, int], list[int]] = {}
        start = 0
        for number, batch in enumerate(batches):
            for row in range(start, start + len(batch)):
                limit = self.max_length(len(sources[row]), max(len(forced_ids[row]), d.min_len), d)
                groups.setdefault((number, limit), []).append(row)
            start += len(batch)
        # A prefix's tokens, and the EOS forced at the maximum length, count in mtkit's score but
        # not in CTranslate2's: the beam's candidates are the same, but under a length penalty,
        # ranking them as mtkit does needs them all. (CTranslate2 then stops a sentence as before,
        # once ``beam`` hypotheses have finished; without a penalty it would stop later.)
        scored_prefix = [ids[forced:] for ids in forced_ids]
        rescore = d.lenpen != 0 and not d.sampling and d.nbest < d.beam
        options: dict[str, Any] = dict(
            beam_size=1 if d.sampling else d.beam,
            num_hypotheses=d.beam if rescore else d.nbest,
            length_penalty=d.lenpen,
            min_decoding_length=d.min_len,
            suppress_sequences=[[SPECIAL_PIECES[PAD_ID]], [SPECIAL_PIECES[BOS_ID]]],
            disable_unk=not d.allow_unk,
            return_end_token=True,  # the length that the penalty divides by counts the EOS
            return_scores=True,
            max_input_length=0,  # mtkit.translate already truncated the source
        )
        if d.sampling:
            options.update(sampling_topk=d.top_k, sampling_topp=d.top_p, sampling_temperature=d.temperature)
        pending = []
        for (_, limit), rows in groups.items():
            target_prefix = [[self.tgt_pieces[i] for i in forced_ids[r]] or None for r in rows]
            pending.append((rows, self.translator.translate_batch(
                [[self.src_pieces[i] for i in sources[r]] for r in rows],
                target_prefix=target_prefix if any(target_prefix) else None,
                max_decoding_length=limit, asynchronous=True, **options,
            )))
        found: list[list[tuple[list[str], float]]] = [[] for _ in sources]
        for rows, results in pending:
            for row, pending_result in zip(rows, results, strict=True):
                result = pending_result.result()
                found[row] = list(zip(result.hypotheses, result.scores, strict=True))
        # mtkit's score counts what CTranslate2's leaves out: a prefix's tokens, and the EOS that
        # mtkit forces at the maximum length. Those hypotheses are scored again, whole, unless
        # they cannot be among the n best: what is left out only lowers a score, so CTranslate2's
        # log-probability over mtkit's length bounds it from above.
        eos = SPECIAL_PIECES[EOS_ID]
        scores: list[list[float]] = [[] for _ in sources]  # mtkit's, or the bound
        redo = []
        for row, hyps in enumerate(found):
            for k, (pieces, score) in enumerate(hyps):
                ended = bool(pieces) and pieces[-1] == eos
                scores[row].append(score * len(pieces) ** d.lenpen / (len(pieces) - ended + 1) ** d.lenpen)
                if scored_prefix[row] or not ended:
                    redo.append((row, k))
        redo = self._worth_scoring(scores, redo, d.nbest)
        rescored = self._logprobs([sources[row] for row, _ in redo],
                                  [found[row][k][0] for row, k in redo], forced, d.batch_sentences) if redo else []
        out: list[list[Hypothesis]] = [[] for _ in sources]
        for (row, k), logprob in zip(redo, rescored, strict=True):
            pieces = found[row][k][0]
            scores[row][k] = logprob / (len(pieces) - (bool(pieces) and pieces[-1] == eos) + 1) ** d.lenpen
        for row, hyps in enumerate(found):
            mine = []
            for (pieces, _), score in zip(hyps, scores[row], strict=True):
                ended = bool(pieces) and pieces[-1] == eos
                mine.append(Hypothesis([self.tgt_ids[p] for p in (pieces[:-1] if ended else pieces)], score))
            out[row] = sorted(mine, key=lambda h: -h.score)[: d.nbest]
        return out

    @staticmethod
    def _worth_scoring(scores: list[list[float]], inexact: list[tuple[int, int]], nbest: int) -> list[tuple[int, int]]:
        """Of the ``inexact`` hypotheses (sentence, rank), whose ``scores`` are upper bounds, those
        that could be among their sentence's ``nbest``: a bound above the ``nbest``-th best exact
        score of the sentence (all of them where fewer are exact)."""
        bounded = set(inexact)
        threshold = []
        for row, found in enumerate(scores):
            exact = sorted((s for k, s in enumerate(found) if (row, k) not in bounded), reverse=True)
            threshold.append(exact[nbest - 1] if len(exact) >= nbest else -math.inf)
        return [(row, k) for row, k in inexact if scores[row][k] > threshold[row]]

    def _logprobs(self, sources: list[list[int]], targets: list[list[str]], forced: int = 0,
                  batch_size: int = 64) -> list[float]:
        """The log-probability of each target (pieces, an EOS at the end or not) followed by EOS,
        less that of its first ``forced`` tokens; in batches of ``batch_size``, which run on the
        translator's ``inter_threads`` (one batch of every hypothesis would run on one, slower)."""
        eos = SPECIAL_PIECES[EOS_ID]
        bare = [t[:-1] if t and t[-1] == eos else t for t in targets]
        scored = self.translator.score_batch([[self.src_pieces[i] for i in ids] for ids in sources], bare,
                                             max_batch_size=batch_size)
        return [float(sum(result.log_probs[forced:])) for result in scored]  # its last is the EOS's

    def translate(self, lines: list[str], batch_size: int = 32) -> list[str]:
        """The best translation of each line, in input order (empty lines stay empty)."""
        ids = self.tokenizers.encode_source(lines)
        out: list[list[int]] = [[] for _ in ids]
        todo = [i for i, x in enumerate(ids) if x and lines[i].strip()]
        for start in range(0, len(todo), batch_size):
            rows = todo[start : start + batch_size]
            for row, hyp in zip(rows, self.translate_ids([ids[r] for r in rows]), strict=True):
                out[row] = hyp
        return self.tokenizers.tgt.decode(out)


class CT2Generator(CT2Translator):
    """``CT2Translator`` for a decoder-only model exported as a CTranslate2 ``Generator``: each
    source is the prompt ``source </s> <s>`` (``source`` alone for ``model.separator: none``),
    and generation continues after it. A batch holds
    sources of one length with ``exact_lengths`` (CTranslate2 forwards a batch's prompts at
    once only up to the shortest), else of any length under the longest one's limit."""

    def __init__(
        self,
        model_dir: Path,
        tokenizers: Any,
        decode: DecodeConfig,
        *,
        compute_type: str = "default",
        intra_threads: int = 0,
        exact_lengths: bool = True,
        separator: str = "eos_bos",
    ):
        ctranslate2 = require("ctranslate2")
        self.prompt_end = [SPECIAL_PIECES[EOS_ID], SPECIAL_PIECES[BOS_ID]] if separator == "eos_bos" else []
        self.generator = ctranslate2.Generator(
            str(model_dir), device="cpu", compute_type=compute_type, intra_threads=intra_threads, inter_threads=1
        )
        self.tokenizers, self.decode, self.exact_lengths = tokenizers, decode, exact_lengths
        self.max_positions = None  # the prompt shares the positions: CTranslate2 stops at the end
        self.src_pieces = tokenizers.src.vocabulary()
        self.tgt_ids = {piece: i for i, piece in enumerate(tokenizers.tgt.vocabulary())}

    def translate_ids(self, batch: list[list[int]]) -> list[list[int]]:
        """Best hypothesis ids (no BOS/EOS) for non-empty source id lists (no BOS/EOS), in order."""
        groups = [list(range(len(batch)))]
        if self.exact_lengths:
            groups = [[i for i, ids in enumerate(batch) if len(ids) == n] for n in sorted({len(ids) for ids in batch})]
        out: list[list[int]] = [[] for _ in batch]
        for rows in groups:
            results = self.generator.generate_batch(
                [[self.src_pieces[i] for i in batch[r]] + self.prompt_end for r in rows],
                beam_size=self.decode.beam,
                length_penalty=self.decode.lenpen,
                max_length=max(self.max_length(len(batch[r])) for r in rows),
                min_length=self.decode.min_len,
                suppress_sequences=[[SPECIAL_PIECES[PAD_ID]], [SPECIAL_PIECES[BOS_ID]]],
                disable_unk=not self.decode.allow_unk,
                include_prompt_in_result=False,
                return_scores=False,
            )
            for r, result in zip(rows, results, strict=True):
                out[r] = [self.tgt_ids[p] for p in result.sequences[0]]
        return out


@dataclass
class Parity:
    """How often mtkit and CTranslate2 produce the same translation of the same lines."""

    sentences: int
    greedy_identical: float
    beam: int
    beam_identical: float
    differences: list[tuple[str, str, str]] = field(default_factory=list)
    """Up to three ``(source, mtkit, ctranslate2)`` beam-search examples that differ."""


def ct2_parity(loaded: Loaded, model_dir: Path, lines: list[str], compute_type: str = "default", *,
               src_lang: str | None = None, tgt_lang: str | None = None) -> Parity:
    """Translate ``lines`` with mtkit and with the CTranslate2 model in ``model_dir``, both
    greedily and with the run's beam settings, and count identical outputs. An encoder-decoder
    runs in CTranslate2 as the engine of an ``mtkit.translate.Translator`` (``CT2Translator.search``),
    so that both sides read the same source ids, language tokens included (``src_lang``,
    ``tgt_lang``: a multilingual model's languages, default the run's ``data.src_lang`` and
    ``data.tgt_lang``); a decoder-only model runs as a ``CT2Generator``."""
    from mtkit.tokenizer import run_languages
    from mtkit.translate import Translator

    decode = loaded.config.decode.model_copy(update={"sampling": False, "nbest": 1})
    greedy = decode.model_copy(update={"beam": 1})
    src_lang, tgt_lang = run_languages(loaded.config.data, loaded.tokenizers, src_lang, tgt_lang)
    shares, outputs = {}, {}
    for name, settings in (("greedy", greedy), ("beam", decode)):
        ours = Translator(loaded.model, loaded.tokenizers, settings, src_lang=src_lang, tgt_lang=tgt_lang
                          ).translate(lines)
        if loaded.model.has_encoder:
            engine = CT2Translator(model_dir, loaded.tokenizers, settings, compute_type=compute_type,
                                   max_positions=loaded.config.model.max_positions)
            theirs = Translator(loaded.model, loaded.tokenizers, settings, backend=engine, src_lang=src_lang,
                                tgt_lang=tgt_lang).translate(lines)
        else:
            theirs = CT2Generator(model_dir, loaded.tokenizers, settings, compute_type=compute_type,
                                  separator=loaded.config.model.separator).translate(lines)
        shares[name] = sum(a == b for a, b in zip(ours, theirs, strict=True)) / max(len(lines), 1)
        outputs[name] = (ours, theirs)
    ours, theirs = outputs["beam"]
    differences = [(s, a, b) for s, a, b in zip(lines, ours, theirs, strict=True) if a != b][:3]
    return Parity(len(lines), shares["greedy"], decode.beam, shares["beam"], differences)


SAMPLE_SENTENCES = [
    "A man in an orange hat starring at something.",
    "Two young children are playing in the sand on a beach.",
    "A group of people stand in front of an igloo.",
    "A woman is riding a bicycle down a busy city street.",
    "A black dog runs through the grass with a ball in its mouth.",
    "Several men in hard hats are operating a giant pulley system.",
    "A little girl climbs into a wooden playhouse.",
    "People are walking along the beach at sunset.",
]
"""Default parity sample: short descriptive English (Multi30k-like) sentences."""
