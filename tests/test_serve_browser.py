"""The page at "/" in a real browser: ``mtkit serve`` runs as a real process on 127.0.0.1 with a
tiny random-weight model, and Playwright drives Debian's chromium through the page (typing,
the button, Ctrl+Enter, the over-limit error, the character count, copy, the keyboard, a
narrow screen). Screenshots are kept under each test's tmp_path.

Playwright's own browser download is not reachable here, so the system chromium is launched
with ``executable_path`` (.ci/run installs it with apt-get when missing). The tests skip only
when chromium or playwright is missing.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers.data import random_checkpoint

try:
    from playwright.sync_api import Browser, Page, expect, sync_playwright
except ImportError:  # pragma: no cover - depends on the environment
    pytest.skip("playwright is not installed (it is in the dev extra: pip install -e '.[dev]')",
                allow_module_level=True)

CHROMIUM = shutil.which("chromium") or next((p for p in ("/usr/bin/chromium",) if os.path.exists(p)), None)
if CHROMIUM is None:  # pragma: no cover - depends on the environment
    pytest.skip("Debian's chromium is missing (apt-get install chromium; .ci/run installs it)",
                allow_module_level=True)

CHAR_LIMIT = 200
SERVER_START_S = 120  # loading torch and the model on a busy 2-core machine
WAIT_MS = 30_000  # for a translation to show up in the page
TEXT = "kato rimu sena lopeshi"
API_KEY = "s3cret-key"

expect.set_options(timeout=WAIT_MS)


# --------------------------------------------------------------------------- the server


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


def _post(url: str, body: dict) -> tuple[int, Any]:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@contextlib.contextmanager
def _serve(base: Path, args: list[str]) -> Iterator[str]:
    """``mtkit serve ARGS`` on a free port of 127.0.0.1, run in ``base``; yields its base URL
    once /health says it is ready, and stops it with SIGTERM."""
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(base / "server.log", "w+", encoding="utf-8")  # noqa: SIM115 - closed below
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "mtkit", "serve", *args, "--host", "127.0.0.1", "--port", str(port)],
        cwd=base, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + SERVER_START_S
        while True:
            if proc.poll() is not None:
                log.seek(0)
                pytest.fail(f"mtkit serve exited with {proc.returncode}:\n{log.read()}")
            try:
                if _get(f"{url}/health")[0] == 200:
                    break
            except (OSError, ValueError):
                pass  # not listening (or not answering) yet
            if time.monotonic() > deadline:
                log.seek(0)
                pytest.fail(f"mtkit serve not ready after {SERVER_START_S} s:\n{log.read()}")
            time.sleep(0.2)
        yield url
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


@pytest.fixture(scope="module")
def models(trainkit_prepared, tmp_path_factory) -> dict[str, Path]:
    """Random tiny models (run directories) for the pairs "en-de" and "de-en"."""
    base = tmp_path_factory.mktemp("serve_browser_models")
    runs = {}
    for src, tgt in (("en", "de"), ("de", "en")):
        prepared = {**trainkit_prepared, "data": {**trainkit_prepared["data"], "src_lang": src, "tgt_lang": tgt}}
        runs[f"{src}-{tgt}"] = random_checkpoint(prepared, base / f"{src}-{tgt}")
    return runs


@pytest.fixture(scope="module")
def server(models, tmp_path_factory) -> Iterator[str]:
    """Both pairs and a small character limit."""
    with _serve(tmp_path_factory.mktemp("serve_browser"),
                ["-m", str(models["en-de"]), "-m", str(models["de-en"]), "--char-limit", str(CHAR_LIMIT)]) as url:
        yield url


@pytest.fixture(scope="module")
def keyed_server(models, tmp_path_factory) -> Iterator[str]:
    """en->de, and every request needs the API key ``API_KEY``."""
    base = tmp_path_factory.mktemp("serve_browser_keyed")
    (base / "keys.txt").write_text(f"# the browser test's key\n{API_KEY}\n", encoding="utf-8")
    with _serve(base, ["-m", str(models["en-de"]), "--api-keys", str(base / "keys.txt")]) as url:
        yield url


def _translate(server: str, text: str, source: str = "en", target: str = "de") -> tuple[int, Any]:
    """What the API itself answers for ``text`` (the page must show the same)."""
    return _post(f"{server}/translate", {"q": text, "source": source, "target": target})


# --------------------------------------------------------------------------- the browser


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    # Chromium's sandbox refuses to start as root (CI runs as root).
    args = ["--no-sandbox"] if os.geteuid() == 0 else []
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=args)
        yield b
        b.close()


def _open(browser: Browser, server: str, width: int = 1200, height: int = 800) -> Page:
    context = browser.new_context(viewport={"width": width, "height": height})
    context.grant_permissions(["clipboard-read", "clipboard-write"], origin=server)
    page = context.new_page()
    page.set_default_timeout(WAIT_MS)
    page.goto(server + "/")
    # The page is ready once it has filled the language pair from /frontend/settings.
    expect(page.locator("#source-lang option")).not_to_have_count(0)
    page.get_by_label("From").select_option("en")
    expect(page.get_by_label("To")).to_have_value("de")
    return page


@pytest.fixture
def page(browser: Browser, server: str) -> Iterator[Page]:
    p = _open(browser, server)
    yield p
    p.context.close()


def _translate_requests(page: Page) -> list[str]:
    """The bodies of the POST /translate requests that ``page`` sends from now on."""
    sent: list[str] = []
    page.on("request", lambda r: sent.append(r.post_data or "") if r.url.endswith("/translate") else None)
    return sent


# --------------------------------------------------------------------------- the tests


def test_the_page_is_served_and_offers_the_language_pairs(page: Page, server: str):
    expect(page).to_have_title(re.compile("mtkit"))
    expect(page.locator("#source-lang option")).to_have_text(["German", "English"])
    expect(page.locator("#target-lang option")).to_have_text(["German"])  # en's only target
    page.get_by_label("From").select_option("de")
    expect(page.locator("#target-lang option")).to_have_text(["English"])
    expect(page.locator("#count")).to_have_text(f"0 / {CHAR_LIMIT}")


def test_swap_turns_the_pair_and_the_translation_around(page: Page, server: str):
    page.get_by_label("Text").fill(TEXT)
    translation = _translate(server, TEXT)[1]["translatedText"]
    expect(page.get_by_label("Translation")).to_have_value(translation)
    page.get_by_role("button", name="Swap languages").click()
    expect(page.get_by_label("From")).to_have_value("de")
    expect(page.get_by_label("To")).to_have_value("en")
    expect(page.get_by_label("Text")).to_have_value(translation)
    back = _translate(server, translation, "de", "en")[1]["translatedText"]
    expect(page.get_by_label("Translation")).to_have_value(back)


def test_typing_translates_after_a_pause(page: Page, server: str, tmp_path: Path):
    sent = _translate_requests(page)
    page.get_by_label("Text").press_sequentially(TEXT, delay=20)
    status, body = _translate(server, TEXT)
    assert status == 200 and body["translatedText"]
    expect(page.get_by_label("Translation")).to_have_value(body["translatedText"])
    expect(page.locator("#count")).to_have_text(f"{len(TEXT)} / {CHAR_LIMIT}")
    expect(page.locator("[role=alert]")).to_have_text("")
    # Debounced: one request for the whole text, not one per key (a few if the machine stalls).
    queries = [json.loads(s)["q"] for s in sent]
    assert queries[-1] == TEXT and len(queries) <= 3, queries
    page.screenshot(path=tmp_path / "page.png", full_page=True)


def test_the_button_and_ctrl_enter_translate_at_once(page: Page, server: str):
    sent = _translate_requests(page)
    source, target = page.get_by_label("Text"), page.get_by_label("Translation")

    source.fill(TEXT)
    page.get_by_role("button", name="Translate").click()
    expect(target).to_have_value(_translate(server, TEXT)[1]["translatedText"])

    source.fill("rimu")
    source.press("Control+Enter")
    expect(target).to_have_value(_translate(server, "rimu")[1]["translatedText"])
    assert json.loads(sent[-1])["q"] == "rimu"
    before = len(sent)
    page.wait_for_timeout(800)  # past the debounce: the pause after typing sends nothing more
    assert len(sent) == before


def test_a_text_over_the_limit_shows_the_servers_error(page: Page, server: str, tmp_path: Path):
    source, target = page.get_by_label("Text"), page.get_by_label("Translation")
    source.fill(TEXT)
    expect(target).not_to_have_value("")

    long = "kato " * 50  # 250 characters
    status, body = _translate(server, long)
    assert status == 413 and body["error"]
    source.fill(long)
    expect(page.locator("#count")).to_have_text(re.compile(rf"^{len(long)} / {CHAR_LIMIT}\b"))
    expect(page.locator("#count")).to_have_class(re.compile(r"\bover\b"))
    alert = page.locator("[role=alert]")
    expect(alert).to_have_text(body["error"])
    expect(alert).to_be_visible()
    expect(target).to_have_value("")  # the old translation is not left standing beside the error
    page.screenshot(path=tmp_path / "page_error.png", full_page=True)

    source.fill(TEXT)  # back under the limit: the error goes away
    expect(alert).to_have_text("")
    expect(alert).to_be_hidden()
    expect(target).not_to_have_value("")


def test_copy_puts_the_translation_on_the_clipboard(page: Page, server: str):
    copy = page.get_by_role("button", name="Copy")
    expect(copy).to_be_disabled()
    page.get_by_label("Text").fill(TEXT)
    translation = _translate(server, TEXT)[1]["translatedText"]
    expect(page.get_by_label("Translation")).to_have_value(translation)
    copy.click()
    expect(page.get_by_role("button", name="Copied")).to_be_visible()
    assert page.evaluate("navigator.clipboard.readText()") == translation


def test_the_keyboard_reaches_every_control_in_order_with_a_visible_focus(page: Page, server: str):
    page.get_by_label("Text").fill(TEXT)
    expect(page.get_by_label("Translation")).not_to_have_value("")
    page.locator("h1").click()  # Tab now starts from the top of the page
    order = []
    for _ in range(8):
        page.keyboard.press("Tab")
        focused = page.evaluate("""() => {
            const e = document.activeElement, s = getComputedStyle(e);
            return [e.id, s.outlineStyle, s.outlineWidth];
        }""")
        order.append(focused[0])
        assert focused[1] != "none" and focused[2] != "0px", f"#{focused[0]} has no visible focus"
    assert order == ["source-lang", "swap", "target-lang", "source", "clear", "translate", "target", "copy"]


def test_a_narrow_screen_stacks_the_text_areas_without_horizontal_scroll(browser: Browser, server: str,
                                                                       tmp_path: Path):
    page = _open(browser, server, width=375, height=700)
    try:
        source, target = page.get_by_label("Text"), page.get_by_label("Translation")
        source.fill(TEXT)
        expect(target).not_to_have_value("")
        width = page.evaluate("[document.documentElement.scrollWidth, window.innerWidth]")
        assert width[0] <= width[1], f"horizontal scroll: content {width[0]}px in a {width[1]}px window"
        a, b = source.bounding_box(), target.bounding_box()
        assert a is not None and b is not None
        assert b["y"] >= a["y"] + a["height"], "the translation should sit below the text on a narrow screen"
        assert a["x"] >= 0 and a["x"] + a["width"] <= 375 and b["x"] + b["width"] <= 375
        page.screenshot(path=tmp_path / "page_narrow.png", full_page=True)
    finally:
        page.context.close()


def test_a_server_with_api_keys_asks_for_one(browser: Browser, keyed_server: str):
    page = _open(browser, keyed_server)
    try:
        key = page.get_by_label("API key")
        expect(key).to_be_visible()
        source, target = page.get_by_label("Text"), page.get_by_label("Translation")
        source.fill(TEXT)
        status, body = _post(f"{keyed_server}/translate", {"q": TEXT, "source": "en", "target": "de"})
        assert status == 403
        expect(page.get_by_role("alert")).to_have_text(body["error"])
        key.fill(API_KEY)  # a pause after typing the key translates again, now with it
        expect(target).not_to_have_value("")
        expect(page.locator("[role=alert]")).to_have_text("")
        page.reload()  # the key is remembered for the session
        expect(page.get_by_label("API key")).to_have_value(API_KEY)
    finally:
        page.context.close()
