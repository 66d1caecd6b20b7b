"""Request bodies read and checked, and responses shaped like the request.

Bodies are parsed here, not by the framework, so that every error is ``{"error": "..."}``
with the status an operator of LibreTranslate expects (``HTTPError``).
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote_to_bytes

from mtkit.serve.languages import matches

if TYPE_CHECKING:
    from starlette.requests import Request

    from mtkit.sentences import Layout
    from mtkit.serve.app import Pair, ServeSettings
    from mtkit.translate import Translation


class HTTPError(Exception):
    """A request refused: answered with ``status``, ``{"error": message}`` and ``headers``."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.headers = headers or {}



def _body_limit(char_limit: int) -> int:
    # Every character may take 4 UTF-8 bytes, each escaped as %XX (form) or \uXXXX (JSON).
    return char_limit * 12 + 65536


# Digits of the longest integer a JSON body may hold: Python parses longer ones in quadratic
# time, and refuses (ValueError) those past sys.get_int_max_str_digits().
_MAX_INT_DIGITS = 100


async def read_fields(request: Request, settings: ServeSettings) -> dict[str, Any]:
    """The fields of a JSON, urlencoded or multipart body (a repeated form field becomes a
    list). HTTPError 400 for malformed bodies or invalid UTF-8, 408 for a body that took over
    ``settings.body_timeout`` to arrive, 413 for an oversized one, 415 for JSON sent without
    ``Content-Type: application/json`` (unless ``settings.json_content_type`` is off)."""
    limit = _body_limit(settings.char_limit)
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise HTTPError(413, f"request body over {limit} bytes")

    async def receive() -> bytes:
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise HTTPError(413, f"request body over {limit} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    # The deadline holds for the whole body, so that a client trickling a byte at a time
    # (slowloris) cannot hold a connection open for long.
    try:
        body = await asyncio.wait_for(receive(), settings.body_timeout)
    except asyncio.TimeoutError:
        raise HTTPError(408, f"the request body did not arrive within {settings.body_timeout:g} s",
                        {"Connection": "close"}) from None
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    try:
        if content_type == "application/x-www-form-urlencoded":
            return _group(_urlencoded(body))
        if content_type == "multipart/form-data":
            return _group(_multipart(body, request.headers.get("content-type", "")))
        if settings.json_content_type and content_type != "application/json":
            sent = f"Content-Type {content_type}" if content_type else "no Content-Type"
            raise HTTPError(415, f"a JSON body needs Content-Type: application/json (got {sent}); forms may be "
                                 "application/x-www-form-urlencoded or multipart/form-data")
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise HTTPError(400, "the body is not valid UTF-8") from None
    try:
        data = json.loads(text, parse_int=_json_int)
    except (json.JSONDecodeError, RecursionError) as err:
        message = err.msg if isinstance(err, json.JSONDecodeError) else "nested too deeply"
        raise HTTPError(400, f"malformed JSON: {message}") from None
    if not isinstance(data, dict):
        raise HTTPError(400, "malformed request: expected a JSON object")
    return data


def _json_int(text: str) -> int:
    digits = len(text.lstrip("-"))
    if digits > _MAX_INT_DIGITS:
        raise HTTPError(400, f"malformed JSON: an integer of {digits} digits (at most {_MAX_INT_DIGITS})")
    return int(text)


def _urlencoded(body: bytes) -> list[tuple[str, str]]:
    pairs = []
    for part in body.split(b"&"):
        if part:
            name, _, value = part.partition(b"=")
            pairs.append(tuple(unquote_to_bytes(x.replace(b"+", b" ")).decode("utf-8") for x in (name, value)))
    return pairs  # type: ignore[return-value]


def _multipart(body: bytes, content_type: str) -> list[tuple[str, str]]:
    import io

    from python_multipart import parse_form
    from python_multipart.exceptions import FormParserError

    pairs: list[tuple[str, str]] = []

    def on_field(f: Any) -> None:
        pairs.append((f.field_name.decode("utf-8"), (f.value or b"").decode("utf-8")))

    def on_file(f: Any) -> None:
        raise HTTPError(400, f"unexpected file in field {f.field_name.decode('utf-8', 'replace')!r}")

    headers = {"Content-Type": content_type.encode("latin-1"), "Content-Length": str(len(body)).encode()}
    try:
        parse_form(headers, io.BytesIO(body), on_field, on_file)
    except (FormParserError, ValueError) as err:
        if isinstance(err, UnicodeDecodeError):
            raise
        raise HTTPError(400, f"malformed multipart body: {err}") from None
    return pairs


def _group(pairs: Iterable[tuple[str, str]]) -> dict[str, Any]:
    fields: dict[str, Any] = {}
    for name, value in pairs:
        if name in fields:
            fields[name] = (fields[name] if isinstance(fields[name], list) else [fields[name]]) + [value]
        else:
            fields[name] = value
    return fields



def parse_request(fields: dict[str, Any], pairs: dict[tuple[str, str], Pair],
                  char_limit: int) -> tuple[list[str], Pair, int]:
    """The texts, the language pair and the hypotheses per sentence (1 + alternatives) of a
    ``/translate`` request; HTTPError 400 or 413 naming the problem."""
    for name in ("q", "source", "target"):
        if name not in fields:
            raise HTTPError(400, f"missing field: {name}")
    q = fields["q"]
    texts = q if isinstance(q, list) else [q]
    if not all(isinstance(t, str) for t in texts):
        raise HTTPError(400, "q: expected a string or a list of strings")
    source, target = fields["source"], fields["target"]
    if not isinstance(source, str) or not isinstance(target, str):
        raise HTTPError(400, "source and target: expected language codes")
    target = _served_code("target", target, {t for _, t in pairs}, pairs, f"{source}->{target}")
    if source == "auto":  # no language detection: fine when only one source translates into target
        sources = sorted({s for s, t in pairs if t == target})
        if len(sources) != 1:
            raise HTTPError(400, "source: auto works only when one source language translates into target; "
                                 "name the source language")
        source = sources[0]
    source = _served_code("source", source, {s for s, _ in pairs}, pairs, f"{source}->{fields['target']}")
    if (source, target) not in pairs:
        raise HTTPError(400, f"{source}->{target}: language pair not served (served: {_served(pairs)})")
    pair = pairs[(source, target)]
    text_format = fields.get("format", "text")
    if text_format == "html":
        raise HTTPError(400, "format: html is not supported; send plain text with format text")
    if text_format != "text":
        raise HTTPError(400, f"format: {text_format!r} is not a format; use text")
    alternatives = fields.get("alternatives", 0)
    if isinstance(alternatives, str) and re.fullmatch("[0-9]{1,9}", alternatives.strip()):
        alternatives = int(alternatives)
    if isinstance(alternatives, bool) or not isinstance(alternatives, int) or alternatives < 0:
        raise HTTPError(400, "alternatives: expected a whole number >= 0")
    if alternatives > pair.max_alternatives:
        decode = pair.engine.translator.decode
        why = (f"beam search with beam {decode.beam} finds {decode.beam} hypotheses" if not decode.sampling
               else "sampling draws at most 10 per sentence here")
        raise HTTPError(400, f"alternatives: at most {pair.max_alternatives} for {source}->{target} ({why})")
    for text in texts:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate escaped in JSON ("\ud800")
            raise HTTPError(400, "q: not valid Unicode (a lone surrogate)") from None
    chars = sum(len(t) for t in texts)
    if chars > char_limit:
        raise HTTPError(413, f"text of {chars} characters is over the limit of {char_limit}")
    return texts, pair, alternatives + 1


def _served_code(field: str, code: str, codes: set[str], pairs: dict[tuple[str, str], Pair], asked: str) -> str:
    """The served code that a client's ``code`` for ``field`` means (``de`` -> ``deu``, see
    ``mtkit.serve.languages.matches``); HTTPError 400 naming the field when none or several do."""
    found = matches(code, codes)
    if len(found) == 1:
        return found[0]
    if found:
        raise HTTPError(400, f"{field}: {code!r} may mean {', '.join(found)}; send one of them")
    way = "from" if field == "source" else "into"
    raise HTTPError(400, f"{field}: {code!r} is not a language this server translates {way}; "
                         f"{asked}: language pair not served (served: {_served(pairs)})")


def _served(pairs: dict[tuple[str, str], Pair]) -> str:
    """The pairs served, in a line (a multilingual model serves thousands: then counted)."""
    if len(pairs) > 12:
        return f"{len(pairs):,} pairs of {len({c for pair in pairs for c in pair})} languages: see GET /languages"
    return ", ".join(f"{s}->{t}" for s, t in pairs)


def build_response(q: Any, layouts: list[Layout], translations: list[Translation],
                   alternatives: int | None) -> dict[str, Any]:
    """``translatedText`` (and ``alternatives``, up to that many distinct other translations
    per text) shaped like ``q``; ``splitSentences``, where sentences were longer than the model
    accepts and translated in pieces, how many."""
    texts, alts = [], []
    position = 0
    for layout in layouts:
        mine = translations[position : position + len(layout.sentences)]
        position += len(layout.sentences)
        best = layout.join([t.text for t in mine])
        texts.append(best)
        if alternatives is not None:
            seen, others = {best}, []
            most = max((len(t.nbest) for t in mine), default=0)
            for k in range(1, most):
                candidate = layout.join([t.nbest[k][0] if k < len(t.nbest) else t.text for t in mine])
                if candidate not in seen:
                    seen.add(candidate)
                    others.append(candidate)
            alts.append(others[:alternatives])
    single = not isinstance(q, list)
    response: dict[str, Any] = {"translatedText": texts[0] if single else texts}
    if alternatives is not None:
        response["alternatives"] = alts[0] if single else alts
    split = sum(t.pieces > 1 for t in translations)
    if split:
        response["splitSentences"] = split
    return response
