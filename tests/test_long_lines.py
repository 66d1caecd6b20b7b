"""Lines longer than the model accepts are never cut silently: ``mtkit translate`` (and the
server) split them at sentence boundaries (then between words, then inside a word), translate
the pieces and join them into one output line, and say so; ``--long-lines truncate`` cuts them
instead, and says that."""

from __future__ import annotations

import pytest
from helpers.cli import invoke
from test_backend import corpus, run_dir  # noqa: F401 (a fixture)

from mtkit.checkpoint import load_for_inference
from mtkit.engines import open_translator
from mtkit.sentences import fit_pieces, split_text
from mtkit.serve.request import build_response
from mtkit.translate import Translation

pytestmark = pytest.mark.usefixtures("one_thread")


def words(texts: list[str]) -> list[list[str]]:
    return [text.split() for text in texts]


def joined(ids: list[list[str]]) -> list[str]:
    return [" ".join(pieces) for pieces in ids]


@pytest.mark.parametrize("line", [
    "One two three. Four five six seven. Eight nine! Ten eleven twelve thirteen fourteen fifteen sixteen. End.",
    "  a b c d e f g h i j k l m n o p q r s t u v w x y z  ",
    "Short. " * 40,
])
def test_pieces_fit_keep_sentences_whole_and_rebuild_the_line(line):
    layout = fit_pieces(line, words, joined, 5)
    assert all(len(piece.split()) <= 5 for piece in layout.sentences)
    assert layout.join(layout.sentences) == line
    if line.startswith("One"):  # whole sentences where they fit, two to a piece where both fit
        assert layout.sentences[:2] == ["One two three.", "Four five six seven."]


def test_a_word_longer_than_the_limit_is_cut_into_runs_of_subwords():
    characters = lambda texts: [list(text) for text in texts]  # noqa: E731
    layout = fit_pieces("xy abcdefghij.", characters, lambda ids: ["".join(i) for i in ids], 4)
    assert all(len(piece) <= 4 for piece in layout.sentences)
    assert layout.join(layout.sentences) == "xy abcdefghij."
    assert layout.join(["<" + piece + ">" for piece in layout.sentences]) == "<xy> <abcd><efgh><ij.>"


def test_a_line_ten_times_the_limit_is_translated_whole_through_the_cli(run_dir, tmp_path):  # noqa: F811
    sentences = corpus(60, seed=7)
    long = ". ".join(sentences) + "."
    loaded = load_for_inference(run_dir)
    limit = loaded.model.max_source_length()
    assert len(loaded.tokenizers.src.encode([long])[0]) >= 10 * limit
    source = tmp_path / "in.txt"
    source.write_text(f"the cat\n{long}\n\nred house\n", encoding="utf-8")
    result = invoke("translate", "-m", str(run_dir), "-i", str(source), "--threads", "1", "--beam", "2")
    assert result.exit_code == 0, result.stderr
    out = result.stdout.split("\n")
    assert len(out) == 5 and out[2] == "" and out[4] == ""
    assert "line 2: " in result.stderr and "pieces cut at sentence boundaries" in result.stderr
    assert "mtkit: 1 line longer than the model accepts translated in pieces" in result.stderr
    # Its translation is its pieces' translations joined: as long as all of them together.
    translator = open_translator(loaded, loaded.config.decode.model_copy(update={"beam": 2, "backend": "torch"}))
    layout = fit_pieces(long, loaded.tokenizers.src.encode, loaded.tokenizers.src.decode, limit)
    assert len(layout.sentences) >= 10
    assert out[1] == layout.join(translator.translate(layout.sentences))
    truncated = invoke("translate", "-m", str(run_dir), "-i", str(source), "--threads", "1", "--beam", "2",
                       "--long-lines", "truncate")
    assert truncated.exit_code == 0 and len(truncated.stdout.split("\n")) == 5
    assert f"truncated to {limit} (decode.long_lines: truncate)" in truncated.stderr
    assert len(truncated.stdout.split("\n")[1]) < len(out[1]) / 3


def test_the_server_says_how_many_sentences_it_translated_in_pieces():
    layouts = [split_text("One. Two."), split_text("Three.")]
    translations = [Translation("Eins.", -1.0), Translation("Zwei.", -1.0, pieces=3), Translation("Drei.", -1.0)]
    response = build_response(["One. Two.", "Three."], layouts, translations, None)
    assert response == {"translatedText": ["Eins. Zwei.", "Drei."], "splitSentences": 1}
    plain = build_response("Three.", [layouts[1]], [translations[2]], None)
    assert plain == {"translatedText": "Drei."}
