"""Translating a set and scoring it, one way for every consumer: training's validation BLEU,
the pipeline's choice of the final checkpoint, the precision check of ``compute_type: auto``
(``mtkit.engines.precision``) and ``mtkit compare`` all call ``translate_and_score``, so a score
from one is the score the others would give. Also the validation loss, and where a checkpoint's
validation set is read from (``validation_set``)."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from mtkit.batching import TokenizedCorpus, sorted_batches
from mtkit.errors import MtkitError
from mtkit.loss import TranslationLoss
from mtkit.score import MetricScore, score

if TYPE_CHECKING:
    from mtkit.checkpoint import Loaded
    from mtkit.config import Config, CorpusConfig
    from mtkit.experiment import Experiment
    from mtkit.models import Model
    from mtkit.runtime import Runtime
    from mtkit.translate import Translator


@dataclass
class Evaluation:
    """What ``translate_and_score`` measured: the best translation of each source line, one
    score per metric asked for (in that order, each with its signature), and the seconds the
    translation took."""

    hypotheses: list[str]
    scores: list[MetricScore]
    seconds: float


def translate_and_score(
    translator: Translator,
    sources: Sequence[str],
    references: Sequence[str],
    *,
    metrics: Sequence[str] = ("bleu", "chrf"),
    tgt_lang: str | None = None,
    tokenize: str | None = None,
) -> Evaluation:
    """Translate ``sources`` with ``translator`` (as ``mtkit translate`` would) and score the
    translations against ``references`` (``mtkit.score.score``: detokenized text, sacrebleu)."""
    started = time.perf_counter()
    hypotheses = translator.translate(list(sources))
    seconds = time.perf_counter() - started
    found = score(hypotheses, [list(references)], metrics=metrics, tgt_lang=tgt_lang, tokenize=tokenize)
    return Evaluation(hypotheses, found, seconds)


@torch.no_grad()
def validation_loss(model: Model, corpus: TokenizedCorpus, max_tokens: int, runtime: Runtime) -> dict[str, float]:
    """Per-token NLL (``loss``) and perplexity of ``corpus``, without label smoothing."""
    model.eval()
    loss_fn = TranslationLoss(model, smoothing=0.0)
    nll = tokens = 0.0
    for ids in sorted_batches(corpus, max(max_tokens, int(corpus.sizes.max()))):
        batch = corpus.batch(ids).to(runtime.device)
        with torch.no_grad(), runtime.autocast():  # no graph: nothing is kept for a backward
            _, batch_nll = loss_fn(batch.src, batch.tgt_in, batch.tgt_out)
        nll += float(batch_nll)
        tokens += batch.target_tokens
    model.train()
    loss = nll / max(tokens, 1)
    return {"loss": loss, "ppl": math.exp(min(loss, 100.0))}


def validation_bleu(config: Config, exp: Experiment, model: Model, runtime: Runtime) -> dict[str, Any]:
    """BLEU and chrF of the validation set (its first ``train.valid_max_sentences``) decoded
    exactly as ``mtkit translate`` would with the PyTorch engine. A multilingual experiment's
    set is scored per direction (``directions``: each one's BLEU, chrF and sentences, its first
    ``valid_max_sentences``); ``bleu`` and ``chrf`` are then their means, what selection uses."""
    from mtkit.data import Group
    from mtkit.translate import Translator

    if exp.valid_text is None:
        raise ValueError("validation_bleu needs an experiment with validation data")
    sources, references = exp.valid_text
    groups = exp.valid_groups or [Group(config.data.src_lang, config.data.tgt_lang, 0, len(sources))]
    named = exp.tokenizers.languages is not None  # the model is told its languages
    model.eval()
    found = {}
    with torch.no_grad():
        for group in groups:
            start, end = group.start, min(group.end, group.start + (config.train.valid_max_sentences or group.end))
            languages = (group.src_lang, group.tgt_lang) if named else (None, None)
            translator = Translator(model, exp.tokenizers, config.decode, runtime.device, seed=config.experiment.seed,
                                    src_lang=languages[0], tgt_lang=languages[1])
            lang = group.tgt_lang if len(groups) > 1 else config.data.tgt_lang  # one group: the run's, as before
            found[group.direction] = (
                end - start, translate_and_score(translator, sources[start:end], references[start:end], tgt_lang=lang))
    model.train()
    metrics: dict[str, Any] = {"sentences": sum(n for n, _ in found.values())}
    for number, key in enumerate(("bleu", "chrf")):
        metrics[key] = sum(result.scores[number].score for _, result in found.values()) / len(found)
        signatures = dict.fromkeys(result.scores[number].signature for _, result in found.values())
        metrics[f"{key}_signature"] = " / ".join(signatures)
    if len(found) > 1:
        metrics["directions"] = {direction: {"bleu": result.scores[0].score, "chrf": result.scores[1].score,
                                             "sentences": n} for direction, (n, result) in found.items()}
    return metrics


def validation_set(
    loaded: Loaded, limit: int, valid: CorpusConfig | None = None
) -> tuple[list[str], list[str], str, tuple[str | None, str | None]] | None:
    """Up to ``limit`` (source, reference) lines of a validation set, where they came from and
    their direction (for a model told its languages; else None, None): the prepared split of the
    run that holds the checkpoint (as training validated on it; its first direction), else
    ``valid`` (a corpus the user named); None when there is neither. Never a path from the
    checkpoint's own config: a checkpoint is data, and its ``data.valid`` may name any file on
    this machine."""
    from mtkit.checkpoint import refuse_links_out
    from mtkit.corpus import read_corpus
    from mtkit.data import load_split, split_groups
    from mtkit.rundir import ExperimentDir

    languages = loaded.tokenizers.languages
    checkpoint = Path(loaded.path).resolve()
    if checkpoint.parent.name == "checkpoints":
        run = checkpoint.parent.parent
        try:
            refuse_links_out(ExperimentDir(run).data, within=run)
            first = split_groups(run, "valid")[0]
            rows = load_split(run, "valid")[first.start : min(first.end, first.start + limit)]
            if rows["src"]:
                direction: tuple[str | None, str | None] = (
                    (first.src_lang, first.tgt_lang) if languages is not None else (None, None))
                return list(rows["src"]), list(rows["tgt"]), f"{run}/data (valid)", direction
        except MtkitError:
            pass
    if valid is None or languages is not None and languages.directions and not (valid.src_lang and valid.tgt_lang):
        return None
    try:
        sources, references = next(iter(read_corpus(valid, "skip", limit)), ([], []))
    except (MtkitError, OSError):
        return None
    if not sources:
        return None
    direction = (valid.src_lang, valid.tgt_lang) if languages is not None else (None, None)
    return list(sources[:limit]), list(references[:limit]), "data.valid", direction
