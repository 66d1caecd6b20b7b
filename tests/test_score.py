"""``mtkit.score`` and ``mtkit score`` against the ``sacrebleu`` command itself."""

import gzip
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mtkit.cli import app
from mtkit.errors import MtkitError
from mtkit.score import compare, looks_tokenized, score

SACREBLEU = Path(sys.executable).parent / "sacrebleu"
MULTI30K = Path(__file__).resolve().parents[2] / "shared" / "data" / "multi30k"


def invoke(args, input=None):
    return CliRunner().invoke(app, args, input=input)


def perturb(lines: list[str], seed: int) -> list[str]:
    """A plausible 'system output': words dropped, swapped and replaced at random."""
    rng = random.Random(seed)
    out = []
    for line in lines:
        words = line.split()
        words = [w for w in words if rng.random() > 0.15] or words[:1]
        if len(words) > 2 and rng.random() < 0.3:
            i = rng.randrange(len(words) - 1)
            words[i], words[i + 1] = words[i + 1], words[i]
        words = [w if rng.random() > 0.1 else "xyz" for w in words]
        out.append(" ".join(words))
    return out


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("score")
    if (MULTI30K / "test_2016_flickr.de.gz").exists():
        with gzip.open(MULTI30K / "test_2016_flickr.de.gz", "rt", encoding="utf-8") as handle:
            refs = [line.rstrip("\n") for line in handle][:300]
    else:
        rng = random.Random(0)
        vocab = ["ein", "Mann", "eine", "Frau", "Hund", "läuft", "auf", "der", "Straße", "mit", "einem", "Ball", "."]
        refs = [" ".join(rng.choice(vocab) for _ in range(rng.randint(3, 15))) for _ in range(300)]
    paths = {"ref": root / "ref.de", "ref2": root / "ref2.de", "hyp": root / "hyp.de", "hyp2": root / "hyp2.de"}
    texts = {"ref": refs, "ref2": perturb(refs, 9), "hyp": perturb(refs, 1), "hyp2": perturb(refs, 2)}
    for name, path in paths.items():
        path.write_text("".join(line + "\n" for line in texts[name]), encoding="utf-8")
    gz = root / "ref.de.gz"
    gz.write_bytes(gzip.compress(paths["ref"].read_bytes()))
    paths["ref_gz"] = gz
    return paths


def sacrebleu_json(*args: str) -> list[dict]:
    done = subprocess.run([str(SACREBLEU), *args, "-m", "bleu", "chrf", "ter", "-w", "4"],
                          capture_output=True, text=True, check=True)
    return json.loads(done.stdout)


@pytest.mark.parametrize("refs", [["ref"], ["ref", "ref2"]])
def test_library_and_cli_equal_the_sacrebleu_command(files, refs):
    expected = sacrebleu_json(*[str(files[r]) for r in refs], "-i", str(files["hyp"]))
    results = invoke(["score", *[str(files[r]) for r in refs], "-i", str(files["hyp"]), "--json"])
    assert results.exit_code == 0, results.output
    got = json.loads(results.stdout)
    assert [g["name"] for g in got] == [e["name"] for e in expected] == ["BLEU", "chrF2", "TER"]
    for g, e in zip(got, expected, strict=True):
        assert g["signature"] == e["signature"]
        assert round(g["score"], 4) == pytest.approx(e["score"], abs=1e-4)
    texts = invoke(["score", *[str(files[r]) for r in refs]], input=files["hyp"].read_text()).stdout.splitlines()
    assert [line.split(" = ")[0] for line in texts] == [f"{e['name']}|{e['signature']}" for e in expected]


def test_gzip_reference_and_stdin(files):
    plain = invoke(["score", str(files["ref"]), "-i", str(files["hyp"])])
    piped = invoke(["score", str(files["ref_gz"])], input=files["hyp"].read_bytes())
    assert plain.exit_code == piped.exit_code == 0
    assert plain.stdout == piped.stdout


def test_language_and_tokenizer_choice():
    hyps, refs = ["我喜欢猫。"], [["我喜欢狗。"]]
    zh = score(hyps, refs, metrics=["bleu"], tgt_lang="zh")[0]
    assert "tok:zh" in zh.signature
    assert "tok:13a" in score(hyps, refs, metrics=["bleu"])[0].signature
    assert "tok:char" in score(hyps, refs, metrics=["bleu"], tgt_lang="zh", tokenize="char")[0].signature
    with pytest.raises(MtkitError, match="unknown BLEU tokenizer"):
        score(hyps, refs, metrics=["bleu"], tokenize="nope")
    result = invoke(["score", "-", "--lang", "zh", "-m", "bleu"], input="x\n")
    assert result.exit_code != 0  # '-' is not a reference file


ZH_HYPS = ["我喜欢吃苹果和香蕉。", "今天天气很好，我们去公园散步吧。", "他昨天买了一本新书。"]
ZH_REFS = ["我喜欢吃香蕉和苹果。", "今天天气不错，我们去公园走走吧。", "他昨天买了一本书。"]


def test_chinese_target_is_scored_with_its_own_settings(tmp_path):
    """Without asian_support TER counts each unspaced sentence as one word (100.0 here)."""
    hyp, ref = tmp_path / "hyp.zh", tmp_path / "ref.zh"
    hyp.write_text("".join(line + "\n" for line in ZH_HYPS), encoding="utf-8")
    ref.write_text("".join(line + "\n" for line in ZH_REFS), encoding="utf-8")
    expected = sacrebleu_json(str(ref), "-i", str(hyp), "-l", "en-zh", "--ter-asian-support", "--ter-normalized")
    result = invoke(["score", str(ref), "-i", str(hyp), "-l", "zh", "--json"])
    assert result.exit_code == 0, result.output
    got = json.loads(result.stdout)
    for g, e in zip(got, expected, strict=True):
        assert g["signature"] == e["signature"]
        assert round(g["score"], 4) == pytest.approx(e["score"], abs=1e-4)
    assert "asian:yes" in got[2]["signature"] and got[2]["score"] == pytest.approx(20.0)
    # Region and script subtags and three-letter codes name the same language.
    for lang in ("zh-CN", "zh_Hant", "zho_Hans"):
        bleu, _, ter = score(ZH_HYPS, [ZH_REFS], tgt_lang=lang)
        assert "tok:zh" in bleu.signature and ter.score == pytest.approx(20.0)
    assert "asian:no" in score(["a b"], [["a c"]], ["ter"], tgt_lang="de")[0].signature


def test_japanese_target(caplog):
    hyps, refs = ["私は猫が好きです。"], [["私は犬が好きです。"]]
    assert "asian:yes" in score(hyps, refs, ["ter"], tgt_lang="ja")[0].signature
    try:
        import MeCab  # noqa: F401
    except ImportError:  # sacrebleu's ja-mecab needs it: char, said once, rather than a failed validation
        from mtkit.score import _say_fallback

        _say_fallback.cache_clear()
        assert "tok:char" in score(hyps, refs, ["bleu"], tgt_lang="jpn_Jpan")[0].signature
        assert "tok:char" in score(hyps, refs, ["bleu"], tgt_lang="ja-JP")[0].signature
        assert [r.message for r in caplog.records] == [
            "mtkit: warning: BLEU for ja: sacrebleu's ja-mecab tokenizer needs MeCab (pip install 'sacrebleu[ja]'); "
            "tokenizing with char instead"]
        with pytest.raises(MtkitError, match=r"^BLEU: the ja-mecab tokenizer needs MeCab: pip install '.*\[ja\]'$"):
            score(hyps, refs, ["bleu"], tokenize="ja-mecab")
    else:
        assert "tok:ja-mecab" in score(hyps, refs, ["bleu"], tgt_lang="ja")[0].signature
    assert "tok:char" in score(hyps, refs, ["bleu"], tgt_lang="ja", tokenize="char")[0].signature


def test_line_count_mismatch_names_both(files, tmp_path):
    short = tmp_path / "short.de"
    short.write_text("a\nb\n")
    result = invoke(["score", str(files["ref"]), "-i", str(short)])
    assert result.exit_code == 1
    assert result.stderr.strip() == f"mtkit: error: {short} has 2 lines but {files['ref']} has 300"
    with pytest.raises(MtkitError, match="has 1 lines but reference 1 has 2"):
        score(["a"], [["a", "b"]])


def test_sentencepiece_output_warns(tmp_path):
    ref = tmp_path / "ref"
    ref.write_text("ein Hund\n")
    result = invoke(["score", str(ref)], input="▁ein ▁Hund\n")
    assert result.exit_code == 0
    assert "looks SentencePiece-tokenized" in result.stderr
    assert looks_tokenized(["▁a"]) and not looks_tokenized(["a"])


def test_errors(files, tmp_path):
    assert invoke(["score", str(tmp_path / "missing")], input="a\n").stderr.startswith("mtkit: error: ")
    bad = invoke(["score", str(files["ref"]), "-i", str(files["hyp"]), "-m", "bleu,meteor"])
    assert bad.exit_code == 1 and "meteor" in bad.stderr
    broken = tmp_path / "broken.gz"
    broken.write_bytes(b"not gzip")
    assert invoke(["score", str(broken)], input="a\n").exit_code == 1


def test_paired_bootstrap(files):
    refs = [files["ref"].read_text().splitlines()]
    systems = [("a", files["hyp"].read_text().splitlines()), ("b", files["hyp2"].read_text().splitlines())]
    result = compare(systems, refs, metrics=["bleu", "chrf"], samples=100)
    assert set(result.rows) == {"BLEU", "chrF2"}
    assert "bs:100" in result.signatures["BLEU"] and "seed:12345" in result.signatures["BLEU"]
    (name_a, score_a, _, _, p_a), (name_b, _, mean_b, ci_b, p_b) = result.rows["BLEU"]
    assert (name_a, p_a) == ("a", None) and 0 <= p_b <= 1 and ci_b > 0
    assert score_a == pytest.approx(score(systems[0][1], refs, metrics=["bleu"])[0].score)
    cli = invoke(["score", str(files["ref"]), "-i", str(files["hyp"]), "--compare", str(files["hyp2"]), "-m", "bleu",
                  "--json"])
    assert cli.exit_code == 0, cli.output
    data = json.loads(cli.stdout)
    assert [s["system"] for s in data["BLEU"]["systems"]] == [str(files["hyp"]), str(files["hyp2"])]
