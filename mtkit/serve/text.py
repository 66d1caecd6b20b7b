"""Text cut into sentences for translation, and the translations put back into its layout."""

from __future__ import annotations

import re
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
