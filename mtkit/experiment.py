"""An experiment's prepared inputs, loaded and checked before training's first update: the
tokenizers, the training corpus (and its per-epoch subword sampling) and the validation set,
both as token ids (for the loss) and as text (for BLEU, ``mtkit.evaluate``)."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mtkit.batching import TokenizedCorpus
from mtkit.config import Config
from mtkit.errors import MtkitError


@dataclass
class Experiment:
    """What the loop works on, loaded and checked before the first step."""

    config: Config
    tokenizers: Any
    train: TokenizedCorpus
    valid: TokenizedCorpus | None
    valid_text: tuple[list[str], list[str]] | None  # source lines, references
    sampling: SubwordSampling | None = None  # train.subword_alpha > 0
    train_groups: list[Any] = field(default_factory=list)
    """The training split's corpora as row ranges with their directions (``mtkit.data.Group``)."""
    valid_groups: list[Any] = field(default_factory=list)
    """The same for the validation split: validation BLEU is per direction."""


def load_experiment(config: Config) -> Experiment:
    """Tokenizer and prepared data; refuses data prepared with another tokenizer and a
    ``max_tokens`` too small for the longest training pair."""
    from mtkit.data import load_split, prepared_fingerprint, split_groups
    from mtkit.tokenizer import Tokenizers, tokenizer_dir

    exp_dir = config.experiment.dir
    tokenizers = Tokenizers.load(tokenizer_dir(config))
    if prepared_fingerprint(exp_dir) != tokenizers.fingerprint():
        raise MtkitError(
            f"{exp_dir / 'data'}: prepared with a different tokenizer than {tokenizer_dir(config)}; "
            "run `mtkit prepare -c CONFIG` again"
        )
    train_split = load_split(exp_dir, "train")
    train = TokenizedCorpus.from_dataset(train_split)
    if len(train) == 0:
        raise MtkitError(f"{exp_dir / 'data' / 'train.arrow'}: no training pairs")
    longest = int(train.sizes.max())
    if longest > config.train.max_tokens:
        raise MtkitError(
            f"train.max_tokens={config.train.max_tokens} is smaller than the longest training pair "
            f"({longest} tokens with BOS/EOS); raise train.max_tokens or lower data.max_len and prepare again"
        )
    positions = positions_needed(config, train.src_lens, train.tgt_lens)
    if int(positions.max()) > config.model.max_positions:
        raise MtkitError(
            f"model.max_positions={config.model.max_positions} is smaller than the longest training pair "
            f"({int(positions.max())} positions); raise it or lower data.max_len and prepare again"
        )
    valid = valid_text = None
    valid_groups = []
    if config.data.valid is not None:
        split = load_split(exp_dir, "valid")
        valid_groups = split_groups(exp_dir, "valid")
        if len(split) == 0:
            raise MtkitError(f"{exp_dir / 'data' / 'valid.arrow'}: no validation pairs; fix data.valid or remove it")
        valid_text = (list(split["src"]), list(split["tgt"]))
        # Validation pairs are kept line-exact by prepare; the loss leaves out those the model
        # cannot take (BLEU still translates them, truncated, as `mtkit translate` would).
        needed = positions_needed(config, np.asarray(split["src_len"]), np.asarray(split["tgt_len"]))
        fits = np.flatnonzero(needed <= config.model.max_positions).tolist()
        if len(fits) < len(split):
            warnings.warn(f"{len(split) - len(fits)} validation pairs exceed model.max_positions="
                          f"{config.model.max_positions}; the validation loss leaves them out", stacklevel=1)
            split = split.select(fits)
        valid = TokenizedCorpus.from_dataset(split) if len(split) else None
    train_groups = split_groups(exp_dir, "train")
    sampling = None
    if config.train.subword_alpha > 0:
        sampling = SubwordSampling(config, tokenizers, train_split, train, train_groups)
    return Experiment(config, tokenizers, train, valid, valid_text, sampling, train_groups, valid_groups)


def positions_needed(config: Config, src_lens: np.ndarray, tgt_lens: np.ndarray) -> np.ndarray:
    """``(N,)`` positions each pair takes in the model (lengths without BOS/EOS): its longer
    side with BOS/EOS, or, in a decoder-only model whose target positions continue after the
    source, both sides with theirs."""
    if config.model.target_follows_source:
        return src_lens + tgt_lens + 2
    return np.maximum(src_lens, tgt_lens) + 1


class SubwordSampling:
    """Subword regularisation (``train.subword_alpha``): each epoch's training corpus is the
    text prepare stored, segmented anew by SentencePiece's sampling, seeded by the experiment's
    seed and the epoch. Within a process an epoch's draw is repeatable; a resumed run (a new
    process) or another rank draws other segmentations, because SentencePiece's sampling does
    not follow the seed across processes (0.2.3): such a run resumes at the right data position
    with the right weights, but is not bit-identical to an uninterrupted one. A pair
    whose drawn segmentation no longer fits the model's positions or one batch keeps its
    best segmentation (``best``, the corpus prepare encoded)."""

    CHUNK = 10_000  # rows of text read and encoded at a time

    def __init__(self, config: Config, tokenizers: Any, split: Any, best: TokenizedCorpus, groups: list[Any]):
        from mtkit.tokenizer import language_prefixes

        self.config, self.tokenizers, self.split, self.best = config, tokenizers, split, best
        # Each corpus's language tokens, which prepare put before its ids (none for most models).
        self.prefixes = [(group, *language_prefixes(tokenizers, group.src_lang, group.tgt_lang))
                         for group in groups] if tokenizers.languages is not None else []

    def corpus(self, epoch: int) -> TokenizedCorpus:
        cfg = self.config.train
        parts: list[TokenizedCorpus] = []
        for number, start in enumerate(range(0, len(self.split), self.CHUNK)):
            rows = self.split.table.slice(start, self.CHUNK)
            # Seeded for each chunk, so that a chunk's draw follows from (seed, epoch, chunk).
            seeds = np.random.SeedSequence([self.config.experiment.seed, epoch, number]).generate_state(2)
            src, tgt = (tokenizer.sample(rows.column(side).to_pylist(), cfg.subword_alpha, cfg.subword_nbest,
                                         int(seed))
                        for tokenizer, side, seed in ((self.tokenizers.src, "src", seeds[0]),
                                                      (self.tokenizers.tgt, "tgt", seeds[1])))
            for group, src_prefix, tgt_prefix in self.prefixes:
                for row in range(max(group.start, start), min(group.end, start + len(src))):
                    src[row - start], tgt[row - start] = src_prefix + src[row - start], tgt_prefix + tgt[row - start]
            src_lens, tgt_lens = _lengths(src), _lengths(tgt)
            too_big = ((positions_needed(self.config, src_lens, tgt_lens) > self.config.model.max_positions)
                       | (np.maximum(src_lens, tgt_lens) + 1 > cfg.max_tokens))
            for row in np.flatnonzero(too_big).tolist():
                src[row], tgt[row] = self.best.ids(start + row)
            parts.append(TokenizedCorpus.from_lists(src, tgt))
        return TokenizedCorpus.concatenate(parts)


def _lengths(rows: list[list[int]]) -> np.ndarray:
    return np.fromiter(map(len, rows), dtype=np.int64, count=len(rows))
