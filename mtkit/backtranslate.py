"""Back-translation: target-side monolingual text through a reverse model into a synthetic
parallel corpus (Sennrich et al. 2016; Edunov et al. 2018; Caswell et al. 2019).

``backtranslate(model, input, output, settings)`` translates each line of ``input`` (text in
the reverse model's source language, e.g. German for a de->en model) into a synthetic source
sentence and writes ``output/synthetic.SRC`` and ``output/synthetic.TGT`` (SRC: the reverse
run's ``data.tgt_lang``; TGT: its ``data.src_lang``) and ``output/report.json``. The files
are listed under ``data.train`` as a ``format: text`` corpus.

Generation (``Settings.method``): ``beam``, the run's beam search; ``sampling``, one sample
per line (unrestricted, or top-k/top-p, at a temperature: ``decode.*``); ``noised-beam``, beam
output with Edunov et al.'s noise on the synthetic source (``noise_words``).

Filters (``drop_reason``): every input line is either kept or dropped for one reason
(``DROP_REASONS``), and ``report.json`` counts both.

Resumable and line-exact: the input goes through ``Translator.translate_stream`` in chunks of
``Settings.chunk_lines`` lines; after each chunk the kept pairs so far and a small state
(lines done, byte lengths, the options and the input's identity) are on disk under
``output/.partial/``. A run killed and started again with the same options continues after
the last finished chunk and ends with the files an uninterrupted run writes: sampling and
noise draw from generators seeded by ``(seed, chunk index)``, never from the state of an
earlier chunk. Other options or another input refuse to resume (``restart`` starts over).
The finished directory replaces ``output`` whole (``mtkit.fileio.atomic_dir``), so
``synthetic.*`` never exist unless complete.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from mtkit.config import tag_problem
from mtkit.corpus import normalize
from mtkit.errors import MtkitError
from mtkit.fileio import STDIN, atomic_dir, atomic_write_text, fsync_path, open_binary, read_lines, refuse_overlap
from mtkit.rundir import ExperimentDir, exclusive

if TYPE_CHECKING:
    from mtkit.checkpoint import Loaded
    from mtkit.config import DecodeConfig
    from mtkit.translate import Translator

log = logging.getLogger(__name__)

METHODS: tuple[str, ...] = ("beam", "sampling", "noised-beam")
"""How a synthetic source is generated (see the module docstring)."""
DROP_REASONS: tuple[str, ...] = ("empty", "copy", "ratio", "too_long")
"""Why a pair is dropped, in the order ``drop_reason`` checks them."""
PARTIAL = ".partial"
"""The hidden directory in the output that holds an unfinished run."""
REPORT = "report.json"
_STATE = "state.json"
_HEAD_BYTES = 1 << 20  # the input's identity hashes its first MiB: cheap, and catches a rewritten file


@dataclass(frozen=True)
class Noise:
    """Edunov et al. (2018)'s noise on a synthetic source, after Lample et al. (2018): each word
    deleted with probability ``delete``, replaced by ``filler`` with probability ``replace``,
    and the words shuffled so that none moves more than ``swap`` positions (0: no shuffle)."""

    delete: float = 0.1
    replace: float = 0.1
    swap: int = 3
    filler: str = "<blank>"

    def problems(self) -> list[str]:
        found = [f"--{name}-prob must be between 0 and 1 (got {value})"
                 for name, value in (("delete", self.delete), ("replace", self.replace)) if not 0 <= value <= 1]
        if self.swap < 0:
            found.append(f"--swap-distance must be 0 or more (got {self.swap})")
        if not self.filler or len(self.filler.split()) != 1 or self.filler != self.filler.strip():
            found.append(f"--filler must be one word without spaces (got {self.filler!r})")
        return found


@dataclass(frozen=True)
class Filters:
    """Which synthetic pairs are dropped (``drop_reason``). Lengths are counted in words
    (whitespace-separated), as the pairs are text: the subword filters of ``mtkit prepare``
    still apply when the corpus is prepared."""

    max_ratio: float = 3.0
    """Drop pairs whose longer side has more than this many times the words of the shorter."""
    max_words: int | None = None
    """Drop pairs with more words than this on either side (None: no limit)."""


@dataclass(frozen=True)
class Settings:
    """Everything but the decode settings that decides ``backtranslate``'s output."""

    method: str = "beam"
    noise: Noise = field(default_factory=Noise)
    """Used by ``noised-beam`` only."""
    filters: Filters = field(default_factory=Filters)
    tag: str | None = None
    """Prepended with a space to every synthetic source line (Caswell et al. 2019's tagged
    back-translation), e.g. ``<BT>``."""
    seed: int = 1
    """Seeds sampling and noise, per chunk."""
    chunk_lines: int = 5000
    """Lines translated, and saved, at a time: a killed run loses at most one chunk."""

    def check(self) -> None:
        """MtkitError listing every problem of the settings at once."""
        problems = [] if self.method in METHODS else [f"--method {self.method}: choose from {', '.join(METHODS)}"]
        if self.method == "noised-beam":
            problems += self.noise.problems()
        if not self.filters.max_ratio > 0:
            problems.append(f"--max-ratio must be above 0 (got {self.filters.max_ratio})")
        if self.filters.max_words is not None and self.filters.max_words < 1:
            problems.append(f"--max-words must be 1 or more (got {self.filters.max_words})")
        tag = tag_problem(self.tag)
        if tag:
            problems.append(f"--tag {tag}")
        if self.chunk_lines < 1:
            problems.append(f"--chunk-lines must be 1 or more (got {self.chunk_lines})")
        if problems:
            raise MtkitError("; ".join(problems))


# --------------------------------------------------------------------------- pieces


def drop_reason(source: str, target: str, filters: Filters) -> str | None:
    """Why the synthetic pair (``source``: the reverse model's output; ``target``: the
    monolingual line) is dropped, or None to keep it: ``empty`` (either side has no words),
    ``copy`` (the sides are equal after whitespace normalisation: the model copied its input),
    ``ratio`` (longer/shorter in words above ``filters.max_ratio``), ``too_long`` (more than
    ``filters.max_words`` words on a side)."""
    src_words, tgt_words = source.split(), target.split()
    if not src_words or not tgt_words:
        return "empty"
    if src_words == tgt_words:
        return "copy"
    shorter, longer = sorted((len(src_words), len(tgt_words)))
    if longer / shorter > filters.max_ratio:
        return "ratio"
    if filters.max_words is not None and longer > filters.max_words:
        return "too_long"
    return None


def noise_words(words: list[str], rng: np.random.Generator, noise: Noise) -> list[str]:
    """``words`` shuffled, thinned and blanked as Lample et al. (2018) and Edunov et al. (2018)
    do, in that order. Shuffle: word ``i`` is sorted by ``i + u`` with ``u`` uniform in
    ``[0, swap + 1)``, so two words trade places only when fewer than ``swap + 1`` positions
    apart and no word ends up more than ``swap`` positions from where it was. Delete: each word
    with probability ``noise.delete``, but one word (chosen at random) stays when all would go,
    so a synthetic source is never empty. Replace: each word that is left by ``noise.filler``
    with probability ``noise.replace``."""
    if not words:
        return []
    if noise.swap > 0 and len(words) > 1:
        keys = np.arange(len(words)) + rng.uniform(0, noise.swap + 1, len(words))
        words = [words[i] for i in np.argsort(keys, kind="stable")]
    keep = rng.random(len(words)) >= noise.delete
    if not keep.any():
        keep[rng.integers(len(words))] = True
    words = [w for w, k in zip(words, keep, strict=True) if k]
    blank = rng.random(len(words)) < noise.replace
    return [noise.filler if b else w for w, b in zip(words, blank, strict=True)]


def chunk_seed(seed: int, chunk: int, stream: int) -> int:
    """A 32-bit seed for chunk ``chunk`` of a run seeded ``seed``; ``stream`` keeps sampling
    (0) and noise (1) apart. Depends on nothing else, so a resumed run draws what an
    uninterrupted one drew."""
    return int(np.random.SeedSequence([seed, chunk, stream]).generate_state(1)[0])


def method_decode(method: str, decode: DecodeConfig) -> DecodeConfig:
    """``decode`` as ``method`` needs it: one hypothesis per line, sampled for ``sampling``,
    searched otherwise."""
    from mtkit.config import DecodeConfig

    return DecodeConfig.model_validate({**decode.model_dump(), "sampling": method == "sampling", "nbest": 1})


def input_identity(path: Path) -> dict[str, Any]:
    """What tells a resumed run that its input is the same file: its resolved path, size,
    modification time and the SHA-256 of its first MiB. MtkitError naming ``path`` when it
    cannot be read."""
    with open_binary(path):  # the one-line errors of a missing file, a directory...
        pass
    try:
        stat = path.stat()
        with open(path, "rb") as raw:
            head = hashlib.sha256(raw.read(_HEAD_BYTES)).hexdigest()
    except OSError as err:
        raise MtkitError(f"{path}: cannot read: {err.strerror}") from None
    return {"path": str(path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "head_sha256": head}


# --------------------------------------------------------------------------- the stage


def backtranslate(
    model: str | Path | Loaded,
    input: str | Path,
    output: str | Path,
    settings: Settings | None = None,
    decode: DecodeConfig | None = None,
    *,
    device: str = "cpu",
    threads: int | None = None,
    restart: bool = False,
    src_lang: str | None = None,
    tgt_lang: str | None = None,
    say: Callable[[str], None] = log.info,
    warn: Callable[[str], None] = log.warning,
    on_chunk: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Back-translate the file ``input`` with the reverse run or checkpoint ``model`` into the
    directory ``output`` (see the module docstring) and return the report (what
    ``report.json`` holds).

    decode: the search settings (default: the checkpoint's); ``sampling`` and ``nbest`` are
    set by ``settings.method``. src_lang, tgt_lang: a multilingual reverse model's languages,
    as for ``mtkit translate`` (``tgt_lang`` is the synthetic source's language); they also
    name the files. restart: drop an unfinished (or finished) run of other options or input
    instead of refusing. on_chunk: called with the number of input lines done after each chunk
    is safely on disk. say: the engine chosen, a finished output found again; warn: lines with
    invalid UTF-8 or too long for the model.

    MtkitError (one line, naming the file) for a missing input, a directory that is not a run,
    an output that holds something else, or an unfinished run of other options or input.
    """
    from mtkit.checkpoint import Loaded, load_for_inference
    from mtkit.tokenizer import language_prefixes, run_languages

    settings = settings or Settings()
    settings.check()
    if str(input) == STDIN:
        raise MtkitError("--input: name a file (stdin cannot be resumed)")
    input, output = Path(input), Path(output)
    identity = input_identity(input)
    loaded = model if isinstance(model, Loaded) else load_for_inference(Path(model), device=device)
    refuse_overlap(output, [input], "the input")
    refuse_overlap(output, [loaded.path], "the model")
    decode = method_decode(settings.method, decode or loaded.config.decode)
    src_lang, tgt_lang = run_languages(loaded.config.data, loaded.tokenizers, src_lang, tgt_lang)
    language_prefixes(loaded.tokenizers, src_lang, tgt_lang)  # names both where the model needs them
    src_code, tgt_code = str(tgt_lang), str(src_lang)
    for code in (src_code, tgt_code):
        if not re.fullmatch(r"[\w.+-]+", code):
            raise MtkitError(f"language code {code!r}: not usable in a file name")
    if src_code == tgt_code:
        raise MtkitError(f"{loaded.path}: source and target language are both {src_code!r}; "
                         "the synthetic files need two names (--source-lang/--target-lang)")
    names = {"src": f"synthetic.{src_code}", "tgt": f"synthetic.{tgt_code}"}
    options = {"model": str(loaded.path.resolve()), "method": settings.method, "decode": decode.model_dump(),
               "noise": asdict(settings.noise) if settings.method == "noised-beam" else None,
               "filters": asdict(settings.filters), "tag": settings.tag, "seed": settings.seed,
               "chunk_lines": settings.chunk_lines, "files": names}

    with exclusive(output):  # a second back-translation into it stops at once, naming this one
        return _backtranslate(loaded, input, output, names, decode, settings, options, identity, restart=restart,
                              device=device, threads=threads, src_lang=src_lang, tgt_lang=tgt_lang, say=say,
                              warn=warn, on_chunk=on_chunk)


def _backtranslate(
    loaded: Loaded, input: Path, output: Path, names: dict[str, str], decode: DecodeConfig, settings: Settings,
    options: dict[str, Any], identity: dict[str, Any], *, restart: bool, device: str, threads: int | None,
    src_lang: str | None, tgt_lang: str | None, say: Callable[[str], None], warn: Callable[[str], None],
    on_chunk: Callable[[int], None] | None,
) -> dict[str, Any]:
    finished = _finished(output, options, identity, restart)
    if finished is not None:
        say(f"{output}: already complete ({finished['kept']} of {finished['lines_read']} lines kept); "
            "--restart to make it again")
        return finished
    partial = output / PARTIAL
    state = _resume_state(output, options, identity, restart)
    partial.mkdir(parents=True, exist_ok=True)
    if state is None:
        state = {"options": options, "input": identity, "lines_done": 0, "kept": 0,
                 "dropped": dict.fromkeys(DROP_REASONS, 0), "bytes": {"src": 0, "tgt": 0}, "seconds": 0.0}
        for side in ("src", "tgt"):
            (partial / names[side]).write_bytes(b"")
        atomic_write_text(partial / _STATE, json.dumps(state))
    elif state["lines_done"]:
        say(f"{output}: resuming after line {state['lines_done']}")
    _run(loaded, input, partial, names, decode, settings, state, device=device, threads=threads,
         src_lang=src_lang, tgt_lang=tgt_lang, say=say, warn=warn, on_chunk=on_chunk)

    report = {"lines_read": state["lines_done"], "kept": state["kept"], "dropped": state["dropped"],
              "seconds": round(state["seconds"], 3), **options, "input": identity}
    if report["kept"] + sum(report["dropped"].values()) != report["lines_read"]:
        raise AssertionError(f"lines unaccounted for: {report}")
    with atomic_dir(output) as tmp:
        for side in ("src", "tgt"):
            _link_or_copy(partial / names[side], tmp / names[side])
        atomic_write_text(tmp / REPORT, json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    return report


def _run(loaded: Loaded, input: Path, partial: Path, names: dict[str, str], decode: DecodeConfig,
         settings: Settings, state: dict[str, Any], *, device: str, threads: int | None, src_lang: str | None,
         tgt_lang: str | None, say: Callable[[str], None], warn: Callable[[str], None],
         on_chunk: Callable[[int], None] | None) -> None:
    """Translate the lines of ``input`` after ``state['lines_done']``, chunk by chunk, appending
    the kept pairs to ``partial``'s files and saving ``state`` after each chunk."""
    import torch

    from mtkit.engines import open_translator

    done = state["lines_done"]
    lines = read_lines(input, "replace", what="input", warn=warn)
    skipped = sum(1 for _ in islice(lines, done))
    if skipped < done:
        raise MtkitError(f"{input}: has {skipped} lines, fewer than the {done} already translated")
    taken: deque[str] = deque()  # the lines translate_stream has read and not yet returned

    def remember(source: Iterator[str]) -> Iterator[str]:
        for line in source:
            taken.append(line)
            yield line

    # Truncate what a kill may have written after the last saved state.
    files = {}
    for side in ("src", "tgt"):
        path = partial / names[side]
        files[side] = open(path, "r+b")  # noqa: SIM115 - closed in the finally below
        files[side].truncate(state["bytes"][side])
        files[side].seek(state["bytes"][side])
    chunk = done // settings.chunk_lines  # resumed runs stop only after whole chunks
    sampling = settings.method == "sampling"
    workers = threads or torch.get_num_threads()
    translator = open_translator(loaded, decode, device, threads=threads, workers=workers,
                                 seed=chunk_seed(settings.seed, chunk, 0), say=say, warn=warn, src_lang=src_lang,
                                 tgt_lang=tgt_lang)
    try:
        with translator:
            if sampling:  # a compute-type check may have drawn from the new engine's generator
                _reseed(translator, loaded, device, threads, chunk_seed(settings.seed, chunk, 0), warn, rebuild=False)
            start = time.monotonic()
            for translations in translator.translate_stream(remember(lines), chunk_lines=settings.chunk_lines):
                targets = normalize([taken.popleft() for _ in translations])
                rng = np.random.default_rng(chunk_seed(settings.seed, chunk, 1))
                src_out, tgt_out = [], []
                for translation, target in zip(translations, targets, strict=True):
                    reason = drop_reason(translation.text, target, settings.filters)
                    if reason is not None:
                        state["dropped"][reason] += 1
                        continue
                    source = translation.text
                    if settings.method == "noised-beam":
                        source = " ".join(noise_words(source.split(), rng, settings.noise))
                    if settings.tag is not None:
                        source = f"{settings.tag} {source}"
                    src_out.append(source + "\n")
                    tgt_out.append(target + "\n")
                for side, text in (("src", src_out), ("tgt", tgt_out)):
                    data = "".join(text).encode("utf-8")
                    _write(files[side], data, partial / names[side])
                    state["bytes"][side] += len(data)
                state["kept"] += len(src_out)
                state["lines_done"] += len(translations)
                now = time.monotonic()
                state["seconds"] += now - start
                start = now
                # The data first, then the state that vouches for it.
                atomic_write_text(partial / _STATE, json.dumps(state))
                chunk += 1
                if on_chunk is not None:
                    on_chunk(state["lines_done"])
                if sampling:
                    _reseed(translator, loaded, device, threads, chunk_seed(settings.seed, chunk, 0), warn)
    finally:
        for handle in files.values():
            handle.close()


def _reseed(translator: Translator, loaded: Loaded, device: str, threads: int | None, seed: int,
            warn: Callable[[str], None], rebuild: bool = True) -> None:
    """Make the translator's next samples those of a fresh engine seeded ``seed``. rebuild:
    False when a CTranslate2 engine is fresh already (its threads have not drawn yet)."""
    from mtkit.engines import open_engine
    from mtkit.engines.pytorch import TorchBackend

    if isinstance(translator.backend, TorchBackend):
        translator.backend.generator.manual_seed(seed)
        return
    if not rebuild:
        return
    # CTranslate2 seeds each of its threads' generators once, at the thread's first draw
    # (ctranslate2.set_random_seed changes only what new threads start from): a new engine has
    # new threads.
    translator.backend.close()
    translator.backend = open_engine(loaded, translator.decode, device, threads=threads, seed=seed, say=_quiet,
                                     warn=warn)


def _quiet(message: str) -> None:
    """The engine was named when the translator was opened."""


def _write(handle: Any, data: bytes, path: Path) -> None:
    try:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    except OSError as err:
        raise MtkitError(f"{path}: cannot write: {err.strerror}") from None


def _link_or_copy(source: Path, target: Path) -> None:
    """``target`` holding ``source``'s bytes, ``source`` left in place (a kill before the final
    rename must leave the unfinished run whole)."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)
        fsync_path(target)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise MtkitError(f"{path}: unreadable ({err}); --restart to start over") from None
    if not isinstance(data, dict):
        raise MtkitError(f"{path}: not a back-translation state; --restart to start over")
    return data


def _differences(options: dict[str, Any], identity: dict[str, Any], found: dict[str, Any]) -> list[str]:
    """What differs between this call's options and input and those ``found`` recorded."""
    stored = found.get("options", found)
    names = [key for key in options if stored.get(key) != options[key]]
    for key in ("decode", "filters", "noise"):
        if key in names and isinstance(stored.get(key), dict) and isinstance(options[key], dict):
            names.remove(key)
            names += [f"{key}.{k}" for k in options[key] if stored[key].get(k) != options[key][k]]
    if found.get("input") != identity:
        names.append("the input file")
    return names


def _finished(output: Path, options: dict[str, Any], identity: dict[str, Any], restart: bool) -> dict[str, Any] | None:
    """The report of a finished run of the same options and input in ``output``, or None when
    there is work to do. MtkitError when ``output`` holds something else (which the finished
    directory would replace), or a finished run of other options without ``restart``."""
    if not output.exists():
        return None
    if not output.is_dir():
        raise MtkitError(f"{output}: exists and is not a directory")
    if (output / PARTIAL).exists():
        return None
    if not (output / REPORT).exists():
        with contextlib.suppress(StopIteration):
            next(path for path in output.iterdir() if path != ExperimentDir(output).lock_file)
            raise MtkitError(f"{output}: exists and holds other files (no {REPORT}); "
                             "choose another output directory")
        return None
    report = _read_json(output / REPORT)
    changed = _differences(options, identity, report)
    if not changed:
        return report if not restart else None
    if restart:
        return None
    raise MtkitError(f"{output}: holds a back-translation made with other settings ({', '.join(changed)}); "
                     "use the same ones, another output directory, or --restart")


def _resume_state(output: Path, options: dict[str, Any], identity: dict[str, Any],
                  restart: bool) -> dict[str, Any] | None:
    """The saved state of an unfinished run of the same options and input, or None (nothing
    to resume: a fresh start). MtkitError for an unfinished run of other options or input
    without ``restart``; with it, that run is removed."""
    partial = output / PARTIAL
    if not partial.exists():
        return None
    state_file = partial / _STATE
    if restart or not state_file.exists():  # no state: killed before the first one was written
        shutil.rmtree(partial)
        return None
    state = _read_json(state_file)
    changed = _differences(options, identity, state)
    if changed:
        raise MtkitError(f"{output}: holds an unfinished back-translation with other settings "
                         f"({', '.join(changed)}); rerun with the same ones, or --restart to start over")
    for side, name in options["files"].items():
        path = partial / name
        if not path.is_file():
            raise MtkitError(f"{path}: missing from the unfinished back-translation; --restart to start over")
        if path.stat().st_size < state["bytes"][side]:
            raise MtkitError(f"{path}: shorter than {state_file} records; --restart to start over")
    return state
