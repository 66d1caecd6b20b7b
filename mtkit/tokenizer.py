"""SentencePiece: train, load, encode, decode. No torch, no corpus reading.

A trained tokenizer is one directory (``{experiment.dir}/tokenizer/``) holding the model(s),
their vocabularies and ``meta.json``::

    joint:     spm.model  spm.vocab                       meta.json
    separate:  src.model  src.vocab  tgt.model  tgt.vocab  meta.json

Ids 0-3 are reserved in every model: ``<pad>``=0, ``<unk>``=1, ``<s>``=2, ``</s>``=3, then the
user symbols (language tags and the like, never split), then the learned pieces.
"""

from __future__ import annotations

import difflib
import hashlib
import io
import json
import re
import shutil
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import sentencepiece as spm

from mtkit.config import Config, TokenizerConfig
from mtkit.errors import MtkitError
from mtkit.fileio import atomic_dir, atomic_write_bytes, atomic_write_text
from mtkit.vocab import BOS_ID, EOS_ID, PAD_ID, SPECIAL_IDS, UNK_ID

Side = Literal["src", "tgt"]
META_FILE = "meta.json"
META_FORMAT = 1
PROMPT_FIELD = "{source}"
"""Where the source text goes in a prompt template (``Tokenizers.prompt``)."""


def check_prompt(template: str, what: str) -> str:
    """``template`` if it holds ``PROMPT_FIELD`` exactly once; else ValueError naming ``what``."""
    if template.count(PROMPT_FIELD) != 1:
        raise ValueError(f"{what}: a prompt template holds {PROMPT_FIELD} exactly once "
                         f"(where the source text goes), got {template!r}")
    return template


def tokenizer_dir(config: Config) -> Path:
    """Where ``mtkit tokenizer train`` writes and every later stage reads the tokenizer."""
    from mtkit.rundir import ExperimentDir

    return ExperimentDir(config.experiment.dir).tokenizer


class Tokenizer:
    """One subword model. Ids never include BOS/EOS; adding them is the model's business.

    The model is SentencePiece's (``.model``), or a Hugging Face ``tokenizer.json`` (``.json``,
    for imported models whose tokenizer transformers keeps in that form only). Its ids are the
    model's own unless ``pieces`` is given: the vocabulary in mtkit's id order (an imported model's,
    with the special tokens moved to mtkit's ids), which then maps pieces to ids both ways; a
    piece the vocabulary lacks is UNK, as in Hugging Face's Marian tokenizer. ``hidden`` ids
    (language tokens) never reach a decoded text.
    """

    def __init__(self, path: Path, num_threads: int = 1, pieces: list[str] | None = None,
                 hidden: Iterable[int] = ()):
        self.path = Path(path)
        self.num_threads = num_threads
        self._sp: spm.SentencePieceProcessor | None = None
        self._hf: Any = None
        try:
            if self.path.suffix == ".json":
                from tokenizers import Tokenizer as HFTokenizer

                self._hf = HFTokenizer.from_file(str(self.path))
            else:
                self._sp = spm.SentencePieceProcessor(model_file=str(self.path))
        except Exception as err:  # noqa: BLE001 - both libraries raise their own kinds
            kind = "tokenizer.json" if self.path.suffix == ".json" else "SentencePiece model"
            raise MtkitError(f"{self.path}: not a {kind} ({_first_line(err)})") from None
        if pieces is None and self._sp is None:
            raise MtkitError(f"{self.path}: a tokenizer.json needs the vocabulary of mtkit ids (vocab file)")
        self.pieces = pieces
        self._ids = None if pieces is None else {piece: i for i, piece in enumerate(pieces)}
        self._dropped = SPECIAL_IDS | frozenset(hidden)
        self.vocab_size: int = len(pieces) if pieces is not None else self._sp.get_piece_size()  # type: ignore[union-attr]

    def encode(self, texts: list[str]) -> list[list[int]]:
        """Subword ids of each text (no BOS/EOS)."""
        if self._ids is None:
            return self._sp.encode(texts, out_type=int, num_threads=self.num_threads)  # type: ignore[union-attr]
        return [self._to_ids(pieces) for pieces in self.encode_pieces(texts)]

    def sample(self, texts: list[str], alpha: float, nbest: int, seed: int) -> list[list[int]]:
        """Subword regularisation: ids of one segmentation of each text drawn at random
        (unigram: among the ``nbest`` best, -1 for all, smoothed by ``alpha``; BPE: BPE-dropout
        at rate ``alpha``). Within one process the same ``seed`` draws the same segmentations:
        SentencePiece keeps a generator per thread, so this encodes on the calling thread, seeded
        first. Another process draws others (SentencePiece 0.2.3, measured): its generator does
        not follow the seed alone."""
        if self._sp is None:
            raise MtkitError(f"{self.path}: subword regularisation (train.subword_alpha) needs a SentencePiece model")
        spm.set_random_generator_seed(seed)
        if self._ids is None:
            return self._sp.encode(texts, out_type=int, enable_sampling=True, alpha=alpha, nbest_size=nbest,
                                   num_threads=1)
        pieces = self._sp.encode(texts, out_type=str, enable_sampling=True, alpha=alpha, nbest_size=nbest,
                                 num_threads=1)
        return [self._to_ids(p) for p in pieces]

    def encode_pieces(self, texts: list[str]) -> list[list[str]]:
        """Subword pieces of each text, for people and shell pipelines."""
        if self._hf is not None:
            return [e.tokens for e in self._hf.encode_batch(texts, add_special_tokens=False)]
        return self._sp.encode(texts, out_type=str, num_threads=self.num_threads)  # type: ignore[union-attr]

    def decode(self, ids: list[list[int]]) -> list[str]:
        """Text of each id sequence; padding, BOS, EOS and hidden ids are dropped."""
        kept = [[i for i in seq if i not in self._dropped] for seq in ids]
        if self.pieces is None:
            return self._sp.decode(kept, num_threads=self.num_threads)  # type: ignore[union-attr]
        return self.decode_pieces([[self.pieces[i] for i in seq] for seq in kept])

    def decode_pieces(self, pieces: list[list[str]]) -> list[str]:
        if self._hf is not None:
            return [self._hf.decoder.decode(p) if self._hf.decoder else "".join(p) for p in pieces]
        return self._sp.decode_pieces(pieces, num_threads=self.num_threads)  # type: ignore[union-attr]

    def vocabulary(self) -> list[str]:
        """Every piece, in id order (unique strings: what a runtime's vocabulary file lists)."""
        if self.pieces is not None:
            return list(self.pieces)
        assert self._sp is not None
        return [self._sp.id_to_piece(i) for i in range(self.vocab_size)]

    def hide(self, pieces: Iterable[str]) -> None:
        """Drop ``pieces`` (language tokens) from every decoded text from now on."""
        self._dropped = self._dropped | {i for i in map(self.piece_to_id, pieces) if i != UNK_ID}

    def piece_to_id(self, piece: str) -> int:
        """The id of a piece (UNK_ID when the vocabulary lacks it)."""
        if self._ids is not None:
            return self._ids.get(piece, UNK_ID)
        return self._sp.piece_to_id(piece)  # type: ignore[union-attr]

    def _to_ids(self, pieces: list[str]) -> list[int]:
        ids = self._ids
        assert ids is not None
        return [ids.get(piece, UNK_ID) for piece in pieces]

    def __repr__(self) -> str:
        return f"Tokenizer({str(self.path)!r}, vocab_size={self.vocab_size})"


@dataclass
class Tokenizers:
    """The source and target tokenizers of an experiment (the same object when joint)."""

    src: Tokenizer
    tgt: Tokenizer
    joint: bool

    languages: Languages | None = None
    """An imported multilingual model's language tokens (None: the model has none)."""
    vocab_files: tuple[Path, ...] = ()
    """The vocabulary files mapping pieces to mtkit ids (an imported model's), src then tgt."""
    prompt: str | None = None
    """A language model's prompt template (``PROMPT_FIELD`` marks where the source goes): the
    text every source is put in before it is encoded, for training as for translation."""
    source_bos: bool = False
    """Every source starts with BOS, as a language model's own tokenizer starts each text."""

    @classmethod
    def load(cls, directory: Path, num_threads: int = 1) -> Tokenizers:
        directory = Path(directory)
        meta = read_meta(directory)
        try:
            files, vocab = meta["files"], meta.get("vocab") or {}
            languages = Languages.from_meta(meta["languages"]) if meta.get("languages") else None
            pieces = {side: _read_pieces(_model_file(directory, vocab[side])) if side in vocab else None
                      for side in ("src", "tgt")}
            src = Tokenizer(_model_file(directory, files["src"]), num_threads, pieces["src"])
            tgt = src if meta["joint"] else Tokenizer(_model_file(directory, files["tgt"]), num_threads,
                                                      pieces["tgt"])
            if languages is not None:
                for tokenizer in {id(src): src, id(tgt): tgt}.values():
                    tokenizer.hide(languages.tokens.values())
            expected = meta["fingerprint"]
            vocab_files = tuple(dict.fromkeys(_model_file(directory, vocab[side]) for side in ("src", "tgt")
                                              if side in vocab))
            prompt = meta.get("prompt")
            if prompt is not None:
                check_prompt(str(prompt), f"{directory / META_FILE}: prompt")
        except (KeyError, TypeError, ValueError, AttributeError):
            raise MtkitError(f"{directory / META_FILE}: malformed tokenizer meta; retrain the tokenizer") from None
        tokenizers = cls(src=src, tgt=tgt, joint=bool(meta["joint"]), languages=languages, vocab_files=vocab_files,
                         prompt=prompt, source_bos=bool(meta.get("source_bos", False)))
        if tokenizers.fingerprint() != expected:
            raise MtkitError(f"{directory}: tokenizer model files changed since training (fingerprint mismatch)")
        return tokenizers

    def encode_source(self, texts: list[str]) -> list[list[int]]:
        """Subword ids of each source text as the model reads it: put in the prompt template where
        there is one, and after BOS where the model's tokenizer starts texts with one (language
        tokens and EOS are the translator's and the batcher's)."""
        if self.prompt is not None:
            before, _, after = self.prompt.partition(PROMPT_FIELD)
            texts = [before + text + after for text in texts]
        ids = self.src.encode(texts)
        return [[BOS_ID, *seq] for seq in ids] if self.source_bos else ids

    @property
    def shared_vocab(self) -> bool:
        """Both sides use one vocabulary (one id space), so embeddings may be shared: one model,
        or two segmentation models over one vocabulary (Marian's source.spm and target.spm)."""
        return self.joint or (self.src.pieces is not None and self.src.pieces == self.tgt.pieces)

    def model_files(self) -> list[Path]:
        return [self.src.path] if self.joint else [self.src.path, self.tgt.path]

    def fingerprint(self) -> str:
        """sha256 of the model file bytes (src then tgt when separate), then of the vocabulary
        files where there are any: prepared data and checkpoints record it, so a retrained
        tokenizer cannot silently mismatch them."""
        return files_fingerprint([*self.model_files(), *self.vocab_files], self.prompt, self.source_bos,
                                 self.languages)

    def copy_to(self, directory: Path) -> None:
        """Copy the model files, vocabularies and meta so that ``Tokenizers.load(directory)`` works."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        source = self.src.path.parent
        for path in [*self.model_files(), *self.vocab_files]:
            shutil.copyfile(path, directory / path.name)
            vocab = path.with_suffix(".vocab")
            if vocab.exists() and vocab != path:
                shutil.copyfile(vocab, directory / vocab.name)
        shutil.copyfile(source / META_FILE, directory / META_FILE)


def files_fingerprint(paths: list[Path], prompt: str | None = None, source_bos: bool = False,
                      languages: Languages | None = None) -> str:
    """sha256 of the files' bytes, in order, then of the prompt template and the BOS rule where
    there are any, and of the language tokens of a model mtkit trained on several directions
    (which say what prepare put in the data): a tokenizer's fingerprint."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(Path(path).read_bytes())
    if prompt is not None or source_bos:
        digest.update(json.dumps({"prompt": prompt, "source_bos": source_bos}, sort_keys=True).encode("utf-8"))
    if languages is not None and languages.directions:
        digest.update(json.dumps(languages.to_meta(), sort_keys=True).encode("utf-8"))
    return digest.hexdigest()


@dataclass(frozen=True)
class Languages:
    """How a multilingual model is told its languages: by a token (``>>deu<<``, ``__de__``,
    ``deu_Latn``) at the start of the source and/or forced as the first target token.

    tokens: every language token of the vocabulary, by code (``deu`` -> ``>>deu<<``).
    source: what the source starts with: ``"src"`` (the source language's token, M2M100,
    NLLB, mBART-50), ``"tgt"`` (the target language's, Marian's multi-target models) or None.
    target: ``"tgt"`` when the target language's token is forced as the first output token.
    """

    tokens: dict[str, str]
    source: Literal["src", "tgt"] | None
    target: Literal["tgt"] | None
    directions: tuple[tuple[str, str], ...] = ()
    """The directions a model trained by mtkit learned (``("en", "de")``, ...); empty for an
    imported model, which may translate between any of its languages."""

    @classmethod
    def from_meta(cls, meta: dict) -> Languages:
        directions = tuple((str(s), str(t)) for s, t in meta.get("directions") or ())
        return cls(tokens=dict(meta["tokens"]), source=meta.get("source"), target=meta.get("target"),
                   directions=directions)

    @classmethod
    def tags(cls, directions: list[tuple[str, str]], convention: Literal["source", "target"]) -> Languages:
        """The languages of a multilingual model mtkit trains: a ``<2xx>`` token per target
        language, at the start of the source (``source``) or forced as the first output token
        (``target``)."""
        tokens = {tgt: f"<2{tgt}>" for tgt in dict.fromkeys(tgt for _, tgt in directions)}
        if convention == "source":
            return cls(tokens, source="tgt", target=None, directions=tuple(directions))
        return cls(tokens, source=None, target="tgt", directions=tuple(directions))

    def to_meta(self) -> dict:
        meta: dict[str, Any] = {"tokens": self.tokens, "source": self.source, "target": self.target}
        if self.directions:
            meta["directions"] = [list(direction) for direction in self.directions]
        return meta

    def names(self) -> str:
        """What a message lists: the directions (``en-de, en-fr``), else the language codes."""
        if self.directions:
            return ", ".join(f"{s}-{t}" for s, t in self.directions)
        known = sorted(self.tokens)
        return ", ".join(known[:12]) + (f", ... ({len(known)} in all)" if len(known) > 12 else "")

    def token(self, code: str, what: str) -> str:
        """The token of language ``code`` (a code, or the token itself); a one-line error naming
        ``what`` (the option) for a language the model lacks."""
        if code in self.tokens:
            return self.tokens[code]
        if code in self.tokens.values():
            return code
        known = sorted(self.tokens)
        close = [c for c in known if c.lower().startswith(code.lower() + "_")][:3]  # de -> de_DE
        close = close or difflib.get_close_matches(code, known, n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise MtkitError(f"{what} {code!r}: the model has no such language{hint}; it knows {self.names()}")


def run_languages(data: Any, tokenizers: Tokenizers, src_lang: str | None,
                  tgt_lang: str | None) -> tuple[str | None, str | None]:
    """The languages to translate between: those asked for, else the run's ``data.src_lang``
    and ``data.tgt_lang`` (``data``: a ``DataConfig``). A model mtkit trained on several
    directions has no default: its languages must be named (``language_prefixes`` says so)."""
    if tokenizers.languages is not None and tokenizers.languages.directions:
        return src_lang, tgt_lang
    return src_lang or data.src_lang, tgt_lang or data.tgt_lang


def language_prefixes(tokenizers: Tokenizers, src_lang: str | None,
                      tgt_lang: str | None) -> tuple[list[int], list[int]]:
    """What tells a multilingual model its languages (``Tokenizers.languages``): the ids its
    source starts with, and those its output is forced to start with; for training pairs
    (``mtkit.data.prepare``) as for translation. A model without language tokens takes none. A
    language the model lacks, or none named (a model mtkit trained must be told both), is a
    one-line error naming the option and listing what the model knows."""
    languages = tokenizers.languages
    if languages is None:
        return [], []

    def token_id(code: str | None, option: str) -> int:
        if code is None or code in ("src", "tgt") and code not in languages.tokens:  # mtkit's placeholders
            raise MtkitError(f"{option}: this model translates between several languages; name one "
                             f"(it knows {languages.names()})")
        return tokenizers.tgt.piece_to_id(languages.token(code, option))

    if languages.directions:
        sources = {s for s, _ in languages.directions} | {t for _, t in languages.directions}
        if src_lang is None or src_lang not in sources:
            what = "name one" if src_lang is None else f"{src_lang!r} is not one of its languages"
            raise MtkitError(f"--source-lang: this model translates between several languages; {what} "
                             f"(it knows {languages.names()})")
    source = []
    if languages.source is not None:
        source = [token_id(src_lang, "--source-lang") if languages.source == "src" else token_id(tgt_lang,
                                                                                                  "--target-lang")]
    target = [token_id(tgt_lang, "--target-lang")] if languages.target else []
    return source, target


def _read_pieces(path: Path) -> list[str]:
    """A vocabulary file: a JSON list of pieces in mtkit's id order."""
    pieces = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(pieces, list) or not all(isinstance(p, str) for p in pieces):
        raise ValueError(f"{path}: not a list of pieces")
    return pieces


def _model_file(directory: Path, name: str) -> Path:
    """``directory/name``, which must lie in ``directory`` (links resolved): a tokenizer shipped
    in a checkpoint is data, and its meta.json must not make mtkit read a file elsewhere."""
    path = directory / name
    if not path.resolve().is_relative_to(directory.resolve()):
        raise MtkitError(f"{directory / META_FILE}: names a model file outside {directory} ({name})")
    return path


def read_meta(directory: Path) -> dict:
    """The tokenizer's meta.json; MtkitError telling how to train one if there is none."""
    path = Path(directory) / META_FILE
    if not path.is_file():
        raise MtkitError(f"{directory}: tokenizer not trained; run `mtkit tokenizer train -c CONFIG` first")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise MtkitError(f"{path}: unreadable tokenizer meta ({_first_line(err)}); retrain the tokenizer") from None
    if not isinstance(meta, dict) or meta.get("format") != META_FORMAT:
        raise MtkitError(f"{path}: not an mtkit tokenizer meta (format {META_FORMAT}); retrain the tokenizer")
    return meta


def trained_normalization(directory: Path) -> str:
    """The normalisation rule the tokenizer in ``directory`` was trained with, as its meta
    records it; one trained before mtkit recorded it has SentencePiece's default, nmt_nfkc."""
    return str(read_meta(directory).get("normalization", "nmt_nfkc"))


# --------------------------------------------------------------------------- training


def train_tokenizers(
    cfg: TokenizerConfig,
    directory: Path,
    texts: Callable[[tuple[Side, ...]], Iterable[str]],
    seed: int = 1,
    languages: Languages | None = None,
) -> Tokenizers:
    """Train SentencePiece into ``directory`` (replaced atomically) and return the result.

    ``texts(sides)`` yields the training sentences of the given sides, already normalised; it
    is called once for a joint model (``("src", "tgt")``) or once per side. The sentences are
    streamed into SentencePiece, which keeps a uniform sample of ``cfg.input_sentence_size``
    of them (reservoir sampling), so memory stays bounded however large the corpus is.
    ``languages``: a multilingual model's language tokens (already in ``cfg.user_symbols``),
    recorded in the meta.
    """
    directory = Path(directory)
    groups: dict[str, tuple[Side, ...]] = {"spm": ("src", "tgt")} if cfg.joint else {"src": ("src",), "tgt": ("tgt",)}
    counts: dict[str, int] = {}
    with atomic_dir(directory) as tmp:
        for name, sides in groups.items():
            counts[name] = _train_one(cfg, tmp / name, texts(sides), seed)
        files = {"src": "spm.model", "tgt": "spm.model"} if cfg.joint else {"src": "src.model", "tgt": "tgt.model"}
        fingerprint = files_fingerprint([tmp / name for name in dict.fromkeys(files.values())], languages=languages)
        sizes = {
            side: spm.SentencePieceProcessor(model_file=str(tmp / f)).get_piece_size() for side, f in files.items()
        }
        meta = {
            "format": META_FORMAT,
            "joint": cfg.joint,
            "type": cfg.type,
            "vocab_size": sizes,
            "files": files,
            "user_symbols": cfg.user_symbols,
            "character_coverage": cfg.character_coverage,
            "byte_fallback": cfg.byte_fallback,
            "normalization": cfg.normalization,
            "sentences": counts,
            "fingerprint": fingerprint,
            # Releases train different vocabularies from the same text and settings (0.2.2 and
            # 0.2.3 differ by 4-6% in subwords a sentence): say which one made this one.
            "sentencepiece": spm.__version__,
        }
        if languages is not None:
            meta["languages"] = languages.to_meta()
        atomic_write_text(tmp / META_FILE, json.dumps(meta, indent=2, ensure_ascii=False) + "\n")
    return Tokenizers.load(directory)


class _CountingIterator:
    """Feeds SentencePiece from a Python iterator, counting sentences and keeping the first
    exception: SentencePiece would otherwise report a reader error as a bare end of input."""

    def __init__(self, texts: Iterable[str]):
        self._texts = iter(texts)
        self.count = 0
        self.error: BaseException | None = None

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        try:
            text = next(self._texts)
        except StopIteration:
            raise
        except BaseException as err:  # re-raised by _train_one once SentencePiece returns
            self.error = err
            raise StopIteration from None
        self.count += 1
        return text


_SPM_ERROR = re.compile(r"^(?:\w+: )?(?:\S+\(\d+\) )?(?:\[[^\]]*\] )?")


def _train_one(cfg: TokenizerConfig, prefix: Path, texts: Iterable[str], seed: int) -> int:
    """Train one model to ``prefix``.model/.vocab; returns the number of sentences seen."""
    feed = _CountingIterator(texts)
    model = io.BytesIO()
    spm.set_random_generator_seed(seed)
    try:
        # Written through model_writer rather than model_prefix: SentencePiece stores the
        # prefix in the model, and a temporary path there would change the fingerprint.
        spm.SentencePieceTrainer.train(
            sentence_iterator=feed,
            model_writer=model,
            model_type=cfg.type,
            vocab_size=cfg.vocab_size,
            character_coverage=cfg.character_coverage,
            input_sentence_size=cfg.input_sentence_size,
            shuffle_input_sentence=True,
            user_defined_symbols=cfg.user_symbols,
            byte_fallback=cfg.byte_fallback,
            normalization_rule_name=cfg.normalization,
            pad_id=PAD_ID,
            unk_id=UNK_ID,
            bos_id=BOS_ID,
            eos_id=EOS_ID,
            num_threads=cfg.num_threads,
            minloglevel=2,
        )
    except RuntimeError as err:
        if feed.error is not None:
            raise feed.error from None
        if feed.count == 0:
            raise MtkitError("data.train: no text to train the tokenizer on") from None
        reason = _SPM_ERROR.sub("", _first_line(err))
        raise MtkitError(f"tokenizer: SentencePiece training failed: {reason}") from None
    if feed.error is not None:
        raise feed.error
    atomic_write_bytes(prefix.with_suffix(".model"), model.getvalue())
    processor = spm.SentencePieceProcessor(model_proto=model.getvalue())
    vocab = "".join(
        f"{processor.id_to_piece(i)}\t{processor.get_score(i):g}\n" for i in range(processor.get_piece_size())
    )
    atomic_write_text(prefix.with_suffix(".vocab"), vocab)
    return feed.count


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
