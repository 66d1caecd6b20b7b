"""``mtkit import huggingface`` on M2M100 and NLLB models built and trained here (both
transformers' ``m2m_100`` architecture, with their own tokenizers): mtkit's source ids, logits
and translations equal transformers' own, the target language chosen by the forced token."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers.cli import invoke, one_line_error
from helpers.hf_models import (
    M2M100_LANGUAGES,
    NLLB_LANGUAGES,
    SOURCES,
    make_m2m100,
    make_nllb,
    padded_logits,
)

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")

MAX_NEW = 40
"""transformers' ``max_new_tokens``: the forced language token and at most 39 more."""
MAX_LEN_B = MAX_NEW
"""mtkit's ``--max-len-b`` for the same limit: it counts the forced language token too, and
not ``</s>``, which mtkit forces at the limit where transformers stops without it (the same
text)."""


@dataclass(eq=False)
class Imported:
    """A transformers model directory, the run imported from it, and transformers' own view."""

    source: Path
    run: Path
    languages: tuple[str, str, str]
    """The source language, then the two targets (as the fixture's codes)."""
    tokenizer: Any
    model: Any

    def lang_id(self, code: str) -> int:
        """The model's id of a language's token (M2M100 writes ``de`` as ``__de__``)."""
        lang_token = getattr(self.tokenizer, "get_lang_token", lambda c: c)
        return self.tokenizer.convert_tokens_to_ids(lang_token(code))


FAMILIES = {"m2m100": (make_m2m100, M2M100_LANGUAGES), "nllb": (make_nllb, NLLB_LANGUAGES)}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def imported(request, tmp_path_factory) -> Imported:
    make, languages = FAMILIES[request.param]
    root = tmp_path_factory.mktemp(request.param)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model gains nothing from threads; on a busy machine they only wait
    try:
        source = make(root / "hf")
    finally:
        torch.set_num_threads(threads)
    result = invoke("import", "huggingface", str(source), "-o", str(root / "run"), "--source-lang", languages[0],
                    "--target-lang", languages[1])
    assert result.exit_code == 0, result.output
    tokenizer = transformers.AutoTokenizer.from_pretrained(source, src_lang=languages[0])
    model = transformers.AutoModelForSeq2SeqLM.from_pretrained(source).eval()
    return Imported(source, root / "run", languages, tokenizer, model)


def test_fairseq_positions_equal_transformers_table():
    from transformers.models.m2m_100.modeling_m2m_100 import M2M100SinusoidalPositionalEmbedding

    from mtkit.models.layers import fairseq_sinusoidal_table

    for dim in (32, 33):
        theirs = M2M100SinusoidalPositionalEmbedding(64, dim, padding_idx=1).weights
        assert torch.equal(fairseq_sinusoidal_table(64, dim), theirs[2:66])


def test_the_run_describes_the_model(imported):
    config = (imported.run / "checkpoints" / "final" / "config.yaml").read_text()
    for line in ("norm: pre", "activation: relu", "positions: sinusoidal_fairseq", "scale_embeddings: true",
                 f"src_lang: {imported.languages[0]}", f"tgt_lang: {imported.languages[1]}"):
        assert line in config


def _assert_source_ids_equal(imported: Imported, run: Path) -> None:
    """The run's source ids (language token first, ``</s>`` last) are the model tokenizer's, and
    its forced target token the model's language token."""
    from mtkit.checkpoint import load_for_inference
    from mtkit.huggingface import special_rows
    from mtkit.tokenizer import language_prefixes
    from mtkit.vocab import EOS_ID

    tokenizers = load_for_inference(run).tokenizers
    rows = special_rows(imported.model.config, imported.tokenizer)
    source, target = language_prefixes(tokenizers, *imported.languages[:2])
    assert [rows[i] for i in target] == [imported.lang_id(imported.languages[1])]
    ours = [[rows[i] for i in source + ids + [EOS_ID]] for ids in tokenizers.src.encode(SOURCES)]
    theirs = imported.tokenizer(SOURCES)["input_ids"]
    assert theirs[0][0] == imported.lang_id(imported.languages[0])
    assert ours == theirs
    # and ids map back to the model's text (not the language token's: transformers 5's
    # M2M100Tokenizer writes it out)
    text = imported.tokenizer.batch_decode([ids[1:] for ids in theirs], skip_special_tokens=True)
    assert tokenizers.tgt.decode(tokenizers.src.encode(SOURCES)) == text


def test_source_ids_equal_the_tokenizer(imported):
    _assert_source_ids_equal(imported, imported.run)


def test_a_tokenizer_json_alone_segments_as_the_model(imported, tmp_path):
    """transformers 5 saves an NLLB tokenizer as tokenizer.json, without the SentencePiece model."""
    if not (imported.source / "tokenizer.json").is_file():
        pytest.skip("this model's tokenizer has no tokenizer.json")
    source = tmp_path / "hf"
    source.mkdir()
    for path in imported.source.iterdir():
        if path.name != "sentencepiece.bpe.model":
            (source / path.name).symlink_to(path)
    run = tmp_path / "run"
    result = invoke("import", "huggingface", str(source), "-o", str(run), "--source-lang", imported.languages[0],
                    "--target-lang", imported.languages[1])
    assert result.exit_code == 0, result.output
    assert (run / "checkpoints" / "final" / "tokenizer" / "spm.json").is_file()
    _assert_source_ids_equal(imported, run)


def test_logits_equal_transformers_on_a_padded_batch(imported):
    from mtkit.checkpoint import load_for_inference
    from mtkit.huggingface import masked_columns, special_rows
    from mtkit.vocab import BOS_ID

    loaded = load_for_inference(imported.run)
    config = imported.model.config
    rows = special_rows(config, imported.tokenizer)
    to_mtkit = {row: i for i, row in reversed(list(enumerate(rows)))}  # EOS and BOS share a row: EOS wins
    batch = imported.tokenizer(SOURCES[:16], padding=True, return_tensors="pt")
    decoder = torch.randint(4, config.vocab_size, (16, 8), generator=torch.Generator().manual_seed(0))
    decoder[:, 0] = config.decoder_start_token_id
    decoder[:, 1] = imported.lang_id(imported.languages[1])
    ours, theirs = padded_logits(imported.model, loaded, batch, decoder, to_mtkit)
    kept = [i for i in range(len(rows)) if i not in masked_columns(rows)]
    assert masked_columns(rows) == [BOS_ID]
    difference = (ours[..., kept] - theirs[..., [rows[i] for i in kept]]).abs().max().item()
    assert difference < 1e-4
    assert torch.log_softmax(ours, -1)[..., masked_columns(rows)].max().item() < -1e3


@cache
def _generated(imported: Imported, target: str, beam: int) -> tuple[tuple[str, ...], tuple[bool, ...]]:
    """transformers' translations into ``target``, and whether each ended before the limit."""
    inputs = imported.tokenizer(SOURCES, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = imported.model.generate(**inputs, forced_bos_token_id=imported.lang_id(target), num_beams=beam,
                                      early_stopping=True, length_penalty=1.0, max_new_tokens=MAX_NEW,
                                      do_sample=False)
    assert bool((out[:, 1] == imported.lang_id(target)).all())
    config = imported.model.config
    ended = tuple(bool((row == config.eos_token_id).any() or (row == config.pad_token_id).any()) for row in out[:, 2:])
    # Without the language token: transformers 5's M2M100Tokenizer keeps it as text.
    return tuple(imported.tokenizer.batch_decode(out[:, 2:], skip_special_tokens=True)), ended


@pytest.mark.parametrize("beam", [1, 4])
@pytest.mark.parametrize("which", [1, 2], ids=["first_target", "second_target"])
def test_translations_equal_generate(imported, tmp_path, backend, beam, which):
    target = imported.languages[which]
    theirs, ended = _generated(imported, target, beam)
    source = tmp_path / "src.txt"
    source.write_text("\n".join(SOURCES) + "\n", encoding="utf-8")
    result = invoke("translate", "-m", str(imported.run), "-i", str(source), "--target-lang", target,
                    "--beam", str(beam), "--backend", backend, "--max-len-a", "0", "--max-len-b", str(MAX_LEN_B),
                    "--lenpen", "1.0")
    assert result.exit_code == 0, result.output
    ours = result.stdout.splitlines()
    assert len(ours) == len(SOURCES)
    # At the length limit mtkit's beam search ranks its hypotheses with a forced </s>, and
    # transformers' without one: the two may keep different ones there (greedy search cannot).
    compared = [i for i in range(len(SOURCES)) if ended[i] or beam == 1]
    assert len(compared) >= 50  # most of the fixture's sentences end
    assert [ours[i] for i in compared] == [theirs[i] for i in compared]
    # The forced token, not the run's default (the first target), chose the language.
    assert (sum(line.isupper() for line in ours) > len(SOURCES) // 2) == (which == 2)


def test_a_missing_or_unknown_target_language_is_a_one_line_error(imported, tmp_path):
    source = tmp_path / "src.txt"
    source.write_text(SOURCES[0] + "\n", encoding="utf-8")
    result = invoke("translate", "-m", str(imported.run), "-i", str(source), "--target-lang", "xx_Yyyy")
    one_line_error(result, "--target-lang", "xx_Yyyy")
    bare = tmp_path / "bare"  # imported without a default target language
    result = invoke("import", "huggingface", str(imported.source), "-o", str(bare))
    assert result.exit_code == 0, result.output
    result = invoke("translate", "-m", str(bare), "-i", str(source))
    one_line_error(result, "--target-lang")
    result = invoke("import", "huggingface", str(imported.source), "-o", str(tmp_path / "out"),
                    "--target-lang", "xx_Yyyy")
    one_line_error(result, "--target-lang", "xx_Yyyy")
    assert not (tmp_path / "out").exists()
