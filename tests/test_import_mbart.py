"""``mtkit import huggingface`` on an mBART-50 model built and trained here (language codes
``en_XX``, ``de_DE``, ``fr_XX``; learned positions with mBART's offset of 2; embedding layer
norms): mtkit's source ids, logits and translations in either target language equal
transformers' own, with the SentencePiece model or with ``tokenizer.json`` alone."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from helpers.cli import invoke, one_line_error
from helpers.hf_models import MBART_LANGUAGES, SOURCES, make_mbart50, padded_logits

transformers = pytest.importorskip("transformers")

SOURCE, GERMAN, FRENCH = MBART_LANGUAGES
MAX_NEW = 60
"""generate's ``max_new_tokens`` (within the tiny model's 64 positions); it counts the forced
language token and the EOS, so mtkit's ``--max-len-b`` is one less (the language token is
part of mtkit's output, the EOS is not)."""


@pytest.fixture(scope="module")
def mbart(tmp_path_factory) -> Path:
    """The transformers model directory (``sentencepiece.bpe.model`` beside ``tokenizer.json``,
    as the hub's mBART-50 repositories are)."""
    return make_mbart50(tmp_path_factory.mktemp("mbart") / "hf")


def _import(source: Path, run: Path, *options: str) -> Path:
    result = invoke("import", "huggingface", str(source), "-o", str(run), *options)
    assert result.exit_code == 0, result.output
    return run


@pytest.fixture(scope="module")
def runs(mbart, tmp_path_factory) -> dict[str, Path]:
    """Runs imported with ``--source-lang en_XX --target-lang de_DE``, by the tokenizer file
    the import found: the SentencePiece model, or (a copy without it) ``tokenizer.json``."""
    root = tmp_path_factory.mktemp("mbart_runs")
    json_only = root / "hf_json"
    shutil.copytree(mbart, json_only)
    (json_only / "sentencepiece.bpe.model").unlink()
    languages = ("--source-lang", SOURCE, "--target-lang", GERMAN)
    return {"sentencepiece": _import(mbart, root / "run", *languages),
            "tokenizer.json": _import(json_only, root / "run_json", *languages)}


@pytest.fixture(scope="module")
def reference(mbart):
    tokenizer = transformers.AutoTokenizer.from_pretrained(mbart, src_lang=SOURCE)
    model = transformers.AutoModelForSeq2SeqLM.from_pretrained(mbart).eval()
    return tokenizer, model


@pytest.fixture(scope="module")
def generated(reference):
    """transformers' translations of SOURCES, by (target language, beam, max_new_tokens), and
    the sentences that reached max_new_tokens."""
    tokenizer, model = reference
    inputs = tokenizer(SOURCES, padding=True, return_tensors="pt")
    cache: dict[tuple[str, int, int], tuple[list[str], set[int]]] = {}

    def generate(language: str, beam: int, max_new: int) -> tuple[list[str], set[int]]:
        if (language, beam, max_new) not in cache:
            with torch.no_grad():
                ids = model.generate(**inputs, forced_bos_token_id=tokenizer.convert_tokens_to_ids(language),
                                     num_beams=beam, early_stopping=True, length_penalty=1.0,
                                     max_new_tokens=max_new, do_sample=False)
            lengths = (ids != model.config.pad_token_id).sum(dim=1) - 1  # without the decoder start
            cache[language, beam, max_new] = (tokenizer.batch_decode(ids, skip_special_tokens=True),
                                              {i for i, n in enumerate(lengths.tolist()) if n >= max_new})
        return cache[language, beam, max_new]

    return generate


@pytest.fixture
def one_thread():
    """``--threads 1`` (no worker processes: 60 tiny sentences take longer to hand out than to
    translate) sets torch's threads for the whole test process: put them back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _translate(run: Path, tmp_path: Path, *options: str) -> list[str]:
    source = tmp_path / "src.txt"
    source.write_text("\n".join(SOURCES) + "\n", encoding="utf-8")
    result = invoke("translate", "-m", str(run), "-i", str(source), "--lenpen", "1.0", "--length-penalty-form",
                    "length", "--max-len-a", "0", "--threads", "1", *options)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert len(lines) == len(SOURCES)
    return lines


def test_the_run_is_an_mbart_model(mbart, runs):
    from mtkit.checkpoint import load_for_inference

    loaded = load_for_inference(runs["sentencepiece"])
    cfg = loaded.config
    assert (cfg.data.src_lang, cfg.data.tgt_lang) == (SOURCE, GERMAN)
    assert (cfg.model.norm, cfg.model.activation, cfg.model.positions) == ("pre", "gelu", "learned")
    assert not cfg.model.share_positions and cfg.model.embedding_norm and cfg.model.scale_embeddings
    assert cfg.model.max_positions == 64
    assert loaded.tokenizers.src.path.name == "spm.model"
    assert load_for_inference(runs["tokenizer.json"]).tokenizers.src.path.name == "spm.json"
    # mBART's tables hold two rows before position 0; mtkit's start at position 0.
    theirs = transformers.AutoModelForSeq2SeqLM.from_pretrained(mbart).state_dict()
    assert torch.equal(loaded.model.positions.weight, theirs["model.encoder.embed_positions.weight"][2:])
    assert torch.equal(loaded.model.decoder_positions.weight, theirs["model.decoder.embed_positions.weight"][2:])


@pytest.mark.parametrize("tokenizer_file", ["sentencepiece", "tokenizer.json"])
def test_source_ids_equal_the_mbart50_tokenizer(runs, reference, tokenizer_file):
    from mtkit.checkpoint import load_for_inference
    from mtkit.huggingface import special_rows
    from mtkit.tokenizer import language_prefixes
    from mtkit.vocab import EOS_ID

    tokenizer, model = reference
    tokenizers = load_for_inference(runs[tokenizer_file]).tokenizers
    rows = special_rows(model.config, tokenizer)
    prefix, forced = language_prefixes(tokenizers, SOURCE, FRENCH)
    ours = [[rows[i] for i in [*prefix, *ids, EOS_ID]] for ids in tokenizers.src.encode(SOURCES)]
    assert ours == tokenizer(SOURCES)["input_ids"]  # [en_XX] X </s>
    assert [rows[i] for i in forced] == [tokenizer.convert_tokens_to_ids(FRENCH)]
    # Output ids map back to the model's text, the language token left out.
    text = tokenizer.batch_decode(tokenizer(SOURCES)["input_ids"], skip_special_tokens=True)
    assert tokenizers.tgt.decode([forced + ids for ids in tokenizers.tgt.encode(SOURCES)]) == text


def test_logits_equal_transformers_on_a_padded_batch(runs, reference):
    from mtkit.checkpoint import load_for_inference
    from mtkit.huggingface import masked_columns, special_rows
    from mtkit.vocab import BOS_ID, EOS_ID

    tokenizer, model = reference
    loaded = load_for_inference(runs["sentencepiece"])
    rows = special_rows(model.config, tokenizer)
    to_mtkit = {row: i for i, row in enumerate(rows)}  # the decoder start's row is also EOS's: EOS wins
    assert to_mtkit[model.config.eos_token_id] == EOS_ID
    batch = tokenizer(SOURCES[:16], padding=True, return_tensors="pt")
    generator = torch.Generator().manual_seed(0)
    decoder = torch.randint(4, len(rows), (16, 8), generator=generator)
    decoder[:, 0] = model.config.decoder_start_token_id
    decoder[:, 1] = torch.tensor([tokenizer.convert_tokens_to_ids(code) for code in (GERMAN, FRENCH) * 8])
    ours, theirs = padded_logits(model, loaded, batch, decoder, to_mtkit)
    kept = [i for i in range(len(rows)) if i not in masked_columns(rows)]
    assert masked_columns(rows) == [BOS_ID]
    their_columns = [rows[i] for i in kept]
    assert (ours[..., kept] - theirs[..., their_columns]).abs().max().item() < 1e-4
    log_probs = torch.log_softmax(ours, -1)
    assert (log_probs[..., kept] - torch.log_softmax(theirs, -1)[..., their_columns]).abs().max().item() < 1e-4
    assert log_probs[..., BOS_ID].max().item() < -1e3  # the duplicated column never takes probability


@pytest.mark.parametrize("backend", ["torch", "ctranslate2"])
@pytest.mark.parametrize("beam", [1, 4])
def test_translations_equal_generate(runs, generated, tmp_path, one_thread, backend, beam):
    """Every translation, in both target languages, except where beam search reaches the
    maximum length: there transformers scores the EOS it forces (``forced_eos_token_id``) 0,
    mtkit by its log-probability, so the best hypothesis may differ."""
    if backend == "ctranslate2":
        pytest.importorskip("ctranslate2")
    for language in (GERMAN, FRENCH):
        theirs, at_max = generated(language, beam, MAX_NEW)
        ours = _translate(runs["sentencepiece"], tmp_path, "--target-lang", language, "--backend", backend,
                          "--beam", str(beam), "--max-len-b", str(MAX_NEW - 1))
        compared = [i for i in range(len(SOURCES)) if beam == 1 or i not in at_max]
        assert len(compared) >= 50
        assert [ours[i] for i in compared] == [theirs[i] for i in compared], language
    assert theirs != generated(GERMAN, beam, MAX_NEW)[0]  # the forced language token decides the output


def test_the_maximum_length_lines_up_with_max_new_tokens(runs, generated, tmp_path, one_thread):
    theirs, at_max = generated(FRENCH, 1, 12)
    assert len(at_max) > len(SOURCES) // 2  # most sentences cut
    ours = _translate(runs["tokenizer.json"], tmp_path, "--target-lang", FRENCH, "--backend", "torch",
                      "--beam", "1", "--max-len-b", "11")
    assert ours == theirs


def test_a_missing_or_unknown_target_language_is_a_one_line_error(mbart, tmp_path):
    # Imported without --target-lang, the run has no default target: each translation names one.
    run = _import(mbart, tmp_path / "run")
    source = tmp_path / "src.txt"
    source.write_text(SOURCES[0] + "\n", encoding="utf-8")
    result = invoke("translate", "-m", str(run), "-i", str(source), "--backend", "torch")
    one_line_error(result, "--target-lang", "name one", GERMAN)
    result = invoke("translate", "-m", str(run), "-i", str(source), "--backend", "torch", "--target-lang", "xx_YY")
    one_line_error(result, "--target-lang 'xx_YY'", "no such language")
    result = invoke("import", "huggingface", str(mbart), "-o", str(tmp_path / "other"), "--target-lang", "de_XX")
    one_line_error(result, "--target-lang 'de_XX'", "no such language")
    assert not (tmp_path / "other").exists()
