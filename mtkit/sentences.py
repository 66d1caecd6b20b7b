"""Text cut into sentences for translation, and the translations put back into its layout:
``split_text`` for a server's texts, ``fit_pieces`` for a line longer than a model accepts."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

# The line breaks str.splitlines() knows, CRLF as one.
_LINE_BREAK = re.compile("(\r\n|[\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029])")
# A sentence ends at . ! ? ... (with closing quotes or brackets) before whitespace, or at a
# CJK full stop (with closing quotes or brackets) before anything but another closer; the
# separator (whitespace, or none in Chinese and Japanese) is kept to rejoin the translations.
_CJK_CLOSERS = "\"'\u201d\u2019\u300d\u300f\uff09\u3011\u300b\u3009)\\]"  # quotes, brackets
_SENTENCE_END = re.compile(
    "[.!?\u2026]+[\"'\u201d\u2019\u00bb)\\]]*(?P<a>\\s+)(?=\\S)"  # Latin: . ! ? \u2026, then whitespace
    f"|[\u3002\uff01\uff1f]+[{_CJK_CLOSERS}]*(?P<b>\\s*)(?=[^\\s{_CJK_CLOSERS}])"  # CJK: \u3002 \uff01 \uff1f
)


@dataclass
class Layout:
    """A text cut into sentences: ``parts`` alternates literal text (line breaks, spaces)
    with slots (ints) indexing ``sentences``; ``join`` puts translations back in."""

    parts: list[str | int]
    sentences: list[str]

    def join(self, translations: list[str]) -> str:
        return "".join(translations[p] if isinstance(p, int) else p for p in self.parts)


def split_text(text: str) -> Layout:
    """Cut ``text`` into lines (keeping each break as it was) and each line into sentences;
    leading and trailing spaces of a line, and empty lines, stay as they are."""
    parts: list[str | int] = []
    sentences: list[str] = []
    for i, chunk in enumerate(_LINE_BREAK.split(text)):
        if i % 2:  # a line break
            parts.append(chunk)
            continue
        body = chunk.strip()
        if not body:
            parts.append(chunk)
            continue
        lead = chunk[: len(chunk) - len(chunk.lstrip())]
        parts.append(lead)
        start = 0
        for match in _SENTENCE_END.finditer(body):
            gap = "a" if match.group("a") is not None else "b"
            end = match.start(gap)
            if match.end() < len(body) and body[match.end()].islower():
                continue  # "e.g. this": not a new sentence
            parts += [len(sentences), body[end : match.end()]]
            sentences.append(body[start:end])
            start = match.end()
        parts.append(len(sentences))
        sentences.append(body[start:])
        parts.append(chunk[len(lead) + len(body) :])
    return Layout([p for p in parts if p != ""], sentences)


_SPACES = re.compile(r"(\s+)")


def fit_pieces(line: str, encode: Callable[[list[str]], list[list[int]]],
               decode: Callable[[list[list[int]]], list[str]], limit: int) -> Layout:
    """``line`` (one line of text) cut into pieces that each encode to at most ``limit``
    subwords, as a ``Layout`` whose ``join`` puts their translations back: at sentence
    boundaries (``split_text``), as many whole sentences in a piece as fit; a sentence longer
    alone between words, as many as fit; a word longer alone into runs of ``limit`` subwords
    (``encode``d once, ``decode``d back). What separates two pieces (spaces, or nothing) stays
    between their translations. Counts add up (SentencePiece encodes words apart); a piece whose
    joined text still encodes longer is cut back into its parts."""
    units = _units(line, encode, decode, limit)
    groups: list[list[tuple[str, int, str]]] = []  # pieces as (text, subwords, separator before)
    for text, count, gap in units:
        last = groups[-1] if groups else None
        if last is not None and gap is not None and sum(c for _, c, _ in last) + count <= limit:
            last.append((text, count, gap))
        else:
            groups.append([(text, count, gap or "")])
    joined = ["".join((g if i else "") + t for i, (t, _, g) in enumerate(group)) for group in groups]
    parts: list[str | int] = [_lead(line)]
    pieces: list[str] = []
    for group, text, count in zip(groups, joined, (len(ids) for ids in encode(joined)), strict=True):
        for i, (unit, _, gap) in enumerate(group if count > limit else [(text, 0, group[0][2])]):
            if pieces or i:
                parts.append(gap)
            parts.append(len(pieces))
            pieces.append(unit)
    parts.append(line[len(line.rstrip()) :])
    return Layout([p for p in parts if p != ""], pieces)


def _lead(line: str) -> str:
    return line[: len(line) - len(line.lstrip())]


def _units(line: str, encode: Callable[[list[str]], list[list[int]]],
           decode: Callable[[list[list[int]]], list[str]], limit: int) -> list[tuple[str, int, str | None]]:
    """``line``'s sentences, or the words of one too long, or runs of a word too long, each as
    ``(text, subwords, separator before it)``; the separator is None inside a word (runs of one
    word never join a neighbour's piece across a cut)."""
    layout = split_text(line.strip())
    sentences = layout.sentences
    counts = [len(ids) for ids in encode(sentences)]
    gaps, between = [], ""  # what comes before each sentence
    for part in layout.parts:
        if isinstance(part, int):
            gaps.append(between)
            between = ""
        else:
            between += part
    out: list[tuple[str, int, str | None]] = []
    for sentence, count, gap in zip(sentences, counts, gaps, strict=True):
        if count <= limit:
            out.append((sentence, count, gap))
            continue
        tokens = [t for t in _SPACES.split(sentence) if t]
        words = [t for t in tokens if not t.isspace()]
        word_counts = iter([len(ids) for ids in encode(words)])
        space = gap
        for token in tokens:
            if token.isspace():
                space = token
                continue
            word_count = next(word_counts)
            if word_count <= limit:
                out.append((token, word_count, space))
            else:
                ids = encode([token])[0]
                runs = decode([ids[i : i + limit] for i in range(0, len(ids), limit)])
                out += [(run, limit, space if i == 0 else None) for i, run in enumerate(runs)]
            space = " "
    return out
