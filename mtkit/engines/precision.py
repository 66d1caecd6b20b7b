"""The precision check of ``decode.compute_type: auto``: a reduced precision (int8 for
CTranslate2 on a CPU, float16 on a GPU; bfloat16 for the PyTorch engine on a CPU that
multiplies it in hardware) is kept only if it loses less than ``BLEU_TOLERANCE`` BLEU against
float32 *and* translates faster, both measured on at most ``CHECK_SENTENCES`` sentences of
the checkpoint's validation set (``mtkit.evaluate.validation_set``), once. ``say`` announces
the check before it starts; its figures are stored beside the model (``RECORD`` beside a
CTranslate2 conversion, ``TORCH_RECORD`` beside the checkpoint's weights, one entry per
device kind), so that a user can read why, and later runs reuse them.

The sentences are translated through ``mtkit.translate.Translator`` and scored by
``mtkit.evaluate.translate_and_score``, as training's validation is: the check truncates and
batches as ``mtkit translate`` does.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mtkit.errors import MtkitError
from mtkit.fileio import atomic_write_text

if TYPE_CHECKING:
    from mtkit.checkpoint import Loaded
    from mtkit.config import CorpusConfig, DecodeConfig
    from mtkit.translate import SearchBackend

BLEU_TOLERANCE = 0.3
"""A reduced precision is chosen by ``compute_type: auto`` only if it loses less BLEU than this."""
CHECK_SENTENCES = 100
"""Validation sentences that ``compute_type: auto`` translates with each precision: enough to
see a precision that breaks the model, few enough that the check takes seconds."""
WARM_UP_SENTENCES = 8
"""Translated, untimed, by each precision before its timed run (first-call set-up)."""
RECORD = "compute_type.json"
"""Beside a CTranslate2 conversion: its compute-type check."""
TORCH_RECORD = "torch_compute_type.json"
"""Beside a checkpoint's weights: the PyTorch engine's compute-type check."""


def choose_compute_type(
    loaded: Loaded,
    decode: DecodeConfig,
    key: str,
    fast: str,
    path: Path,
    build: Callable[[str], SearchBackend],
    valid: CorpusConfig | None,
    say: Callable[[str], None],
) -> tuple[str, str]:
    """``decode.compute_type``, or for ``auto`` the ``fast`` type if it keeps validation BLEU
    within ``BLEU_TOLERANCE`` of float32 and is faster (measured once with ``build``'s engines,
    stored in ``path`` under ``key``: the device, for the PyTorch engine prefixed by ``torch``),
    else float32; and why, in words. ``valid``: see ``mtkit.evaluate.validation_set``."""
    from mtkit.evaluate import validation_set

    if decode.compute_type != "auto":
        return decode.compute_type, "decode.compute_type"
    records = _read_records(path)
    record = _well_formed(records.get(key), fast)
    when = "measured before"
    if record is None:
        found = validation_set(loaded, CHECK_SENTENCES, valid)
        if found is None:
            return "float32", f"no validation set to check {fast} against"
        sources, references, where, direction = found
        say(f"compute type: checking {fast} against float32 on {len(sources)} sentences of {where} "
            f"(once; stored in {path})")
        record = measure_compute_type(loaded, decode, build, fast, sources, references, direction)
        record["validation_set"] = where
        records[key] = record
        when = f"measured now in {sum(record['seconds'].values()):.0f} s"
        try:
            atomic_write_text(path, json.dumps(records, indent=2) + "\n")
        except MtkitError as err:
            when += f", not stored: {err}"
    bleu, seconds = record["bleu"], record.get("seconds") or {}
    speed = (f", {seconds[fast]:.2f} s vs {seconds['float32']:.2f} s"
             if all(isinstance(seconds.get(t), int | float) for t in (fast, "float32")) else "")
    return record["choice"], (f"{fast} BLEU {bleu[fast]:.2f} vs float32 {bleu['float32']:.2f}{speed} on "
                              f"{record['sentences']} validation sentences, {when}; {path}")


def measure_compute_type(
    loaded: Loaded,
    decode: DecodeConfig,
    build: Callable[[str], SearchBackend],
    fast: str,
    sources: list[str],
    references: list[str],
    direction: tuple[str | None, str | None] = (None, None),
) -> dict[str, Any]:
    """Translate ``sources`` (in ``direction``, for a model told its languages) with float32 and
    with ``fast``; the record ``choose_compute_type`` stores: BLEU of each, seconds of each, the
    choice and the settings it was measured with."""
    from mtkit.evaluate import translate_and_score
    from mtkit.tokenizer import run_languages
    from mtkit.translate import Translator

    src_lang, tgt_lang = run_languages(loaded.config.data, loaded.tokenizers, *direction)
    settings = decode.model_copy(update={"sampling": False, "nbest": 1})
    bleu, seconds = {}, {}
    for compute_type in ("float32", fast):
        # A Translator as the user's, quiet: this check is not a translation the user asked for.
        translator = Translator(loaded.model, loaded.tokenizers, settings, warn=_quiet, backend=build(compute_type),
                                src_lang=src_lang, tgt_lang=tgt_lang)
        translator.translate(sources[:WARM_UP_SENTENCES])
        found = translate_and_score(translator, sources, references, metrics=("bleu",),
                                    tgt_lang=tgt_lang or loaded.config.data.tgt_lang)
        seconds[compute_type] = round(found.seconds, 2)
        bleu[compute_type] = round(found.scores[0].score, 2)
        signature = found.scores[0].signature
    record = {
        "rule": f"{fast} if its BLEU >= float32 BLEU - {BLEU_TOLERANCE} and it takes fewer seconds",
        "bleu": bleu,
        "delta": round(bleu[fast] - bleu["float32"], 2),
        "seconds": seconds,
        "sentences": len(sources),
        "signature": signature,
        "decode": settings.model_dump(include={"beam", "lenpen", "length_penalty_form", "max_len_a", "max_len_b",
                                               "min_len"}),
    }
    return {"choice": _choice(record, fast), **record}


def _choice(record: dict[str, Any], fast: str) -> str:
    """``fast`` if it kept BLEU within the tolerance and took fewer seconds, else float32. A
    record without both times (written before speed counted) decides by BLEU alone."""
    bleu, seconds = record["bleu"], record.get("seconds")
    kept = bleu[fast] >= bleu["float32"] - BLEU_TOLERANCE
    if not (isinstance(seconds, dict) and all(isinstance(seconds.get(t), int | float) for t in (fast, "float32"))):
        return fast if kept else "float32"
    return fast if kept and seconds[fast] < seconds["float32"] else "float32"


def _quiet(message: str) -> None:
    """The check's truncation warnings: the user's own translation gives them."""


def _read_records(path: Path) -> dict[str, Any]:
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return records if isinstance(records, dict) else {}


def _well_formed(record: Any, fast: str) -> dict[str, Any] | None:
    """``record`` if it has the shape ``measure_compute_type`` gives it, for ``fast``, with its
    choice made again by today's rule (``_choice``), else None: the file lies in the checkpoint,
    which may come from anywhere, so its choice is not obeyed but derived."""
    if not isinstance(record, dict) or record.get("choice") not in (fast, "float32"):
        return None
    bleu = record.get("bleu")
    if (isinstance(bleu, dict) and all(isinstance(bleu.get(t), int | float) for t in (fast, "float32"))
            and isinstance(record.get("sentences"), int)):
        return {**record, "choice": _choice(record, fast)}
    return None
