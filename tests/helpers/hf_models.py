"""Hugging Face translation models made offline for the import tests: a SentencePiece model
trained here, the family's tokenizer files, a model built from transformers' config class and
trained a few hundred steps on the synthetic word-by-word task (``helpers.data.tokdata_pairs``),
so that it writes sentences that end, then saved with ``save_pretrained``."""

from __future__ import annotations

import atexit
import io
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import sentencepiece as spm
import torch

from helpers.data import tokdata_pairs

TINY = dict(d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
            encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64, dropout=0.0,
            attention_dropout=0.0, activation_dropout=0.0)

PAIRS = tokdata_pairs(400, seed=11)
SOURCES = [src for src, _ in tokdata_pairs(60, seed=12)]
"""Sentences the tests translate (unseen in training)."""


def train_spm(texts: list[str], path: Path, vocab_size: int, model_type: str = "unigram") -> Path:
    """A SentencePiece model with SentencePiece's own ids (``<unk>`` 0, ``<s>`` 1, ``</s>`` 2),
    as Marian's and fairseq's are."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(texts), model_writer=model, vocab_size=vocab_size,
                                   model_type=model_type, character_coverage=1.0, minloglevel=2,
                                   hard_vocab_limit=False)
    path.write_bytes(model.getvalue())
    return path


def pieces(path: Path) -> list[str]:
    sp = spm.SentencePieceProcessor(model_file=str(path))
    return [sp.id_to_piece(i) for i in range(sp.get_piece_size())
            if not (sp.is_control(i) or sp.is_unknown(i))]


def fit(model: Any, tokenizer: Any, pairs: list[tuple[str, str]], steps: int, lr: float = 3e-3,
        batch: int = 32, seed: int = 0, **encode: Any) -> None:
    """Train ``model`` (a transformers seq2seq model) ``steps`` steps on ``pairs``, on one thread
    (a model this small trains fastest so, and far faster on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _fit(model, tokenizer, pairs, steps, lr, batch, seed, **encode)
    finally:
        torch.set_num_threads(threads)


def _fit(model: Any, tokenizer: Any, pairs: list[tuple[str, str]], steps: int, lr: float, batch: int, seed: int,
         **encode: Any) -> None:
    torch.manual_seed(seed)
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    for step in range(steps):
        start = (step * batch) % len(pairs)
        chunk = (pairs + pairs)[start : start + batch]
        inputs = tokenizer([s for s, _ in chunk], text_target=[t for _, t in chunk], padding=True,
                           return_tensors="pt", **encode)
        labels = inputs["labels"].masked_fill(inputs["labels"] == tokenizer.pad_token_id, -100)
        loss = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()


_BUILT: dict[tuple, Path] = {}
"""Models made in this test session, by their arguments: each is built once and copied."""


def make_marian(directory: Path, *, languages: list[str] | None = None, steps: int = 300,
                separate_spm: bool = True) -> Path:
    """An opus-mt-like model: source.spm, target.spm, one vocab.json (``</s>`` 0, ``<unk>`` 1,
    the pieces of both models, ``>>xx<<`` tokens of a multi-target model, ``<pad>`` last),
    swish, scaled embeddings, tied and shared embeddings, decoding from ``<pad>``. Built once per
    test session for the same arguments, then copied to ``directory``."""
    key = (tuple(languages or ()), steps, separate_spm)
    if key not in _BUILT:
        built = Path(tempfile.mkdtemp(prefix="marian-"))
        atexit.register(shutil.rmtree, built, ignore_errors=True)
        _BUILT[key] = _build_marian(built, languages, steps, separate_spm)
    shutil.copytree(_BUILT[key], directory, dirs_exist_ok=True)
    return directory


def _build_marian(directory: Path, languages: list[str] | None, steps: int, separate_spm: bool) -> Path:
    from transformers import MarianConfig, MarianMTModel, MarianTokenizer

    directory.mkdir(parents=True, exist_ok=True)
    src_spm = train_spm([s for s, _ in PAIRS], directory / "source.spm", 120)
    # A multi-target model writes its second language upper-cased: the target pieces cover both.
    targets = [t for _, t in PAIRS] + ([t.upper() for _, t in PAIRS] if languages else [])
    tgt_spm = train_spm(targets, directory / "target.spm", 200 if languages else 120) if separate_spm else None
    if tgt_spm is None:
        (directory / "target.spm").write_bytes(src_spm.read_bytes())
        tgt_spm = directory / "target.spm"
    vocab = ["</s>", "<unk>"]
    vocab += [f">>{code}<<" for code in languages or []]
    for piece in pieces(src_spm) + pieces(tgt_spm):
        if piece not in vocab:
            vocab.append(piece)
    vocab.append("<pad>")
    (directory / "vocab.json").write_text(json.dumps({p: i for i, p in enumerate(vocab)}), encoding="utf-8")
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "MarianTokenizer", "source_lang": "src", "target_lang": "tgt", "model_max_length": 64,
        "unk_token": "<unk>", "eos_token": "</s>", "pad_token": "<pad>"}), encoding="utf-8")
    tokenizer = MarianTokenizer.from_pretrained(directory)
    pad = len(vocab) - 1
    config = MarianConfig(vocab_size=len(vocab), pad_token_id=pad, eos_token_id=0, decoder_start_token_id=pad,
                          forced_eos_token_id=None, activation_function="swish", scale_embedding=True,
                          share_encoder_decoder_embeddings=True, **TINY)
    torch.manual_seed(0)
    model = MarianMTModel(config)
    pairs = PAIRS
    if languages:  # a multi-target model: each pair twice, its target token first in the source
        pairs = [(f">>{code}<< {s}", t if i % 2 == 0 else t.upper())
                 for s, t in PAIRS for i, code in enumerate(languages[:2])]
    fit(model, tokenizer, pairs, steps)
    model.generation_config.update(num_beams=4, max_length=64, bad_words_ids=[[pad]], forced_eos_token_id=None)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


MBART_LANGUAGES = ("en_XX", "de_DE", "fr_XX")
"""The mBART-50 fixture's languages: the source's, then two targets (``fr_XX`` writes the
target upper-cased, so that the forced language token decides the output)."""


def make_mbart50(directory: Path, *, steps: int = 600) -> Path:
    """An mBART-50-like many-to-many model: ``sentencepiece.bpe.model`` and an MBart50Tokenizer
    (``<s>`` 0, ``<pad>`` 1, ``</s>`` 2, ``<unk>`` 3, the pieces, the 52 language codes,
    ``<mask>`` last), sources ``[en_XX] X </s>``, targets ``[de_DE] Y </s>`` decoded from
    ``</s>``; learned positions (offset 2), embedding layer norms, pre-norm, gelu. 600 steps:
    with fewer, beam search runs some sentences to the maximum length."""
    from transformers import MBart50Tokenizer, MBartConfig, MBartForConditionalGeneration

    source, german, french = MBART_LANGUAGES
    directory.mkdir(parents=True, exist_ok=True)
    texts = [s for s, _ in PAIRS] + [t for _, t in PAIRS] + [t.upper() for _, t in PAIRS]
    train_spm(texts, directory / "sentencepiece.bpe.model", 200)
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "MBart50Tokenizer", "src_lang": source, "model_max_length": 64}), encoding="utf-8")
    tokenizer = MBart50Tokenizer.from_pretrained(directory)
    config = MBartConfig(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, bos_token_id=0,
                         eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=tokenizer.eos_token_id,
                         forced_eos_token_id=tokenizer.eos_token_id, activation_function="gelu",
                         scale_embedding=True, **TINY)
    torch.manual_seed(0)
    return _train_two_targets(MBartForConditionalGeneration(config), tokenizer, (german, french), steps, directory)


def _fit_many_to_many(model: Any, tokenizer: Any, examples: list[tuple[str, str, str]], steps: int,
                      lr: float = 3e-3, batch: int = 32) -> None:
    """``fit`` for (source, target language, target) examples: each label row is the target's
    language code, its pieces, ``</s>`` (what the tokenizer writes for that ``tgt_lang``)."""
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a model this small trains fastest on one thread (far faster on a busy machine)
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    for step in range(steps):
        start = (step * batch) % len(examples)
        chunk = (examples + examples)[start : start + batch]
        inputs = tokenizer([s for s, _, _ in chunk], padding=True, return_tensors="pt")
        targets = tokenizer([t for _, _, t in chunk], add_special_tokens=False)["input_ids"]
        rows = [[tokenizer.convert_tokens_to_ids(code), *ids, tokenizer.eos_token_id]
                for (_, code, _), ids in zip(chunk, targets, strict=True)]
        width = max(len(row) for row in rows)
        labels = torch.tensor([row + [-100] * (width - len(row)) for row in rows])
        loss = model(**inputs, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    torch.set_num_threads(threads)


M2M100_LANGUAGES = ("en", "de", "fr")
"""The M2M100 fixture's languages: the source's, then two targets (``fr`` writes the target
upper-cased, so that the forced language token decides the output). The saved tokenizer names
the source language and no target, as the hub's do."""

NLLB_LANGUAGES = ("eng_Latn", "deu_Latn", "fra_Latn")
"""The NLLB fixture's languages, as ``M2M100_LANGUAGES``."""


def _m2m100_config(vocab_size: int) -> Any:
    """A tiny M2M100 (NLLB's architecture too): fairseq's ids (``<s>`` 0, ``<pad>`` 1, ``</s>``
    2), decoding from ``</s>``, relu, scaled embeddings, tied and shared embeddings."""
    from transformers import M2M100Config

    return M2M100Config(vocab_size=vocab_size, pad_token_id=1, bos_token_id=0, eos_token_id=2,
                        decoder_start_token_id=2, activation_function="relu", scale_embedding=True,
                        encoder_layerdrop=0.0, decoder_layerdrop=0.0, **TINY)


def _train_m2m100(directory: Path, tokenizer: Any, vocab_size: int, codes: tuple[str, str], steps: int) -> Path:
    """Train a tiny M2M100 on both target languages (``codes``: their tokens) and save it with
    ``tokenizer`` in ``directory``."""
    from transformers import M2M100ForConditionalGeneration

    torch.manual_seed(0)
    return _train_two_targets(M2M100ForConditionalGeneration(_m2m100_config(vocab_size)), tokenizer, codes, steps,
                              directory)


def _train_two_targets(model: Any, tokenizer: Any, codes: tuple[str, str], steps: int, directory: Path) -> Path:
    """Train ``model`` into two target languages (the second's targets upper-cased, so the forced
    language token decides the output) and save it with its tokenizer in ``directory``."""
    german, french = codes
    examples = [(s, code, t if code == german else t.upper()) for s, t in PAIRS for code in (german, french)]
    _fit_many_to_many(model, tokenizer, examples, steps)
    model.generation_config.update(num_beams=4, max_length=64)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def make_m2m100(directory: Path, *, steps: int = 600) -> Path:
    """An M2M100-like model (as facebook/m2m100_418M): ``sentencepiece.bpe.model`` (BPE) and a
    fairseq ``vocab.json`` (``<s>`` 0, ``<pad>`` 1, ``</s>`` 2, ``<unk>`` 3, then the pieces in
    an order of their own), the tokenizer's 100 ``__xx__`` codes after them, and the model's 8
    rows no token names (fairseq's made-up words) last. Sources ``__en__ X </s>``; targets
    ``__de__ Y </s>`` decoded from ``</s>``."""
    import random

    from transformers import M2M100Tokenizer

    source, german, french = M2M100_LANGUAGES
    directory.mkdir(parents=True, exist_ok=True)
    texts = [s for s, _ in PAIRS] + [t for _, t in PAIRS] + [t.upper() for _, t in PAIRS]
    spm_file = train_spm(texts, directory / "sentencepiece.bpe.model", 200, model_type="bpe")
    learned = pieces(spm_file)
    random.Random(0).shuffle(learned)  # ids come from vocab.json, never from SentencePiece
    vocab = ["<s>", "<pad>", "</s>", "<unk>", *learned]
    (directory / "vocab.json").write_text(json.dumps({p: i for i, p in enumerate(vocab)}), encoding="utf-8")
    tokenizer = M2M100Tokenizer(vocab_file=str(directory / "vocab.json"), spm_file=str(spm_file),
                                src_lang=source, model_max_length=64)
    vocab_size = tokenizer.encoder_size + len(tokenizer.lang_code_to_id) + tokenizer.num_madeup_words
    return _train_m2m100(directory, tokenizer, vocab_size,
                         (tokenizer.get_lang_token(german), tokenizer.get_lang_token(french)), steps)


def make_nllb(directory: Path, *, steps: int = 500) -> Path:
    """An NLLB-like model: a BPE ``sentencepiece.bpe.model`` turned by transformers into an
    NllbTokenizer (fairseq's ids: SentencePiece's plus one, ``<s>`` 0, ``<pad>`` 1, ``</s>`` 2,
    ``<unk>`` 3; ``<mask>`` and the 202 codes ``eng_Latn``... after the pieces), saved as
    ``tokenizer.json`` beside the SentencePiece model (as the hub's NLLB repositories are).
    Sources ``eng_Latn X </s>`` (not the legacy ``X </s> eng_Latn``); targets ``deu_Latn Y </s>``
    decoded from ``</s>``."""
    from transformers import AutoTokenizer
    from transformers.models.nllb.tokenization_nllb import FAIRSEQ_LANGUAGE_CODES

    source, german, french = NLLB_LANGUAGES
    directory.mkdir(parents=True, exist_ok=True)
    texts = [s for s, _ in PAIRS] + [t for _, t in PAIRS] + [t.upper() for _, t in PAIRS]
    train_spm(texts, directory / "sentencepiece.bpe.model", 200, model_type="bpe")
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "NllbTokenizer", "src_lang": source, "model_max_length": 64,
        "legacy_behaviour": False, "extra_special_tokens": FAIRSEQ_LANGUAGE_CODES}), encoding="utf-8")
    tokenizer = AutoTokenizer.from_pretrained(directory)  # converts the SentencePiece model
    return _train_m2m100(directory, tokenizer, len(tokenizer), (german, french), steps)


T5_VARIANTS = ("v1.0", "v1.1")
"""The T5 fixtures: v1.0 as t5-small (relu, heads * d_kv = d_model, the output projection tied to the
embeddings and the decoder's output scaled by d_model^-0.5, 32 buckets to distance 128); v1.1 as
Flan-T5 and mT5 (gated-gelu, 3 heads of 16 over a d_model of 32, an untied ``lm_head``, no scaling,
16 buckets to distance 20, so that the sentences reach the shared last bucket)."""

T5_PAIRS = tokdata_pairs(2000, seed=11)
"""The T5 fixtures' training pairs (``PAIRS`` first): a model with relative positions only learns
to end unseen sentences from fewer steps over more sentences."""
T5_SOURCES = [src for src, _ in tokdata_pairs(120, seed=12)]
"""Sentences the T5 tests translate (``SOURCES`` first): at this size a third of them still run
to the maximum length, which beam comparisons leave out."""

_T5_VARIANTS: dict[str, dict[str, Any]] = {
    "v1.0": dict(d_model=32, d_kv=8, num_heads=4, d_ff=64, feed_forward_proj="relu"),
    "v1.1": dict(d_model=32, d_kv=16, num_heads=3, d_ff=48, feed_forward_proj="gated-gelu",
                 relative_attention_num_buckets=16, relative_attention_max_distance=20),
}


def train_t5_spm(texts: list[str], path: Path, vocab_size: int) -> Path:
    """A unigram SentencePiece model with T5's ids: ``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2, no ``<s>``."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(texts), model_writer=model, vocab_size=vocab_size,
                                   model_type="unigram", character_coverage=1.0, minloglevel=2,
                                   hard_vocab_limit=False, pad_id=0, eos_id=1, unk_id=2, bos_id=-1)
    path.write_bytes(model.getvalue())
    return path


def make_t5(directory: Path, *, variant: str = "v1.0", steps: int = 400) -> Path:
    """A T5-like model (``T5_VARIANTS``) as the hub's repositories hold one: ``spiece.model`` beside
    ``tokenizer.json`` (a T5Tokenizer: the pieces, then the 100 sentinels ``<extra_id_99>`` ...
    ``<extra_id_0>``), ``model_max_length`` 512, a vocab_size rounded up to a multiple of 64 (rows
    no token names, as t5-small's 32128 for 32100 tokens), decoding from ``<pad>``, and config.json
    as the hub writes it (v1.1: ``tie_word_embeddings: false``; no ``scale_decoder_outputs``, which
    transformers 5 derives from it). Built once per test session for the same arguments, then
    copied to ``directory``."""
    key = ("t5", variant, steps)
    if key not in _BUILT:
        built = Path(tempfile.mkdtemp(prefix="t5-"))
        atexit.register(shutil.rmtree, built, ignore_errors=True)
        _BUILT[key] = _build_t5(built, variant, steps)
    shutil.copytree(_BUILT[key], directory, dirs_exist_ok=True)
    return directory


def _build_t5(directory: Path, variant: str, steps: int) -> Path:
    from transformers import AutoTokenizer, T5Config, T5ForConditionalGeneration

    directory.mkdir(parents=True, exist_ok=True)
    train_t5_spm([s for s, _ in PAIRS] + [t for _, t in PAIRS], directory / "spiece.model", 150)
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "T5Tokenizer", "model_max_length": 512, "extra_ids": 100}), encoding="utf-8")
    tokenizer = AutoTokenizer.from_pretrained(directory)  # converts the SentencePiece model
    untied = variant == "v1.1"
    config = T5Config(vocab_size=-(-len(tokenizer) // 64) * 64, num_layers=2, dropout_rate=0.0,
                      decoder_start_token_id=tokenizer.pad_token_id, tie_word_embeddings=not untied,
                      **_T5_VARIANTS[variant])
    torch.manual_seed(0)
    model = T5ForConditionalGeneration(config)
    if untied and model.lm_head.weight is model.shared.weight:
        # transformers 5 ties T5's lm_head whatever the config says (it loads an untied one untied).
        model.lm_head.weight = torch.nn.Parameter(torch.randn_like(model.shared.weight))
    fit(model, tokenizer, T5_PAIRS, steps)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)  # tokenizer.json; the SentencePiece model stays beside it
    saved = json.loads((directory / "config.json").read_text(encoding="utf-8"))
    saved.pop("scale_decoder_outputs", None)
    saved["tie_word_embeddings"] = not untied
    (directory / "config.json").write_text(json.dumps(saved, indent=2), encoding="utf-8")
    return directory


def padded_logits(model: Any, loaded: Any, batch: dict[str, Any], decoder: Any,
                  to_mtkit: dict[int, int]) -> tuple[Any, Any]:
    """mtkit's and transformers' logits for the same padded batch: ``batch`` and ``decoder``
    (the decoder's input, from its start token) in the model's ids, mapped by ``to_mtkit``."""
    import torch

    from mtkit.vocab import BOS_ID, PAD_ID

    with torch.no_grad():
        theirs = model(**batch, decoder_input_ids=decoder).logits
        src = batch["input_ids"].clone().apply_(lambda i: to_mtkit[i])
        tgt = decoder.clone().apply_(lambda i: to_mtkit[i])
        tgt[:, 0] = BOS_ID
        assert bool((src == PAD_ID).any())  # the batch is padded
        return loaded.model(src, tgt), theirs


LLAMA_PROMPT = "Translate English to German:\n{source}\n"
"""The prompt the language models here are trained with: mtkit's default with these names."""

LLAMA_FAMILIES = ("llama", "mistral", "qwen2")
"""Llama 3's layout (a byte-level BPE whose texts start with ``<|begin_of_text|>``, no UNK or
PAD, grouped-query attention), Mistral's (a SentencePiece-style BPE with ``<unk>``, ``<s>``,
``</s>``, a sliding window), Qwen2's (byte-level, no BOS, ``<|endoftext|>`` both EOS and PAD,
biases on the query, key and value projections)."""


def _llama_tokenizer(family: str, texts: list[str]) -> Any:
    """A ``PreTrainedTokenizerFast`` of ``family``'s kind, trained on ``texts``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if family == "mistral":
        specials = {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>"}
        tok = Tokenizer(models.BPE(unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
        tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
        alphabet: list[str] = []
    else:
        specials = ({"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>"} if family == "llama"
                    else {"eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"})
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    tokens = list(dict.fromkeys(specials.values()))
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=400, special_tokens=tokens, initial_alphabet=alphabet,
                                                       show_progress=False))
    if "bos_token" in specials:
        bos = specials["bos_token"]
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A $B",
                                                           special_tokens=[(bos, tok.token_to_id(bos))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, **specials)


def llama_ids(tokenizer: Any, source: str) -> list[int]:
    """The prompt of ``source`` as the model reads it (its tokenizer's own ids, BOS where it has one)."""
    return tokenizer(LLAMA_PROMPT.replace("{source}", source))["input_ids"]


def make_llama(directory: Path, *, family: str = "llama", steps: int = 300) -> Path:
    """A Llama-layout causal language model (``LLAMA_FAMILIES``) trained ``steps`` steps to translate
    the synthetic pairs by continuing ``LLAMA_PROMPT`` (the loss on the target and its EOS only, the
    target's ids after the prompt's, as mtkit feeds them), saved with ``save_pretrained``. Built once
    per test session for the same arguments, then copied to ``directory``."""
    key = ("llama", family, steps)
    if key not in _BUILT:
        built = Path(tempfile.mkdtemp(prefix=f"{family}-"))
        atexit.register(shutil.rmtree, built, ignore_errors=True)
        _BUILT[key] = _build_llama(built, family, steps)
    shutil.copytree(_BUILT[key], directory, dirs_exist_ok=True)
    return directory


def _build_llama(directory: Path, family: str, steps: int) -> Path:
    from transformers import AutoConfig, AutoModelForCausalLM

    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = _llama_tokenizer(family, [LLAMA_PROMPT] + [s for s, _ in PAIRS] + [t for _, t in PAIRS])
    shape = dict(hidden_size=32, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=family != "llama")
    if family == "mistral":
        shape.update(sliding_window=192, head_dim=16)  # heads * head_dim apart from hidden_size
    config = AutoConfig.for_model(family, vocab_size=len(tokenizer) + 3, bos_token_id=tokenizer.bos_token_id,
                                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **shape)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _fit_causal(model, tokenizer, steps)
    finally:
        torch.set_num_threads(threads)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def _fit_causal(model: Any, tokenizer: Any, steps: int, batch: int = 32, lr: float = 3e-3) -> None:
    torch.manual_seed(0)
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    examples = []
    for src, tgt in PAIRS:
        prompt = llama_ids(tokenizer, src)
        target = tokenizer(tgt, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        examples.append((prompt + target, [-100] * len(prompt) + target))
    for step in range(steps):
        start = (step * batch) % len(examples)
        chunk = (examples + examples)[start : start + batch]
        width = max(len(ids) for ids, _ in chunk)
        ids = torch.tensor([ids + [0] * (width - len(ids)) for ids, _ in chunk])
        labels = torch.tensor([labels + [-100] * (width - len(labels)) for _, labels in chunk])
        mask = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in chunk])
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
