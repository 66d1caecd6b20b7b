"""BLEU, chrF and TER through sacrebleu's object API, each with its signature. No torch.

Scores equal the ``sacrebleu`` command's on the same files: lines are read as it reads them
(split on ``\\n`` only, trailing whitespace removed) and the metrics are built with the same
arguments. Every metric is built with the target language's settings: ``tgt_lang`` picks
sacrebleu's BLEU tokenizer for zh, ja and ko (``13a`` otherwise; ``tokenize`` overrides it),
and for zh and ja TER splits CJK characters as sacrebleu's ``--ter-asian-support
--ter-normalized`` do. chrF counts characters, the same for every language. sacrebleu's
tokenizers for ja and ko need MeCab (``pip install 'sacrebleu[ja]'``); without it BLEU
falls back to ``char`` for ja (``13a`` would count a sentence as one word) and ``13a`` for ko,
says so once on stderr, and the signature's ``tok:`` shows it.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from mtkit.errors import MtkitError
from mtkit.fileio import SKIP_HINT, STDIN, read_lines

log = logging.getLogger(__name__)

METRICS = ("bleu", "chrf", "ter")
BOOTSTRAP_SAMPLES = 1000
SPM_MARK = "\u2581"  # SentencePiece's word-boundary piece: left in a hypothesis, it was not detokenized


@dataclass
class MetricScore:
    """One corpus score. ``name`` is sacrebleu's (BLEU, chrF2, TER); ``text`` is the line
    sacrebleu prints (``BLEU|nrefs:1|...|version:2.6.0 = 34.1 65.2/40.1/...``)."""

    name: str
    score: float
    signature: str
    text: str
    verbose: str = ""
    ratio: float | None = None
    """BLEU only: hypothesis length over reference length, in BLEU's tokens."""

    def to_dict(self) -> dict[str, object]:
        return {"name": self.name, "score": round(self.score, 4), "signature": self.signature,
                "verbose_score": self.verbose}


UNSPACED = frozenset({"zh", "ja"})
"""Languages written without spaces between words: left as is, TER counts a whole sentence as one word."""
_ALIASES = {"zho": "zh", "cmn": "zh", "jpn": "ja", "kor": "ko"}
"""Three-letter codes (FLORES' ``zho_Hans``, ``jpn_Jpan``) for the languages with settings of their own."""
_MECAB_EXTRAS = {"ja-mecab": "sacrebleu[ja]", "ko-mecab": "sacrebleu[ko]"}
_MECAB_FALLBACK = {"ja-mecab": "char", "ko-mecab": "13a"}


def language(tgt_lang: str | None) -> str:
    """The language a metric's settings go by: ``zh-Hans``, ``zh_CN``, ``zho_Hans`` -> ``zh``; ``""`` for None."""
    primary = (tgt_lang or "").replace("_", "-").split("-")[0].lower()
    return _ALIASES.get(primary, primary)


def _bleu(tgt_lang: str | None, tokenize: str | None, nrefs: int):
    from sacrebleu.metrics import BLEU

    lang = language(tgt_lang)
    try:
        return BLEU(tokenize=tokenize, trg_lang=lang)
    except RuntimeError:
        # sacrebleu's ja-mecab / ko-mecab without MeCab: it fails, over several lines.
        chosen = tokenize or BLEU._TOKENIZER_MAP.get(lang, "")
        if chosen not in _MECAB_EXTRAS:
            raise
        if tokenize is not None:
            raise MtkitError(f"BLEU: the {chosen} tokenizer needs MeCab: pip install "
                             f"'{_MECAB_EXTRAS[chosen]}'") from None
    fallback = _MECAB_FALLBACK[chosen]
    _say_fallback(lang, chosen, fallback)
    return BLEU(tokenize=fallback)  # no trg_lang: sacrebleu would warn about the choice again


@functools.cache  # once per process: validation and compare score again and again
def _say_fallback(lang: str, chosen: str, fallback: str) -> None:
    log.warning(f"mtkit: warning: BLEU for {lang}: sacrebleu's {chosen} tokenizer needs MeCab "
                f"(pip install '{_MECAB_EXTRAS[chosen]}'); tokenizing with {fallback} instead")


def _chrf(tgt_lang: str | None, tokenize: str | None, nrefs: int):
    from sacrebleu.metrics import CHRF

    return CHRF()  # characters with spaces removed: right for every language as it is


def _ter(tgt_lang: str | None, tokenize: str | None, nrefs: int):
    from sacrebleu.metrics import TER

    # asian_support splits CJK characters, but only together with normalized.
    unspaced = language(tgt_lang) in UNSPACED
    return TER(normalized=unspaced, asian_support=unspaced)


# name -> factory(tgt_lang, tokenize, nrefs); sacrebleu's metric modules load lazily.
_FACTORIES: dict[str, Callable] = {"bleu": _bleu, "chrf": _chrf, "ter": _ter}


def make_metric(name: str, tgt_lang: str | None = None, tokenize: str | None = None, nrefs: int = 1):
    """A sacrebleu metric object; MtkitError for an unknown name or an unusable tokenizer."""
    if name not in _FACTORIES:
        raise MtkitError(f"unknown metric {name!r}; choose from {', '.join(METRICS)}")
    try:
        return _FACTORIES[name](tgt_lang, tokenize, nrefs)
    except (ImportError, ModuleNotFoundError) as err:
        raise MtkitError(f"{name}: tokenizer needs a missing package ({err}); install it or pass --tokenize") from None
    except (KeyError, AssertionError, RuntimeError) as err:
        from sacrebleu.metrics.bleu import _TOKENIZERS

        if tokenize is not None and tokenize not in _TOKENIZERS:
            raise MtkitError(f"unknown BLEU tokenizer {tokenize!r}; choose from {', '.join(_TOKENIZERS)}") from None
        raise MtkitError(f"{name}: {' '.join(str(err).split())}") from None


def _check(hyps: Sequence[str], refs: Sequence[Sequence[str]], names: tuple[str, list[str]] | None) -> None:
    if not refs:
        raise MtkitError("no reference given")
    hyp_name, ref_names = names or ("hypothesis", [f"reference {i + 1}" for i in range(len(refs))])
    if not hyps:
        raise MtkitError(f"{hyp_name} has no lines: nothing to score")
    for ref, ref_name in zip(refs, ref_names, strict=True):
        if len(ref) != len(hyps):
            raise MtkitError(f"{hyp_name} has {len(hyps)} lines but {ref_name} has {len(ref)}")


def score(
    hyps: list[str],
    refs: list[list[str]],
    metrics: Sequence[str] = METRICS,
    tgt_lang: str | None = None,
    tokenize: str | None = None,
) -> list[MetricScore]:
    """Corpus scores of ``hyps`` against one or more reference streams (``refs[k][i]`` is
    the k-th reference of line i)."""
    _check(hyps, refs, None)
    results = []
    for name in metrics:
        metric = make_metric(name, tgt_lang, tokenize, len(refs))
        result = metric.corpus_score(list(hyps), [list(r) for r in refs])
        signature = metric.get_signature().format()
        text = f"{result.name}|{signature} = {_body(result)}"
        ratio = getattr(result, "ratio", None)
        results.append(MetricScore(result.name, float(result.score), signature, text, _verbose(result), ratio))
    return results


def _body(result) -> str:
    """``45.9 77.8/42.9/... (BP = ...)``: what sacrebleu prints after ``NAME|SIG = ``."""
    return result.format(width=1).split(" = ", 1)[1]


def _verbose(result) -> str:
    body = _body(result)
    return body.split(" ", 1)[1] if " " in body else ""


@dataclass
class Comparison:
    """A paired bootstrap test of systems against the first (the baseline): per metric,
    per system ``(name, score, mean, ci, p_value)`` (p_value None for the baseline)."""

    signatures: dict[str, str]
    rows: dict[str, list[tuple[str, float, float | None, float | None, float | None]]]


def compare(
    systems: Sequence[tuple[str, Sequence[str]]],
    refs: list[list[str]],
    metrics: Sequence[str] = METRICS,
    tgt_lang: str | None = None,
    tokenize: str | None = None,
    samples: int = BOOTSTRAP_SAMPLES,
) -> Comparison:
    """sacrebleu's paired bootstrap resampling (its ``--paired-bs``): each system against the
    first, with 95% confidence intervals and p-values; seed from ``SACREBLEU_SEED`` (12345)."""
    from sacrebleu.significance import PairedTest

    for name, hyps in systems:
        _check(hyps, refs, (name, [f"reference {i + 1}" for i in range(len(refs))]))
    objects = {name: make_metric(name, tgt_lang, tokenize, len(refs)) for name in metrics}
    test = PairedTest(list(systems), objects, refs, test_type="bs", n_samples=samples)
    signatures, table = test()
    rows: dict[str, list[tuple[str, float, float | None, float | None, float | None]]] = {}
    names = [str(system) for system in table["System"]]
    for metric_name, results in table.items():
        if metric_name == "System":
            continue
        rows[metric_name] = [
            (system, r.score, r.mean, r.ci, r.p_value)
            for system, r in zip(names, results, strict=True)
            if not isinstance(r, str)  # only the "System" column holds strings
        ]
    return Comparison({k: v.format() for k, v in signatures.items()}, rows)


def read_text(source: Path | str) -> list[str]:
    """Lines of a plain or gzip UTF-8 file, or of stdin for the string ``-``, as sacrebleu reads them
    (trailing whitespace removed); a line that is not UTF-8 is an error naming it."""
    # Kept as mtkit has always worded it: files with read_lines' hint, stdin without.
    hint = "" if source == STDIN else SKIP_HINT
    return [line.rstrip() for line in read_lines(source, hint=hint)]


def looks_tokenized(hyps: Sequence[str]) -> bool:
    """True when a hypothesis still holds SentencePiece's '▁' (forgotten detokenization)."""
    return any(SPM_MARK in h for h in hyps)
