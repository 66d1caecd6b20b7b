"""``mtkit import huggingface`` on a Marian (opus-mt) model built and trained here: mtkit's
tokenizer, logits and translations equal transformers' own."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers.cli import invoke, one_line_error
from helpers.hf_models import SOURCES, make_marian, padded_logits

transformers = pytest.importorskip("transformers")

MAX_NEW = 60  # within the tiny model's 64 positions; its sentences end well before


@pytest.fixture(scope="module")
def marian(tmp_path_factory) -> tuple[Path, Path]:
    """(the transformers model directory, the mtkit run imported from it)."""
    root = tmp_path_factory.mktemp("marian")
    source = make_marian(root / "hf")
    result = invoke("import", "huggingface", str(source), "-o", str(root / "run"))
    assert result.exit_code == 0, result.output
    return source, root / "run"


@pytest.fixture(scope="module")
def reference(marian):
    source, _ = marian
    tokenizer = transformers.AutoTokenizer.from_pretrained(source)
    model = transformers.AutoModelForSeq2SeqLM.from_pretrained(source).eval()
    return tokenizer, model


def test_the_run_records_its_source_and_the_model(marian):
    source, run = marian
    meta = json.loads((run / "checkpoints" / "final" / "meta.json").read_text())
    assert meta["source"] == {"huggingface": str(source.resolve()), "revision": None}
    config = (run / "checkpoints" / "final" / "config.yaml").read_text()
    for line in ("norm: post", "activation: silu", "output_bias: true", "positions: sinusoidal"):
        assert line in config


def test_source_ids_equal_the_marian_tokenizer(marian, reference):
    from mtkit.checkpoint import load_for_inference
    from mtkit.huggingface import special_rows

    tokenizer, model = reference
    loaded = load_for_inference(marian[1])
    rows = special_rows(model.config, tokenizer)
    ours = [[rows[i] for i in ids] + [model.config.eos_token_id] for ids in loaded.tokenizers.src.encode(SOURCES)]
    assert ours == tokenizer(SOURCES)["input_ids"]
    # Output ids map back to the model's text.
    text = tokenizer.batch_decode(tokenizer(text_target=SOURCES)["input_ids"], skip_special_tokens=True)
    assert loaded.tokenizers.tgt.decode(loaded.tokenizers.tgt.encode(SOURCES)) == text


def test_logits_equal_transformers_on_a_padded_batch(marian, reference):
    from mtkit.checkpoint import load_for_inference
    from mtkit.huggingface import masked_columns, special_rows

    tokenizer, model = reference
    loaded = load_for_inference(marian[1])
    rows = special_rows(model.config, tokenizer)
    to_mtkit = {row: i for i, row in reversed(list(enumerate(rows)))}  # PAD and BOS share a row: PAD wins
    batch = tokenizer(SOURCES[:16], padding=True, return_tensors="pt")
    generator = torch.Generator().manual_seed(0)
    decoder = torch.randint(2, model.config.vocab_size - 1, (16, 7), generator=generator)  # no </s>, no <pad>
    decoder[:, 0] = model.config.decoder_start_token_id
    ours, theirs = padded_logits(model, loaded, batch, decoder, to_mtkit)
    kept = [i for i in range(len(rows)) if i not in masked_columns(rows)]
    difference = (ours[..., kept] - theirs[..., [rows[i] for i in kept]]).abs().max().item()
    assert difference < 1e-4
    # The duplicated column never takes probability.
    assert torch.log_softmax(ours, -1)[..., masked_columns(rows)].max().item() < -1e3


@pytest.mark.parametrize("beam", [1, 4])
def test_translations_equal_generate(marian, reference, tmp_path, beam):
    tokenizer, model = reference
    inputs = tokenizer(SOURCES, padding=True, return_tensors="pt")
    with torch.no_grad():
        generated = model.generate(**inputs, num_beams=beam, max_new_tokens=MAX_NEW, early_stopping=True,
                                   length_penalty=1.0, do_sample=False)
    theirs = tokenizer.batch_decode(generated, skip_special_tokens=True)
    # At the maximum length mtkit forces </s> and counts it; transformers stops without it, so a
    # beam that reaches the limit may rank otherwise: those sentences are left out of the count.
    ended = [model.config.eos_token_id in row[1:].tolist() for row in generated]
    source = tmp_path / "src.txt"
    source.write_text("\n".join(SOURCES) + "\n", encoding="utf-8")
    result = invoke("translate", "-m", str(marian[1]), "-i", str(source), "--beam", str(beam), "--backend", "torch",
                     "--max-len-a", "0", "--max-len-b", str(MAX_NEW), "--lenpen", "1.0", "--threads", "1")
    assert result.exit_code == 0, result.output
    ours = result.stdout.splitlines()
    assert len(ours) == len(SOURCES)
    compared = [(a, b) for a, b, end in zip(ours, theirs, ended, strict=True) if end or beam == 1]
    assert len(compared) >= 50
    assert [a for a, _ in compared] == [b for _, b in compared]


def test_import_refuses_an_existing_run_and_unknown_models(marian, tmp_path):
    source, run = marian
    result = invoke("import", "huggingface", str(source), "-o", str(run))
    assert one_line_error(result).endswith("already exists; pass --force to replace it")
    config = json.loads((source / "config.json").read_text())
    other = tmp_path / "bert"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({**config, "model_type": "bert"}))
    result = invoke("import", "huggingface", str(other), "-o", str(tmp_path / "out"))
    assert "model_type 'bert' cannot be imported" in one_line_error(result)
    assert not (tmp_path / "out").exists()
    result = invoke("import", "huggingface", str(tmp_path / "missing/dir/x"), "-o", str(tmp_path / "out"))
    assert "not a model directory" in one_line_error(result)


def test_a_hub_id_is_downloaded_with_its_revision(marian, tmp_path, monkeypatch):
    import huggingface_hub

    source, _ = marian
    calls = []

    def snapshot_download(repo_id, revision=None, allow_patterns=None):
        calls.append((repo_id, revision))
        return str(source)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    result = invoke("import", "huggingface", "Helsinki-NLP/opus-mt-xx-yy", "--revision", "v1", "-o",
                     str(tmp_path / "run"))
    assert result.exit_code == 0, result.output
    assert calls == [("Helsinki-NLP/opus-mt-xx-yy", "v1")]
    meta = json.loads((tmp_path / "run" / "checkpoints" / "final" / "meta.json").read_text())
    assert meta["source"] == {"huggingface": "Helsinki-NLP/opus-mt-xx-yy", "revision": "v1", "commit": "hf"}
