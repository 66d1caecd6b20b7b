"""Which engine runs ``Translator``'s search: mtkit's own (PyTorch) or CTranslate2.

``decode.backend``: ``torch``, ``ctranslate2`` or ``auto``. ``auto`` takes CTranslate2 when it
is installed, runs on the device, can represent the model and can honour every decode setting
(``ct2_problems`` lists what stands in the way), else PyTorch; either way one line says which
and why. An explicit ``ctranslate2`` that cannot be honoured is a one-line error instead.

The CTranslate2 model is converted on first use (``mtkit.export.ct2_model_dir``); one whose
files no longer match the checksums written with it is converted again under an explicit
``ctranslate2``, and left for PyTorch, with one warning, under ``auto``. Its
precision, ``decode.compute_type``: ``auto`` tries the fast one of the device (int8 on a CPU,
float16 on a GPU) against float32 on at most ``CHECK_SENTENCES`` sentences of the run's
validation set, once, and keeps it only if BLEU stays within ``BLEU_TOLERANCE``; the figures
are stored beside the converted model (``compute_type.json``, one entry per device kind), so
a user can read why. On a CPU the threads go to concurrent batches (``inter_threads``, one
thread each), which on few cores translates a file faster than threads within a batch.

The PyTorch backend (``mtkit.torch_backend``) runs at float32, bfloat16 or float16; ``auto``
checks bfloat16 the same way on a CPU that multiplies it in hardware (its record is
``torch_compute_type.json`` beside the checkpoint's weights) and keeps float32 elsewhere. On a
CPU it searches in ``workers`` processes.

GPU: CTranslate2 runs on CUDA when the torch device is ``cuda[:N]`` and ctranslate2 sees a
CUDA device; otherwise ``auto`` keeps PyTorch there.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from mtkit.config import CorpusConfig, DecodeConfig
from mtkit.errors import MtkitError
from mtkit.fileio import atomic_write_text

if TYPE_CHECKING:
    from mtkit.checkpoint import Loaded
    from mtkit.export import CT2Translator
    from mtkit.torch_backend import TorchBackend
    from mtkit.translate import SearchBackend

BLEU_TOLERANCE = 0.3
"""A reduced precision is chosen by ``compute_type: auto`` only if it loses less BLEU than this."""
CHECK_SENTENCES = 500
"""Validation sentences that ``compute_type: auto`` translates with each precision (bounds its time)."""
RECORD = "compute_type.json"
TORCH_RECORD = "torch_compute_type.json"
"""Beside a checkpoint's weights: the PyTorch backend's compute-type check."""
_FAST_TYPE = {"cpu": "int8", "cuda": "float16"}


def open_backend(
    loaded: Loaded,
    decode: DecodeConfig,
    device: str | torch.device = "cpu",
    *,
    threads: int | None = None,
    workers: int = 1,
    seed: int = 1,
    valid: CorpusConfig | None = None,
    say: Callable[[str], None],
    warn: Callable[[str], None],
) -> SearchBackend:
    """The search backend for ``Translator(..., backend=...)`` under ``decode.backend``. Under
    ``auto``, ``say`` gets the one line that names the choice and why (an explicit choice is
    silent, but for the one-time compute-type check); ``warn`` what went wrong on the way (a
    read-only checkpoint directory). threads: CPU threads for CTranslate2 (default: torch's).
    workers: processes the PyTorch backend searches batches in on a CPU (``TorchBackend``).
    seed: seeds sampling. valid: a validation corpus the user named, for the compute-type check
    (``validation_set``)."""
    device = torch.device(device)
    if decode.backend == "torch":
        return _open_torch(loaded, decode, device, workers, seed, valid, say, why=None)
    explicit = decode.backend == "ctranslate2"
    problems = ct2_problems(loaded, decode, device)
    if problems:
        if explicit:
            raise MtkitError("decode.backend=ctranslate2: " + "; ".join(problems))
        return _open_torch(loaded, decode, device, workers, seed, valid, say, why=problems[0])
    from mtkit.export import CT2Translator, DamagedConversion, ct2_model_dir

    try:
        # Explicitly asked for, a damaged conversion is made again; under auto it is left as it
        # is and PyTorch translates (decode.backend=ctranslate2 repairs it).
        model_dir = ct2_model_dir(loaded, warn, repair=explicit)
    except MtkitError as err:
        if explicit:
            raise
        if isinstance(err, DamagedConversion):
            warn(f"{err}; translating with PyTorch (decode.backend=ctranslate2 converts it again)")
            why = "the CTranslate2 model is damaged"
        else:
            warn(f"{err}; translating with PyTorch")
            why = "no place to store the CTranslate2 model"
        return _open_torch(loaded, decode, device, workers, seed, valid, say, why=why)
    threads = threads or torch.get_num_threads()

    def build(compute_type: str) -> CT2Translator:
        cpu = device.type == "cpu"
        return CT2Translator(model_dir, loaded.tokenizers, decode, device=device.type, device_index=device.index or 0,
                             compute_type=compute_type, intra_threads=1 if cpu else 0,
                             inter_threads=threads if cpu else 1, max_positions=loaded.config.model.max_positions)

    import ctranslate2

    fast = _FAST_TYPE[device.type]
    if decode.compute_type == "auto" and fast not in ctranslate2.get_supported_compute_types(device.type):
        compute_type, why = "float32", f"{fast} is not supported on this {device.type}"
    else:
        compute_type, why = choose_compute_type(loaded, decode, device.type, fast, model_dir / RECORD, build, valid)
    ctranslate2.set_random_seed(seed)
    if not explicit:
        say(f"backend: ctranslate2 {compute_type} on {device} ({why})")
    return build(compute_type)


def _open_torch(loaded: Loaded, decode: DecodeConfig, device: torch.device, workers: int, seed: int,
                valid: CorpusConfig | None, say: Callable[[str], None], why: str | None) -> TorchBackend:
    """The PyTorch backend at ``decode.compute_type``; under ``auto``, bfloat16 where the device
    multiplies it in hardware (a CPU with AMX or AVX512-BF16) and it keeps validation BLEU (as
    ``choose_compute_type``), else float32. ``why``: why ``backend: auto`` came to PyTorch
    (None: ``decode.backend`` said so)."""
    from mtkit.runtime import cpu_has_native_bf16
    from mtkit.torch_backend import DTYPES, TorchBackend

    if decode.compute_type not in ("auto", *DTYPES):
        raise MtkitError(f"decode.compute_type={decode.compute_type}: the PyTorch backend runs "
                         f"{', '.join(DTYPES)} (the others are CTranslate2's)")
    built: dict[str, TorchBackend] = {}

    def build(compute_type: str) -> TorchBackend:
        if compute_type not in built:
            model = loaded.model if compute_type == "float32" else copy.deepcopy(loaded.model).to(DTYPES[compute_type])
            generator = torch.Generator(device=device).manual_seed(seed)
            # The compute-type check searches in this process; the user's translation may fork workers.
            built[compute_type] = TorchBackend(model, device, generator=generator)
        return built[compute_type]

    if decode.compute_type == "auto" and not (device.type == "cpu" and cpu_has_native_bf16()):
        compute_type, checked = "float32", "bfloat16 is not native here"
    else:
        record = Path(loaded.path) / TORCH_RECORD
        compute_type, checked = choose_compute_type(loaded, decode, f"torch {device.type}", "bfloat16", record, build,
                                                    valid)
    chosen = build(compute_type)
    backend = TorchBackend(chosen.model, device, workers=workers, generator=chosen.generator)
    if why is not None:
        say(f"backend: torch {compute_type} on {device} ({why}; {checked})")
    return backend


def ct2_problems(loaded: Loaded, decode: DecodeConfig, device: torch.device) -> list[str]:
    """Why CTranslate2 cannot translate ``loaded`` under ``decode`` on ``device`` (empty: it can),
    one short clause each, the first the most basic."""
    try:
        import ctranslate2
    except ImportError:
        return ["ctranslate2 is not installed (pip install ctranslate2)"]
    from mtkit.export import CTranslate2Exporter

    if device.type not in _FAST_TYPE:
        return [f"CTranslate2 runs on CPUs and CUDA GPUs, not {device.type}"]
    if device.type == "cuda" and ctranslate2.get_cuda_device_count() == 0:
        return ["this ctranslate2 has no CUDA device"]
    if loaded.config.model.arch == "decoder_only":
        # Exported, it is a CTranslate2 Generator (mtkit export ctranslate2); this backend
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


def choose_compute_type(
    loaded: Loaded,
    decode: DecodeConfig,
    key: str,
    fast: str,
    path: Path,
    build: Callable[[str], SearchBackend],
    valid: CorpusConfig | None = None,
) -> tuple[str, str]:
    """``decode.compute_type``, or for ``auto`` the ``fast`` type if it keeps validation BLEU
    within ``BLEU_TOLERANCE`` of float32 (measured once with ``build``'s backends, stored in
    ``path`` under ``key``: the device, for the PyTorch backend prefixed by ``torch``), else
    float32; and why, in words. ``valid``: see ``validation_set``."""
    if decode.compute_type != "auto":
        return decode.compute_type, "decode.compute_type"
    records = _read_records(path)
    record = _well_formed(records.get(key), fast)
    when = "measured before"
    if record is None:
        found = validation_set(loaded, valid=valid)
        if found is None:
            return "float32", f"no validation set to check {fast} against"
        sources, references, where = found
        record = measure_compute_type(loaded, decode, build, fast, sources, references)
        record["validation_set"] = where
        records[key] = record
        when = f"measured now in {sum(record['seconds'].values()):.0f} s"
        try:
            atomic_write_text(path, json.dumps(records, indent=2) + "\n")
        except MtkitError as err:
            when += f", not stored: {err}"
    bleu = record["bleu"]
    return record["choice"], (f"{fast} BLEU {bleu[fast]:.2f} vs float32 {bleu['float32']:.2f} on "
                              f"{record['sentences']} validation sentences, {when}; {path}")


def measure_compute_type(
    loaded: Loaded,
    decode: DecodeConfig,
    build: Callable[[str], SearchBackend],
    fast: str,
    sources: list[str],
    references: list[str],
) -> dict[str, Any]:
    """Translate ``sources`` with float32 and with ``fast``; the record ``choose_compute_type``
    stores: BLEU of each, seconds of each, the choice and the settings it was measured with."""
    from mtkit.score import score
    from mtkit.translate import one_line

    settings = decode.model_copy(update={"sampling": False, "nbest": 1})
    tokenizers, longest = loaded.tokenizers, loaded.config.model.max_positions - 1
    ids = [line_ids[:longest] for line_ids in tokenizers.src.encode([line if line.strip() else "" for line in sources])]
    todo = sorted((i for i, line_ids in enumerate(ids) if line_ids), key=lambda i: len(ids[i]))
    batches = [[ids[i] for i in todo[start : start + 64]] for start in range(0, len(todo), 64)]
    bleu, seconds = {}, {}
    for compute_type in ("float32", fast):
        start = time.perf_counter()
        # The backend's search itself, not a Translator: this check is not a translation the
        # user asked for (nor one that fault tests count).
        found = build(compute_type).search(batches, None, settings)
        best: list[list[int]] = [[] for _ in sources]
        for row, nbest in zip(todo, found, strict=True):
            best[row] = nbest[0].tokens if nbest else []
        texts = [one_line(text) for text in tokenizers.tgt.decode(best)]
        seconds[compute_type] = round(time.perf_counter() - start, 2)
        result = score(texts, [references], metrics=("bleu",), tgt_lang=loaded.config.data.tgt_lang)[0]
        bleu[compute_type] = round(result.score, 2)
        signature = result.signature
    keep = bleu[fast] >= bleu["float32"] - BLEU_TOLERANCE
    return {
        "choice": fast if keep else "float32",
        "rule": f"{fast} if its BLEU >= float32 BLEU - {BLEU_TOLERANCE}",
        "bleu": bleu,
        "delta": round(bleu[fast] - bleu["float32"], 2),
        "seconds": seconds,
        "sentences": len(sources),
        "signature": signature,
        "decode": settings.model_dump(include={"beam", "lenpen", "length_penalty_form", "max_len_a", "max_len_b",
                                               "min_len"}),
    }


def validation_set(
    loaded: Loaded, limit: int = CHECK_SENTENCES, valid: CorpusConfig | None = None
) -> tuple[list[str], list[str], str] | None:
    """Up to ``limit`` (source, reference) lines of a validation set, and where they came from:
    the prepared split of the run that holds the checkpoint, else ``valid`` (a corpus the user
    named); None when there is neither. Never a path from the checkpoint's own config: a
    checkpoint is data, and its ``data.valid`` may name any file on this machine."""
    from mtkit.checkpoint import refuse_links_out
    from mtkit.corpus import read_corpus
    from mtkit.data import load_split
    from mtkit.rundir import ExperimentDir

    checkpoint = Path(loaded.path).resolve()
    if checkpoint.parent.name == "checkpoints":
        run = checkpoint.parent.parent
        try:
            refuse_links_out(ExperimentDir(run).data, within=run)
            rows = load_split(run, "valid")[:limit]
            if rows["src"]:
                return list(rows["src"]), list(rows["tgt"]), f"{run}/data (valid)"
        except MtkitError:
            pass
    if valid is None:
        return None
    try:
        sources, references = next(iter(read_corpus(valid, "skip", limit)), ([], []))
    except (MtkitError, OSError):
        return None
    if not sources:
        return None
    return list(sources[:limit]), list(references[:limit]), "data.valid"


def _read_records(path: Path) -> dict[str, Any]:
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return records if isinstance(records, dict) else {}


def _well_formed(record: Any, fast: str) -> dict[str, Any] | None:
    """``record`` if it has the shape ``measure_compute_type`` gives it, for ``fast``, else None:
    the file lies in the checkpoint, which may come from anywhere, so its choice is checked."""
    if not isinstance(record, dict) or record.get("choice") not in (fast, "float32"):
        return None
    bleu = record.get("bleu")
    if (isinstance(bleu, dict) and all(isinstance(bleu.get(t), int | float) for t in (fast, "float32"))
            and isinstance(record.get("sentences"), int)):
        return record
    return None
