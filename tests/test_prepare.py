"""``mtkit prepare``: readers, cleaning, filters, Arrow output, bad input and kill-safety."""

from __future__ import annotations

import gzip
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers.data import tokdata_pairs
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

import mtkit.data
from mtkit.cli import app
from mtkit.config import load_config
from mtkit.corpus import normalize
from mtkit.data import load_split, prepared_fingerprint
from mtkit.errors import MtkitError
from mtkit.tokenizer import Tokenizers

runner = CliRunner()
MULTI30K = Path(__file__).resolve().parents[2] / "shared" / "data" / "multi30k"


def _invoke(*args: str):
    return runner.invoke(app, list(args))


def _edit(config: Path, **sections) -> Path:
    data = yaml.safe_load(config.read_text())
    for section, values in sections.items():
        data[section].update(values)
    config.write_text(yaml.safe_dump(data))
    return config


@pytest.fixture
def trained(tokdata_experiment):
    """A config with 300 synthetic training pairs and its tokenizer trained."""
    config = tokdata_experiment()
    assert _invoke("tokenizer", "train", "-c", str(config)).exit_code == 0
    return config


def _fail(config: Path, *overrides: str) -> str:
    """Run prepare expecting a one-line user error; returns the message; checks nothing was written."""
    args = ["prepare", "-c", str(config)]
    for item in overrides:
        args += ["--set", item]
    result = runner.invoke(app, args)
    assert result.exit_code == 1, result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("mtkit: error: "), result.stderr
    run = config.parent / "run"
    assert not (run / "data").exists()
    assert not list(run.glob(".data.tmp-*"))
    return lines[0].removeprefix("mtkit: error: ")


def test_normalize():
    assert normalize(["  a\t\tb \x00c\u00a0d \r", "\ufeffx\u3000 y", "", " \t "]) == ["a b c d", "x y", "", ""]
    assert normalize(["a\nb", "\x85c\u2028"]) == ["a b", "c"]


_ODD = "ab  é\t\n\r\x00\x1f\x7f\x85\xa0\u2009\u2028\u3000\ufeff\U0001f600"
_SPACY = st.text(alphabet=st.sampled_from(list(_ODD)), max_size=10)


@settings(deadline=None, max_examples=300)
@given(st.lists(st.one_of(_SPACY, st.text(alphabet="abc d", max_size=10)), max_size=40))
def test_normalize_equals_the_line_by_line_definition(texts):
    # normalize reworks only the lines its scan of the whole chunk flags: never one too few.
    control = re.compile("[\x00-\x08\x0e-\x1b\x7f-\x84\x86-\x9f\ufeff]")
    assert normalize(texts) == [" ".join(control.sub("", text).split()) for text in texts]


@settings(deadline=None, max_examples=80)
@given(st.lists(st.text(alphabet=st.characters(codec="utf-8"), max_size=12), max_size=8))
def test_arrow_columns_match_pyarrow(texts):
    import numpy as np
    import pyarrow as pa

    clean = normalize(texts)
    assert all(t == " ".join(t.split()) for t in clean)
    assert mtkit.data._string_array(clean).equals(pa.array(clean, pa.string()))
    assert mtkit.data._string_array(texts).equals(pa.array(texts, pa.string()))  # newlines: the slow path
    seqs = [[ord(c) for c in t] for t in texts]
    lengths = np.array([len(x) for x in seqs], dtype=np.int32)
    assert mtkit.data._list_array(seqs, lengths).equals(pa.array(seqs, pa.list_(pa.int32())))


def test_prepare_writes_arrow_splits_and_report(trained):
    result = _invoke("prepare", "-c", str(trained), "--set", "data.chunk_size=7")
    assert result.exit_code == 0, result.output
    assert "train" in result.stderr and "tokenizer_fingerprint" in result.stderr
    run = trained.parent / "run"
    tok = Tokenizers.load(run / "tokenizer")
    report = json.loads((run / "data" / "report.json").read_text())
    assert (run / "data" / "report.txt").is_file()
    assert report["tokenizer_fingerprint"] == tok.fingerprint() == prepared_fingerprint(run)
    assert report["splits"]["train"]["read"] == 300
    for split, n in (("train", None), ("valid", 20), ("test", 20)):
        counts = report["splits"][split]
        assert counts["read"] == counts["kept"] + sum(counts["dropped"].values())
        ds = load_split(run, split)
        assert ds.column_names == ["src", "tgt", "src_ids", "tgt_ids", "src_len", "tgt_len"]
        assert str(ds.schema.field("src_ids").type.value_type) == "int32"
        assert str(ds.schema.field("src_len").type) == "int32"
        assert len(ds) == counts["kept"] and (n is None or len(ds) == n)
        rows = ds[:5]
        assert rows["src_ids"] == tok.src.encode(rows["src"])
        assert rows["tgt_len"] == [len(x) for x in rows["tgt_ids"]]
    assert load_split(run, "valid")["src"] == [p[0] for p in tokdata_pairs(20, 1)]


def test_splits_are_arrow_files_that_plain_pyarrow_maps(trained):
    import pyarrow as pa

    assert _invoke("prepare", "-c", str(trained), "--set", "data.chunk_size=40").exit_code == 0
    run = trained.parent / "run"
    data = run / "data"
    names = ["report.json", "report.txt", "test.arrow", "train.arrow", "valid.arrow"]
    assert sorted(p.name for p in data.iterdir()) == names
    assert json.loads((data / "report.json").read_text())["format"] == mtkit.data.FORMAT
    with pa.memory_map(str(data / "train.arrow")) as source:
        table = pa.ipc.open_file(source).read_all()
    assert table.schema.equals(mtkit.data.SCHEMA) and table.column("src").num_chunks > 1  # a batch per chunk
    train = load_split(run, "train")
    assert table.to_pydict() == train.to_dict()
    assert train.table.schema.equals(mtkit.data.SCHEMA) and train.column_names == table.column_names
    # Rows, slices and selections as Python objects.
    rows = train.to_dict()
    n = len(train)
    assert train[n - 1] == train[-1] == {k: v[-1] for k, v in rows.items()}
    assert train[3:7] == {k: v[3:7] for k, v in rows.items()}
    assert train[::50] == {k: v[::50] for k, v in rows.items()}
    assert train.select([5, 2])["src"] == [rows["src"][5], rows["src"][2]]
    with pytest.raises(IndexError):
        train[n]


def test_data_of_an_older_mtkit_is_refused_in_one_line(trained):
    # Before format 1 a split was a directory in the datasets.save_to_disk layout and report.json
    # had no format key.
    assert _invoke("prepare", "-c", str(trained)).exit_code == 0
    data = trained.parent / "run" / "data"
    for split in ("train", "valid", "test"):
        (data / split).mkdir()
        (data / f"{split}.arrow").rename(data / split / "data-00000-of-00001.arrow")
    report = json.loads((data / "report.json").read_text())
    del report["format"]
    (data / "report.json").write_text(json.dumps(report))
    message = "prepared by another version of mtkit (data format 0, this one reads 1); run `mtkit prepare"
    with pytest.raises(MtkitError, match=re.escape(message)):
        load_split(trained.parent / "run", "train")
    result = _invoke("train", "-c", str(trained))
    assert result.exit_code == 1 and result.stderr.splitlines() == [f"mtkit: error: {data}: {message} -c CONFIG` again"]
    assert _invoke("prepare", "-c", str(trained)).exit_code == 0
    assert len(load_split(trained.parent / "run", "valid")) == 20


def test_reading_prepared_data_does_not_import_datasets(trained):
    assert _invoke("prepare", "-c", str(trained)).exit_code == 0
    code = (
        "import sys; from mtkit.data import load_split; "
        f"assert len(load_split({str(trained.parent / 'run')!r}, 'train')) == 300; "
        "assert 'datasets' not in sys.modules, 'datasets imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def _formats(tmp: Path, pairs: list[tuple[str, str]]) -> dict[str, dict]:
    """The same corpus in every local format, as data.train entries."""
    (tmp / "c.src.gz").write_bytes(gzip.compress("".join(s + "\n" for s, _ in pairs).encode()))
    (tmp / "c.tgt").write_text("".join(t + "\n" for _, t in pairs))
    (tmp / "c.tsv").write_text("id\tde\ten\n" + "".join(f"{i}\t{t}\t{s}\n" for i, (s, t) in enumerate(pairs)))
    with gzip.open(tmp / "c.jsonl.gz", "wt") as f:
        for s, t in pairs:
            f.write(json.dumps({"translation": {"en": s, "de": t}, "id": 1}) + "\n")
    return {
        "text": {"src": str(tmp / "c.src.gz"), "tgt": str(tmp / "c.tgt")},
        "tsv_index": {"format": "tsv", "path": str(tmp / "c.tsv"), "src_field": "2", "tgt_field": "1", "header": True},
        "tsv_header": {
            "format": "tsv",
            "path": str(tmp / "c.tsv"),
            "src_field": "en",
            "tgt_field": "de",
            "header": True,
        },
        "jsonl": {
            "format": "jsonl",
            "path": str(tmp / "c.jsonl.gz"),
            "src_field": "translation.en",
            "tgt_field": "translation.de",
        },
        "hub": {
            "format": "hub",
            "name": "someone/corpus",
            "subset": "de-en",
            "split": "train",
            "src_field": "translation.en",
            "tgt_field": "translation.de",
        },
    }


def test_every_format_gives_the_same_data(trained, monkeypatch):
    import datasets

    pairs = tokdata_pairs(300)
    calls = []

    def fake_load_dataset(name, subset=None, split=None, streaming=False):
        calls.append((name, subset, split, streaming))
        return iter([{"translation": {"en": s, "de": t}} for s, t in pairs])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    run = trained.parent / "run"
    columns = None
    for kind, corpus in _formats(trained.parent, pairs).items():
        _edit(trained, data={"train": corpus})
        result = _invoke("prepare", "-c", str(trained))
        assert result.exit_code == 0, (kind, result.output)
        got = load_split(run, "train").to_dict()
        assert columns is None or got == columns, kind
        columns = got
    assert calls == [("someone/corpus", "de-en", "train", True)]


def test_hub_reads_a_local_dataset_directory(trained):
    # The real datasets.load_dataset(..., streaming=True) path, on a directory instead of a hub name.
    hub = trained.parent / "hubdata"
    hub.mkdir()
    pairs = tokdata_pairs(50)
    (hub / "train.jsonl").write_text("".join(json.dumps({"translation": {"en": s, "de": t}}) + "\n" for s, t in pairs))
    corpus = {"format": "hub", "name": str(hub), "src_field": "translation.en", "tgt_field": "translation.de"}
    _edit(trained, data={"train": corpus})
    result = _invoke("prepare", "-c", str(trained))
    assert result.exit_code == 0, result.output
    assert load_split(trained.parent / "run", "train")["src"] == [s for s, _ in pairs]


def test_filters_and_counts(tokdata_experiment):
    config = tokdata_experiment()
    pairs = tokdata_pairs(300)
    valid = tokdata_pairs(20, 1)
    long = " ".join(["kato rimu sena"] * 40)
    train = (
        pairs
        + [
            pairs[0],  # duplicate
            pairs[1],  # duplicate
            ("", "ka"),  # empty source
            ("  \t ", "ka"),  # empty after normalisation
            (valid[3][0], "x"),  # valid source
            (long, long),  # too long
            ("ka", long[:200]),  # ratio
        ]
    )
    (config.parent / "train.src").write_text("".join(s + "\n" for s, _ in train))
    (config.parent / "train.tgt").write_text("".join(t + "\n" for _, t in train))
    (config.parent / "valid.src").write_text("".join(s + "\n" for s, _ in valid[:10]) + "\n" + valid[10][0] + "\n")
    (config.parent / "valid.tgt").write_text("".join(t + "\n" for _, t in valid[:10]) + "\n" + "\n")
    assert _invoke("tokenizer", "train", "-c", str(config)).exit_code == 0
    result = _invoke(
        "prepare",
        "-c",
        str(config),
        "--set",
        "data.max_len=60",
        "--set",
        "data.remove_eval_overlap=true",
        "--set",
        "data.chunk_size=50",
    )
    assert result.exit_code == 0, result.output
    run = config.parent / "run"
    report = json.loads((run / "data" / "report.json").read_text())["splits"]
    assert report["train"]["read"] == 307 and report["train"]["kept"] == 300
    assert report["train"]["dropped"] == {
        "invalid_utf8": 0,
        "empty": 2,
        "duplicate": 2,
        "eval_overlap": 1,
        "too_short": 0,
        "too_long": 1,
        "ratio": 1,
    }
    # Valid is kept line for line, the empty line too.
    valid_ds = load_split(run, "valid")
    assert len(valid_ds) == 12 and valid_ds[10]["src"] == "" and valid_ds[10]["src_ids"] == []
    assert valid_ds[11]["tgt"] == ""

    result = _invoke("prepare", "-c", str(config), "--set", "data.min_len=1000")
    assert result.exit_code == 1 and "data.train: no pairs left (read 307; dropped" in result.stderr
    assert (run / "data").is_dir()  # the previous output is untouched


def test_dedup_off_keeps_duplicates(trained):
    (trained.parent / "train.src").write_text("ka to\n" * 5)
    (trained.parent / "train.tgt").write_text("to ka\n" * 5)
    assert _invoke("prepare", "-c", str(trained), "--set", "data.dedup=false").exit_code == 0
    assert len(load_split(trained.parent / "run", "train")) == 5
    assert _invoke("prepare", "-c", str(trained), "--set", "data.chunk_size=2").exit_code == 0
    assert len(load_split(trained.parent / "run", "train")) == 1


def test_invalid_utf8(trained):
    path = trained.parent / "train.tgt"
    lines = path.read_bytes().splitlines(keepends=True)
    lines[4] = b"caf\xe9\n"
    path.write_bytes(b"".join(lines))
    assert _fail(trained).startswith(f"{path}:5: not valid UTF-8")
    result = _invoke("prepare", "-c", str(trained), "--set", "data.invalid_utf8=skip")
    assert result.exit_code == 0
    report = json.loads((trained.parent / "run" / "data" / "report.json").read_text())
    assert report["splits"]["train"]["dropped"]["invalid_utf8"] == 1 and report["splits"]["train"]["kept"] == 299


def test_bad_input_is_a_one_line_error(trained):
    tmp = trained.parent
    good = {"src": str(tmp / "train.src"), "tgt": str(tmp / "train.tgt")}

    (tmp / "short.tgt").write_text("ka\nto\n")
    _edit(trained, data={"train": {**good, "tgt": str(tmp / "short.tgt")}})
    assert _fail(trained) == (
        f"{tmp / 'train.src'} has 300 lines but {tmp / 'short.tgt'} has 2; "
        "a parallel corpus needs the same number of lines on both sides"
    )

    _edit(trained, data={"train": {**good, "tgt": str(tmp / "missing.tgt")}})
    assert _fail(trained) == f"{tmp / 'missing.tgt'}: file not found"

    (tmp / "bad.gz").write_bytes(b"plain text, not gzip\n")
    _edit(trained, data={"train": {**good, "tgt": str(tmp / "bad.gz")}})
    assert "bad.gz: not a gzip file" in _fail(trained)
    (tmp / "cut.gz").write_bytes(gzip.compress(b"ka\n" * 1000)[:-30])
    _edit(trained, data={"train": {**good, "tgt": str(tmp / "cut.gz")}})
    assert "cut.gz: unreadable after line" in _fail(trained)

    (tmp / "bad.tsv").write_text("a\tb\nc\n")
    _edit(trained, data={"train": {"format": "tsv", "path": str(tmp / "bad.tsv"), "src_field": "0", "tgt_field": "1"}})
    assert _fail(trained) == f"{tmp / 'bad.tsv'}:2: 1 column(s), column 1 is missing"
    _edit(trained, data={"train": {"format": "tsv", "path": str(tmp / "bad.tsv")}})
    result = runner.invoke(app, ["prepare", "-c", str(trained)])  # a config error now, before anything is read
    assert result.exit_code == 2 and "data.train.0: format 'tsv' without a header needs 0-based column" in result.stderr

    (tmp / "bad.jsonl").write_text('{"src": "a", "tgt": "b"}\n{"src": "a"\n')
    _edit(trained, data={"train": {"format": "jsonl", "path": str(tmp / "bad.jsonl")}})
    assert _fail(trained).startswith(f"{tmp / 'bad.jsonl'}:2: not valid JSON")
    (tmp / "bad.jsonl").write_text('{"src": "a", "tgt": "b"}\n\n{"src": "a", "tgt2": "b"}\n')
    assert _fail(trained) == f"{tmp / 'bad.jsonl'}:3: no field 'tgt'"

    (tmp / "empty.src").write_text("")
    (tmp / "empty.tgt").write_text("")
    _edit(trained, data={"train": {"src": str(tmp / "empty.src"), "tgt": str(tmp / "empty.tgt")}})
    assert _fail(trained) == "data.train: no pairs left (read 0)"


def test_hub_errors_are_one_line(trained, monkeypatch):
    import datasets

    def broken(*args, **kwargs):
        raise ConnectionError("no internet\nsecond line")

    monkeypatch.setattr(datasets, "load_dataset", broken)
    _edit(trained, data={"train": {"format": "hub", "name": "wmt14", "subset": "de-en"}})
    assert _fail(trained) == "hub dataset wmt14/de-en [train]: cannot load: no internet second line"
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: iter([{"src": "a"}]))
    assert _fail(trained) == "hub dataset wmt14/de-en [train] record 1: no field 'tgt'"


def test_tokenizer_not_trained(tokdata_experiment):
    config = tokdata_experiment()
    assert _fail(config).endswith("tokenizer not trained; run `mtkit tokenizer train -c CONFIG` first")
    with pytest.raises(MtkitError, match="data not prepared"):
        load_split(config.parent / "run", "train")


def test_killed_prepare_leaves_no_data_and_rerun_works(trained, monkeypatch):
    run = trained.parent / "run"
    real_encode = mtkit.data._encode
    calls = []

    def dying_encode(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # as if killed mid-way through the training split
        return real_encode(*args, **kwargs)

    monkeypatch.setattr(mtkit.data, "_encode", dying_encode)
    result = _invoke("prepare", "-c", str(trained), "--set", "data.chunk_size=50")
    assert result.exit_code == 130 and len(calls) >= 3  # (encoding threads may have started the next)
    assert not (run / "data").exists() and not list(run.glob(".data.tmp-*"))

    # A hard kill leaves a hidden temporary directory behind; the next run removes it.
    (run / ".data.tmp-killed").mkdir()
    monkeypatch.setattr(mtkit.data, "_encode", real_encode)
    assert _invoke("prepare", "-c", str(trained)).exit_code == 0
    assert len(load_split(run, "train")) == 300
    assert not list(run.glob(".data.tmp-*"))


@pytest.mark.skipif(not (MULTI30K / "train.en.gz").exists(), reason="Multi30k not available")
def test_multi30k_first_2000(tmp_path):
    corpus = {"src": str(MULTI30K / "train.en.gz"), "tgt": str(MULTI30K / "train.de.gz"), "limit": 2000}
    config = tmp_path / "m.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "experiment": {"dir": str(tmp_path / "run")},
                "data": {
                    "src_lang": "en",
                    "tgt_lang": "de",
                    "train": corpus,
                    "valid": {"src": str(MULTI30K / "val.en.gz"), "tgt": str(MULTI30K / "val.de.gz")},
                },
                "tokenizer": {"vocab_size": 300, "joint": False, "type": "bpe"},
            }
        )
    )
    assert _invoke("tokenizer", "train", "-c", str(config)).exit_code == 0
    assert _invoke("prepare", "-c", str(config)).exit_code == 0
    cfg = load_config(config)
    train = load_split(cfg.experiment.dir, "train")
    assert 1990 <= len(train) <= 2000
    assert len(load_split(cfg.experiment.dir, "valid")) == 1014
    assert train[0]["src"] == "Two young, White males are outside near many bushes."
    assert max(train["src_len"]) <= cfg.data.max_len


def test_worker_processes_give_the_same_data(trained):
    run = trained.parent / "run"
    args = ["prepare", "-c", str(trained), "--set", "data.chunk_size=40", "--set", "data.max_len=12"]
    assert _invoke(*args).exit_code == 0
    single = {split: load_split(run, split).to_dict() for split in ("train", "valid", "test")}
    report = json.loads((run / "data" / "report.json").read_text())["splits"]
    assert report["train"]["dropped"]["too_long"] > 0
    result = _invoke(*args, "--set", "data.num_proc=2")
    assert result.exit_code == 0, result.output
    assert {split: load_split(run, split).to_dict() for split in single} == single
    assert json.loads((run / "data" / "report.json").read_text())["splits"] == report
