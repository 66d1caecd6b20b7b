"""``mtkit compare``: hypothesis files and runs side by side, checked against sacrebleu itself."""

import copy
import json
import random
from pathlib import Path

import pytest
import yaml
from helpers.data import TRAINKIT_SECTIONS, tokdata_experiment, tokdata_pairs
from sacrebleu.metrics import BLEU, CHRF
from sacrebleu.significance import PairedTest
from typer.testing import CliRunner

from mtkit.cli import app


def invoke(*args: str):
    return CliRunner().invoke(app, ["compare", *args])


def write(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def degrade(lines: list[str], drop: float, seed: int) -> list[str]:
    """Each line with a share ``drop`` of its words left out: a worse system, reproducibly."""
    rng = random.Random(seed)
    return [" ".join(w for w in line.split() if rng.random() >= drop) for line in lines]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """Fixed test files: 80 synthetic pairs and three systems of different quality."""
    root = tmp_path_factory.mktemp("compare_files")
    pairs = tokdata_pairs(80, seed=5)
    refs = [t for _, t in pairs]
    return {
        "src": write(root / "dev.en", [s for s, _ in pairs]),
        "ref": write(root / "dev.de", refs),
        "good": write(root / "good.de", degrade(refs, 0.15, 1)),
        "worse": write(root / "worse.de", degrade(refs, 0.35, 2)),
        "close": write(root / "close.de", degrade(refs, 0.17, 3)),
    }


def as_json(*args: str) -> dict:
    result = invoke(*args, "--json")
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


# --------------------------------------------------------------------------- hypothesis files


@pytest.mark.parametrize("seed", [None, "7"])
def test_bootstrap_equals_sacrebleus_paired_bootstrap(files, monkeypatch, seed):
    if seed is not None:
        monkeypatch.setenv("SACREBLEU_SEED", seed)
    names = ["good", "worse", "close"]
    report = as_json(*[str(files[n]) for n in names], "--test", str(files["src"]), str(files["ref"]))

    refs = files["ref"].read_text().splitlines()
    systems = [(n, files[n].read_text().splitlines()) for n in names]
    signatures, expected = PairedTest(systems, {"BLEU": BLEU(), "chrF2": CHRF()}, [refs], test_type="bs",
                                      n_samples=1000)()
    assert report["bootstrap"] == {"samples": 1000, "seed": seed or "12345"}
    assert report["test_sets"][0]["bleu_signature"] == signatures["BLEU"].format()
    assert report["test_sets"][0]["chrf_signature"] == signatures["chrF2"].format()
    for system, bleu, chrf in zip(report["systems"], expected["BLEU"], expected["chrF2"], strict=True):
        got = system["tests"][0]
        assert (system["bleu"], system["chrf"]) == (round(bleu.score, 4), round(chrf.score, 4))
        # The report rounds to 4 decimals; sacrebleu's means and intervals are float32.
        for metric, result in (("bleu", bleu), ("chrf", chrf)):
            assert (got[f"{metric}_mean"], got[f"{metric}_ci"]) == (round(float(result.mean), 4),
                                                                    round(float(result.ci), 4))
        assert (system["p_value"], system["chrf_p_value"]) == (bleu.p_value, chrf.p_value)
    assert report["systems"][0]["p_value"] is None
    assert report["systems"][1]["p_value"] < 0.05  # far worse: a real difference


def test_length_ratio_and_bleu_by_length_equal_sacrebleu_on_each_bucket(files):
    report = as_json(str(files["good"]), str(files["worse"]), "--test", str(files["src"]), str(files["ref"]),
                     "--buckets", "6,9")
    sources, refs = files["src"].read_text().splitlines(), files["ref"].read_text().splitlines()
    buckets = report["test_sets"][0]["buckets"]
    assert [(b["label"], b["min_words"], b["max_words"]) for b in buckets] == [
        ("≤6", 0, 6), ("7–9", 7, 9), (">9", 10, None)]
    edges = [(0, 6), (7, 9), (10, 10**9)]
    rows = [[i for i, s in enumerate(sources) if low <= len(s.split()) <= high] for low, high in edges]
    assert [b["sentences"] for b in buckets] == [len(r) for r in rows] and all(rows)
    for name, system in zip(["good", "worse"], report["systems"], strict=True):
        hyps = files[name].read_text().splitlines()
        assert system["tests"][0]["length_ratio"] == round(BLEU().corpus_score(hyps, [refs]).ratio, 4)
        expected = [BLEU().corpus_score([hyps[i] for i in r], [[refs[i] for i in r]]).score for r in rows]
        assert system["tests"][0]["bleu_by_length"] == [round(b, 4) for b in expected]
        assert system["params"] is None and system["decode_sent_per_s"] is None and system["updates"] is None


def test_markdown_report_through_the_cli_and_written_atomically(files, tmp_path):
    args = [str(files["good"]), str(files["worse"]), "--test", str(files["src"]), str(files["ref"])]
    result = invoke(*args)
    assert result.exit_code == 0, result.stderr
    text = result.stdout
    assert f"{files['good']} (baseline)" in text
    assert "nrefs:1|bs:1000|seed:12345" in text and "BLEU by source length" in text
    assert "## Systems" not in text  # no run: no sizes or speeds to show
    tables = [line for line in text.splitlines() if line.startswith("|")]
    assert tables
    for line in tables:  # columns padded: every row of a table is as wide as its header
        assert len(line) in {len(t) for t in tables if t.count("|") == line.count("|")}

    out = tmp_path / "report.md"
    written = invoke(*args, "-o", str(out))
    assert written.exit_code == 0 and written.stdout == ""
    assert out.read_text() == text
    assert [p.name for p in tmp_path.iterdir()] == ["report.md"]  # no temporary left behind


def test_several_test_sets_map_hypothesis_files_by_name(files, tmp_path):
    for name in ("alpha", "beta"):
        write(tmp_path / f"{name}.en", files["src"].read_text().splitlines()[:40])
        write(tmp_path / f"{name}.de", files["ref"].read_text().splitlines()[:40])
        write(tmp_path / f"sys.{name}.de", files["good"].read_text().splitlines()[:40])
    tests = ["--test", str(tmp_path / "alpha.en"), str(tmp_path / "alpha.de"),
             "--test", str(tmp_path / "beta.en"), str(tmp_path / "beta.de")]
    report = as_json(str(tmp_path / "sys.{test}.de"), str(tmp_path / "{test}.de"), *tests)
    assert [t["name"] for t in report["test_sets"]] == ["alpha", "beta"]
    first = report["systems"][0]
    assert [t["test"] for t in first["tests"]] == ["alpha", "beta"]
    assert first["bleu"] == first["tests"][0]["bleu"]
    assert [t["bleu"] for t in report["systems"][1]["tests"]] == [100.0, 100.0]  # each set's own references

    one_file = invoke(str(files["good"]), str(tmp_path / "alpha.de"), *tests)
    assert one_file.exit_code != 0
    assert one_file.stderr.startswith(f"mtkit: error: {files['good']}: one hypothesis file for 2 test sets")


def error_of(*args: str) -> str:
    result = invoke(*args)
    assert result.exit_code != 0
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("mtkit: error: "), result.stderr
    return lines[0]


def test_bad_input_is_one_line_naming_the_file(files, tmp_path):
    test = ["--test", str(files["src"]), str(files["ref"])]
    missing = tmp_path / "missing.de"
    assert str(missing) in error_of(str(files["good"]), str(missing), *test)
    short = write(tmp_path / "short.de", ["a", "b"])
    assert f"{short} has 2 lines" in error_of(str(files["good"]), str(short), *test)
    not_a_run = tmp_path / "empty_dir"
    not_a_run.mkdir()
    assert f"{not_a_run}: no checkpoint found" in error_of(str(not_a_run), str(files["good"]), *test)
    assert f"{short} has 2 lines" in error_of(str(files["good"]), "--test", str(short), str(files["ref"]))
    assert "no --test" in error_of(str(files["good"]), str(files["worse"]))
    assert "--buckets" in error_of(str(files["good"]), *test, "--buckets", "20,10")


# --------------------------------------------------------------------------- runs


def pipeline_run(root: Path, **model) -> Path:
    """A tiny run through `mtkit pipeline` (8 updates, checkpoints at 4 and 8, a 20-pair test
    split, the same data whatever ``root``), with ``model`` settings over the tiny ones."""
    sections = copy.deepcopy(TRAINKIT_SECTIONS)
    sections["model"].update(model)
    config = tokdata_experiment(root, 300, **sections)
    result = CliRunner().invoke(app, ["pipeline", "-c", str(config)])
    assert result.exit_code == 0, result.stderr
    return root / "run"


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    return pipeline_run(tmp_path_factory.mktemp("compare_run"))


@pytest.fixture(scope="module")
def trained_decoder_only(tmp_path_factory) -> Path:
    """A prefix-LM decoder-only run with as many non-embedding parameters as ``trained``'s."""
    return pipeline_run(tmp_path_factory.mktemp("compare_decoder_only"), arch="decoder_only",
                        size="tiny_decoder_only", source_attention="bidirectional")


def test_runs_and_checkpoints_against_the_pipelines_own_scores(trained):
    hyps = trained / "translations" / "test.hyp.tgt"
    report = as_json(str(trained), str(trained / "checkpoints" / "step_00000004"), str(hyps),
                     "--speed-sentences", "8", "--samples", "100")
    pipeline = json.loads((trained / "report.json").read_text())
    assert report["test_sets"][0]["sentences"] == 20  # the runs' own test split, as the pipeline's
    run, early, file = report["systems"]
    # The run translates as `mtkit pipeline` did: same scores, and the pipeline's file is its output.
    assert (round(run["bleu"], 2), round(run["chrf"], 2)) == (pipeline["test"]["bleu"], pipeline["test"]["chrf"])
    assert file["tests"][0]["same_as_baseline"] and file["chrf"] == run["chrf"]
    assert run["checkpoint"].endswith("step_00000008")
    assert (run["updates"], early["updates"]) == (8, 4)
    assert run["params"]["total"] == pipeline["model"]["parameters"]
    assert run["params"]["embedding"] > 0 and run["params"]["other"] > 0
    for system in (run, early):
        assert system["train_seconds"] > 0 and system["train_tgt_tok_per_s"] > 0
        assert set(system["decode_sent_per_s"]) == {"batch_32", "batch_1"}
        assert min(system["decode_sent_per_s"].values()) > 0 and system["kv_cache_bytes_per_sentence"] > 0
    assert file["params"] is file["decode_sent_per_s"] is file["kv_cache_bytes_per_sentence"] is None
    assert report["speed"]["beam"] == 5
    assert (report["speed"]["batch_32_sentences"], report["speed"]["batch_1_sentences"]) == (8, 2)


def test_a_run_on_given_test_files_in_markdown(trained, tmp_path):
    config = yaml.safe_load((trained / "config.yaml").read_text())
    src, tgt = config["data"]["test"]["src"], config["data"]["test"]["tgt"]
    result = invoke(str(trained), "--test", src, tgt, "--speed-sentences", "4")
    assert result.exit_code == 0, result.stderr
    assert "## Systems" in result.stdout and "KV cache / sentence" in result.stdout
    assert "4 sentences of test" in result.stdout and "1 of them at batch 1" in result.stdout
    assert "translating test (20 sentences" in result.stderr


def test_an_averaged_checkpoint_has_no_training_record_and_no_test_split(trained, tmp_path):
    average = CliRunner().invoke(app, ["average", str(trained), "--last", "2", "-o", str(tmp_path / "avg")])
    assert average.exit_code == 0, average.stderr
    assert "no test split" in error_of(str(tmp_path / "avg"))
    config = yaml.safe_load((trained / "config.yaml").read_text())
    test = ["--test", config["data"]["test"]["src"], config["data"]["test"]["tgt"]]
    (system,) = as_json(str(tmp_path / "avg"), *test, "--speed-sentences", "0")["systems"]
    assert system["updates"] == 8 and system["params"]["total"] > 0
    assert system["train_seconds"] is system["train_tgt_tok_per_s"] is system["decode_sent_per_s"] is None
    assert system["p_value"] is None and system["tests"][0]["bleu_mean"] is None  # one system: no bootstrap


def test_an_encoder_decoder_against_a_decoder_only_run(trained, trained_decoder_only):
    report = as_json(str(trained), str(trained_decoder_only), "--speed-sentences", "8", "--samples", "100")
    assert report["test_sets"][0]["sentences"] == 20  # two runs prepared from the same test files
    for system, run in zip(report["systems"], (trained, trained_decoder_only), strict=True):
        pipeline = json.loads((run / "report.json").read_text())
        assert (round(system["bleu"], 2), round(system["chrf"], 2)) == (pipeline["test"]["bleu"],
                                                                        pipeline["test"]["chrf"])
        assert system["params"]["total"] == pipeline["model"]["parameters"]
        assert system["kv_cache_bytes_per_sentence"] > 0 and system["train_tgt_tok_per_s"] > 0
    encoder_decoder, decoder_only = (s["params"] for s in report["systems"])
    assert encoder_decoder["embedding"] == decoder_only["embedding"]  # the same vocabulary and width
    assert abs(decoder_only["other"] / encoder_decoder["other"] - 1) < 0.1  # the preset's matching
