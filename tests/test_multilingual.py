"""Multilingual models: corpora that name their directions, a ``<2xx>`` token (on the source,
or forced as the first output token), temperature sampling over directions, validation and the
pipeline's report per direction, and translation that must be told its languages.

The data is synthetic, made here: "en" sentences of made-up words, their "de" (each word
reversed, then ``x``) and their "fr" (each word in capitals), so the language a model writes
can be read off its words."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import numpy as np
import pytest
from helpers.cli import invoke, one_line_error
from helpers.data import write_config

from mtkit.batching import epoch_rows
from mtkit.config import load_config
from mtkit.errors import ConfigError

_SYLLABLES = ["ka", "to", "ri", "mu", "se", "na", "lo", "pe"]
WORDS = sorted({a + b for a in _SYLLABLES for b in _SYLLABLES})[:40]
WRITE = {"en": lambda w: w, "de": lambda w: w[::-1] + "x", "fr": str.upper}


def sentences(n: int, seed: int) -> list[list[str]]:
    rng = random.Random(seed)
    return [[rng.choice(WORDS) for _ in range(rng.randint(3, 8))] for _ in range(n)]


def write_direction(directory: Path, split: str, src: str, tgt: str, n: int, seed: int) -> dict:
    """``n`` pairs of ``src`` -> ``tgt`` as two files; the config's corpus entry."""
    rows = sentences(n, seed)
    entry = {"format": "text", "src_lang": src, "tgt_lang": tgt}
    for side, lang in (("src", src), ("tgt", tgt)):
        path = directory / f"{split}.{src}-{tgt}.{side}"
        path.write_text("".join(" ".join(map(WRITE[lang], words)) + "\n" for words in rows), encoding="utf-8")
        entry[side] = str(path)
    return entry


DIRECTIONS = [("en", "de"), ("en", "fr"), ("de", "en")]
ROOT = Path(__file__).resolve().parents[1]


def multilingual_config(directory: Path, language_token: str = "source", steps: int = 300, **data) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    config = {
        "experiment": {"dir": str(directory / "run")},
        "data": {
            **{split: [write_direction(directory, split, s, t, n, first + i) for i, (s, t) in enumerate(DIRECTIONS)]
               for split, n, first in (("train", 600, 0), ("valid", 20, 10), ("test", 20, 20))},
            "language_token": language_token, **data,
        },
        "tokenizer": {"vocab_size": 150, "num_threads": 1},
        "model": {"size": "tiny", "dropout": 0.0},
        "train": {"max_tokens": 600, "max_steps": steps, "warmup_steps": 30, "lr": 0.004, "log_every": 50,
                  "valid_every": steps // 2, "threads": 1, "precision": "fp32", "average_last": 1},
        "decode": {"beam": 2, "max_len_a": 1.2, "max_len_b": 4, "backend": "torch", "compute_type": "float32"},
    }
    return write_config(directory / "config.yaml", config)


def language_of(line: str) -> str | None:
    """The language most of a line's words are written in (None: no word of any)."""
    votes = {"de": 0, "fr": 0, "en": 0}
    for word in line.split():
        if word.isupper():
            votes["fr"] += 1
        elif word.endswith("x") and word[:-1][::-1] in WORDS:
            votes["de"] += 1
        elif word in WORDS:
            votes["en"] += 1
    best = max(votes, key=votes.__getitem__)
    return best if votes[best] else None


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """The pipeline run on three directions (300 updates of the tiny model)."""
    directory = tmp_path_factory.mktemp("multilingual")
    config = multilingual_config(directory)
    result = invoke("pipeline", "-c", str(config))
    assert result.exit_code == 0, result.output
    return directory


# --------------------------------------------------------------------------- config and prepare


def test_directions_come_from_the_corpora():
    config = load_config(ROOT / "configs/tiny_multilingual.yaml")
    assert config.data.directions() == [("en", "de"), ("en", "fr"), ("de", "en"), ("fr", "en")]
    assert config.data.multilingual and len(config.data.eval_sets("valid")) == 4
    assert not load_config(ROOT / "configs/tiny.yaml").data.multilingual
    assert load_config(ROOT / "configs/tiny.yaml").data.eval_sets("valid")[0].limit == 200


def test_two_validation_sets_of_one_direction_are_refused(tmp_path):
    corpus = {"format": "text", "src": "a", "tgt": "b", "src_lang": "en", "tgt_lang": "de"}
    with pytest.raises(ConfigError, match="two corpora of direction en-de"):
        load_config(write_config(tmp_path / "c.yaml", {"data": {"valid": [corpus, dict(corpus)]}}))


@pytest.mark.parametrize("language_token", ["source", "target"])
def test_prepare_puts_the_language_token_where_the_config_says(tmp_path, language_token):
    from mtkit.data import load_split, split_groups
    from mtkit.tokenizer import Tokenizers

    config = multilingual_config(tmp_path, language_token)
    for stage in (("tokenizer", "train"), ("prepare",)):
        result = invoke(*stage, "-c", str(config))
        assert result.exit_code == 0, result.output
    run = tmp_path / "run"
    tokenizers = Tokenizers.load(run / "tokenizer")
    assert tokenizers.languages.directions == tuple(DIRECTIONS)
    tags = {lang: tokenizers.src.piece_to_id(f"<2{lang}>") for lang in ("de", "fr", "en")}
    assert len(set(tags.values())) == 3 and 0 not in tags.values()  # three pieces of their own
    train = load_split(run, "train")
    groups = split_groups(run, "train")
    assert [(g.src_lang, g.tgt_lang) for g in groups] == DIRECTIONS
    assert groups[-1].end == len(train)
    side = "src_ids" if language_token == "source" else "tgt_ids"
    for group in groups:
        first = {row[0] for row in train[group.start : group.end][side]}
        assert first == {tags[group.tgt_lang]}, group
    other = "tgt_ids" if language_token == "source" else "src_ids"
    assert not set(tags.values()) & {i for row in train[other] for i in row}
    report = (run / "data" / "report.txt").read_text()
    counts = re.search(r"train pairs by direction: en-de (\d+), en-fr (\d+), de-en (\d+)", report)
    assert counts and [int(n) for n in counts.groups()] == [g.end - g.start for g in groups]
    # The tokenizer says what it was trained for: another convention needs it trained again.
    other_config = multilingual_config(tmp_path, "target" if language_token == "source" else "source")
    one_line_error(invoke("prepare", "-c", str(other_config)), "the tokenizer was trained for",
                   "mtkit tokenizer train")


# --------------------------------------------------------------------------- sampling over directions


def test_temperature_sampling_follows_fairseq_formula():
    groups = [("en-de", 0, 9000, 1.0), ("en-fr", 9000, 10000, 1.0)]
    assert epoch_rows(groups, 1.0, seed=1, epoch=1) is None  # as the corpus comes
    assert epoch_rows(groups[:1], 5.0, seed=1, epoch=1) is None
    rows = epoch_rows(groups, 5.0, seed=1, epoch=1)
    p = np.array([0.9, 0.1]) ** (1 / 5)
    p /= p.sum()
    small = int((rows >= 9000).sum())
    assert len(rows) == 10000 and abs(small - round(10000 * p[1])) <= 1  # 3,889: upsampled ~3.9x
    counts = np.bincount(rows[rows >= 9000] - 9000, minlength=1000)
    assert counts.min() >= 3 and counts.max() <= 4  # every pair floor(3.9) times, then without replacement
    assert len(np.unique(rows[rows < 9000])) == len(rows[rows < 9000])  # the large one: no pair twice
    assert np.array_equal(rows, epoch_rows(groups, 5.0, seed=1, epoch=1))
    assert not np.array_equal(rows, epoch_rows(groups, 5.0, seed=1, epoch=2))


def test_corpus_weights_upsample_and_subsample():
    real, synthetic = ("en-de", 0, 100, 3.0), ("en-de", 100, 1100, 0.5)
    rows = epoch_rows([real, synthetic], 1.0, seed=1, epoch=1)
    assert len(rows) == 800  # 3 x 100 + 0.5 x 1,000
    assert np.array_equal(np.bincount(rows[rows < 100]), np.full(100, 3))
    drawn = rows[rows >= 100]
    assert len(drawn) == 500 and len(np.unique(drawn)) == 500  # half of them, none twice
    assert not np.array_equal(np.sort(drawn), np.sort(epoch_rows([real, synthetic], 1.0, seed=1, epoch=2)[300:]))
    with pytest.raises(ConfigError, match="weight is for training corpora"):
        load_config(None, ["data.valid.src=a", "data.valid.tgt=b", "data.valid.weight=2"])


# --------------------------------------------------------------------------- a trained model


def test_validation_and_report_are_per_direction(trained):
    run = trained / "run"
    valids = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()
              if json.loads(line).get("type") == "valid"]
    last = valids[-1]
    assert set(last["directions"]) == {"en-de", "en-fr", "de-en"}
    assert last["bleu"] == pytest.approx(np.mean([d["bleu"] for d in last["directions"].values()]))
    report = json.loads((run / "report.json").read_text())
    assert set(report["test"]["directions"]) == {"en-de", "en-fr", "de-en"}
    assert all(d["sentences"] == 20 for d in report["test"]["directions"].values())
    markdown = (run / "report.md").read_text()
    assert "| direction | test sentences | test BLEU |" in markdown and "| en-fr | 20 |" in markdown
    # The test translations are in the language each direction asks for.
    hyps = (run / "translations" / f"test.hyp.{load_config(trained / 'config.yaml').data.tgt_lang}").read_text()
    written = [language_of(line) for line in hyps.splitlines()]
    assert written[:20].count("de") >= 18 and written[20:40].count("fr") >= 18 and written[40:].count("en") >= 18


def test_translate_needs_the_languages_and_follows_the_target(trained, tmp_path):
    run = str(trained / "run")
    sources = "".join(" ".join(words) + "\n" for words in sentences(20, 99))
    outputs = {}
    for target in ("de", "fr"):
        result = invoke("translate", "-m", run, "--source-lang", "en", "--target-lang", target, input=sources)
        assert result.exit_code == 0, result.output
        outputs[target] = result.stdout.splitlines()
        assert len(outputs[target]) == 20 and "<2" not in result.stdout  # the tag never leaks
    assert sum(language_of(line) == "de" for line in outputs["de"]) >= 18
    assert sum(language_of(line) == "fr" for line in outputs["fr"]) >= 18
    one_line_error(invoke("translate", "-m", run, input=sources), "--source-lang", "name one",
                   "en-de, en-fr, de-en")
    one_line_error(invoke("translate", "-m", run, "--source-lang", "en", "--target-lang", "it", input=sources),
                   "--target-lang 'it'", "en-de, en-fr, de-en")


def test_serve_lists_every_direction(trained):
    from mtkit.checkpoint import load_for_inference
    from mtkit.cli.serve_cmd import served_pairs

    loaded = load_for_inference(trained / "run" / "checkpoints" / "final")
    assert [pair[:2] for pair in served_pairs(loaded)] == DIRECTIONS


def test_a_multilingual_pretrained_model_is_fine_tuned_with_its_language_tokens(tmp_path):
    """An imported M2M100 model keeps its tokens: prepare frames each pair as translation does
    (source language token first, target language token forced first)."""
    pytest.importorskip("transformers")
    from helpers.data import write_pairs
    from helpers.hf_models import M2M100_LANGUAGES, make_m2m100

    from mtkit.data import load_split
    from mtkit.tokenizer import Tokenizers, language_prefixes

    imported = tmp_path / "imported"
    result = invoke("import", "huggingface", str(make_m2m100(tmp_path / "hf", steps=1)), "-o", str(imported))
    assert result.exit_code == 0, result.stderr
    source, german, _ = M2M100_LANGUAGES
    config = write_config(tmp_path / "tune.yaml", {
        "experiment": {"dir": str(tmp_path / "tuned")},
        "data": {"src_lang": source, "tgt_lang": german, "max_len": 60,
                 **{split: write_pairs(tmp_path, split, count, seed)
                    for split, count, seed in (("train", 40, 3), ("valid", 6, 4))}},
        "pretrained": {"run": str(imported)},
        "train": {"max_tokens": 400, "max_steps": 2, "warmup_steps": 1, "valid_every": 2, "valid_bleu": False,
                  "best_metric": "loss", "threads": 1, "precision": "fp32"},
        "decode": {"beam": 1, "max_len_a": 1.0, "max_len_b": 3, "backend": "torch"},
    })
    for stage in (("tokenizer", "train"), ("prepare",), ("train",)):
        result = invoke(*stage, "-c", str(config))
        assert result.exit_code == 0, result.stderr
    tokenizers = Tokenizers.load(tmp_path / "tuned" / "tokenizer")
    src_prefix, tgt_prefix = language_prefixes(tokenizers, source, german)
    assert len(src_prefix) == 1 and len(tgt_prefix) == 1
    train = load_split(tmp_path / "tuned", "train")
    assert {tuple(ids[:1]) for ids in train["src_ids"]} == {tuple(src_prefix)}
    assert {tuple(ids[:1]) for ids in train["tgt_ids"]} == {tuple(tgt_prefix)}
    result = invoke("translate", "-m", str(tmp_path / "tuned"), input="katori mu\n")
    assert result.exit_code == 0 and len(result.stdout.splitlines()) == 1, result.stderr


def test_compare_scores_each_direction_in_its_languages(trained):
    run = str(trained / "run")
    result = invoke("compare", run, run, "--speed-sentences", "0", "--samples", "50", "--json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert [test["name"] for test in report["test_sets"]] == ["test.en-de en-de", "test.en-fr en-fr",
                                                              "test.de-en de-en"]
    scores = {row["test"]: row["bleu"] for row in report["systems"][0]["tests"]}
    pipeline = json.loads((trained / "run" / "report.json").read_text())["test"]["directions"]
    for test, direction in zip(scores, ("en-de", "en-fr", "de-en"), strict=True):
        assert scores[test] == pytest.approx(pipeline[direction]["bleu"], abs=0.01)
    # A file test set names its direction; without one a multilingual run is refused in one line.
    refused = invoke("compare", run, "--test", str(trained / "test.en-fr.src"), str(trained / "test.en-fr.tgt"))
    one_line_error(refused, "--source-lang", "en-de, en-fr, de-en")


@pytest.mark.parametrize("language_token", ["source", "target"])
def test_a_decoder_only_model_translates_into_each_language(tmp_path, language_token):
    # One stack over `<2xx> source </s> <s> target` (source tags) or `source </s> <s> <xx> target`
    # (target tags, forced as the first target token): both follow --target-lang.
    config = multilingual_config(tmp_path, language_token)
    arch = ["--set", "model.arch=decoder_only", "--set", "model.size=tiny_decoder_only"]
    result = invoke("pipeline", "-c", str(config), *arch)
    assert result.exit_code == 0, result.output
    sources = "".join(" ".join(words) + "\n" for words in sentences(20, 98))
    for target in ("de", "fr"):
        result = invoke("translate", "-m", str(tmp_path / "run"), "--source-lang", "en", "--target-lang", target,
                        input=sources)
        assert result.exit_code == 0, result.output
        lines = result.stdout.splitlines()
        assert len(lines) == 20 and "<2" not in result.stdout
        assert sum(language_of(line) == target for line in lines) >= 16
