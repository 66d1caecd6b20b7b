"""Export to Hugging Face Marian and CTranslate2: same logits, same translations, clear refusals.

Runtimes come from the optional ``bench`` extra; tests that need one skip without it.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from mtkit.checkpoint import Loaded, load_for_inference, save_checkpoint
from mtkit.cli import app
from mtkit.config import validate_config
from mtkit.engines.ctranslate2 import CT2Translator
from mtkit.errors import MtkitError
from mtkit.export import (
    CTranslate2Exporter,
    HuggingFaceExporter,
    export,
    huggingface_generation_config,
)
from mtkit.models.encoder_decoder import Transformer
from mtkit.search import greedy_search
from mtkit.tokenizer import train_tokenizers
from mtkit.vocab import EOS_ID, PAD_ID

WORDS = [
    "the", "a", "cat", "dog", "sat", "on", "mat", "red", "blue",
    "house", "tree", "man", "woman", "runs", "walks", "big", "small", "green",
]


def _lines(seed: int, count: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 9))) for _ in range(count)]


def make_run(directory: Path, seed: int = 0, joint: bool = True, **model: object) -> Loaded:
    """A checkpointed run with a tiny tokenizer and a randomly initialised tiny model."""
    cfg = validate_config({
        "experiment": {"dir": str(directory)},
        "tokenizer": {"vocab_size": 40, "joint": joint},
        "model": {"size": "tiny", "dropout": 0.0, **model},
        # Random models rarely stop: keep outputs short so the searches stay fast.
        "decode": {"beam": 3, "max_len_a": 0.0, "max_len_b": 8},
    })
    texts = _lines(seed, 300)
    tokenizers = train_tokenizers(cfg.tokenizer, directory / "tokenizer", lambda sides: iter(texts))
    torch.manual_seed(seed)
    transformer = Transformer(cfg.model, tokenizers.src.vocab_size, tokenizers.tgt.vocab_size, tokenizers.joint)
    save_checkpoint(directory / "checkpoints", step=1, epoch=1, model=transformer, config=cfg,
                    tokenizers=tokenizers, metrics={}, trainer_state={}, best=True, keep_last=1)
    return load_for_inference(directory)


@pytest.fixture(scope="module")
def post_run(tmp_path_factory) -> Loaded:
    return make_run(tmp_path_factory.mktemp("post"), norm="post")


@pytest.fixture(scope="module")
def pre_run(tmp_path_factory) -> Loaded:
    return make_run(tmp_path_factory.mktemp("pre"), seed=1, norm="pre")


def source_batch(loaded: Loaded, lines: list[str]) -> torch.Tensor:
    """``(B, S)`` ids + EOS, right-padded, as mtkit's search and Marian both expect."""
    ids = loaded.tokenizers.src.encode(lines)
    src = torch.full((len(ids), max(map(len, ids)) + 1), PAD_ID, dtype=torch.long)
    for row, seq in enumerate(ids):
        src[row, : len(seq) + 1] = torch.tensor([*seq, EOS_ID])
    return src


# --------------------------------------------------------------------------- Hugging Face


@pytest.mark.parametrize(
    "model",
    [
        {},  # shared embeddings, tied output
        {"tie_output": False},
        {"share_embeddings": False, "activation": "gelu"},
        {"joint": False},  # separate vocabularies
    ],
    ids=["shared-tied", "untied", "unshared-gelu", "separate-vocabs"],
)
@pytest.mark.filterwarnings("ignore:Recommended. pip install sacremoses")
def test_huggingface_export_matches_mtkit(tmp_path, model):
    transformers = pytest.importorskip("transformers")
    model = dict(model)
    loaded = make_run(tmp_path / "run", seed=2, joint=model.pop("joint", True), norm="post", **model)
    result = CliRunner().invoke(app, ["export", "huggingface", str(tmp_path / "run"), str(tmp_path / "hf")])
    assert result.exit_code == 0, result.stderr

    marian = transformers.MarianMTModel.from_pretrained(tmp_path / "hf").eval()
    lines = _lines(7, 4)
    src = source_batch(loaded, lines)
    tgt_in = torch.tensor([[2, 5, 9, 11, 7], [2, 6, 6, 8, 12], [2, 13, 4, 9, 5], [2, 10, 11, 12, 13]])
    with torch.no_grad():
        ours = loaded.model(src, tgt_in)
        theirs = marian(input_ids=src, attention_mask=(src != PAD_ID).long(), decoder_input_ids=tgt_in).logits
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)

    # Greedy generation through generate() equals mtkit's greedy search.
    with torch.no_grad():
        generated = marian.generate(input_ids=src, attention_mask=(src != PAD_ID).long(), num_beams=1,
                                    max_new_tokens=7)
    expected = greedy_search(loaded.model, src, max_len_a=0.0, max_len_b=6)
    for row, hyps in zip(generated.tolist(), expected, strict=True):
        assert [t for t in row[1:] if t not in (PAD_ID, EOS_ID)] == hyps[0].tokens

    # The exported tokenizer encodes as mtkit does, plus the source EOS mtkit appends.
    tokenizer = transformers.MarianTokenizer.from_pretrained(tmp_path / "hf")
    assert tokenizer(lines).input_ids == [[*ids, EOS_ID] for ids in loaded.tokenizers.src.encode(lines)]
    assert marian.generation_config.decoder_start_token_id == 2


def test_huggingface_exports_pre_norm_as_blenderbot(pre_run, tmp_path):
    pytest.importorskip("transformers")
    result = CliRunner().invoke(app, ["export", "huggingface", str(pre_run.path), str(tmp_path / "hf"),
                                      "--sample-lines", "0"])
    assert result.exit_code == 0, result.stderr
    assert '"model_type": "blenderbot"' in (tmp_path / "hf" / "config.json").read_text(encoding="utf-8")


def test_huggingface_refuses_learned_positions(tmp_path):
    loaded = make_run(tmp_path / "run", norm="post", positions="learned")
    problems = HuggingFaceExporter().problems(loaded)
    assert len(problems) == 1 and problems[0].startswith("model.positions=learned")


def test_generation_config_follows_mtkit_tokens(post_run):
    pytest.importorskip("transformers")
    config = huggingface_generation_config(post_run)
    assert (config.decoder_start_token_id, config.eos_token_id, config.pad_token_id) == (2, 3, 0)
    assert config.num_beams == post_run.config.decode.beam


# --------------------------------------------------------------------------- CTranslate2


@pytest.mark.parametrize("norm", ["pre", "post"])
def test_ctranslate2_export_matches_mtkit(norm, post_run, pre_run, tmp_path):
    pytest.importorskip("ctranslate2")
    loaded = pre_run if norm == "pre" else post_run
    export(CTranslate2Exporter(), loaded, tmp_path / "ct2")
    lines = _lines(11, 6)
    src = source_batch(loaded, lines)

    greedy = loaded.config.decode.model_copy(update={"beam": 1})
    translator = CT2Translator(tmp_path / "ct2", loaded.tokenizers, greedy, intra_threads=1)
    theirs = translator.translate_ids(loaded.tokenizers.src.encode(lines))
    ours = greedy_search(loaded.model, src, max_len_a=0.0, max_len_b=8)
    assert theirs == [hyps[0].tokens for hyps in ours]

    # Token log-probabilities of a fixed target agree with mtkit's forward pass.
    target = [[5, 9, 11, 7], [6, 8], [13, 4, 9], [10, 12, 13, 5, 6], [7], [8, 9]]
    pieces = translator.src_pieces
    scored = translator.translator.score_batch(
        [[pieces[i] for i in ids] for ids in loaded.tokenizers.src.encode(lines)],
        [[pieces[i] for i in ids] for ids in target],
    )
    tgt_in = torch.full((6, 6), PAD_ID, dtype=torch.long)
    for row, ids in enumerate(target):
        tgt_in[row, : len(ids) + 1] = torch.tensor([2, *ids])
    with torch.no_grad():
        log_probs = torch.log_softmax(loaded.model(src, tgt_in), dim=-1)
    for row, ids in enumerate(target):
        expected = [log_probs[row, t, token].item() for t, token in enumerate([*ids, EOS_ID])]
        assert scored[row].log_probs == pytest.approx(expected, abs=1e-4)


def test_ctranslate2_cli_reports_parity(post_run, tmp_path):
    pytest.importorskip("ctranslate2")
    sample = tmp_path / "sample.txt"
    sample.write_text("\n".join(_lines(5, 6)) + "\n", encoding="utf-8")
    out = tmp_path / "ct2"
    args = ["export", "ctranslate2", str(post_run.path), str(out), "--sample", str(sample)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.stderr
    assert "parity on 6 sentences" in result.stdout and "greedy 100% identical" in result.stdout
    assert {"model.bin", "config.json", "source.spm", "target.spm"} <= {p.name for p in out.iterdir()}

    # An existing output is refused without --force, replaced with it.
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 1 and "already exists; pass --force" in again.stderr
    forced = CliRunner().invoke(app, [*args, "--force", "--quantization", "int8", "--sample-lines", "0"])
    assert forced.exit_code == 0, forced.stderr
    assert "int8" in forced.stdout and (out / "model.bin").exists()


def test_ctranslate2_quantization_leaves_the_model_alone(post_run, tmp_path):
    pytest.importorskip("ctranslate2")
    before = {name: tensor.clone() for name, tensor in post_run.model.state_dict().items()}
    export(CTranslate2Exporter("int8"), post_run, tmp_path / "ct2")
    for name, tensor in post_run.model.state_dict().items():
        assert torch.equal(tensor, before[name]), name


def test_ctranslate2_refuses_unknown_quantization(post_run, tmp_path):
    pytest.importorskip("ctranslate2")
    with pytest.raises(MtkitError, match="--quantization int3: expected one of"):
        export(CTranslate2Exporter("int3"), post_run, tmp_path / "ct2")


def test_output_may_not_replace_the_checkpoint(post_run):
    with pytest.raises(MtkitError, match="would replace the checkpoint"):
        export(CTranslate2Exporter(), post_run, post_run.path.parent, force=True)


def test_missing_runtime_says_how_to_install(post_run, tmp_path, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "transformers", None)
    with pytest.raises(MtkitError, match=r"pip install 'mtkit\[hf\]'"):
        export(HuggingFaceExporter(), post_run, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()
