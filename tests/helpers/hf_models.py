"""Hugging Face translation models made offline for the import tests: a SentencePiece model
trained here, the family's tokenizer files, a model built from transformers' config class and
trained a few hundred steps on the synthetic word-by-word task (``helpers.data.tokdata_pairs``),
so that it writes sentences that end, then saved with ``save_pretrained``."""

from __future__ import annotations

import io
import json
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
    """Train ``model`` (a transformers seq2seq model) ``steps`` steps on ``pairs``."""
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


def make_marian(directory: Path, *, languages: list[str] | None = None, steps: int = 300,
                separate_spm: bool = True) -> Path:
    """An opus-mt-like model: source.spm, target.spm, one vocab.json (``</s>`` 0, ``<unk>`` 1,
    the pieces of both models, ``>>xx<<`` tokens of a multi-target model, ``<pad>`` last),
    swish, scaled embeddings, tied and shared embeddings, decoding from ``<pad>``."""
    from transformers import MarianConfig, MarianMTModel, MarianTokenizer

    directory.mkdir(parents=True, exist_ok=True)
    src_spm = train_spm([s for s, _ in PAIRS], directory / "source.spm", 120)
    tgt_spm = train_spm([t for _, t in PAIRS], directory / "target.spm", 120) if separate_spm else None
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
