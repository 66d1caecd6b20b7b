"""Translation engines, and ``open_translator``: the one way to get a ``Translator`` for a
trained run or checkpoint, used by ``mtkit translate``, ``mtkit serve``, the pipeline's test
translation, ``mtkit compare``, the benchmarks and library users alike::

    from mtkit.engines import open_translator

    translator = open_translator("runs/tiny")          # the run's final checkpoint and settings
    print(translator.translate(["A man rides a bike."]))
    translator.translate_lines(lines, nbest=4, beam=8)  # per-call decode settings

Two engines run ``Translator``'s search: mtkit's own on the PyTorch model
(``mtkit.engines.pytorch``) and CTranslate2 on a converted copy of it
(``mtkit.engines.ctranslate2``). ``decode.backend`` picks one: ``torch``, ``ctranslate2`` or
``auto``. ``auto`` takes CTranslate2 when it is installed, runs on the device, can represent
the model and can honour every decode setting (``ct2_problems`` lists what stands in the way),
else PyTorch; either way one line says which and why. An explicit ``ctranslate2`` that cannot
be honoured is a one-line error instead.

The CTranslate2 model is converted on first use (``mtkit.engines.ctranslate2.ct2_model_dir``);
one whose files no longer match the checksums written with it is converted again under an
explicit ``ctranslate2``, and left for PyTorch, with one warning, under ``auto``. Precision,
``decode.compute_type``: ``auto`` measures the fast type of the device against float32 once
(``mtkit.engines.precision``). On a CPU the threads go to concurrent batches (CTranslate2's
``inter_threads``, one thread each; PyTorch worker processes), which on few cores translates a
file faster than threads within a batch.

GPU: CTranslate2 runs on CUDA when the torch device is ``cuda[:N]`` and ctranslate2 sees a
CUDA device; otherwise ``auto`` keeps PyTorch there.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from mtkit.errors import MtkitError

if TYPE_CHECKING:
    from mtkit.checkpoint import Loaded
    from mtkit.config import CorpusConfig, DecodeConfig
    from mtkit.engines.ctranslate2 import CT2Translator
    from mtkit.engines.pytorch import TorchBackend
    from mtkit.translate import SearchBackend, Translator

log = logging.getLogger(__name__)

FAST_TYPE = {"cpu": "int8", "cuda": "float16"}
"""The reduced precision that CTranslate2's ``compute_type: auto`` checks, per device kind."""


def open_translator(
    source: str | Path | Loaded,
    decode: DecodeConfig | None = None,
    device: str | torch.device = "cpu",
    *,
    threads: int | None = None,
    workers: int = 1,
    seed: int | None = None,
    valid: CorpusConfig | None = None,
    say: Callable[[str], None] = log.info,
    warn: Callable[[str], None] = log.warning,
    src_lang: str | None = None,
    tgt_lang: str | None = None,
) -> Translator:
    """A ``Translator`` for ``source`` (a run directory: its final, else best, else last
    checkpoint; a checkpoint directory; or a checkpoint already loaded on ``device``) under
    ``decode`` (default: the checkpoint's own settings), on the engine ``decode.backend`` picks
    (``open_engine``). seed: seeds sampling (default: the checkpoint's ``experiment.seed``).
    warn: truncated lines and what went wrong on the way; say: the engine chosen, the precision
    check. src_lang, tgt_lang: a multilingual model's languages (default: the run's
    ``data.src_lang``/``data.tgt_lang``). ``Translator.close()`` (or ``with``) stops what the
    engine started."""
    from mtkit.checkpoint import Loaded, load_for_inference
    from mtkit.tokenizer import language_prefixes, run_languages
    from mtkit.translate import Translator

    loaded = source if isinstance(source, Loaded) else load_for_inference(Path(source), device=str(device))
    decode = decode if decode is not None else loaded.config.decode
    seed = loaded.config.experiment.seed if seed is None else seed
    src_lang, tgt_lang = run_languages(loaded.config.data, loaded.tokenizers, src_lang, tgt_lang)
    language_prefixes(loaded.tokenizers, src_lang, tgt_lang)  # a language the model lacks: before any engine starts
    engine = open_engine(loaded, decode, device, threads=threads, workers=workers, seed=seed, valid=valid, say=say,
                         warn=warn)
    return Translator(loaded.model, loaded.tokenizers, decode, device, seed=seed, warn=warn, backend=engine,
                      src_lang=src_lang, tgt_lang=tgt_lang)


def open_engine(
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
    """The engine for ``Translator(..., backend=...)`` under ``decode.backend``. Under ``auto``,
    ``say`` gets the one line that names the choice and why (an explicit choice is silent, but
    for the one-time compute-type check); ``warn`` what went wrong on the way (a read-only
    checkpoint directory). threads: CPU threads for CTranslate2 (default: torch's). workers:
    processes the PyTorch engine searches batches in on a CPU (``TorchBackend``). seed: seeds
    sampling. valid: a validation corpus the user named, for the compute-type check."""
    device = torch.device(device)
    if decode.backend == "torch":
        return _open_torch(loaded, decode, device, workers, seed, valid, say, why=None)
    from mtkit.engines.ctranslate2 import CT2Translator, DamagedConversion, ct2_model_dir, ct2_problems
    from mtkit.engines.precision import RECORD, choose_compute_type

    explicit = decode.backend == "ctranslate2"
    problems = ct2_problems(loaded, decode, device)
    if problems:
        if explicit:
            raise MtkitError("decode.backend=ctranslate2: " + "; ".join(problems))
        return _open_torch(loaded, decode, device, workers, seed, valid, say, why=problems[0])
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

    fast = FAST_TYPE[device.type]
    if decode.compute_type == "auto" and fast not in ctranslate2.get_supported_compute_types(device.type):
        compute_type, why = "float32", f"{fast} is not supported on this {device.type}"
    else:
        compute_type, why = choose_compute_type(loaded, decode, device.type, fast, model_dir / RECORD, build, valid,
                                                say)
    ctranslate2.set_random_seed(seed)
    if not explicit:
        say(f"backend: ctranslate2 {compute_type} on {device} ({why})")
    return build(compute_type)


def _open_torch(loaded: Loaded, decode: DecodeConfig, device: torch.device, workers: int, seed: int,
                valid: CorpusConfig | None, say: Callable[[str], None], why: str | None) -> TorchBackend:
    """The PyTorch engine at ``decode.compute_type``; under ``auto``, bfloat16 where the device
    multiplies it in hardware (a CPU with AMX or AVX512-BF16) and it keeps validation BLEU and
    is faster (``choose_compute_type``), else float32. ``why``: why ``backend: auto`` came to
    PyTorch (None: ``decode.backend`` said so)."""
    from mtkit.engines.precision import TORCH_RECORD, choose_compute_type
    from mtkit.engines.pytorch import DTYPES, TorchBackend
    from mtkit.runtime import cpu_has_native_bf16

    if decode.compute_type not in ("auto", *DTYPES):
        raise MtkitError(f"decode.compute_type={decode.compute_type}: the PyTorch backend runs "
                         f"{', '.join(DTYPES)} (the others are CTranslate2's)")
    built: dict[str, TorchBackend] = {}

    def build(compute_type: str) -> TorchBackend:
        if compute_type not in built:
            model = loaded.model if compute_type == "float32" else copy.deepcopy(loaded.model).to(DTYPES[compute_type])
            generator = torch.Generator(device=device).manual_seed(seed)
            # The compute-type check searches as the user's translation will, in as many workers.
            built[compute_type] = TorchBackend(model, device, workers=workers, generator=generator)
        return built[compute_type]

    if decode.compute_type == "auto" and not (device.type == "cpu" and cpu_has_native_bf16()):
        compute_type, checked = "float32", "bfloat16 is not native here"
    else:
        record = Path(loaded.path) / TORCH_RECORD
        compute_type, checked = choose_compute_type(loaded, decode, f"torch {device.type}", "bfloat16", record, build,
                                                    valid, say)
    chosen = build(compute_type)
    for other in built.values():
        if other is not chosen:
            other.close()
    if why is not None:
        say(f"backend: torch {compute_type} on {device} ({why}; {checked})")
    return chosen
