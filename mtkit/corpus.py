"""Parallel corpora as text: read them (plain or gzip text pairs, TSV, JSONL, TMX, hub datasets) and
normalise their whitespace. No tokenizer, no Arrow; ``mtkit.data`` encodes and stores.

Every reader yields raw pairs ``chunk_size`` at a time, so memory is bounded by a chunk
whatever the corpus size. Bad input raises a one-line MtkitError naming the file and line (or
the hub dataset and record). ``datasets`` is imported only when a hub corpus is read.

Whitespace normalisation (applied to every side of every split, and to tokenizer training
text): control characters other than whitespace are removed (C0, DEL, C1, and the byte-order
mark U+FEFF); every run of whitespace (spaces, tabs, Unicode spaces such as U+00A0 and U+3000,
line and paragraph separators) becomes one ASCII space; the ends are stripped. A tab inside a
sentence is therefore a space: tabs only ever separate columns (TSV).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Iterator
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np

from mtkit.config import CorpusConfig, DataConfig, is_column_index
from mtkit.errors import MtkitError
from mtkit.fileio import open_binary, read_line_chunks, read_lines

if TYPE_CHECKING:  # the tokenizer module imports sentencepiece, which reading text does not need
    from mtkit.tokenizer import Side

Chunk = tuple[list[Any], list[Any]]
"""Source and target sentences of up to ``chunk_size`` pairs; None marks a line that is not
UTF-8 (under ``invalid_utf8=skip``)."""


def corpus_files(corpora: Iterable[CorpusConfig | None]) -> list[Path]:
    """The local files the given corpora read (none for a hub corpus)."""
    files: list[Path] = []
    for corpus in corpora:
        if corpus is not None:
            files.extend(p for p in (corpus.src, corpus.tgt, corpus.path) if p is not None)
    return files


def input_problems(data: DataConfig) -> list[str]:
    """What a valid config's corpora would fail on once read, one line each naming the key: no
    training corpus, a local file that is missing, a TSV header without a named column. Hub
    corpora are not opened (that needs the network)."""
    problems = [] if data.train else ["data.train: no training corpora: tokenizer training and prepare need one"]
    named = [(f"data.train.{i}", corpus) for i, corpus in enumerate(data.train)]
    for split in ("valid", "test"):
        sets = data.eval_sets(split)
        named += [(f"data.{split}" + (f".{i}" if len(sets) > 1 else ""), corpus) for i, corpus in enumerate(sets)]
    for key, corpus in named:
        for field in ("src", "tgt", "path"):
            path = getattr(corpus, field)
            if path is not None and not path.is_file():
                problems.append(f"{key}.{field}: {path}: {'not a regular file' if path.exists() else 'no such file'}")
        if corpus.format == "tsv" and corpus.header and corpus.path is not None and corpus.path.is_file():
            problems += _header_problems(key, corpus, corpus.path)
    return problems


def _header_problems(key: str, corpus: CorpusConfig, path: Path) -> list[str]:
    try:
        first = next(read_lines(path), None)
    except MtkitError as err:
        return [f"{key}.path: {err}"]
    if first is None:
        return [f"{key}.path: {path}: empty, but header is true"]
    names = first.split("\t")
    return [f"{key}.{field}: no column named '{spec}' in the header of {path} ({', '.join(names)})"
            for field, spec in (("src_field", corpus.src_field), ("tgt_field", corpus.tgt_field))
            if not is_column_index(spec) and spec not in names]


# --------------------------------------------------------------------------- normalisation

_CONTROL = re.compile("[\x00-\x08\x0e-\x1b\x7f-\x84\x86-\x9f\ufeff]")
"""Control characters that str.split() does not already treat as whitespace."""
_WIDE_SPACES = np.array([0x1680, *range(0x2000, 0x200B), 0x2028, 0x2029, 0x202F, 0x205F, 0x3000, 0xFEFF], np.uint32)
"""Code points above U+00FF that normalisation removes or turns into a space."""


def normalize(texts: list[str]) -> list[str]:
    """Remove control characters, collapse whitespace runs to one space, strip (see module doc)."""
    # Most lines need nothing: find the few that do in one scan of the joined chunk, then
    # rework those only (far cheaper than splitting and joining every line).
    joined = "\n".join(texts)
    lines = _lines_to_normalize(texts, joined) if joined.count("\n") == len(texts) - 1 else range(len(texts))
    if not lines:
        return texts
    out = list(texts)
    for i in lines:
        text = _CONTROL.sub("", texts[i]) if _CONTROL.search(texts[i]) else texts[i]
        out[i] = " ".join(text.split())
    return out


def _lines_to_normalize(texts: list[str], joined: str) -> Iterable[int]:
    """Numbers of the ``texts`` (no newline inside, joined by newlines in ``joined``) that
    normalisation changes, found by array operations on the code points (a regex holds the
    GIL through its scan, and ran several times slower); all of them when many change."""
    codes = np.frombuffer(joined.encode("utf-32-le", "surrogatepass"), np.uint32)
    newline, space = codes == 10, codes == 32
    # Control characters and whitespace other than the space: below U+0020 (but the newline),
    # U+007F-U+00A0 (DEL, C1, NEL, no-break space), and the few wider ones.
    odd = ((codes < 32) & ~newline) | ((codes >= 0x7F) & (codes <= 0xA0))
    wide = np.flatnonzero(codes > 0xFF)
    odd[wide[np.isin(codes[wide], _WIDE_SPACES)]] = True
    # A space next to a space, a newline or an end of the chunk.
    edge = space | newline
    odd[1:] |= space[1:] & edge[:-1]
    odd[:-1] |= space[:-1] & edge[1:]
    if len(codes):
        odd[0] |= space[0]
        odd[-1] |= space[-1]
    at = np.flatnonzero(odd)
    if len(at) > len(texts) // 8:
        return range(len(texts))
    return np.unique(np.searchsorted(np.flatnonzero(newline), at)).tolist()  # newlines before each


def utf8_pairs(src: list[str | None], tgt: list[str | None]) -> tuple[list[str], list[str]]:
    """The pairs of a chunk whose both sides are UTF-8 (see ``invalid_utf8=skip``)."""
    if None not in src and None not in tgt:
        return cast(list[str], src), cast(list[str], tgt)
    pairs = [(s, t) for s, t in zip(src, tgt, strict=True) if s is not None and t is not None]
    return [s for s, _ in pairs], [t for _, t in pairs]


def training_text(data: DataConfig, sides: tuple[Side, ...]) -> Iterator[str]:
    """Normalised, non-empty sentences of ``sides`` of the training corpora, for tokenizer
    training: the same readers and normalisation as ``mtkit.data.prepare``."""
    if not data.train:
        raise MtkitError("data.train: no training corpora configured")
    for corpus in data.train:
        for raw_src, raw_tgt in read_corpus(corpus, data.invalid_utf8, data.chunk_size):
            src, tgt = utf8_pairs(raw_src, raw_tgt)
            for side, texts in (("src", src), ("tgt", tgt)):
                if side in sides:
                    yield from filter(None, normalize(texts))


# --------------------------------------------------------------------------- readers


def read_corpus(corpus: CorpusConfig, invalid_utf8: str = "error", chunk_size: int = 10_000) -> Iterator[Chunk]:
    """Raw (not yet normalised) pairs of one corpus, ``chunk_size`` at a time, at most
    ``corpus.limit`` in all. Bad input raises MtkitError naming the file and line."""
    chunks = _READERS[corpus.format](corpus, invalid_utf8, chunk_size)
    if corpus.limit is None:
        yield from chunks
        return
    left = corpus.limit
    for src, tgt in chunks:
        if len(src) >= left:
            yield src[:left], tgt[:left]
            return
        left -= len(src)
        yield src, tgt


def _read_text(corpus: CorpusConfig, invalid_utf8: str, chunk_size: int) -> Iterator[Chunk]:
    assert corpus.src is not None and corpus.tgt is not None
    src_chunks = read_line_chunks(corpus.src, chunk_size, invalid_utf8)
    tgt_chunks = read_line_chunks(corpus.tgt, chunk_size, invalid_utf8)
    done = 0
    while True:
        src, tgt = next(src_chunks, []), next(tgt_chunks, [])
        if len(src) != len(tgt):
            src_total = done + len(src) + sum(map(len, src_chunks))
            tgt_total = done + len(tgt) + sum(map(len, tgt_chunks))
            raise MtkitError(
                f"{corpus.src} has {src_total} lines but {corpus.tgt} has {tgt_total}; "
                "a parallel corpus needs the same number of lines on both sides"
            )
        if not src:
            return
        done += len(src)
        yield src, tgt


def _read_tsv(corpus: CorpusConfig, invalid_utf8: str, chunk_size: int) -> Iterator[Chunk]:
    assert corpus.path is not None
    path = corpus.path
    lines = read_lines(path, invalid_utf8)
    number = 0
    names: list[str] = []
    if corpus.header:
        first = next(lines, None)
        number = 1
        if first is None:
            raise MtkitError(f"{path}:1: header line missing or not UTF-8")
        names = first.split("\t")
    columns = [_tsv_column(path, spec, names, corpus.header) for spec in (corpus.src_field, corpus.tgt_field)]
    (src_col, src_name), (tgt_col, tgt_name) = columns
    width = max(src_col, tgt_col) + 1

    def pair(line: str, number: int) -> tuple[str, str]:
        cells = line.split("\t")
        if len(cells) < width:
            name = src_name if len(cells) <= src_col else tgt_name
            raise MtkitError(f"{path}:{number}: {len(cells)} column(s), column {name} is missing")
        return cells[src_col], cells[tgt_col]

    return _records(lines, number, chunk_size, pair)


def _tsv_column(path: Path, spec: str, names: list[str], header: bool) -> tuple[int, str]:
    """(0-based index, description) of a TSV column given by index or header name."""
    if is_column_index(spec):
        return int(spec), spec
    if not header:
        raise MtkitError(
            f"{path}: column '{spec}' is not a 0-based index and the corpus has no header "
            "(set header: true or give a column number)"
        )
    if spec not in names:
        raise MtkitError(f"{path}:1: no column named '{spec}' in the header ({', '.join(names)})")
    return names.index(spec), f"'{spec}'"


def _read_jsonl(corpus: CorpusConfig, invalid_utf8: str, chunk_size: int) -> Iterator[Chunk]:
    assert corpus.path is not None
    path = corpus.path
    src_path, tgt_path = corpus.src_field.split("."), corpus.tgt_field.split(".")

    def pair(line: str, number: int) -> tuple[str, str] | None:
        if not line.strip():  # a blank line holds no record
            return None
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise MtkitError(f"{path}:{number}: not valid JSON ({err.msg})") from None
        return _field(record, src_path, f"{path}:{number}"), _field(record, tgt_path, f"{path}:{number}")

    return _records(read_lines(path, invalid_utf8), 0, chunk_size, pair)


def _records(
    lines: Iterator[str | None], number: int, chunk_size: int, pair: Callable[[str, int], tuple[str, str] | None]
) -> Iterator[Chunk]:
    """Chunks of the pairs in a file of one record a line (TSV, JSONL). ``pair(line, number)``
    gives a line's pair, or None for a line that holds none; ``number`` is the line number
    before ``lines``' first. A line that is not UTF-8 (None) keeps its place as ``(None, None)``."""
    while block := list(islice(lines, chunk_size)):
        src: list[str | None] = []
        tgt: list[str | None] = []
        for line in block:
            number += 1
            found = (None, None) if line is None else pair(line, number)
            if found is not None:
                src.append(found[0])
                tgt.append(found[1])
        yield src, tgt


def _field(record: Any, keys: list[str], where: str) -> str:
    """``record["a"]["b"]`` for the dotted field ``a.b``; MtkitError naming ``where`` if absent."""
    value = record
    for key in keys:
        if not isinstance(value, dict) or key not in value:
            raise MtkitError(f"{where}: no field '{'.'.join(keys)}'")
        value = value[key]
    if not isinstance(value, str):
        raise MtkitError(f"{where}: field '{'.'.join(keys)}' is {type(value).__name__}, expected a string")
    return value


_TMX_CODES = {"bpt", "ept", "ph", "it", "ut"}
"""TMX inline elements that hold the original format's codes (``<b>``, ``{1}``...), not text."""
_XML_LANG = "{http://www.w3.org/XML/1998/namespace}lang"


def _read_tmx(corpus: CorpusConfig, invalid_utf8: str, chunk_size: int) -> Iterator[Chunk]:
    """The pairs of a TMX file, streamed (each ``<tu>`` freed once read): per translation unit,
    the ``<seg>`` of the ``<tuv>`` whose ``xml:lang`` (TMX 1.1: ``lang``) is ``src_field`` and
    of the one that is ``tgt_field``, matched case-insensitively, ``en`` also finding ``en-US``
    or ``en_GB`` where no exact one is there. Inline markup is stripped: the codes in ``<bpt>``,
    ``<ept>``, ``<ph>``, ``<it>`` and ``<ut>`` go, the text in ``<hi>`` and ``<sub>`` stays. A
    unit without one of the languages gives an empty pair (``prepare`` drops and counts it).
    Malformed XML (invalid UTF-8 included) is a one-line error naming the file and line."""
    import xml.etree.ElementTree as ElementTree

    assert corpus.path is not None
    path = corpus.path
    languages = corpus.src_field.lower(), corpus.tgt_field.lower()
    src: list[Any] = []
    tgt: list[Any] = []
    with open_binary(path) as handle:
        parent = None
        try:
            for event, element in ElementTree.iterparse(handle, events=("start", "end")):
                tag = element.tag.rsplit("}", 1)[-1]
                if event == "start":
                    if tag == "body":
                        parent = element
                    continue
                if tag != "tu":
                    continue
                segments: dict[str, str] = {}
                for variant in element:
                    lang = variant.get(_XML_LANG) or variant.get("lang")
                    seg = next((child for child in variant if child.tag.rsplit("}", 1)[-1] == "seg"), None)
                    if lang and seg is not None:
                        segments.setdefault(lang.lower(), _segment_text(seg))
                src.append(_language(segments, languages[0]))
                tgt.append(_language(segments, languages[1]))
                if parent is not None:
                    parent.clear()  # the units read so far: memory stays flat
                if len(src) == chunk_size:
                    yield src, tgt
                    src, tgt = [], []
        except ElementTree.ParseError as err:
            line = err.position[0]
            reason = str(err).split(":")[0]
            raise MtkitError(f"{path}:{line}: not valid TMX: {reason}") from None
    if src:
        yield src, tgt


def _segment_text(element: Any) -> str:
    """The text of a ``<seg>`` (or of an inline element in it), inline codes left out."""
    parts = [element.text or ""]
    for child in element:
        if child.tag.rsplit("}", 1)[-1] not in _TMX_CODES:
            parts.append(_segment_text(child))
        parts.append(child.tail or "")
    return "".join(parts)


def _language(segments: dict[str, str], lang: str) -> str:
    """The segment in ``lang`` (lower case): exact, else the first of the same primary language
    (``en`` finds ``en-us``, ``en-us`` finds ``en``); '' where there is none."""
    if lang in segments:
        return segments[lang]
    primary = re.split("[-_]", lang)[0]
    return next((text for code, text in segments.items() if re.split("[-_]", code)[0] == primary), "")


def _read_hub(corpus: CorpusConfig, invalid_utf8: str, chunk_size: int) -> Iterator[Chunk]:
    import datasets  # takes a second to import; only hub corpora need it

    name = f"hub dataset {corpus.name}" + (f"/{corpus.subset}" if corpus.subset else "") + f" [{corpus.split}]"
    src_path, tgt_path = corpus.src_field.split("."), corpus.tgt_field.split(".")
    # The hub client raises many exception types (network, missing dataset or split, script
    # errors); for the user each is one line about this corpus.
    try:
        records = iter(datasets.load_dataset(corpus.name, corpus.subset, split=corpus.split, streaming=True))
    except Exception as err:
        raise MtkitError(f"{name}: cannot load: {_one_line(err)}") from None
    number = 0
    while True:
        try:
            block = list(islice(records, chunk_size))
        except Exception as err:
            raise MtkitError(f"{name}: read failed after record {number}: {_one_line(err)}") from None
        if not block:
            return
        src, tgt = [], []
        for record in block:
            number += 1
            src.append(_field(record, src_path, f"{name} record {number}"))
            tgt.append(_field(record, tgt_path, f"{name} record {number}"))
        yield src, tgt


_READERS: dict[str, Callable[[CorpusConfig, str, int], Iterator[Chunk]]] = {
    "text": _read_text,
    "tsv": _read_tsv,
    "jsonl": _read_jsonl,
    "tmx": _read_tmx,
    "hub": _read_hub,
}


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return (text[:300] + "...") if len(text) > 300 else (text or type(err).__name__)
