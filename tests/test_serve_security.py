"""mtkit serve guarded like a public service, against the real command on 127.0.0.1: the Host
check (DNS rebinding), JSON bodies only with their content type, ``/info`` behind the API key,
keys compared in constant time, a deadline on slow bodies, a bound on open connections, and
huge integers. Requests go over raw sockets, so that they carry exactly what an attacker sends
(any Host, no Content-Type, a body a byte at a time); every wait is bounded.
"""

from __future__ import annotations

import contextlib
import hmac
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest
from helpers.data import random_checkpoint

from mtkit import serve

API_KEY = "s3cret"
TRANSLATE = {"q": "ka to ri", "source": "src", "target": "tgt", "api_key": API_KEY}


@pytest.fixture(scope="module")
def run_dir(trainkit_prepared, tmp_path_factory) -> Path:
    return random_checkpoint(trainkit_prepared, tmp_path_factory.mktemp("serve_security"))


@pytest.fixture(scope="module")
def keys_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("keys") / "keys.txt"
    path.write_text(f"{API_KEY}\nother-key\n")
    return path


@contextlib.contextmanager
def serving(run_dir: Path, *options: str) -> Iterator[int]:
    """``mtkit serve`` on a free 127.0.0.1 port with ``options``; yields the port once ready."""
    process = subprocess.Popen([sys.executable, "-m", "mtkit", "serve", "-m", str(run_dir), "--port", "0",
                                "--beam", "1", "--threads", "1", *options],
                               stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
                               env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        assert process.stderr is not None
        said = ""
        # Until the ready line (or the end of the output, if the server fails to start).
        while (line := process.stderr.readline()) and not line.startswith("mtkit: serving"):
            said += line
        match = re.fullmatch(r"mtkit: serving src->tgt on http://127\.0\.0\.1:(\d+)\n", line)
        assert match, said + line
        yield int(match.group(1))
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        if process.stderr is not None:
            process.stderr.close()


@pytest.fixture(scope="module")
def guarded(run_dir, keys_file) -> Iterator[int]:
    """A server with every guard at its default, and API keys on."""
    with serving(run_dir, "--api-keys", str(keys_file)) as port:
        yield port


@pytest.fixture(scope="module")
def switched(run_dir, keys_file) -> Iterator[int]:
    """A server with short limits, and the guards that can be relaxed relaxed."""
    with serving(run_dir, "--api-keys", str(keys_file), "--body-timeout", "1", "--max-connections", "3",
                 "--allowed-hosts", "mt.example.org, [::2]:8080", "--lenient-json", "--public-info") as port:
        yield port


def request(method: str, path: str, *, host: str | None = "127.0.0.1", body: bytes = b"",
            content_type: str | None = None, length: int | None = None, close: bool = True) -> bytes:
    """The bytes of an HTTP/1.1 request (HTTP/1.0 without ``host``, which 1.1 requires);
    ``length`` overrides the Content-Length; ``close`` asks the server to close after it."""
    version = "HTTP/1.1" if host is not None else "HTTP/1.0"
    lines = [f"{method} {path} {version}", f"Content-Length: {len(body) if length is None else length}"]
    lines += ["Connection: close"] if close else []
    lines += [f"Host: {host}"] if host is not None else []
    lines += [f"Content-Type: {content_type}"] if content_type is not None else []
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """Status, headers and body of the response, read until the server closes the connection
    (within the socket's timeout)."""
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    head, _, content = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in header_lines)
    return int(status_line.split()[1]), headers, content


def exchange(port: int, raw: bytes) -> tuple[int, Any]:
    """Send one raw request; the status and the JSON body (the text when not JSON)."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(raw)
        status, _, content = read_response(sock)
    try:
        return status, json.loads(content)
    except ValueError:
        return status, content.decode("utf-8", "replace")


def post_json(port: int, fields: dict[str, Any], content_type: str | None = "application/json",
              **options: Any) -> tuple[int, Any]:
    return exchange(port, request("POST", "/translate", body=json.dumps(fields).encode(),
                                  content_type=content_type, **options))


# --------------------------------------------------------------------------- Host


@pytest.mark.parametrize("host, allowed", [
    ("127.0.0.1:5000", True),
    ("127.9.9.9", True),
    ("LocalHost:5000", True),
    ("localhost.", True),
    ("app.localhost:5000", True),
    ("[::1]:5000", True),
    ("[0:0:0:0:0:0:0:1]", True),
    ("10.1.2.3:5000", True),  # the address the connection came in on (--host 0.0.0.0)
    (None, True),  # HTTP/1.0: no browser sends it
    ("10.1.2.4:5000", False),
    ("evil.example", False),
    ("evil.example:5000", False),
    ("localhost.evil.example", False),
    ("127.0.0.1.evil.example", False),
    ("", False),
])
def test_host_allowed_knows_localhost_names_and_the_connections_address(host, allowed):
    assert serve.host_allowed(host, "10.1.2.3", frozenset()) is allowed
    assert serve.host_allowed(host, "::ffff:10.1.2.3", frozenset()) is allowed  # --host :: over IPv4
    assert serve.host_allowed(host, "10.1.2.3", None) is True  # --allowed-hosts '*'


def test_allowed_hosts_option_is_parsed_into_bare_names():
    assert serve.parse_allowed_hosts("") == frozenset()
    assert serve.parse_allowed_hosts(" MT.example.org:443, [::2]:8080,,") == frozenset({"mt.example.org", "::2"})
    assert serve.parse_allowed_hosts("mt.example.org,*") is None


def test_a_request_naming_a_foreign_host_is_refused(guarded):
    for host in ("evil.example", "evil.example:80", "localhost.evil.example", "127.0.0.1.evil.example"):
        status, reply = exchange(guarded, request("GET", "/languages", host=host))
        assert status == 400, (host, reply)
        assert f"Host {host!r} is not served here" in reply["error"] and "--allowed-hosts" in reply["error"]
        status, reply = post_json(guarded, TRANSLATE, host=host)
        assert status == 400 and "DNS rebinding" in reply["error"]
    for host in (f"127.0.0.1:{guarded}", f"localhost:{guarded}", "LOCALHOST", "app.localhost", None):
        assert exchange(guarded, request("GET", "/languages", host=host))[0] == 200, host
    assert post_json(guarded, TRANSLATE, host=f"localhost:{guarded}")[0] == 200


def test_allowed_hosts_extends_the_names_served(switched):
    for host in ("mt.example.org", "MT.example.org:443", "[::2]:8080"):
        assert exchange(switched, request("GET", "/languages", host=host))[0] == 200, host
    assert exchange(switched, request("GET", "/languages", host="evil.example"))[0] == 400


# --------------------------------------------------------------------------- content types


def test_a_json_body_needs_the_json_content_type(guarded):
    for content_type in (None, "text/plain", "text/plain; charset=utf-8", "application/x-json"):
        status, reply = post_json(guarded, TRANSLATE, content_type=content_type)
        assert status == 415, (content_type, reply)
        assert "Content-Type: application/json" in reply["error"]
    assert post_json(guarded, TRANSLATE, content_type="Application/JSON; charset=utf-8")[0] == 200
    # Form bodies, as LibreTranslate's clients send them, are served as before.
    form = urlencode(TRANSLATE).encode()
    assert exchange(guarded, request("POST", "/translate", body=form,
                                     content_type="application/x-www-form-urlencoded"))[0] == 200
    multipart = "".join(f'--b\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'
                        for name, value in TRANSLATE.items()) + "--b--\r\n"
    assert exchange(guarded, request("POST", "/translate", body=multipart.encode(),
                                     content_type="multipart/form-data; boundary=b"))[0] == 200


def test_lenient_json_parses_a_body_of_any_other_type(switched):
    assert post_json(switched, TRANSLATE, content_type="text/plain")[0] == 200
    assert post_json(switched, TRANSLATE, content_type=None)[0] == 200


# --------------------------------------------------------------------------- API keys


def test_info_needs_the_api_key_when_keys_are_on(guarded):
    missing = exchange(guarded, request("GET", "/info"))
    wrong = exchange(guarded, request("GET", "/info?api_key=guess"))
    right = exchange(guarded, request("GET", f"/info?api_key={API_KEY}"))
    assert missing == (403, {"error": "missing api_key: this server's /info needs ?api_key=KEY"})
    assert wrong == (403, {"error": "invalid api_key"})
    assert right[0] == 200 and right[1]["key_required"] is True
    for path in ("/languages", "/frontend/settings", "/health"):  # the page reads these without a key
        assert exchange(guarded, request("GET", path))[0] == 200, path


def test_public_info_opens_info_again(switched):
    assert exchange(switched, request("GET", "/info"))[0] == 200
    assert post_json(switched, {**TRANSLATE, "api_key": "guess"})[0] == 403


def test_api_keys_are_compared_in_constant_time(monkeypatch, guarded):
    compared: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        compared.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    keys = frozenset({API_KEY, "other-key", "third"})
    for key in (API_KEY, API_KEY[:-1] + "x", "s", "\u043a\u043b\u044e\u0447", "\ud800"):
        compared.clear()
        if key == API_KEY:
            serve.check_key({"api_key": key}, keys)
        else:
            with pytest.raises(serve.HTTPError, match="invalid api_key"):
                serve.check_key({"api_key": key}, keys)
        # Every key compared, whatever matched, each as a digest of one length.
        assert len(compared) == len(keys), key
        assert {len(a) for pair in compared for a in pair} == {32}
    # Over the wire too: a key that is not ASCII is a 403, not a 500.
    not_ascii = post_json(guarded, {**TRANSLATE, "api_key": "\u043a\u043b\u044e\u0447"})
    assert not_ascii == (403, {"error": "invalid api_key"})


# --------------------------------------------------------------------------- slow clients and many


@pytest.mark.parametrize("pace", ["silent", "a byte at a time"])
def test_a_body_that_arrives_too_slowly_is_cut_off(switched, pace):
    head = request("POST", "/translate", content_type="application/json", length=200, close=False)
    answer = b""
    with socket.create_connection(("127.0.0.1", switched), timeout=0.2) as sock:
        sock.sendall(head + b"{")
        deadline = time.monotonic() + 20  # 200 bytes at this pace would take 40 s
        while not answer and time.monotonic() < deadline:
            if pace != "silent":
                with contextlib.suppress(OSError):  # the server may have closed already
                    sock.sendall(b" ")
            with contextlib.suppress(TimeoutError, socket.timeout):
                answer = sock.recv(65536)
        assert answer, "the server still waits for the body"
        sock.settimeout(10)
        with contextlib.suppress(ConnectionResetError):  # our unsent bytes may reset the closing socket
            while chunk := sock.recv(65536):  # and the server closes the connection
                answer += chunk
    head_text, _, content = answer.partition(b"\r\n\r\n")
    assert head_text.startswith(b"HTTP/1.1 408 ")
    assert json.loads(content) == {"error": "the request body did not arrive within 1 s"}
    assert post_json(switched, TRANSLATE)[0] == 200


def test_open_connections_are_bounded(switched):
    idle = [socket.create_connection(("127.0.0.1", switched), timeout=30) for _ in range(3)]
    try:
        deadline = time.monotonic() + 10
        while (status := exchange(switched, request("GET", "/health"))[0]) != 503 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert status == 503  # three connections open already: --max-connections 3
    finally:
        for sock in idle[1:]:
            sock.close()
    try:
        deadline = time.monotonic() + 10
        while (status := exchange(switched, request("GET", "/health"))[0]) != 200 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert status == 200  # room again once they close
    finally:
        idle[0].close()


# --------------------------------------------------------------------------- numbers


def test_an_integer_too_long_to_parse_is_a_400(guarded):
    for digits in (5000, 50_000, 4000, 200):  # past Python's limit on int(); under it
        status, reply = exchange(guarded, request(
            "POST", "/translate", content_type="application/json",
            body=json.dumps(TRANSLATE)[:-1].encode() + b', "alternatives": ' + b"9" * digits + b"}"))
        assert status == 400, (digits, reply)
        assert reply == {"error": f"malformed JSON: an integer of {digits} digits (at most 100)"}
    for alternatives in ("9" * 5000, "\u00b2", "\u0661"):  # too long; a digit int() refuses; an Arabic one
        form = urlencode({**TRANSLATE, "alternatives": alternatives}).encode()
        status, reply = exchange(guarded, request("POST", "/translate", body=form,
                                                  content_type="application/x-www-form-urlencoded"))
        assert (status, reply) == (400, {"error": "alternatives: expected a whole number >= 0"}), alternatives
