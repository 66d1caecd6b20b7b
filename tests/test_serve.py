"""mtkit serve: the batching engine, the HTTP API (every status code) and the real command.

A random-weight tiny checkpoint translates nonsense, but deterministically: what matters here
is that the server returns what ``Translator`` returns offline, shaped like the request. A
``Gate`` holds the worker inside its first ``translate_lines`` call, so that queueing,
merging, timeouts and disconnects can be arranged exactly instead of raced.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from helpers.backends import make_translator
from helpers.data import random_checkpoint
from starlette.testclient import TestClient
from typer.testing import CliRunner

from mtkit.checkpoint import load_for_inference
from mtkit.cli import app as cli_app
from mtkit.errors import MtkitError
from mtkit.serve import Engine, Pair, ServeSettings, create_app, run_server, split_text
from mtkit.translate import Translator

TEXTS = ["ka to ri mu", "se na lo pe shi", "dra fen gul", "bor wix quo zat lem", "ka", "to ri"]


@pytest.fixture(scope="module")
def run_dir(trainkit_prepared, tmp_path_factory) -> Path:
    return random_checkpoint(trainkit_prepared, tmp_path_factory.mktemp("serve"))


@pytest.fixture(scope="module")
def loaded(run_dir):
    return load_for_inference(run_dir)


class Gate:
    """Holds the first ``translate_lines`` call until ``release`` (``started`` tells it began)."""

    def __init__(self) -> None:
        self.started = threading.Event()
        self.release = threading.Event()
        self.used = False


def translator(loaded, beam: int = 3, backend: str = "torch") -> Translator:
    decode = loaded.config.decode.model_copy(update={"beam": beam})
    return make_translator(loaded, backend, decode)


def make_app(loaded, *, beam: int = 3, gate: Gate | None = None, settings: ServeSettings | None = None,
             backend: str = "torch", **engine_options: Any) -> tuple[Any, Engine, list[list[str]]]:
    """An app over one spied engine; returns it, the engine and the lines of each
    ``translate_lines`` call."""
    spied = translator(loaded, beam, backend)
    calls: list[list[str]] = []
    original = spied.translate_lines

    def spy(lines, *args, **kwargs):
        calls.append(list(lines))
        if gate is not None and not gate.used:
            gate.used = True
            gate.started.set()
            assert gate.release.wait(20), "the test never released the gate"
        return original(lines, *args, **kwargs)

    spied.translate_lines = spy  # type: ignore[method-assign]
    engine = Engine(spied, **engine_options)
    app = create_app([Pair("src", "tgt", engine)], settings or ServeSettings())
    return app, engine, calls


def offline(loaded, texts: list[str], beam: int = 3, backend: str = "torch") -> list[str]:
    """What the server should answer for ``texts``: each split and translated by ``Translator``."""
    results = []
    for text in texts:
        layout = split_text(text)
        results.append(layout.join(translator(loaded, beam, backend).translate(layout.sentences)))
    return results


def body(q: Any = "ka to ri", **fields: Any) -> dict[str, Any]:
    return {"q": q, "source": "src", "target": "tgt", **fields}


def run_async(app, scenario: Callable[[httpx.AsyncClient], Awaitable[Any]]) -> Any:
    """Run ``scenario(client)`` against ``app`` inside its lifespan (engines closed after)."""

    async def main():
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
                return await scenario(client)

    return asyncio.run(main())


async def until(condition: Callable[[], bool], seconds: float = 10) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.005)


# --------------------------------------------------------------------------- text


@pytest.mark.parametrize("text, sentences", [
    ("", []),
    ("\n\n", []),
    ("Hello there.  How are you?", ["Hello there.", "How are you?"]),
    ("  one\r\ntwo\n\nthree  ", ["one", "two", "three"]),
    ("e.g. this is one. Two", ["e.g. this is one.", "Two"]),
    ('He said "stop." Then he left!', ['He said "stop."', "Then he left!"]),
    ("\u4f60\u597d\u3002\u518d\u89c1\uff01", ["\u4f60\u597d\u3002", "\u518d\u89c1\uff01"]),
    ("他说：\u201c好。\u201d再见。", ["他说：\u201c好。\u201d", "再见。"]),
    ("「はい。」次？ 終わり。", ["「はい。」", "次？", "終わり。"]),
    ("a\u2028b", ["a", "b"]),
    ("3.14 is pi", ["3.14 is pi"]),
])
def test_split_text_cuts_sentences_and_joins_back_exactly(text, sentences):
    layout = split_text(text)
    assert layout.sentences == sentences
    assert layout.join(layout.sentences) == text
    assert layout.join(["X"] * len(sentences)).count("X") == len(sentences)


def test_chinese_and_japanese_sentences_are_joined_as_they_stood(loaded, backend):
    # No space between CJK sentences unless the text had one; a closing quote stays with its sentence.
    app, _, calls = make_app(loaded, backend=backend)
    text = "你好。再见！他说：\u201c好。\u201d\n次？ 終わり。"
    sentences = ["你好。", "再见！", "他说：\u201c好。\u201d", "次？", "終わり。"]
    with TestClient(app) as client:
        response = client.post("/translate", json=body(text))
    assert calls == [sentences]
    one, two, three, four, five = translator(loaded, 3, backend).translate(sentences)
    assert response.json() == {"translatedText": f"{one}{two}{three}\n{four} {five}"}


# --------------------------------------------------------------------------- the API


def test_translate_json_form_and_multipart_agree_with_offline(loaded, backend):
    app, _, _ = make_app(loaded, backend=backend)
    expected = offline(loaded, ["ka to ri", "se na"], backend=backend)
    with TestClient(app) as client:
        as_json = client.post("/translate", json=body("ka to ri"))
        as_form = client.post("/translate", data=body("ka to ri"))
        as_multipart = client.post("/translate", data=body("ka to ri"), files={"unused": (None, "")})
        listed = client.post("/translate", json=body(["ka to ri", "se na"]))
        form_list = client.post("/translate", content=b"q=ka+to+ri&q=se%20na&source=src&target=tgt",
                                headers={"content-type": "application/x-www-form-urlencoded"})
    for response in (as_json, as_form, as_multipart):
        assert response.status_code == 200, response.text
        assert response.json() == {"translatedText": expected[0]}
    assert listed.json() == {"translatedText": expected}
    assert form_list.json() == {"translatedText": expected}


def test_a_sentence_longer_than_the_model_accepts_is_translated_in_pieces_and_counted(loaded):
    app, engine, calls = make_app(loaded)
    engine.translator.max_source = 6  # subwords the model accepts: a short model, for speed
    long, short = "ka to ri se na lo pe shi ka to ri se na lo pe", "ka to ri"
    reference = translator(loaded)
    reference.max_source = 6
    expected = reference.translate_lines([long, short])
    assert expected[0].pieces >= 3 and expected[1].pieces == 1
    with TestClient(app) as client:
        response = client.post("/translate", json=body([long, short]))
        plain = client.post("/translate", json=body(short))
    assert response.status_code == 200, response.text
    assert response.json() == {"translatedText": [expected[0].text, expected[1].text], "splitSentences": 1}
    assert plain.json() == {"translatedText": expected[1].text}


def test_multi_line_text_keeps_its_line_breaks_and_empty_text_stays_empty(loaded, backend):
    app, _, _ = make_app(loaded, backend=backend)
    text = "ka to ri. Se na lo!\n\n  dra fen\r\nbor wix\n"
    with TestClient(app) as client:
        response = client.post("/translate", json=body([text, "", " \n "]))
    assert response.status_code == 200
    got = response.json()["translatedText"]
    assert got == offline(loaded, [text, "", " \n "], backend=backend)
    assert re.sub(r"[^\r\n]", "", got[0]) == "\n\n\r\n\n"  # the same breaks, in order
    assert got[1:] == ["", " \n "]


def test_alternatives_are_other_hypotheses_shaped_like_q(loaded, backend):
    app, _, _ = make_app(loaded, beam=4, backend=backend)
    with TestClient(app) as client:
        one = client.post("/translate", json=body("ka to ri", alternatives=2)).json()
        many = client.post("/translate", json=body(["ka to ri", "se na"], alternatives="3")).json()
        none = client.post("/translate", json=body("ka to ri", alternatives=0)).json()
    assert one["translatedText"] == offline(loaded, ["ka to ri"], beam=4, backend=backend)[0]
    assert isinstance(one["alternatives"], list) and 1 <= len(one["alternatives"]) <= 2
    assert one["translatedText"] not in one["alternatives"]
    assert len(set(one["alternatives"])) == len(one["alternatives"])
    assert isinstance(many["translatedText"], list) and len(many["alternatives"]) == 2
    assert all(isinstance(alts, list) and len(alts) <= 3 for alts in many["alternatives"])
    assert "alternatives" not in none


MALFORMED: list[tuple[str, Any, str]] = [
    ("not JSON", b'{"q": "x"', "malformed JSON"),
    ("not an object", b'["x"]', "expected a JSON object"),
    ("missing q", {"source": "src", "target": "tgt"}, "missing field: q"),
    ("missing source", {"q": "x", "target": "tgt"}, "missing field: source"),
    ("missing target", {"q": "x", "source": "src"}, "missing field: target"),
    ("q not text", body(q=5), "q: expected a string"),
    ("q list of numbers", body(q=["a", 1]), "q: expected a string"),
    ("unknown source", body(source="xx"), "xx->tgt: language pair not served (served: src->tgt)"),
    ("unknown target", body(target="de"), "src->de: language pair not served"),
    ("invalid UTF-8", b'{"q": "\xff", "source": "src", "target": "tgt"}', "not valid UTF-8"),
    ("lone surrogate", b'{"q": "\\ud800", "source": "src", "target": "tgt"}', "lone surrogate"),
    ("html", body(format="html"), "html is not supported"),
    ("unknown format", body(format="xml"), "'xml' is not a format"),
    ("negative alternatives", body(alternatives=-1), "alternatives: expected a whole number"),
    ("text alternatives", body(alternatives="two"), "alternatives: expected a whole number"),
    ("boolean alternatives", body(alternatives=True), "alternatives: expected a whole number"),
    ("too many alternatives", body(alternatives=3), "alternatives: at most 2 for src->tgt"),
]


@pytest.mark.parametrize("payload, message", [(p, m) for _, p, m in MALFORMED], ids=[n for n, _, _ in MALFORMED])
def test_bad_requests_are_400_with_a_json_error(loaded, payload, message):
    app, _, calls = make_app(loaded)
    with TestClient(app) as client:
        if isinstance(payload, bytes):
            response = client.post("/translate", content=payload, headers={"content-type": "application/json"})
        else:
            response = client.post("/translate", json=payload)
    assert response.status_code == 400
    assert message in response.json()["error"]
    assert calls == []


def test_bad_form_bodies_are_400(loaded):
    app, _, _ = make_app(loaded)
    form = {"content-type": "application/x-www-form-urlencoded"}
    with TestClient(app) as client:
        bad_utf8 = client.post("/translate", content=b"q=%FF&source=src&target=tgt", headers=form)
        missing = client.post("/translate", content=b"source=src&target=tgt", headers=form)
        broken = client.post("/translate", content=b"--x\r\ngarbage", headers={"content-type": "multipart/form-data"})
        upload = client.post("/translate", data=body(), files={"q": ("a.txt", b"ka to")})
    assert (bad_utf8.status_code, bad_utf8.json()) == (400, {"error": "the body is not valid UTF-8"})
    assert (missing.status_code, missing.json()) == (400, {"error": "missing field: q"})
    assert broken.status_code == 400 and "multipart" in broken.json()["error"]
    assert upload.status_code == 400 and "unexpected file" in upload.json()["error"]


def test_source_auto_picks_the_only_source(loaded):
    app, _, _ = make_app(loaded)
    with TestClient(app) as client:
        response = client.post("/translate", json=body(source="auto"))
    assert response.status_code == 200


def test_char_limit_is_413(loaded):
    app, _, calls = make_app(loaded, settings=ServeSettings(char_limit=10))
    with TestClient(app) as client:
        at_limit = client.post("/translate", json=body("ka to ri m"))
        over = client.post("/translate", json=body("ka to ri mu"))
        over_in_sum = client.post("/translate", json=body(["ka to", "ri mu se"]))
        huge_body = client.post("/translate", json=body("x" * 1_000_000))
    assert at_limit.status_code == 200
    assert over.status_code == 413 and over.json() == {"error": "text of 11 characters is over the limit of 10"}
    assert over_in_sum.status_code == 413
    assert huge_body.status_code == 413 and "body over" in huge_body.json()["error"]
    assert len(calls) == 1


def test_api_keys_are_403_when_missing_or_wrong(loaded):
    app, _, _ = make_app(loaded, settings=ServeSettings(api_keys=frozenset({"s3cret"})))
    with TestClient(app) as client:
        missing = client.post("/translate", json=body())
        wrong = client.post("/translate", json=body(api_key="guess"))
        right = client.post("/translate", json=body(api_key="s3cret"))
        right_form = client.post("/translate", data=body(api_key="s3cret"))
        settings = client.get("/frontend/settings").json()
    assert (missing.status_code, wrong.status_code) == (403, 403)
    assert "api_key" in missing.json()["error"] and wrong.json() == {"error": "invalid api_key"}
    assert (right.status_code, right_form.status_code) == (200, 200)
    assert settings["keyRequired"] is True


def test_read_only_endpoints(loaded):
    app, _, _ = make_app(loaded, settings=ServeSettings(char_limit=123))
    with TestClient(app) as client:
        languages = client.get("/languages").json()
        settings = client.get("/frontend/settings").json()
        health = client.get("/health")
        client.post("/translate", json=body())
        info = client.get("/info").json()
        page = client.get("/")
        unknown = client.get("/nope")
        wrong_method = client.get("/translate")
    assert languages == [{"code": "src", "name": "src", "targets": ["tgt"]},
                         {"code": "tgt", "name": "tgt", "targets": []}]
    assert settings == {"charLimit": 123, "keyRequired": False, "languages": languages}
    assert (health.status_code, health.json()) == (200, {"status": "ok"})
    model = info["models"][0]
    assert info["mtkit_version"] and model["decode"]["beam"] == 3 and model["stats"]["requests"] == 1
    if (Path(__file__).parents[1] / "mtkit" / "web" / "index.html").exists():
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    else:
        assert page.status_code == 404 and "error" in page.json()
    assert unknown.status_code == 404 and unknown.json() == {"error": "Not Found"}
    assert wrong_method.status_code == 405 and "error" in wrong_method.json()


def test_health_is_503_before_start_and_after_shutdown(loaded):
    app, engine, _ = make_app(loaded)
    client = TestClient(app)  # no `with`: the app has not started
    assert client.get("/health").status_code == 503
    with TestClient(app) as started:
        assert started.get("/health").status_code == 200
    assert not engine.running
    after = client.get("/health")
    assert after.status_code == 503 and "error" in after.json()
    refused = client.post("/translate", json=body())
    assert refused.status_code == 503 and refused.headers["retry-after"] == "1"


def test_a_translation_error_is_500_json(loaded):
    app, engine, _ = make_app(loaded)

    def broken(lines, *args, **kwargs):
        raise RuntimeError("boom")

    engine.translator.translate_lines = broken  # type: ignore[method-assign]
    with TestClient(app, raise_server_exceptions=False) as client:
        response = client.post("/translate", json=body())
    assert response.status_code == 500 and response.json() == {"error": "internal error (RuntimeError)"}


# --------------------------------------------------------------------------- batching and its limits


def behind_a_held_request(app, engine, gate, first_text: str) -> tuple[Any, list[Any]]:
    """POST ``first_text``; while the worker holds it (``gate``), POST every text of TEXTS;
    release the worker once they all wait. Returns the first response and the others'."""

    async def scenario(client):
        first = asyncio.ensure_future(client.post("/translate", json=body(first_text)))
        await until(gate.started.is_set)
        others = [asyncio.ensure_future(client.post("/translate", json=body(text))) for text in TEXTS]
        await until(lambda: engine.pending == len(TEXTS))
        gate.release.set()
        return await first, await asyncio.gather(*others)

    return run_async(app, scenario)


def test_concurrent_requests_are_merged_into_one_batch(loaded):
    gate = Gate()
    app, engine, calls = make_app(loaded, gate=gate, max_wait=0.0)

    first, others = behind_a_held_request(app, engine, gate, "ka to ri")
    assert calls == [["ka to ri"], TEXTS]  # the first alone, then every waiting request in one call
    assert first.json()["translatedText"] == offline(loaded, ["ka to ri"])[0]
    assert [r.json()["translatedText"] for r in others] == offline(loaded, TEXTS)
    assert engine.stats.batches == 2 and engine.stats.largest_batch == len(TEXTS)


def test_max_wait_gathers_requests_that_arrive_together(loaded):
    app, engine, calls = make_app(loaded, max_wait=1.0)

    async def scenario(client):
        return await asyncio.gather(*(client.post("/translate", json=body(text)) for text in TEXTS))

    responses = run_async(app, scenario)
    assert [r.json()["translatedText"] for r in responses] == offline(loaded, TEXTS)
    assert len(calls) == 1 and sorted(calls[0]) == sorted(TEXTS)


def test_the_token_budget_splits_a_merged_batch(loaded):
    gate = Gate()
    app, engine, calls = make_app(loaded, gate=gate, max_wait=0.0, batch_tokens=12)

    _, responses = behind_a_held_request(app, engine, gate, "ka")
    assert [r.json()["translatedText"] for r in responses] == offline(loaded, TEXTS)
    merged = calls[1:]
    assert len(merged) > 1 and [line for call in merged for line in call] == TEXTS
    lengths = loaded.tokenizers.src.encode(TEXTS)
    budget = {text: len(ids) + 1 for text, ids in zip(TEXTS, lengths, strict=True)}
    assert all(len(call) == 1 or sum(budget[t] for t in call) <= 12 for call in merged)


def test_a_second_worker_translates_while_the_first_is_busy(loaded):
    gate = Gate()
    app, engine, calls = make_app(loaded, gate=gate, max_wait=0.0, batch_tokens=12, workers=2)

    async def scenario(client):
        first = asyncio.ensure_future(client.post("/translate", json=body("ka to ri")))
        await until(gate.started.is_set)
        # The first worker is held: the second alone answers these, one request split over calls too.
        others = await asyncio.gather(*(client.post("/translate", json=body(text)) for text in TEXTS),
                                      client.post("/translate", json=body("\n".join(TEXTS))))
        assert not first.done()
        gate.release.set()
        return await first, others

    first, others = run_async(app, scenario)
    assert first.json()["translatedText"] == offline(loaded, ["ka to ri"])[0]
    assert [r.json()["translatedText"] for r in others] == offline(loaded, TEXTS) + ["\n".join(offline(loaded, TEXTS))]
    assert calls[0] == ["ka to ri"] and len(calls) > 2


def test_without_batching_each_request_is_its_own_call(loaded):
    gate = Gate()
    app, engine, calls = make_app(loaded, gate=gate, batching=False)

    _, responses = behind_a_held_request(app, engine, gate, "ka to ri")
    assert calls == [["ka to ri"]] + [[text] for text in TEXTS]
    assert [r.json()["translatedText"] for r in responses] == offline(loaded, TEXTS)


def test_a_full_queue_is_503_with_retry_after(loaded):
    gate = Gate()
    app, engine, _ = make_app(loaded, gate=gate, queue_size=2, max_wait=0.0)

    async def scenario(client):
        first = asyncio.ensure_future(client.post("/translate", json=body("ka")))
        await until(gate.started.is_set)
        waiting = [asyncio.ensure_future(client.post("/translate", json=body(t))) for t in TEXTS[:2]]
        await until(lambda: engine.pending == 2)
        refused = await client.post("/translate", json=body("to"))
        gate.release.set()
        return refused, await first, await asyncio.gather(*waiting)

    refused, first, waiting = run_async(app, scenario)
    assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
    assert "queue is full" in refused.json()["error"]
    assert [r.status_code for r in [first, *waiting]] == [200, 200, 200]
    assert engine.stats.rejected == 1


def test_a_slow_request_is_504_and_its_unstarted_lines_are_dropped(loaded):
    gate = Gate()
    app, engine, calls = make_app(loaded, gate=gate, max_wait=0.0, settings=ServeSettings(timeout=0.3))

    async def scenario(client):
        started = asyncio.ensure_future(client.post("/translate", json=body("ka")))
        await until(gate.started.is_set)
        queued = await client.post("/translate", json=body("to ri. Mu se"))
        gate.release.set()
        after = await client.post("/translate", json=body("lo pe"))
        return await started, queued, after

    started, queued, after = run_async(app, scenario)
    assert (started.status_code, queued.status_code, after.status_code) == (504, 504, 200)
    assert queued.json() == {"error": "the translation took longer than 0.3 s"}
    assert calls == [["ka"], ["lo pe"]]  # the queued request's two sentences never ran
    assert engine.stats.dropped_sentences == 2 and engine.stats.timeouts == 2


def test_a_client_that_goes_away_costs_nothing_further(loaded):
    gate = Gate()
    app, engine, calls = make_app(loaded, gate=gate, max_wait=0.0)
    payload = json.dumps(body("to ri mu")).encode()

    async def scenario(client):
        first = asyncio.ensure_future(client.post("/translate", json=body("ka")))
        await until(gate.started.is_set)
        messages = [{"type": "http.request", "body": payload, "more_body": False}]
        gone = asyncio.Event()
        sent: list[dict] = []

        async def receive():
            if messages:
                return messages.pop(0)
            await gone.wait()
            return {"type": "http.disconnect"}

        async def send(message):
            sent.append(message)

        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
                 "scheme": "http", "path": "/translate", "raw_path": b"/translate", "query_string": b"",
                 "root_path": "", "headers": [(b"content-type", b"application/json")],
                 "client": ("127.0.0.1", 1), "server": ("test", 80)}
        request = asyncio.ensure_future(app(scope, receive, send))
        await until(lambda: engine.pending == 1)
        gone.set()
        await asyncio.wait_for(request, 5)
        assert engine.pending == 0
        gate.release.set()
        after = await client.post("/translate", json=body("lo pe"))
        return await first, after

    first, after = run_async(app, scenario)
    assert (first.status_code, after.status_code) == (200, 200)
    assert calls == [["ka"], ["lo pe"]]
    assert engine.stats.dropped_sentences == 1


# --------------------------------------------------------------------------- the command


def test_cli_errors_are_one_line(run_dir, tmp_path):
    runner = CliRunner()
    missing = runner.invoke(cli_app, ["serve", "-m", str(tmp_path / "nope"), "--port", "0"])
    assert missing.exit_code == 1 and "no such checkpoint or run directory" in missing.output
    no_keys = tmp_path / "keys.txt"
    no_keys.write_text("# nobody yet\n\n")
    empty = runner.invoke(cli_app, ["serve", "-m", str(run_dir), "--api-keys", str(no_keys)])
    unreadable = runner.invoke(cli_app, ["serve", "-m", str(run_dir), "--api-keys", str(tmp_path / "absent")])
    assert empty.exit_code == 1 and "no keys in the file" in empty.output
    assert unreadable.exit_code == 1 and "unreadable: No such file or directory" in unreadable.output
    twice = runner.invoke(cli_app, ["serve", "-m", str(run_dir), "-m", str(run_dir), "--port", "0"])
    assert twice.exit_code == 1 and "serve one model per pair" in twice.output
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = str(taken.getsockname()[1])
        clash = runner.invoke(cli_app, ["serve", "-m", str(run_dir), "--port", port])
    assert clash.exit_code == 1 and f"127.0.0.1:{port} is in use already" in clash.output
    for result in (missing, empty, unreadable, twice, clash):
        assert result.output.count("mtkit: error:") == 1


def test_a_port_in_use_is_reported_before_any_model_loads():
    loads: list[str] = []

    def load() -> list[Pair]:
        loads.append("load")
        return []

    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        with pytest.raises(MtkitError, match=f"--port {port}: 127.0.0.1:{port} is in use already"):
            run_server(load, ServeSettings(), host="127.0.0.1", port=port)
    assert loads == []


def post(port: int, payload: dict[str, Any], timeout: float = 30) -> tuple[int, Any]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/translate", data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


@pytest.mark.slow
def test_serve_end_to_end_and_sigterm_finishes_requests_in_flight(run_dir, loaded, backend):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen([sys.executable, "-m", "mtkit", "serve", "-m", str(run_dir), "--port", "0",
                                "--beam", "2", "--threads", "1", "--max-wait-ms", "500", "--set",
                                f"decode.backend={backend}"],
                               stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env)
    try:
        assert process.stderr is not None
        ready = process.stderr.readline()  # blocks until the ready line (or the process ends)
        match = re.fullmatch(r"mtkit: serving src->tgt on http://127\.0\.0\.1:(\d+)\n", ready)
        assert match, ready
        port = int(match.group(1))
        expected = offline(loaded, ["ka to ri"], beam=2, backend=backend)[0]
        assert post(port, body("ka to ri")) == (200, {"translatedText": expected})

        # A client that connects, sends half a request and hangs up breaks nothing.
        with socket.create_connection(("127.0.0.1", port)) as rude:
            rude.sendall(b"POST /translate HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"q\":")
        assert post(port, body("se na"))[0] == 200

        # A long request in flight when SIGTERM arrives (waiting 0.5 s for others to join its
        # batch) still gets its answer.
        long_text = " ".join(TEXTS * 40)[:4900]
        answer: dict[str, Any] = {}
        client = threading.Thread(target=lambda: answer.update(result=post(port, body(long_text))))
        client.start()
        time.sleep(0.2)
        process.send_signal(signal.SIGTERM)
        client.join(60)
        assert process.wait(60) == 0
        status, reply = answer["result"]
        assert status == 200 and reply["translatedText"]
        rest = process.stderr.read()
        assert "mtkit: stopped" in rest and "Traceback" not in rest
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        if process.stderr is not None:
            process.stderr.close()
