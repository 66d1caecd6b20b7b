"""SentencePiece training and the shell encode/decode commands, through the real CLI."""

from __future__ import annotations

import json

import pytest
import sentencepiece as spm
from typer.testing import CliRunner

from mtkit.cli import app
from mtkit.errors import MtkitError
from mtkit.tokenizer import Tokenizers
from mtkit.vocab import BOS_ID, EOS_ID, PAD_ID, UNK_ID

runner = CliRunner()


def _train(config, *overrides):
    args = ["tokenizer", "train", "-c", str(config)]
    for item in overrides:
        args += ["--set", item]
    return runner.invoke(app, args)


@pytest.mark.parametrize("kind", ["unigram", "bpe"])
@pytest.mark.parametrize("joint", [True, False])
def test_train_writes_models_meta_and_config(tokdata_experiment, kind, joint):
    config = tokdata_experiment(tokenizer={"type": kind, "joint": joint, "vocab_size": 100, "user_symbols": ["<2de>"]})
    result = _train(config)
    assert result.exit_code == 0, result.output
    run = config.parent / "run"
    files = sorted(p.name for p in (run / "tokenizer").iterdir())
    expected = ["spm.model", "spm.vocab"] if joint else ["src.model", "src.vocab", "tgt.model", "tgt.vocab"]
    assert files == sorted([*expected, "meta.json"])
    assert (run / "config.yaml").is_file()
    meta = json.loads((run / "tokenizer" / "meta.json").read_text())
    assert meta["joint"] is joint and meta["type"] == kind
    assert meta["vocab_size"] == {"src": 100, "tgt": 100}
    assert meta["sentencepiece"] == spm.__version__

    tok = Tokenizers.load(run / "tokenizer")
    assert tok.joint is joint and (tok.src is tok.tgt) is joint
    assert meta["fingerprint"] == tok.fingerprint()
    for t in (tok.src, tok.tgt):
        assert t.vocab_size == 100
        assert [t.piece_to_id(p) for p in ("<pad>", "<unk>", "<s>", "</s>", "<2de>")] == [
            PAD_ID,
            UNK_ID,
            BOS_ID,
            EOS_ID,
            4,
        ]
        # A user symbol is one piece, never split.
        assert 4 in t.encode(["<2de> the dog"])[0]
    # Separate models learn different vocabularies.
    assert joint or tok.src.encode(["hund"]) != tok.tgt.encode(["hund"])


def test_tokenizer_api_round_trip_and_copy(tokdata_experiment, tmp_path):
    config = tokdata_experiment()
    assert _train(config).exit_code == 0
    tok = Tokenizers.load(config.parent / "run" / "tokenizer")
    texts = ["the red dog runs in the park 7", "der rote hund", "kato rimu"]
    ids = tok.src.encode(texts)
    assert all(BOS_ID not in seq and EOS_ID not in seq for seq in ids)
    assert tok.src.decode([[BOS_ID, *seq, EOS_ID, PAD_ID] for seq in ids]) == texts
    tok.copy_to(tmp_path / "copy")
    copy = Tokenizers.load(tmp_path / "copy")
    assert copy.fingerprint() == tok.fingerprint()
    assert copy.src.encode(texts) == ids


def test_training_is_deterministic_and_bounded(tokdata_experiment):
    config = tokdata_experiment(n=400)
    assert _train(config, "tokenizer.input_sentence_size=150", "tokenizer.vocab_size=60").exit_code == 0
    first = Tokenizers.load(config.parent / "run" / "tokenizer").fingerprint()
    assert _train(config, "tokenizer.input_sentence_size=150", "tokenizer.vocab_size=60").exit_code == 0
    assert Tokenizers.load(config.parent / "run" / "tokenizer").fingerprint() == first


def test_encode_decode_round_trip_via_stdin(tokdata_experiment):
    config = tokdata_experiment()
    assert _train(config).exit_code == 0
    text = "the  red dog\truns 12\n\nthe man sees a ball\n"
    pieces = runner.invoke(app, ["tokenizer", "encode", "-c", str(config)], input=text)
    assert pieces.exit_code == 0, pieces.output
    assert len(pieces.stdout.splitlines()) == 3  # one output line per input line, the empty one too
    back = runner.invoke(app, ["tokenizer", "decode", "-c", str(config), "--side", "src"], input=pieces.stdout)
    assert back.stdout.splitlines() == ["the red dog runs 12", "", "the man sees a ball"]

    tok_dir = str(config.parent / "run" / "tokenizer")
    ids = runner.invoke(app, ["tokenizer", "encode", "-m", tok_dir, "--side", "tgt", "--ids"], input="der hund\n")
    assert ids.exit_code == 0 and all(x.isdigit() for x in ids.stdout.split())
    back = runner.invoke(app, ["tokenizer", "decode", "-m", tok_dir, "--ids"], input=ids.stdout)
    assert back.stdout == "der hund\n"


def test_errors_are_one_line(tokdata_experiment):
    config = tokdata_experiment()
    result = runner.invoke(app, ["tokenizer", "encode", "-c", str(config)], input="x\n")
    assert result.exit_code == 1
    assert result.stderr.strip().endswith("tokenizer not trained; run `mtkit tokenizer train -c CONFIG` first")

    result = _train(config, "tokenizer.vocab_size=5000")
    assert result.exit_code == 1 and len(result.stderr.splitlines()) == 1
    assert "vocab" in result.stderr.lower()
    assert not (config.parent / "run" / "tokenizer").exists()

    assert _train(config).exit_code == 0
    tok_dir = str(config.parent / "run" / "tokenizer")
    result = runner.invoke(app, ["tokenizer", "decode", "-m", tok_dir, "--ids"], input="5 6\n99999\n")
    assert result.exit_code == 1 and "<stdin>:2: id 99999 outside the vocabulary" in result.stderr
    result = runner.invoke(app, ["tokenizer", "encode"], input="x\n")
    assert result.exit_code == 1 and "-c CONFIG or -m TOKENIZER_DIR" in result.stderr


def test_bad_corpus_fails_training_without_output(tokdata_experiment):
    config = tokdata_experiment()
    (config.parent / "train.tgt").write_text("only one line\n")
    result = _train(config)
    assert result.exit_code == 1
    assert "train.src has 300 lines but" in result.stderr and "train.tgt has 1" in result.stderr
    assert not (config.parent / "run" / "tokenizer").exists()


def test_failed_training_leaves_no_new_experiment_directory(tokdata_experiment):
    config = tokdata_experiment()
    (config.parent / "train.src").unlink()
    result = _train(config, f"experiment.dir={config.parent / 'new' / 'run'}")
    assert result.exit_code == 1 and "train.src: file not found" in result.stderr
    assert not (config.parent / "new").exists()
    # A directory that was there before stays, with whatever it held.
    (config.parent / "run").mkdir()
    (config.parent / "run" / "notes.txt").write_text("mine\n")
    assert _train(config).exit_code == 1
    assert [p.name for p in (config.parent / "run").iterdir() if p.name != ".lock"] == ["notes.txt"]
    empty = config.parent / "empty"
    empty.mkdir()
    assert _train(config, f"experiment.dir={empty}").exit_code == 1
    assert empty.is_dir()


def test_load_rejects_changed_model(tokdata_experiment):
    config = tokdata_experiment()
    assert _train(config).exit_code == 0
    directory = config.parent / "run" / "tokenizer"
    (directory / "spm.model").write_bytes(b"garbage")
    with pytest.raises(MtkitError, match="not a SentencePiece model|fingerprint"):
        Tokenizers.load(directory)


def test_no_training_text(tokdata_experiment):
    config = tokdata_experiment()
    for name in ("train.src", "train.tgt"):
        (config.parent / name).write_text("\n  \n")
    result = _train(config)
    assert result.exit_code == 1 and result.stderr == "mtkit: error: data.train: no text to train the tokenizer on\n"
    result = _train(config, "data.train=[]")
    assert result.exit_code == 1 and result.stderr == "mtkit: error: data.train: no training corpora configured\n"


# Full-width punctuation, an ellipsis, superscripts, ligatures and full-width letters: text
# that SentencePiece's default rule (nmt_nfkc) rewrites.
AS_WRITTEN = ["你好，世界？是的！注意：等等…", "E = mc² and x³ …", "the ﬁnal ﬂight", "Ｆｕｌｌ ｗｉｄｔｈ １２３"]


def _with_lines(config, lines):
    """Append ``lines`` (five times) to both sides of the training data of ``config``."""
    import yaml

    data = yaml.safe_load(config.read_text())["data"]["train"]
    for side in ("src", "tgt"):
        with open(data[side], "a", encoding="utf-8") as out:
            out.write("".join(line + "\n" for line in lines * 5))
    return config


def _round_trip(config, text):
    ids = runner.invoke(app, ["tokenizer", "encode", "-c", str(config), "--ids"], input=text)
    assert ids.exit_code == 0, ids.output
    back = runner.invoke(app, ["tokenizer", "decode", "-c", str(config), "--ids", "--side", "src"], input=ids.stdout)
    assert back.exit_code == 0, back.output
    return back.stdout


def test_identity_normalization_keeps_text_as_written(tokdata_experiment):
    config = _with_lines(tokdata_experiment(tokenizer={"vocab_size": 180, "num_threads": 1}), AS_WRITTEN)
    assert _train(config).exit_code == 0
    run = config.parent / "run"
    assert json.loads((run / "tokenizer" / "meta.json").read_text())["normalization"] == "identity"
    text = "".join(line + "\n" for line in AS_WRITTEN)
    assert _round_trip(config, text) == text
    tok = Tokenizers.load(run / "tokenizer")
    assert tok.tgt.decode(tok.tgt.encode(AS_WRITTEN)) == AS_WRITTEN
    assert UNK_ID not in sum(tok.tgt.encode(AS_WRITTEN), [])
    # mtkit's own cleanup still applies: whitespace runs and control characters.
    assert _round_trip(config, " the\t ﬁnal\x00 …\n") == "the ﬁnal …\n"

    # SentencePiece's default rule, still selectable, rewrites them.
    assert _train(config, "tokenizer.normalization=nmt_nfkc").exit_code == 0
    rewritten = _round_trip(config, text).splitlines()
    assert rewritten[0] == "你好,世界?是的!注意:等等..." and rewritten[1] == "E = mc2 and x3 ..."
    assert rewritten[2:] == ["the final flight", "Full width 123"]


def test_byte_fallback_spells_unseen_characters(tokdata_experiment):
    config = tokdata_experiment(tokenizer={"vocab_size": 400, "byte_fallback": True, "num_threads": 1})
    assert _train(config).exit_code == 0
    tok = Tokenizers.load(config.parent / "run" / "tokenizer")
    unseen = ["日本語 ﬁ ²"]  # none of these characters is in the training data
    ids = tok.src.encode(unseen)
    assert UNK_ID not in ids[0] and tok.src.decode(ids) == unseen
