"""TMX translation memories as training data (``format: tmx``): streamed, languages matched
case-insensitively (``en`` finds ``EN-US``), inline markup stripped, malformed XML a one-line
error naming the file and line; ``mtkit prepare`` reads one end to end."""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from xml.sax.saxutils import escape

import pytest
from helpers.cli import invoke
from helpers.data import tokdata_experiment, tokdata_pairs
from pydantic import ValidationError

from mtkit.config import CorpusConfig, load_config
from mtkit.corpus import read_corpus
from mtkit.errors import MtkitError

MEMORY = """<?xml version="1.0" encoding="UTF-8"?>
<!DOCTYPE tmx SYSTEM "tmx14.dtd">
<tmx version="1.4">
  <header creationtool="test" segtype="sentence" adminlang="en" srclang="EN-US" datatype="html" o-tmf="x"/>
  <body>
    <tu tuid="1">
      <tuv xml:lang="EN-US"><seg>A dog runs.</seg></tuv>
      <tuv xml:lang="de-DE"><seg>Ein Hund läuft.</seg></tuv>
    </tu>
    <tu tuid="2">
      <tuv xml:lang="en-US">
        <seg>A <bpt i="1">&lt;b&gt;</bpt>bold<ept i="1">&lt;/b&gt;</ept> cat<ph x="2">{1}</ph>.</seg>
      </tuv>
      <tuv xml:lang="DE"><seg>Eine <hi type="b">fette</hi> Katze.</seg></tuv>
    </tu>
    <tu tuid="3">
      <tuv xml:lang="en"><seg>Only English.</seg></tuv>
    </tu>
    <tu tuid="4">
      <tuv lang="EN"><seg>Old &amp; fine.</seg></tuv>
      <tuv lang="de"><seg>Alt &amp; gut.</seg></tuv>
    </tu>
  </body>
</tmx>
"""


def memory_file(path: Path, text: str = MEMORY) -> Path:
    if path.suffix == ".gz":
        path.write_bytes(gzip.compress(text.encode("utf-8")))
    else:
        path.write_text(text, encoding="utf-8")
    return path


def corpus(path: Path, **settings) -> CorpusConfig:
    return CorpusConfig(format="tmx", path=path, src_field="en", tgt_field="de", **settings)


@pytest.mark.parametrize("name", ["memory.tmx", "memory.tmx.gz"])
def test_pairs_languages_and_inline_markup(tmp_path, name):
    path = memory_file(tmp_path / name)
    src, tgt = (sum(side, []) for side in zip(*read_corpus(corpus(path), chunk_size=3), strict=True))
    assert src == ["A dog runs.", "A bold cat.", "Only English.", "Old & fine."]
    assert tgt == ["Ein Hund läuft.", "Eine fette Katze.", "", "Alt & gut."]  # no German: an empty pair
    chunks = list(read_corpus(corpus(path), chunk_size=3))
    assert [len(s) for s, _ in chunks] == [3, 1]
    reverse = CorpusConfig(format="tmx", path=path, src_field="DE-de", tgt_field="en-us", limit=2)
    assert list(read_corpus(reverse)) == [(["Ein Hund läuft.", "Eine fette Katze."], ["A dog runs.", "A bold cat."])]


def test_malformed_xml_is_one_line_naming_the_file_and_line(tmp_path):
    broken = MEMORY.replace("<seg>Only English.</seg>", "<seg>Only English.</sag>")
    path = memory_file(tmp_path / "broken.tmx", broken)
    line = broken.splitlines().index('      <tuv xml:lang="en"><seg>Only English.</sag></tuv>') + 1
    with pytest.raises(MtkitError, match=rf"^{path}:{line}: not valid TMX: mismatched tag$"):
        list(read_corpus(corpus(path)))
    path.write_bytes(MEMORY.encode().replace("läuft".encode(), b"l\xe4uft"))  # Latin-1 in a UTF-8 file
    with pytest.raises(MtkitError, match=rf"^{path}:8: not valid TMX: not well-formed \(invalid token\)$"):
        list(read_corpus(corpus(path)))


def test_a_tmx_corpus_names_its_languages():
    with pytest.raises(ValidationError, match="format 'tmx' needs path, src_field .* tgt_field"):
        CorpusConfig(format="tmx")


def test_prepare_reads_a_translation_memory_through_the_cli(tmp_path):
    units = "".join(f'<tu><tuv xml:lang="en"><seg>{escape(src)}</seg></tuv>'
                    f'<tuv xml:lang="de"><seg>{escape(tgt)}</seg></tuv></tu>\n' for src, tgt in tokdata_pairs(200))
    path = memory_file(tmp_path / "train.tmx.gz", f'<tmx version="1.4"><header/><body>\n{units}</body></tmx>\n')
    config = tokdata_experiment(tmp_path, data={"train": [{"format": "tmx", "path": str(path), "src_field": "en",
                                                           "tgt_field": "de"}]})
    for command in ("tokenizer", "prepare"):
        args = ["tokenizer", "train", "-c", str(config)] if command == "tokenizer" else ["prepare", "-c", str(config)]
        result = invoke(*args)
        assert result.exit_code == 0, result.stderr
    report = json.loads((load_config(config).experiment.dir / "data" / "report.json").read_text())
    assert report["splits"]["train"]["kept"] == 200
